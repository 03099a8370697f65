"""Figures of a 3D decomposition on three orthogonal slices, with the patient's orientation on every edge.

The three views of a volume ``(D, H, W)`` (the canonical frame of :mod:`ddcnn.data.volumes`: with ``RAS``, D runs
inferior to superior, H posterior to anterior, W left to right):

* axial: a plane ``(H, W)`` across D;
* coronal: a plane ``(D, W)`` across H, superior up;
* sagittal: a plane ``(D, H)`` across W, superior up.

Each edge is labelled with the direction it faces (``L``/``R``, ``P``/``A``, ``I``/``S`` for the orientation's axis
codes; ``D``, ``H``, ``W`` with ``-``/``+`` when the volume has no frame, as ``.npy`` and generated data).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib import colors as mcolors
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ddcnn.decomposition import Decomposition
from ddcnn.errors import ShapeError
from ddcnn.report.plots import _distinct_colours, _text_colour, colour_range, save_figure
from ddcnn.report.tables import dims_text

_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}
# view: (the axis it cuts, the plane's row axis, its column axis), axes of (D, H, W)
VIEWS = {"axial": (0, 1, 2), "coronal": (1, 0, 2), "sagittal": (2, 0, 1)}


def axis_ends(orientation: str | None) -> list[tuple[str, str]]:
    """``(low end, high end)`` labels of the axes D, H, W: the orientation's codes are those of X, Y, Z, and
    ``(D, H, W) = (Z, Y, X)``."""
    if not orientation:
        return [("D-", "D+"), ("H-", "H+"), ("W-", "W+")]
    codes = orientation.upper()
    return [(_OPPOSITE[c], c) for c in (codes[2], codes[1], codes[0])]


def _volume(image, decomposition: Decomposition) -> np.ndarray:
    """The first channel of ``image`` (``(C, D, H, W)`` or ``(D, H, W)``) scaled to 0..1."""
    array = image.detach().to("cpu", torch.float64).numpy() if isinstance(image, torch.Tensor) else \
        np.asarray(image, dtype=np.float64)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or tuple(array.shape[1:]) != decomposition.image_size:
        raise ShapeError(f"a 3D figure needs a volume of shape (C, {', '.join(map(str, decomposition.image_size))}), "
                         f"got {list(array.shape)}; pass one volume, channel first")
    vol = np.where(np.isfinite(array[0]), array[0], np.nan)
    lo, hi = np.nanmin(vol) if np.isfinite(vol).any() else 0.0, np.nanmax(vol) if np.isfinite(vol).any() else 1.0
    return np.nan_to_num((vol - lo) / (hi - lo) if hi > lo else np.zeros_like(vol))


def _plane(vol: np.ndarray, view: str, index: int) -> np.ndarray:
    """The slice ``index`` across the view's cut axis: rows and columns keep their order in (D, H, W)."""
    return np.moveaxis(vol, VIEWS[view][0], 0)[index]


def _frame(ax, view: str, shape, ends) -> None:
    """Limits (superior up in the coronal and sagittal views) and the orientation letters on the four edges."""
    _, rows, cols = VIEWS[view]
    h, w = shape[rows], shape[cols]
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim((h - 0.5, -0.5) if view == "axial" else (-0.5, h - 0.5))
    ax.set_xticks([])
    ax.set_yticks([])
    style = {"fontsize": 9, "fontweight": "bold", "color": "tab:red"}
    ax.text(-0.02, 0.5, ends[cols][0], transform=ax.transAxes, ha="right", va="center", **style)
    ax.text(1.02, 0.5, ends[cols][1], transform=ax.transAxes, ha="left", va="center", **style)
    top, bottom = (ends[rows][0], ends[rows][1]) if view == "axial" else (ends[rows][1], ends[rows][0])
    ax.text(0.5, 1.01, top, transform=ax.transAxes, ha="center", va="bottom", **style)
    ax.text(0.5, -0.01, bottom, transform=ax.transAxes, ha="center", va="top", **style)


def plot_decomposition_3d(image, decomposition: Decomposition, path, orientation: str | None = None,
                          title: str | None = None) -> Path:
    """:func:`decomposition_3d_figure` written to ``path`` (PNG)."""
    return save_figure(decomposition_3d_figure(image, decomposition, orientation, title), path)


