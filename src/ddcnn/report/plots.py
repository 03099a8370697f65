"""Figures of a run, drawn on :class:`matplotlib.figure.Figure` directly (no pyplot, no global backend state), so
they are safe from threads, notebooks and headless machines. Every function writes one PNG and returns its path.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib import colors as mcolors
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from ddcnn.config import STAGES
from ddcnn.decomposition import Decomposition
from ddcnn.errors import ShapeError
from ddcnn.files import atomic_write
from ddcnn.report.tables import dims_text, finite_number, ordered, stage_label

_DPI = 100

# ------------------------------------------------------------------------------------------------------ figures


def save_figure(fig: Figure, path) -> Path:
    """``fig`` as a PNG at ``path``, replaced whole (a link there is replaced, not written through)."""
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=_DPI, format="png")
    atomic_write(path, buffer.getvalue())
    return path


def _curve(records, key) -> np.ndarray:
    return np.array([np.nan if finite_number(r.get(key)) is None else float(r[key]) for r in records], dtype=float)


_COLUMNS_MAX = 3  # stages side by side: wider figures are shrunk to the page and their text with them
_SUBDOMAIN_STYLE: dict[str, Any] = {"color": "tab:orange", "alpha": 0.35, "linewidth": 1.0}


_KEPT_STYLE: dict[str, Any] = {"color": "0.35", "linestyle": "--", "linewidth": 1.2}


def plot_learning_curves(metrics: Sequence[Mapping], path) -> Path:
    """The figure of :func:`learning_curves_figure` as a PNG."""
    return save_figure(learning_curves_figure(metrics), path)


def learning_curves_figure(metrics: Sequence[Mapping]) -> Figure:
    """Accuracy (upper panel) and loss (lower panel) against epoch, train and validation, per stage; at most three
    stages side by side (more go on a second band), one legend for the figure.

    The local stage also shows each subdomain's validation accuracy as thin lines. A panel's title gives the stage's
    time (its last epoch's cumulative ``seconds``). Where an epoch was logged twice (a resumed run), the last record
    wins. With no records the figure says so.
    """
    by_stage: dict[str, dict[int, Mapping]] = {}
    kept: dict[str, int] = {}  # the epoch whose weights each stage handed on (its end record)
    for record in metrics:
        stage, epoch = record.get("stage"), finite_number(record.get("epoch"))
        if record.get("event") == "end" and finite_number(record.get("kept_epoch")) is not None:
            kept[str(stage)] = int(record["kept_epoch"])
        if stage is None or epoch is None:
            continue
        by_stage.setdefault(str(stage), {})[int(epoch)] = record
    stages = ordered(by_stage, STAGES)

    if not stages:
        fig = Figure(figsize=(5, 3), layout="constrained")
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no training metrics recorded", ha="center", va="center")
        ax.set_axis_off()
        return fig

    columns = min(_COLUMNS_MAX, len(stages))
    bands = math.ceil(len(stages) / columns)
    fig = Figure(figsize=(3.8 * columns, 5.4 * bands + 0.5), layout="constrained")
    axes = fig.subplots(2 * bands, columns, squeeze=False)
    style: dict[str, Any] = {"marker": "o", "markersize": 4, "linewidth": 1.8}
    subdomains = False
    for index, stage in enumerate(stages):
        band, column = divmod(index, columns)
        acc_ax, loss_ax = axes[2 * band, column], axes[2 * band + 1, column]
        records = [by_stage[stage][e] for e in sorted(by_stage[stage])]
        epochs = np.array(sorted(by_stage[stage]))
        per_sub = [r.get("val_accuracy_per_subdomain") for r in records]
        if any(p for p in per_sub):
            subdomains = True
            n = max(len(p) for p in per_sub if p)
            table = np.full((len(records), n), np.nan)
            for i, p in enumerate(per_sub):
                for j, v in enumerate(p or []):
                    table[i, j] = np.nan if finite_number(v) is None else 100 * float(v)
            for j in range(n):
                acc_ax.plot(epochs, table[:, j], **_SUBDOMAIN_STYLE)
        acc_ax.plot(epochs, 100 * _curve(records, "train_accuracy"), color="tab:blue", **style)
        acc_ax.plot(epochs, 100 * _curve(records, "val_accuracy"), color="tab:orange", **style)
        loss_ax.plot(epochs, _curve(records, "train_loss"), color="tab:blue", **style)
        loss_ax.plot(epochs, _curve(records, "val_loss"), color="tab:orange", **style)

        if stage in kept:
            for ax in (acc_ax, loss_ax):
                ax.axvline(kept[stage], **_KEPT_STYLE)

        seconds = finite_number(records[-1].get("seconds"))
        title = stage_label(stage) + (f" ({seconds:,.1f} s)" if seconds is not None else "")
        acc_ax.set_title(title, fontsize=12)
        acc_ax.set_ylabel("accuracy (%)", fontsize=11)
        loss_ax.set_ylabel("loss", fontsize=11)
        loss_ax.set_xlabel("epoch", fontsize=11)
        for ax in (acc_ax, loss_ax):
            ax.set_xlim(epochs.min() - 0.5, epochs.max() + 0.5)
            ax.grid(True, alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
            ax.tick_params(labelsize=10)
    for index in range(len(stages), bands * columns):  # the empty places of the last band
        band, column = divmod(index, columns)
        axes[2 * band, column].set_axis_off()
        axes[2 * band + 1, column].set_axis_off()
    handles = [Line2D([], [], color="tab:blue", **style), Line2D([], [], color="tab:orange", **style)]
    labels = ["train", "validation"]
    if kept:
        handles.append(Line2D([], [], **_KEPT_STYLE))
        labels.append("kept epoch")
    if subdomains:  # a legend line as visible as the thin lines it stands for
        handles.append(Line2D([], [], **{**_SUBDOMAIN_STYLE, "alpha": 0.6, "linewidth": 1.5}))
        labels.append("validation, each subdomain (local CNNs)")
    fig.legend(handles, labels, loc="outside upper center", ncols=len(handles), fontsize=11, frameon=False)
    return fig


def _grid_index(decomposition: Decomposition, i: int) -> tuple[int, ...]:
    return tuple(int(v) for v in np.unravel_index(i, decomposition.grid))


def colour_range(values: np.ndarray, limits: tuple[float, float] | None) -> tuple[float, float]:
    """(low, high) of a colour scale: ``limits`` widened to the finite ``values`` outside them, or the values' own
    range when ``limits`` is None; never empty."""
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if limits is not None:
        low, high = min(low, limits[0]), max(high, limits[1])
    return (low - 1.0, high + 1.0) if low == high else (low, high)


def _text_colour(cmap, fraction: float) -> str:
    r, g, b, _ = cmap(fraction)
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def plot_subdomain_heatmap(
    values,
    decomposition: Decomposition,
    path,
    title: str = "test accuracy per subdomain",
    label: str = "test accuracy (%)",
    scale: float = 100.0,
    limits: tuple[float, float] | None = (0.0, 100.0),
) -> Path:
    """One value per subdomain painted on the image grid, with a colour bar and each value written at its centre.

    ``values`` (one per subdomain, e.g. accuracies in 0..1) are multiplied by ``scale`` for display. The colour
    scale spans ``limits`` (0 to 100, for percentages: a spread of a few points, noise near chance included, does
    not look like structure), widened to any value outside them; ``None`` spans the values' own range. Where
    subimages overlap the colour is the mean of the subdomains covering the pixel. For a 3D decomposition there is
    one panel per grid layer along D, showing the middle slice of that layer.
    """
    painted = decomposition.paint(values).numpy().astype(float) * scale  # raises ShapeError on a count mismatch
    shown = np.asarray(torch.as_tensor(values, dtype=torch.float64).reshape(-1).numpy()) * scale
    norm = mcolors.Normalize(*colour_range(painted, limits))
    cmap = matplotlib.colormaps["viridis"]

    if decomposition.dims == 2:
        panels: list[tuple[str | None, np.ndarray, list[int]]] = [
            (None, painted, list(range(decomposition.n_subdomains)))]
    else:
        panels = []
        start, size = decomposition.axis_starts[0], decomposition.subimage_size[0]
        for layer in range(decomposition.grid[0]):
            z = start[layer] + (size - 1) // 2
            members = [i for i in range(decomposition.n_subdomains) if _grid_index(decomposition, i)[0] == layer]
            panels.append((f"depth layer {layer} (slice {z})", painted[z], members))

    h, w = decomposition.image_size[-2:]
    panel_size = 4.0
    fig = Figure(figsize=(panel_size * len(panels) * max(w / h, 0.5) + 1.2, panel_size + 0.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    fontsize = max(5.0, min(11.0, 60.0 / max(decomposition.grid[-2:])))
    image = None
    for ax, (panel_title, plane, members) in zip(axes, panels):
        image = ax.imshow(plane, cmap=cmap, norm=norm, interpolation="nearest")
        locations = decomposition.locations.tolist()
        for i in members:
            loc = locations[i]
            start_hw, stop_hw = loc[decomposition.dims - 2 : decomposition.dims], loc[-2:]
            cy, cx = (start_hw[0] + stop_hw[0] - 1) / 2, (start_hw[1] + stop_hw[1] - 1) / 2
            value = shown[i]
            text = "n/a" if not math.isfinite(value) else f"{value:.1f}"
            fraction = norm(value) if math.isfinite(value) else 0.0
            ax.text(cx, cy, text, ha="center", va="center", fontsize=fontsize,
                    color=_text_colour(cmap, float(np.clip(fraction, 0, 1))))
        ax.set_xticks([])
        ax.set_yticks([])
        if panel_title:
            ax.set_title(panel_title, fontsize="medium")
    assert image is not None  # one panel at least
    fig.colorbar(image, ax=list(axes), label=label, shrink=0.85)
    fig.suptitle(title)
    return save_figure(fig, path)


def _distinct_colours(n: int) -> list[tuple[float, float, float]]:
    """``n`` colours in which neighbours (consecutive indices) differ strongly: hues stepped by the golden ratio."""
    if n <= 10:
        cmap = matplotlib.colormaps["tab10"]
        return [cmap(i)[:3] for i in range(n)]
    return [tuple(mcolors.hsv_to_rgb(((i * 0.618034) % 1.0, 0.85, 0.95))) for i in range(n)]


def _display_image(image, decomposition: Decomposition) -> tuple[np.ndarray, str]:
    """A 2D plane to show, (H, W) grey or (H, W, 3) RGB in 0..1, and a note on what it is."""
    if isinstance(image, torch.Tensor):
        array = image.detach().to("cpu", torch.float64).numpy()
    else:
        array = np.asarray(image, dtype=np.float64)
    dims = decomposition.dims
    if array.ndim == dims:  # no channel axis
        array = array[None]
    if array.ndim != dims + 1 or tuple(array.shape[1:]) != decomposition.image_size:
        expected = ", ".join(map(str, decomposition.image_size))
        raise ShapeError(
            f"plot_decomposition expected an image of shape (C, {expected}) for this decomposition, got "
            f"{list(array.shape)}; pass one image, channel first"
        )
    note = ""
    if dims == 3:
        z = array.shape[1] // 2
        array = array[:, z]
        note = f"slice {z} of {decomposition.image_size[0]} along D"
    channels = array.shape[0]
    if channels == 3:
        plane = np.moveaxis(array, 0, -1)
    else:
        plane = array[0]
        if channels != 1:
            note = ", ".join(filter(None, [note, f"channel 0 of {channels}"]))
    finite = np.isfinite(plane)
    if finite.any():
        lo, hi = float(plane[finite].min()), float(plane[finite].max())
        plane = np.where(finite, plane, lo)
        plane = (plane - lo) / (hi - lo) if hi > lo else np.zeros_like(plane)
    else:
        plane = np.zeros_like(plane)
    return np.clip(plane, 0.0, 1.0), note


def plot_decomposition(image, decomposition: Decomposition, path, title: str | None = None) -> Path:
    """One image with every subimage's rectangle (distinct colours; on a grey image the subimages are tinted, so
    overlaps show darker; a colour image keeps its colours) and its index.

    ``image`` is a tensor or array ``(C, H, W)`` or ``(C, D, H, W)`` (the channel axis may be left out), of any
    value range: it is scaled to 0..1 for display; one channel is shown grey, three as RGB, otherwise channel 0. For
    3D the middle slice along D is shown with the subimages that cross it; subimages that differ only along D share
    a rectangle, labelled with all their indices.
    """
    plane, note = _display_image(image, decomposition)
    dims = decomposition.dims
    locations = decomposition.locations.tolist()
    members = list(range(decomposition.n_subdomains))
    if dims == 3:
        z = decomposition.image_size[0] // 2
        members = [i for i in members if locations[i][0] <= z < locations[i][dims]]
    boxes: dict[tuple[int, int, int, int], list[int]] = {}
    for i in members:
        loc = locations[i]
        boxes.setdefault((loc[dims - 2], loc[dims - 1], loc[-2], loc[-1]), []).append(i)

    h, w = decomposition.image_size[-2:]
    fig = Figure(figsize=(5.5 * max(w / h, 0.4), 5.5 * max(h / w, 0.4) + 0.5), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(plane, cmap="gray" if plane.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
    colours = _distinct_colours(len(boxes))
    fontsize = max(5.0, min(12.0, 70.0 / max(decomposition.grid[-2:])))
    tint = 0.18 if plane.ndim == 2 else 0.0  # a colour picture keeps its own colours: outlines only
    for colour, ((y0, x0, y1, x1), indices) in zip(colours, boxes.items()):
        # Pixel i spans [i - 0.5, i + 0.5] in imshow coordinates.
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, facecolor=(*colour, tint), edgecolor="none"))
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, facecolor="none", edgecolor=colour,
                               linewidth=2.0))
        ax.text((x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2, "/".join(map(str, indices)), ha="center", va="center",
                fontsize=fontsize, color=colour, fontweight="bold",
                bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1.5})
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    if title is None:
        title = (
            f"grid {dims_text(decomposition.grid)}, subimages {dims_text(decomposition.subimage_size)}, "
            f"overlap {dims_text(decomposition.overlap)}"
        )
    ax.set_title(title + (f"\n({note})" if note else ""), fontsize="medium")
    return save_figure(fig, path)


def plot_confusion_matrix(matrix, classes: Sequence[str] | None, path, title: str = "confusion matrix") -> Path:
    """A confusion matrix (rows: true class, columns: predicted) with counts in the cells.

    The colour of a cell is its share of the row (the fraction of that true class predicted as each class), so
    rare classes read as clearly as common ones. Counts are written in the cells up to 30 classes.
    """
    counts = np.asarray(matrix.detach().cpu().numpy() if isinstance(matrix, torch.Tensor) else matrix, dtype=float)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] == 0:
        raise ShapeError(f"a confusion matrix must be square (K, K) with K >= 1, got shape {list(counts.shape)}")
    k = counts.shape[0]
    if classes is None:
        classes = [str(i) for i in range(k)]
    classes = [str(c) for c in classes]
    if len(classes) != k:
        raise ShapeError(f"the confusion matrix has {k} classes but {len(classes)} class names were given")
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)

    side = min(max(4.5, 0.45 * k + 2.5), 30.0)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["Blues"]
    image = ax.imshow(share, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="fraction of the true class", shrink=0.8)
    if k <= 30:
        fontsize = max(5.0, min(10.0, 120.0 / k))
        for r in range(k):
            for c in range(k):
                value = counts[r, c]
                text = f"{int(value)}" if float(value).is_integer() else f"{value:.3g}"
                ax.text(c, r, text, ha="center", va="center", fontsize=fontsize,
                        color=_text_colour(cmap, float(share[r, c])))
    labelsize = max(4.0, min(10.0, 200.0 / k))
    # Class names are the user's folder names: '$' or '\\' in them must not be read as mathtext.
    ax.set_xticks(range(k), classes, rotation=45, ha="right", rotation_mode="anchor", fontsize=labelsize,
                  parse_math=False)
    ax.set_yticks(range(k), classes, fontsize=labelsize, parse_math=False)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_accuracy_vs_cost(curves: Mapping[str, Sequence[Mapping]], target: float | None, path,
                          labels: Mapping[str, str] | None = None) -> Path:
    """Validation accuracy against cumulative training cost, one line per strategy: measured seconds (left) and
    critical-path seconds (right, each local CNN on its own device); the target as a dashed line."""
    fig = Figure(figsize=(11.0, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, title in ((axes[0], "seconds", "measured"), (axes[1], "critical_path_seconds",
                                                                 "critical path (a device per local CNN)")):
        for j, (name, curve) in enumerate(curves.items()):
            points = [p for p in curve if None not in (finite_number(p.get("val_accuracy")), finite_number(p.get(key)))]
            if not points:
                continue
            ax.plot([p[key] for p in points], [100 * p["val_accuracy"] for p in points], marker="o", markersize=3,
                    color=f"C{j % 10}", label=(labels or {}).get(name, name))
        if target is not None:
            ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1, label=f"target {100 * target:.2f} %")
        ax.set_xlabel(f"cumulative training time (s), {title}")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy (%)")
    if axes[1].get_legend_handles_labels()[0]:  # no curve and no target: nothing to name
        axes[1].legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)
