"""Spatial parallelism of the global CNN (``stages.global.parallel: spatial``): each process holds a slab of every
image and every process trains the same, whole network; together they compute what one process computes.

The images are split along tensor dim 2 (H of 2D images, D of volumes) into ``P`` equal slabs, rank ``r`` holding
rows ``[r L, (r + 1) L)``. :class:`SpatialCNN` runs a built-in VGG or ResNet global CNN on a slab through its own
forward (the backbone knows nothing of the processes): :func:`on_slabs` gives a view of the CNN's module tree in
which the layers that look across rows are swapped for slab-aware ones sharing their parameters and buffers:

* a convolution (:class:`HaloConv`) with kernel ``k``, stride ``s`` and padding ``p`` first takes ``p`` rows from
  the rank above and ``k - s - p`` from the rank below (:func:`ddcnn.train.parallel.halo.halo`), then convolves
  without padding along the split axis (the halo at the true image border is the zero padding); the other axes
  keep their padding;
* strides and max pooling keep the slabs aligned when ``L`` is a multiple of the network's downsampling
  (:func:`slab_rows` refuses other sizes);
* BatchNorm (:class:`WholeImageBatchNorm`) normalises with the mean and variance over the whole batch and image
  (two all-reduces; the variance from the centred values, as one process computes it); ``torch.nn.SyncBatchNorm``
  refuses CPU tensors;
* the head's global average pooling (:class:`WholeImageMean`) sums its slab's features and all-reduces the sums
  (every process then holds the same pooled features, logits and loss); the classifier runs as it is;
* the gradients of the parameters used on every slab (convolutions, BatchNorm) are summed over the processes in
  the backward pass; the classifier's is already whole on every process.

Every other layer runs as it is (ReLU, max pooling, the classifier, the blocks' own forward); a layer of another
kind is refused when the view is built. The CNN itself is never changed: its parameter and FLOP counts, and its
checkpoint, are the plain CNN's, the same for any ``P`` and for data parallelism. :class:`SpatialParallel` is the
global stage's way that uses it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ddcnn.build import meta_model
from ddcnn.config import SPLITS_LAYERS
from ddcnn.errors import ConfigError
from ddcnn.models.backbones import BACKBONES, DEFAULT_DEPTH, Backbone
from ddcnn.models.settings import builtin_only_error
from ddcnn.train.dist import DistEnv
from ddcnn.train.engine.loop import ModelState
from ddcnn.train.parallel.base import FLOAT, Parallelism, batch_part, ring
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


class HaloConv(nn.Module):
    """``conv`` on this process's slab: ``(B, C, L, ...) -> (B, C', L / s, ...)``, the rows of the convolution of
    the whole image that the slab's rows give; ``conv``'s weight gets the gradient summed over the processes."""

    def __init__(self, conv: nn.Conv2d | nn.Conv3d, rank: int, world: int, meter: CommMeter | None):
        super().__init__()
        self.conv, self.rank, self.world, self.meter = conv, rank, world, meter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
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


class WholeImageBatchNorm(nn.Module):
    """``bn`` on this process's slab ``(B, C, L, ...)``, normalised in training with the statistics of the whole
    batch and image (all processes together), which also update ``bn``'s running statistics."""

    def __init__(self, bn: nn.BatchNorm2d | nn.BatchNorm3d, world: int, meter: CommMeter | None):
        super().__init__()
        self.bn, self.world, self.meter = bn, world, meter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if not self.training:  # running statistics: the same on every process, nothing to exchange
            return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        dims = (0, *range(2, x.dim()))
        xf = x.float()
        n = xf.numel() // xf.shape[1] * self.world  # values per channel over the whole batch and image
        mean = slab_sum(xf.sum(dims), self.world, self.meter) / n
        centred = xf - mean.view(shape)
        var = slab_sum(centred.square().sum(dims), self.world, self.meter) / n
        if bn.track_running_stats:
            self._update_running(mean.detach(), var.detach(), n)
        y = centred * torch.rsqrt(var + bn.eps).view(shape)
        if bn.affine:
            y = y * sum_gradients(bn.weight, self.world, self.meter).view(shape) \
                + sum_gradients(bn.bias, self.world, self.meter).view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        bn = self.bn
        running_mean, running_var, tracked = bn.running_mean, bn.running_var, bn.num_batches_tracked
        assert running_mean is not None and running_var is not None and tracked is not None  # track_running_stats
        tracked.add_(1)
        factor = bn.momentum if bn.momentum is not None else 1.0 / float(tracked)
        running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
        unbiased = var * (n / max(n - 1, 1))  # as nn.BatchNorm keeps it
        running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)


