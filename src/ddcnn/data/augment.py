"""Augmentation that CT users expect: flips on chosen axes, a small random affine, intensity jitter.

:class:`SpatialAugment` works on batches ``(N, C, *spatial)`` (2D or 3D) on any device, with the interface of
:class:`ddcnn.data.loading.Augment` (``draw`` on a CPU generator, ``apply`` on the device), so its choices follow
the same seed rule as the rest of the batch plan: they depend on ``(seed, epoch)`` only, on every device and in
every process. :func:`make_augment` chains it after the crop and horizontal flip of ``Augment``.

Per image, in this order:

* each axis in ``flip_axes`` (0 = depth of a volume, or height of an image) is reversed with probability 1/2;
* an affine map about the centre: a rotation by ``U(-r, r)`` degrees about each axis (one angle in 2D), a zoom
  by ``1 + U(-s, s)`` and a shift by ``U(-t, t)`` of the size along each axis, resampled by ``grid_sample``
  (trilinear or bilinear, ``align_corners=False``, the border value repeated outside the image). The map is in the
  normalised coordinates [-1, 1] of each axis, so on a box that is not a cube a rotation also shears a little:
  keep the angles small;
* values times ``1 + U(-a, a)`` plus ``U(-b, b)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ddcnn.data.loading import Augment
from ddcnn.errors import ConfigError


class SpatialAugment:
    """Random flips on ``flip_axes``, a small random affine and intensity jitter; see the module's docstring."""

    def __init__(self, flip_axes=(), rotate_degrees: float = 0.0, scale: float = 0.0, translate: float = 0.0,
                 intensity_scale: float = 0.0, intensity_shift: float = 0.0):
        self.flip_axes = tuple(int(a) for a in flip_axes)
        self.rotate, self.scale, self.translate = float(rotate_degrees), float(scale), float(translate)
        self.gain, self.bias = float(intensity_scale), float(intensity_shift)
        if min(self.rotate, self.scale, self.translate, self.gain, self.bias, 0.0) < 0:
            raise ConfigError("the augmentation's ranges (rotate_degrees, scale, translate, intensity_scale, "
                              "intensity_shift) must not be negative")

    @property
    def identity(self) -> bool:
        return not self.flip_axes and not self._affine and not (self.gain or self.bias)

    @property
    def _affine(self) -> bool:
        return bool(self.rotate or self.scale or self.translate)

    def __repr__(self) -> str:
        return (f"SpatialAugment(flip_axes={list(self.flip_axes)}, rotate_degrees={self.rotate}, scale={self.scale}, "
                f"translate={self.translate}, intensity_scale={self.gain}, intensity_shift={self.bias})")

    def draw(self, n: int, ndim: int, generator: torch.Generator) -> dict:
        """Choices for ``n`` samples with ``ndim`` spatial axes (uniform draws in [-1, 1], scaled in ``apply``)."""
        if any(a >= ndim for a in self.flip_axes):
            raise ConfigError(f"data.augment.flip_axes = {list(self.flip_axes)} names an axis the {ndim}-D images do "
                              f"not have; use axes 0 to {ndim - 1}")

        def uniform(*shape):
            return 2 * torch.rand(*shape, generator=generator) - 1

        params = {}
        if self.flip_axes:
            params["flip_axes"] = torch.rand(n, len(self.flip_axes), generator=generator) < 0.5
        if self._affine:
            params["angles"] = uniform(n, 3 if ndim == 3 else 1)
            params["zoom"] = uniform(n)
            params["shift"] = uniform(n, ndim)
        if self.gain or self.bias:
            params["gain"], params["bias"] = uniform(n), uniform(n)
        return params

    def theta(self, params: dict, ndim: int) -> torch.Tensor:
        """``(N, ndim, ndim + 1)``: output grid coordinates (x = last axis first, as ``affine_grid`` takes them)
        to input ones."""
        angles = params["angles"].double() * math.radians(self.rotate)
        n = angles.shape[0]
        if ndim == 2:
            c, s = angles[:, 0].cos(), angles[:, 0].sin()
            rotation = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], 1)
        else:
            rotation = torch.eye(3, dtype=torch.float64).expand(n, 3, 3)
            for axis in range(3):  # about x, y, z in turn
                c, s = angles[:, axis].cos(), angles[:, axis].sin()
                one = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
                i, j = [k for k in range(3) if k != axis]
                one[:, i, i], one[:, i, j], one[:, j, i], one[:, j, j] = c, -s, s, c
                rotation = one @ rotation
        zoom = 1 + params["zoom"].double() * self.scale
        # the shift of each tensor axis (D, H, W) in the grid's (x, y, z) = (W, H, D) order; 2t of the [-1, 1] span
        shift = params["shift"].double().flip(-1) * 2 * self.translate
        return torch.cat([rotation / zoom[:, None, None], shift[:, :, None]], dim=2).float()

    def apply(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        """Apply choices from :meth:`draw` to a float batch ``(N, C, *spatial)`` on its device."""
        n, ndim = x.shape[0], x.dim() - 2
        if "flip_axes" in params:
            flips = params["flip_axes"].to(x.device)
            for k, axis in enumerate(self.flip_axes):
                chosen = flips[:, k].view([n] + [1] * (ndim + 1))
                x = torch.where(chosen, x.flip(2 + axis), x)
        if "angles" in params:
            grid = F.affine_grid(self.theta(params, ndim).to(x.device), list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)
        if "gain" in params:
            view = [n] + [1] * (ndim + 1)
            gain = 1 + params["gain"].to(x.device, x.dtype).view(view) * self.gain
            x = x * gain + params["bias"].to(x.device, x.dtype).view(view) * self.bias
        return x


class Chain:
    """Several augmentations drawn and applied one after the other (the crop and flip first)."""

    def __init__(self, parts):
        self.parts = [p for p in parts if not p.identity]

    @property
    def identity(self) -> bool:
        return not self.parts

    def __repr__(self) -> str:
        return f"Chain({', '.join(map(repr, self.parts))})"

    def draw(self, n: int, ndim: int, generator: torch.Generator) -> dict:
        return {f"{i}.{k}": v for i, part in enumerate(self.parts) for k, v in part.draw(n, ndim, generator).items()}

    def apply(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        for i, part in enumerate(self.parts):
            prefix = f"{i}."
            x = part.apply(x, {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)})
        return x

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.draw(x.shape[0], x.dim() - 2, generator))


def make_augment(cfg) -> Chain:
    """The augmentation of a :class:`~ddcnn.config.AugmentConfig`: crop and horizontal flip, then
    :class:`SpatialAugment`."""
    return Chain([Augment(cfg.crop_padding, cfg.hflip),
                  SpatialAugment(cfg.flip_axes, cfg.rotate_degrees, cfg.scale, cfg.translate, cfg.intensity_scale,
                                 cfg.intensity_shift)])
