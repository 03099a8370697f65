"""Spatial parallelism of the global CNN (``stages.global.parallel: spatial``): each process holds a slab of every
image and every process trains the same, whole network; together they compute what one process computes.

The images are split along tensor dim 2 (H of 2D images, D of volumes) into ``P`` equal slabs, rank ``r`` holding
rows ``[r L, (r + 1) L)``. :class:`SpatialCNN` runs the layers of a built-in VGG or ResNet global CNN on a slab:

* a convolution with kernel ``k``, stride ``s`` and padding ``p`` first takes ``p`` rows from the rank above and
  ``k - s - p`` from the rank below (:func:`ddcnn.train.parallel.halo.halo`), then convolves without padding along the
  split axis (the halo at the true image border is the zero padding); the other axes keep their padding;
* strides and max pooling keep the slabs aligned when ``L`` is a multiple of the network's downsampling
  (:func:`slab_rows` refuses other sizes);
* BatchNorm normalises with the mean and variance over the whole batch and image (two all-reduces; the variance
  from the centred values, as one process computes it); ``torch.nn.SyncBatchNorm`` refuses CPU tensors;
* the head sums its slab's features, all-reduces the sums (every process then holds the same pooled features,
  logits and loss) and applies the classifier;
* the gradients of the parameters used on every slab (convolutions, BatchNorm) are summed over the processes in
  the backward pass; the classifier's is already whole on every process.

The parameters are replicated: the checkpoint is the plain global CNN's, the same for any ``P`` and for data
parallelism. :class:`SpatialParallel` is the global stage's way that uses it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ddcnn.errors import ConfigError
from ddcnn.models.backbones import DEFAULT_DEPTH, Backbone, BasicBlock, Head
from ddcnn.models.settings import spatial_backbone_error
from ddcnn.train.dist import DistEnv
from ddcnn.train.engine.loop import ModelState
from ddcnn.train.parallel.base import Parallelism, batch_part
from ddcnn.train.parallel.halo import CommMeter, halo, replicated_sum, slab_sum, sum_gradients
from ddcnn.train.parallel.sync import ReplicatedSync

AXIS = {2: "H", 3: "D"}


def downsampling(depth: Sequence[int]) -> int:
    """How much a built-in backbone shrinks each axis: every stage after the first halves it."""
    return 2 ** (len(depth) - 1)


def slab_rows(image_size: Sequence[int], world: int, depth: Sequence[int], backbone: str) -> list[range]:
    """The rows of tensor dim 2 that each of ``world`` processes holds; a ConfigError names the sizes that work
    when the slabs would not stay aligned through every downsampling."""
    length, factor = image_size[0], downsampling(depth)
    unit = world * factor
    if length % unit:
        axis = AXIS.get(len(image_size), "dim 2")
        below, above = length // unit * unit, (length // unit + 1) * unit
        sizes = " or ".join(str(n) for n in (below, above) if n > 0)
        processes = [p for p in range(2, min(length // factor, 64) + 1) if length % (p * factor) == 0]
        fix = f"; or start {', '.join(map(str, processes[:4]))} processes" if processes else ""
        raise ConfigError(
            f"stages.global.parallel = spatial splits the {list(image_size)} images along {axis} ({length}) over "
            f"{world} processes, and the {backbone} backbone with {len(depth)} stages halves {axis} "
            f"{len(depth) - 1} time(s): {axis} must be a multiple of {world} x {factor} = {unit}; use "
            f"data.image_size with {axis} = {sizes}{fix}")
    step = length // world
    return [range(r * step, (r + 1) * step) for r in range(world)]


class SpatialCNN(nn.Module):
    """This process's part of a built-in global CNN: ``(B, C, *image_size)`` whole images, or this process's slab
    ``(B, C, L, ...)`` of them, -> ``(B, K)`` logits, the same on every process. All processes call it together.

    ``cnn`` is a :class:`~ddcnn.models.GlobalCNN` of a built-in family (its parameters are this module's);
    ``meter`` counts the bytes sent.
    """

    spans_processes = True  # scored by all processes together

    def __init__(self, cnn: nn.Module, env: DistEnv, image_size: Sequence[int], meter: CommMeter | None = None):
        super().__init__()
        net = getattr(cnn, "net", None)
        if not isinstance(net, Backbone) or net.groups != 1:
            raise spatial_backbone_error(getattr(cnn, "backbone", type(cnn).__name__))
        self.cnn = cnn
        self.rank, self.world, self.meter = env.rank, env.world, meter
        self.image_length = image_size[0]
        self.slabs = slab_rows(image_size, env.world, net.depth, net.name)
        self.rows = self.slabs[env.rank]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[2] == self.image_length and len(self.rows) != self.image_length:
            images = images.narrow(2, self.rows.start, len(self.rows))
        return self._run(cast(nn.Module, self.cnn.net), images)

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(module, Head):
            return self._head(module, x)
        if isinstance(module, BasicBlock):
            return F.relu(self._run(module.body, x) + self._run(module.shortcut, x))
        if isinstance(module, nn.Sequential):  # the backbone, its stages, ConvBNReLU
            for child in module:
                x = self._run(child, x)
            return x
        if isinstance(module, nn.Conv2d | nn.Conv3d):
            return self._conv(module, x)
        if isinstance(module, nn.BatchNorm2d | nn.BatchNorm3d):
            return self._batch_norm(module, x)
        if isinstance(module, nn.ReLU):
            return F.relu(x)
        if isinstance(module, nn.MaxPool2d | nn.MaxPool3d | nn.Identity):  # pooling windows never cross slabs
            return module(x)
        raise ConfigError(f"stages.global.parallel = spatial cannot split a {type(module).__name__} layer; use "
                          f"stages.global.parallel: data")

    def _conv(self, conv: nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
        # The built-ins pad with numbers, never "same" (a string): slab_rows relies on it.
        k, s, p = conv.kernel_size[0], conv.stride[0], int(conv.padding[0])
        length = x.shape[2]
        x = halo(x, p, max(0, k - s - p), self.rank, self.world, self.meter)
        weight = sum_gradients(conv.weight, self.world, self.meter)
        bias = None if conv.bias is None else sum_gradients(conv.bias, self.world, self.meter)
        convolve = F.conv2d if x.dim() == 4 else F.conv3d
        out = convolve(x, weight, bias, conv.stride, (0, *conv.padding[1:]), conv.dilation, conv.groups)
        assert out.shape[2] * s == length, "slab_rows keeps every slab a multiple of the strides"
        return out

    def _batch_norm(self, bn: nn.BatchNorm2d | nn.BatchNorm3d, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if not bn.training:  # running statistics: the same on every process, nothing to exchange
            return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        dims = (0, *range(2, x.dim()))
        xf = x.float()
        n = xf.numel() // xf.shape[1] * self.world  # values per channel over the whole batch and image
        mean = slab_sum(xf.sum(dims), self.world, self.meter) / n
        centred = xf - mean.view(shape)
        var = slab_sum(centred.square().sum(dims), self.world, self.meter) / n
        if bn.track_running_stats:
            self._update_running(bn, mean.detach(), var.detach(), n)
        y = centred * torch.rsqrt(var + bn.eps).view(shape)
        if bn.affine:
            y = y * sum_gradients(bn.weight, self.world, self.meter).view(shape) \
                + sum_gradients(bn.bias, self.world, self.meter).view(shape)
        return y.to(x.dtype)

    @staticmethod
    @torch.no_grad()
    def _update_running(bn, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        bn.num_batches_tracked.add_(1)
        factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
        unbiased = var * (n / max(n - 1, 1))  # as nn.BatchNorm keeps it
        bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)

    def _head(self, head: Head, x: torch.Tensor) -> torch.Tensor:
        spatial = tuple(range(2, x.dim()))
        total = replicated_sum(x.float().sum(spatial), self.world, self.meter)
        pooled = total / (math.prod(x.shape[2:]) * self.world)
        return head.fc(pooled.to(x.dtype))


class SpatialParallel(Parallelism):
    """The global stage with ``parallel: spatial`` under torchrun: every process trains the whole global CNN on its
    slab of every image (:class:`SpatialCNN`) and computes the same loss; the checkpoint is the plain CNN's."""

    name = "spatial"
    compiles = False  # the halo exchange's autograd Functions run eagerly
    shares_model = True

    @property
    def processes(self) -> int:
        return self.env.world

    def wrap(self, model: nn.Module, device) -> SpatialCNN:
        return SpatialCNN(model, self.env, self.image_size)

    def trained(self, model: nn.Module, wrapped: nn.Module) -> nn.Module:
        return wrapped

    def evaluated(self, model: nn.Module, wrapped: nn.Module) -> nn.Module:
        return wrapped

    def batch_options(self, wrapped: nn.Module) -> dict:
        return {"slab": cast(SpatialCNN, wrapped).rows}

    def held(self, size, dnn_parameters):
        """The whole model, and this process's slab of the batch."""
        return batch_part(size, self.env.world)

    def sync(self) -> ReplicatedSync:
        return ReplicatedSync(self.env)

    def saver(self, model: nn.Module) -> ModelState:
        return ModelState(model)  # the plain CNN's state dict, not the wrapper's

    def admit(self, cfg) -> None:
        """Every image splits into ``P`` slabs that stay aligned through every downsampling: other image sizes
        are refused, naming the sizes that work."""
        m = cfg.model
        slab_rows(self.image_size, self.env.world, m.depth or DEFAULT_DEPTH[m.backbone], m.backbone)

    def plain(self, model: nn.Module) -> nn.Module:
        return cast(SpatialCNN, model).cnn  # the stage's model is the wrapper: the whole CNN is inside
