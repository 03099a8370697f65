"""Domain decomposition of images into a grid of subimages.

Conventions follow torchio/MONAI: tensors are channel-first, ``(B, C, H, W)`` or ``(B, C, D, H, W)``, and a
subdomain's location is ``(start..., stop...)`` with ``stop`` exclusive.

The rule for sizes (per axis, image length ``L``, ``n`` subimages, requested overlap ``o``):

* every subimage has the same length ``s = ceil((L + (n - 1) * o) / n)``, the smallest length for which ``n``
  subimages overlapping by ``o`` cover ``L``;
* the starts are spread evenly, ``start_i = round(i * (L - s) / (n - 1))`` (halves round up), so the first
  subimage begins at 0 and the last one ends at the border ``L``.

So neighbours overlap by at least ``o``; when ``n`` divides ``L + (n - 1) * o`` they overlap by exactly ``o``, and
with ``o = 0`` and ``n`` dividing ``L`` the subimages tile the image. When the sizes do not divide, some neighbours
overlap by one pixel more than asked (for example ``L = 28, n = 3, o = 0`` gives ``s = 10`` at starts 0, 9, 18).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ddcnn.errors import ConfigError, ShapeError


def _as_tuple(value, length: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * length
    try:
        values = tuple(value)
    except TypeError:
        raise ConfigError(f"{name} must be an int or a sequence of {length} ints, got {value!r}") from None
    if len(values) != length:
        raise ConfigError(
            f"{name} {list(values)} has {len(values)} entries but the image has {length} dimensions; "
            f"give one entry per image axis"
        )
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{name} must hold whole numbers, got {list(values)}")
    return values


def axis_layout(length: int, parts: int, overlap: int) -> tuple[int, list[int]]:
    """Subimage length and starts along one axis (see the module docstring for the rule)."""
    size = -(-(length + (parts - 1) * overlap) // parts)
    if parts == 1:
        return size, [0]
    # round(i * (L - s) / (n - 1)) with halves rounding up, in integers so that no float error creeps in.
    span, denom = length - size, parts - 1
    return size, [(2 * i * span + denom) // (2 * denom) for i in range(parts)]


def max_overlap(length: int, parts: int) -> int:
    """The largest overlap for which ``parts`` subimages along an axis of ``length`` have distinct starts.

    Distinct starts need a span ``L - s >= n - 1``, i.e. ``s <= L - n + 1``; with ``s = ceil((L + (n-1) o) / n)``
    that is ``o <= L - n`` (and then ``o < s`` too). A closed form, so a huge image size costs no loop.
    """
    return max(0, length - parts) if parts >= 2 else 0


class Decomposition:
    """A grid of ``prod(grid)`` subdomains over images of a fixed size, in 2D or 3D.

    Args:
        image_size: ``(H, W)`` or ``(D, H, W)``.
        grid: subimages per axis, same length as ``image_size``; e.g. ``(2, 2)`` or ``(2, 2, 2)``.
        overlap: pixels (voxels) shared by neighbouring subimages, an int or one int per axis.

    Subdomains are numbered in row-major order over the grid (the last axis fastest).
    """

    def __init__(self, image_size: Sequence[int], grid: Sequence[int], overlap: int | Sequence[int] = 0):
        try:
            image_size = tuple(image_size)
        except TypeError:
            raise ConfigError(f"image_size must be (H, W) or (D, H, W), got {image_size!r}") from None
        dims = len(image_size)
        if dims not in (2, 3):
            raise ConfigError(f"image_size must be (H, W) or (D, H, W), got {list(image_size)}")
        image_size = _as_tuple(image_size, dims, "image_size")
        grid = _as_tuple(grid, dims, "grid")
        overlap = _as_tuple(overlap, dims, "overlap")
        if any(v <= 0 for v in image_size):
            raise ConfigError(f"image_size {list(image_size)} must be positive")
        if any(g <= 0 for g in grid):
            raise ConfigError(f"grid {list(grid)} must hold positive numbers of subimages per axis, e.g. [2, 2]")
        if any(o < 0 for o in overlap):
            raise ConfigError(f"overlap {list(overlap)} must not be negative; use 0 for no overlap")
        for axis, (length, parts) in enumerate(zip(image_size, grid)):
            if parts > length:
                raise ConfigError(
                    f"grid {list(grid)} asks for {parts} subimages along axis {axis}, which has only {length} "
                    f"pixels; use at most {length}"
                )
        sizes, starts = [], []
        for axis, (length, parts, ov) in enumerate(zip(image_size, grid, overlap)):
            size, axis_starts = axis_layout(length, parts, ov)
            if parts > 1 and ov >= size:
                raise ConfigError(
                    f"overlap {ov} along axis {axis} is not smaller than the subimage length {size} "
                    f"(image {length}, grid {parts}); use an overlap of at most {max_overlap(length, parts)}"
                )
            if parts > 1 and size > length - parts + 1:
                raise ConfigError(
                    f"overlap {ov} along axis {axis} makes the {parts} subimages of {size} pixels too long for an "
                    f"axis of {length} pixels (neighbours would start at the same pixel); use an overlap of at most "
                    f"{max_overlap(length, parts)}"
                )
            sizes.append(size)
            starts.append(axis_starts)
        self.image_size: tuple[int, ...] = image_size
        self.grid: tuple[int, ...] = grid
        self.overlap: tuple[int, ...] = overlap
        self.subimage_size: tuple[int, ...] = tuple(sizes)
        self.axis_starts: tuple[tuple[int, ...], ...] = tuple(tuple(s) for s in starts)
        self.n_subdomains: int = math.prod(grid)
        self.dims: int = dims
        # (N, 2d): start..., stop... per subdomain, row-major over the grid.
        grids = torch.meshgrid(*[torch.tensor(s, dtype=torch.long) for s in starts], indexing="ij")
        start = torch.stack([g.reshape(-1) for g in grids], dim=1)
        self.locations: torch.Tensor = torch.cat([start, start + torch.tensor(sizes)], dim=1)
        # Evenly strided axes can be cut with unfold (a view); others need an index gather.
        self._strides = [
            (s[1] - s[0] if len(s) > 1 else 1) if len({b - a for a, b in zip(s, s[1:])}) <= 1 else None
            for s in starts
        ]

    def __repr__(self) -> str:
        return (
            f"Decomposition(image_size={self.image_size}, grid={self.grid}, overlap={self.overlap}, "
            f"subimage_size={self.subimage_size})"
        )

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != self.dims + 2 or tuple(x.shape[2:]) != self.image_size:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ShapeError(
                f"expected images of shape (B, C, {', '.join(map(str, self.image_size))}) for this decomposition, "
                f"got {shape}; resize the images or build the Decomposition for their size"
            )

    def region(self, subdomains: range) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(start, stop)`` per axis of the smallest box holding the subimages of ``subdomains``."""
        loc = self.locations[subdomains.start:subdomains.stop]
        return tuple(loc[:, : self.dims].min(0).values.tolist()), tuple(loc[:, self.dims:].max(0).values.tolist())

    def split(self, x: torch.Tensor, subdomains: range | None = None) -> torch.Tensor:
        """Cut images into subimages: ``(B, C, *image_size) -> (B, N, C, *subimage_size)``.

        ``subdomains``: only these (a process's contiguous shard), ``(B, len(subdomains), C, *subimage_size)``; the
        other subimages are never copied. ``x`` may then also be the images cut to :meth:`region` of the shard.
        """
        if subdomains is not None and len(subdomains) < self.n_subdomains:
            start, stop = self.region(subdomains)
            origin = start if isinstance(x, torch.Tensor) and x.dim() == self.dims + 2 and tuple(
                x.shape[2:]) == tuple(b - a for a, b in zip(start, stop)) else None
            if origin is None:
                self._check_input(x)
                origin = (0,) * self.dims
            windows = [tuple(slice(a - o, z - o) for a, z, o in zip(loc[: self.dims], loc[self.dims:], origin))
                       for loc in self.locations[subdomains.start:subdomains.stop].tolist()]
            return torch.stack([x[(slice(None), slice(None)) + w] for w in windows], dim=1)
        self._check_input(x)
        b, c = x.shape[:2]
        for axis in range(self.dims):
            dim = 2 + 2 * axis  # each earlier axis has become (grid, size)
            size, stride = self.subimage_size[axis], self._strides[axis]
            if stride is not None:
                x = x.unfold(dim, size, stride).movedim(-1, dim + 1)
            else:
                index = torch.tensor(self.axis_starts[axis], device=x.device)[:, None] + torch.arange(
                    size, device=x.device
                )
                x = x.index_select(dim, index.reshape(-1))
                x = x.unflatten(dim, (self.grid[axis], size))
        # (B, C, g1, s1, g2, s2, ...) -> (B, g1, g2, ..., C, s1, s2, ...)
        grid_dims = [2 + 2 * a for a in range(self.dims)]
        size_dims = [3 + 2 * a for a in range(self.dims)]
        x = x.permute(0, *grid_dims, 1, *size_dims)
        return x.reshape(b, self.n_subdomains, c, *self.subimage_size)

    def coverage(self) -> torch.Tensor:
        """How many subimages cover each pixel: ``(*image_size)`` long tensor."""
        return self.paint(torch.ones(self.n_subdomains), reduce="sum").round().long()

    def paint(self, values, reduce: str = "mean") -> torch.Tensor:
        """Paint one scalar per subdomain back onto the image grid: ``(N,) -> (*image_size)`` float tensor.

        Where subimages overlap, ``reduce="mean"`` averages the values of the subdomains covering a pixel
        (``"sum"`` adds them). Used for heat maps of per-subdomain accuracy.
        """
        values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
        if values.numel() != self.n_subdomains:
            raise ShapeError(
                f"paint needs one value per subdomain ({self.n_subdomains}), got {values.numel()} values"
            )
        total = torch.zeros(self.image_size, dtype=torch.float64)
        count = torch.zeros(self.image_size, dtype=torch.float64)
        for value, loc in zip(values, self.locations.tolist()):
            window = tuple(slice(a, b) for a, b in zip(loc[: self.dims], loc[self.dims :]))
            total[window] += value
            count[window] += 1
        if reduce == "sum":
            return total.float()
        if reduce != "mean":
            raise ConfigError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
        return (total / count).float()

    def merge(self, subimages: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`split`: ``(B, N, C, *subimage_size) -> (B, C, *image_size)``, averaging overlaps."""
        expected = (self.n_subdomains, *subimages.shape[2:3], *self.subimage_size)
        if subimages.dim() != self.dims + 3 or tuple(subimages.shape[1:]) != expected:
            raise ShapeError(f"merge expected (B, {self.n_subdomains}, C, *{self.subimage_size}), got "
                             f"{list(subimages.shape)}")
        b, _, c = subimages.shape[:3]
        out = subimages.new_zeros((b, c, *self.image_size))
        for i, loc in enumerate(self.locations.tolist()):
            window = (slice(None), slice(None)) + tuple(slice(a, z) for a, z in zip(loc[: self.dims], loc[self.dims :]))
            out[window] += subimages[:, i]
        return out / self.coverage().to(out.device, out.dtype)

    def state(self) -> dict:
        """Plain-data description, for configs and checkpoints."""
        return {"image_size": list(self.image_size), "grid": list(self.grid), "overlap": list(self.overlap)}