class WholeImageMean(nn.Module):
    """Global average pooling of the slabs: ``(B, C, L, ...) -> (B, C, 1, ...)``, the mean over the whole image,
    the same on every process."""

    def __init__(self, world: int, meter: CommMeter | None):
        super().__init__()
        self.world, self.meter = world, meter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = tuple(range(2, x.dim()))
        total = replicated_sum(x.float().sum(spatial), self.world, self.meter)
        pooled = total / (math.prod(x.shape[2:]) * self.world)
        return pooled.to(x.dtype).view(*pooled.shape, *(1,) * len(spatial))


def _all(value, number) -> bool:
    """Whether ``value`` (an int, or one per axis) is ``number`` on every axis."""
    return all(v == number for v in (value if isinstance(value, tuple) else (value,)))


def _runs_as_is(module: nn.Module) -> bool:
    """Layers that never look across rows, or (max pooling without overlap or padding) only within a slab that
    slab_rows keeps aligned."""
    if isinstance(module, nn.MaxPool2d | nn.MaxPool3d):
        return module.kernel_size == module.stride and _all(module.padding, 0) and _all(module.dilation, 1)
    return isinstance(module, nn.ReLU | nn.Identity | nn.Linear)


def slab_layer(module: nn.Module, env: DistEnv, meter: CommMeter | None) -> nn.Module | None:
    """The layer that runs ``module`` on a slab (``module`` itself where it runs as is), or None for a container
    (its own forward runs, over its children's slab layers); a ConfigError for a layer it cannot split."""
    if isinstance(module, nn.Conv2d | nn.Conv3d) and not isinstance(module.padding, str):
        return HaloConv(module, env.rank, env.world, meter)
    if isinstance(module, nn.BatchNorm2d | nn.BatchNorm3d):
        return WholeImageBatchNorm(module, env.world, meter)
    if isinstance(module, nn.AdaptiveAvgPool2d | nn.AdaptiveAvgPool3d) and _all(module.output_size, 1):
        return WholeImageMean(env.world, meter)
    if _runs_as_is(module):
        return module
    if next(module.children(), None) is None:
        raise ConfigError(f"stages.global.parallel = spatial cannot split a {type(module).__name__} layer; use "
                          f"stages.global.parallel: data")
    return None