def decomposition_3d_figure(image, decomposition: Decomposition, orientation: str | None = None,
                            title: str | None = None) -> Figure:
    """The middle axial, coronal and sagittal slices of ``image`` with every subdomain's box projected on each
    plane (subdomains that differ only along the cut axis share a box, labelled with all their indices), so that
    every subdomain is visible in every view."""
    vol = _volume(image, decomposition)
    locations, dims = decomposition.locations.tolist(), 3
    fig = Figure(figsize=(13.0, 5.0), layout="constrained")
    axes = fig.subplots(1, 3)
    ends = axis_ends(orientation)
    for ax, view in zip(axes, VIEWS):
        cut, rows, cols = VIEWS[view]
        middle = vol.shape[cut] // 2
        ax.imshow(_plane(vol, view, middle), cmap="gray", vmin=0, vmax=1, interpolation="nearest",
                  origin="upper" if view == "axial" else "lower")
        boxes: dict[tuple[int, int, int, int], list[int]] = {}
        for i, loc in enumerate(locations):
            boxes.setdefault((loc[rows], loc[cols], loc[dims + rows], loc[dims + cols]), []).append(i)
        for colour, ((y0, x0, y1, x1), indices) in zip(_distinct_colours(len(boxes)), boxes.items()):
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, facecolor=(*colour, 0.15),
                                   edgecolor=colour, linewidth=2.0))
            ax.text((x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2, "/".join(map(str, indices)), ha="center", va="center",
                    fontsize=8, color=colour, fontweight="bold",
                    bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1.0})
        _frame(ax, view, vol.shape, ends)
        ax.set_title(f"{view} (slice {middle} of {vol.shape[cut]} along {'DHW'[cut]})", fontsize="medium", pad=14)
    fig.suptitle(title or f"grid {dims_text(decomposition.grid)}, subimages {dims_text(decomposition.subimage_size)}, "
                          f"overlap {dims_text(decomposition.overlap)}; boxes: every subdomain, projected")
    return fig


def plot_subdomain_heatmap_3d(values, decomposition: Decomposition, path, image=None,
                              orientation: str | None = None, **options) -> Path:
    """:func:`subdomain_heatmap_3d_figure` written to ``path`` (PNG)."""
    return save_figure(subdomain_heatmap_3d_figure(values, decomposition, image, orientation, **options), path)


def subdomain_heatmap_3d_figure(values, decomposition: Decomposition, image=None, orientation: str | None = None,
                                title: str = "test accuracy per subdomain", label: str = "test accuracy (%)",
                                scale: float = 100.0, limits: tuple[float, float] | None = (0.0, 100.0)) -> Figure:
    """One value per subdomain painted over the anatomy (``image``, when given) on three orthogonal views.

    Each view has one panel per grid layer along the axis it cuts (the slice through the layer's centre), so each
    row of panels shows every subdomain once, its value written at its centre.
    """
    painted = decomposition.paint(values).numpy().astype(float) * scale  # raises ShapeError on a count mismatch
    shown = np.asarray(torch.as_tensor(values, dtype=torch.float64).reshape(-1).numpy()) * scale
    anatomy = _volume(image, decomposition) if image is not None else None
    norm = mcolors.Normalize(*colour_range(painted, limits))
    cmap = matplotlib.colormaps["viridis"]
    columns = max(decomposition.grid)
    fig = Figure(figsize=(3.3 * columns + 1.5, 3.4 * 3), layout="constrained")
    axes = fig.subplots(3, columns, squeeze=False)
    ends = axis_ends(orientation)
    grid_index = [tuple(int(v) for v in np.unravel_index(i, decomposition.grid))
                  for i in range(decomposition.n_subdomains)]
    locations = decomposition.locations.tolist()
    shown_image = None
    for row, view in enumerate(VIEWS):
        cut, rows, cols = VIEWS[view]
        start, size = decomposition.axis_starts[cut], decomposition.subimage_size[cut]
        for layer in range(columns):
            ax = axes[row][layer]
            if layer >= decomposition.grid[cut]:
                ax.set_axis_off()
                continue
            index = start[layer] + (size - 1) // 2
            origin = "upper" if view == "axial" else "lower"
            if anatomy is not None:
                ax.imshow(_plane(anatomy, view, index), cmap="gray", vmin=0, vmax=1, interpolation="nearest",
                          origin=origin)
            shown_image = ax.imshow(_plane(painted, view, index), cmap=cmap, norm=norm, interpolation="nearest",
                                    origin=origin, alpha=0.55 if anatomy is not None else 1.0)
            for i in (i for i in range(decomposition.n_subdomains) if grid_index[i][cut] == layer):
                loc = locations[i]
                cy, cx = (loc[rows] + loc[3 + rows] - 1) / 2, (loc[cols] + loc[3 + cols] - 1) / 2
                value = shown[i]
                fraction = float(np.clip(norm(value), 0, 1)) if math.isfinite(value) else 0.0
                ax.text(cx, cy, "n/a" if not math.isfinite(value) else f"{value:.1f}", ha="center", va="center",
                        fontsize=8, color=_text_colour(cmap, fraction))
            _frame(ax, view, painted.shape, ends)
            ax.set_title(f"{view}, layer {layer} (slice {index})", fontsize="small", pad=12)
    assert shown_image is not None  # every view has one layer at least
    fig.colorbar(shown_image, ax=axes.ravel().tolist(), label=label, shrink=0.6)
    fig.suptitle(title + (" over the test volume" if anatomy is not None else ""))
    return fig
