"""Width decomposition: the global CNN's channels split into N narrow sub-networks of the same depth, trained
apart, then recomposed into the global CNN (Gu, Zhang, Liu, Cai, ETNA 56, 2022; Klawonn, Lanser, Weber,
arXiv 2410.23359).

A global VGG- or ResNet-style CNN of width ``w`` has ``w * 2**s`` channels in stage ``s``; sub-network ``i`` of
width ``w / N`` owns channels ``[i * c, (i + 1) * c)`` of every layer (``c = w * 2**s / N``). The N sub-networks are
trained as one grouped network (:class:`~ddcnn.models.LocalEnsemble`), whose weights already have the global
CNN's layout along the output channels. :func:`recompose` writes them into the global CNN:

* every convolution's weight ``(W_out, W_in, *k)`` gets sub-network ``i``'s ``(c_out, c_in, *k)`` as its ``i``-th
  diagonal block; the cross-group blocks start at zero (``cross_scale = 0``) or at ``cross_scale`` times the global
  CNN's own initialisation;
* the first convolution is the exception: every sub-network reads all ``C`` input channels, so their weights
  ``(c_out, C, *k)`` stack along the output channels;
* BatchNorm (statistics and affine parameters) is per channel: copied as it is;
* the classifier ``(K, N * F)`` gets ``W_i / N`` as its ``i``-th column block and the mean of the biases, so the
  recomposed CNN gives the mean of the sub-networks' logits.

With zero cross-group blocks, every group of channels of the recomposed CNN computes exactly what its sub-network
computes on the same image (convolutions, BatchNorm, ReLU, pooling and the residual sums act per channel or within
a group), so on whole images the recomposed CNN's logits are the sub-networks' averaged logits (tested, to float32
rounding). :class:`WholeImages` is the "decomposition" that gives every sub-network the whole image, so the local
stage, its sharding over processes and every combination rule run unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ddcnn.checks import whole
from ddcnn.decomposition import Decomposition
from ddcnn.errors import ConfigError, ShapeError
from ddcnn.models.combiners import Combiner

# Narrower sub-networks are refused: one channel per layer is not a CNN worth training.
MIN_SUB_WIDTH = 2


def sub_width(width: int, parts: int) -> int:
    """The sub-networks' width ``w / N`` (their first stage's channels): ``N`` must divide ``w`` and leave at least
    :data:`MIN_SUB_WIDTH` channels."""
    if width % parts:
        lower = max(d for d in range(1, parts + 1) if width % d == 0)
        wider = parts * max(MIN_SUB_WIDTH, width // parts)
        raise ConfigError(f"model.width = {width} does not split into decomposition.parts = {parts} sub-networks of "
                          f"equal width; use a width divisible by {parts} (e.g. {wider})"
                          + (f" or parts = {lower}" if lower >= 2 else ""))
    if width // parts < MIN_SUB_WIDTH:
        raise ConfigError(f"model.width = {width} split into decomposition.parts = {parts} gives sub-networks of "
                          f"width {width // parts}, narrower than {MIN_SUB_WIDTH}; use model.width >= "
                          f"{MIN_SUB_WIDTH * parts} or at most {width // MIN_SUB_WIDTH} parts")
    return width // parts


class WholeImages(Decomposition):
    """N copies of the whole image: ``split`` ``(B, C, *size) -> (B, N, C, *size)`` (a view, nothing copied), so
    that N sub-networks of a width decomposition are trained as the local CNNs of a grid are. Every location is the
    whole image; the grid is one cell per axis."""

    def __init__(self, image_size: Sequence[int], parts: int):
        super().__init__(image_size, (1,) * len(tuple(image_size)))
        self.n_subdomains = whole("parts", parts)
        self.locations = self.locations.repeat(parts, 1)

    def __repr__(self) -> str:
        return f"WholeImages(image_size={self.image_size}, parts={self.n_subdomains})"

    def split(self, x: torch.Tensor, subdomains: range | None = None) -> torch.Tensor:
        self._check_input(x)
        n = self.n_subdomains if subdomains is None else len(subdomains)
        return x.unsqueeze(1).expand(-1, n, *x.shape[1:])

    def state(self) -> dict:
        return {**super().state(), "parts": self.n_subdomains}


class MeanLogits(Combiner):
    """The sub-networks' ensemble: the mean of their logits, ``(B, N, K) -> (B, K)``. On whole images it is the
    recomposed global CNN before any further training."""

    def combine(self, local_logits):
        return local_logits.mean(1)


@torch.no_grad()
def recompose(net: nn.Module, stacked: Mapping[str, torch.Tensor], parts: int, cross_scale: float = 0.0) -> None:
    """Write N trained sub-networks into the global CNN ``net`` (in place; see the module's doc for the rule).

    ``net``: a built-in VGG- or ResNet-style CNN of width ``w`` (``groups=1``); ``stacked``: the sub-networks'
    state in the grouped layout (:meth:`LocalEnsemble.stacked_state_dict`: one CNN's keys, every tensor the N
    sub-networks' tensors concatenated along dim 0), of the same family and depth at width ``w / N``.
    ``cross_scale``: the cross-group blocks of the convolutions become ``cross_scale`` times ``net``'s own
    initialisation (0: zero, and the recomposed CNN computes the sub-networks' mean logits).
    """
    found: set[str] = set()
    for name, module in net.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            _conv(module, _take(stacked, prefix + "weight", found), parts, cross_scale, prefix)
        elif isinstance(module, _BatchNorm):
            for key, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                tensor.copy_(_fitting(_take(stacked, prefix + key, found), tensor.shape, prefix + key))
        elif isinstance(module, nn.Linear):
            w, b = _take(stacked, prefix + "weight", found), _take(stacked, prefix + "bias", found)
            k, f = module.out_features, w.shape[1]
            _fitting(w, (parts * k, module.in_features // parts), prefix + "weight")
            _fitting(b, (parts * k,), prefix + "bias")
            module.weight.copy_(w.view(parts, k, f).permute(1, 0, 2).reshape(k, parts * f) / parts)
            module.bias.copy_(b.view(parts, k).mean(0))
    left = sorted(set(stacked) - found)
    if left:
        raise ShapeError(f"the sub-networks hold {left[:3]}, which the global CNN lacks; recompose sub-networks of "
                         f"the global CNN's backbone and depth")


def _take(stacked: Mapping[str, torch.Tensor], key: str, found: set) -> torch.Tensor:
    if key not in stacked:
        raise ShapeError(f"the sub-networks have no {key!r}; recompose sub-networks of the global CNN's backbone "
                         f"and depth")
    found.add(key)
    return stacked[key]


def _fitting(tensor: torch.Tensor, shape: Sequence[int], key: str) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(shape):
        raise ShapeError(f"the sub-networks' {key} has shape {list(tensor.shape)} where the global CNN needs "
                         f"{list(shape)}; the global CNN's width must be the sub-networks' width times their number")
    return tensor


def _conv(conv: nn.Module, w: torch.Tensor, parts: int, cross_scale: float, prefix: str) -> None:
    """One convolution: ``w`` ``(N * c_out, c_in, *k)`` into ``conv.weight`` ``(W_out, W_in, *k)``."""
    target = conv.weight
    if conv.bias is not None:
        raise ShapeError(f"{prefix}bias: the built-in backbones' convolutions have none (BatchNorm follows)")
    if target.shape[1] == w.shape[1]:  # the first convolution: every sub-network reads all input channels
        target.copy_(_fitting(w, target.shape, prefix + "weight"))
        return
    c_out, c_in = w.shape[0] // parts, w.shape[1]
    _fitting(w, (target.shape[0], target.shape[1] // parts, *target.shape[2:]), prefix + "weight")
    target.mul_(cross_scale)
    for i in range(parts):
        target[i * c_out:(i + 1) * c_out, i * c_in:(i + 1) * c_in] = w[i * c_out:(i + 1) * c_out]