def on_slabs(module: nn.Module, swap: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """A view of ``module``'s tree in which ``swap`` replaces the layers it returns a module for; every other
    module is a shallow copy running its own forward over the new children, sharing ``module``'s parameters and
    buffers. ``module`` itself is left as it was."""
    layer = swap(module)
    if layer is not None:
        return layer
    view = copy.copy(module)
    view._modules = {name: None if child is None else on_slabs(child, swap)
                     for name, child in module._modules.items()}
    return view


class SpatialCNN(nn.Module):
    """This process's part of a built-in global CNN: ``(B, C, *image_size)`` whole images, or this process's slab
    ``(B, C, L, ...)`` of them, -> ``(B, K)`` logits, the same on every process. All processes call it together.

    ``cnn`` is a :class:`~ddcnn.models.GlobalCNN` of a built-in family (its parameters are this module's, in its
    order); ``on_slabs`` is its view with the slab layers swapped in; ``meter`` counts the bytes sent.
    """

    spans_processes = True  # scored by all processes together

    def __init__(self, cnn: nn.Module, env: DistEnv, image_size: Sequence[int], meter: CommMeter | None = None):
        super().__init__()
        net = getattr(cnn, "net", None)
        if not isinstance(net, Backbone) or net.groups != 1:
            raise builtin_only_error(getattr(cnn, "backbone", type(cnn).__name__), SPLITS_LAYERS)
        self.cnn = cnn
        self.image_length = image_size[0]
        self.slabs = slab_rows(image_size, env.world, net.depth, net.name)
        self.rows = self.slabs[env.rank]
        self.on_slabs = on_slabs(cnn, lambda module: slab_layer(module, env, meter))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[2] == self.image_length and len(self.rows) != self.image_length:
            images = images.narrow(2, self.rows.start, len(self.rows))
        return self.on_slabs(images)


def step_bytes(cnn: nn.Module, input_shape: tuple[int, ...], world: int) -> int:
    """Bytes the busiest process sends in one training step of :class:`SpatialCNN` for a batch of ``input_shape``
    ``(B, C, *image_size)`` whole on every process (``cnn`` may live on the meta device): per convolution with
    input ``(B, C, *, R)`` (``R`` the size of a row: W, or H x W) the halo rows ``lo = p`` and ``hi = k - s - p``
    forward (``4 B C R`` bytes a row) and the same rows' gradients backward (except for the first convolution,
    whose input is the image); plus ``2 (P-1)/P x 4 x`` (the gradients of the convolutions and BatchNorm, four sums
    of ``C`` per BatchNorm, the ``B x F`` pooled features once)."""
    halos: list[tuple[int, int, int]] = []  # (lo, hi, bytes of one row of the whole batch)
    reduced = [0]  # numbers all-reduced

    def on_layer(module, inputs):
        x = inputs[0]
        if isinstance(module, nn.Conv2d | nn.Conv3d):
            k, s, p = module.kernel_size[0], module.stride[0], int(module.padding[0])
            halos.append((p, max(0, k - s - p), x.shape[0] * x.shape[1] * math.prod(x.shape[3:]) * FLOAT))
        if isinstance(module, nn.BatchNorm2d | nn.BatchNorm3d):
            reduced[0] += 4 * module.num_features  # sum and centred square sum, forward and backward
        if isinstance(module, nn.AdaptiveAvgPool2d | nn.AdaptiveAvgPool3d):
            reduced[0] += x.shape[0] * x.shape[1]
        if isinstance(module, nn.Conv2d | nn.Conv3d | nn.BatchNorm2d | nn.BatchNorm3d):
            reduced[0] += sum(p.numel() for p in module.parameters())  # the gradients summed over the slabs

    hooks = [module.register_forward_pre_hook(on_layer) for module in cnn.modules()]
    try:
        with torch.no_grad():
            cnn.eval()(torch.zeros(input_shape, device=next(cnn.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    backward = [0] + [1] * (len(halos) - 1)  # the image needs no gradient
    # To rank + 1: my last lo rows forward, the gradient of my bottom halo backward; to rank - 1 the other way.
    down = sum(row * (lo + hi * b) for (lo, hi, row), b in zip(halos, backward))
    up = sum(row * (hi + lo * b) for (lo, hi, row), b in zip(halos, backward))
    busiest = max((down if rank < world - 1 else 0) + (up if rank > 0 else 0) for rank in range(world))
    return busiest + round(ring(world) * FLOAT * reduced[0])


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

    def step_bytes(self, cfg, models, stage: str) -> int | None:
        """:func:`step_bytes` of the global CNN and batch (None: a backbone or an image size it cannot split)."""
        if cfg.model.backbone not in BACKBONES:
            return None
        try:
            self.admit(cfg)
        except ConfigError:
            return None
        shape = (cfg.stages.get(stage).batch_size, models.shapes.in_channels, *models.shapes.image_size)
        return step_bytes(meta_model(models, stage), shape, self.env.world)

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
