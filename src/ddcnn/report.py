"""Tables, plots and a Markdown report of a training run.

Inputs are the plain data the training code writes: ``results`` (``results.json``) and ``metrics`` (the records of
``metrics.jsonl``, one per epoch per stage). Every plotting function takes the path of the PNG to write, creates its
folder and returns the path. Figures are drawn on :class:`matplotlib.figure.Figure` objects directly (no pyplot, no
global backend state), so this module is safe to use from threads, notebooks and headless machines.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib import colors as mcolors
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ddcnn.decomposition import Decomposition
from ddcnn.errors import DDCNNError, ShapeError

__all__ = [
    "STAGE_LABELS",
    "STAGE_ORDER",
    "STRATEGY_LABELS",
    "STRATEGY_ORDER",
    "STRATEGY_STAGES",
    "plot_confusion_matrix",
    "plot_decomposition",
    "plot_learning_curves",
    "plot_subdomain_heatmap",
    "print_table",
    "results_table",
    "write_report",
]

STRATEGY_ORDER = ("global", "cnn_dnn", "mean_probability", "majority_vote", "coherent", "transfer")
STRATEGY_LABELS = {
    "global": "global CNN",
    "cnn_dnn": "CNN-DNN",
    "mean_probability": "mean probability",
    "majority_vote": "majority vote",
    "coherent": "coherent CNN-DNN",
    "transfer": "transfer CNN-DNN",
}
# What a strategy's train time counts: the wall time of these training stages (for the note under the table).
STRATEGY_STAGES = {
    "global": "global",
    "cnn_dnn": "local + combine",
    "mean_probability": "local",
    "majority_vote": "local",
    "coherent": "coherent",
    "transfer": "local + transfer (+ combine when the DNN was initialised from the combine stage)",
}
STAGE_ORDER = ("global", "local", "combine", "coherent", "transfer")
STAGE_LABELS = {
    "global": "global CNN",
    "local": "local CNNs",
    "combine": "DNN (combine)",
    "coherent": "coherent CNN-DNN",
    "transfer": "transfer CNN-DNN",
}

_DPI = 100
_COLUMNS = ("strategy", "test accuracy (%)", "train time (s)", "parameters", "forward MFLOPs / image")
_MISSING = "—"


# --------------------------------------------------------------------------------------------------- formatting


def _number(value) -> float | None:
    """``value`` as a finite float, or None when it is absent, not a number, NaN or infinite."""
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _percent(value) -> str:
    value = _number(value)
    return _MISSING if value is None else f"{100 * value:.2f}"


def _seconds(value) -> str:
    value = _number(value)
    return _MISSING if value is None else f"{value:,.1f}"


def _count(value) -> str:
    value = _number(value)
    return _MISSING if value is None else f"{round(value):,}"


def _mflops(value) -> str:
    value = _number(value)
    if value is None:
        return _MISSING
    mflops = value / 1e6
    # Two decimals for ordinary networks; three significant digits for the tiny ones (e.g. a DNN alone).
    return f"{mflops:,.2f}" if mflops >= 0.1 or mflops == 0 else f"{mflops:.3g}"


def _strategy_label(name: str) -> str:
    return STRATEGY_LABELS.get(name, str(name))


def _stage_label(name: str) -> str:
    return STAGE_LABELS.get(name, str(name))


def _ordered(names, order: Sequence[str]) -> list[str]:
    """``names`` in the fixed ``order``, followed by any unknown names in the order they came."""
    names = list(dict.fromkeys(names))
    return [n for n in order if n in names] + [n for n in names if n not in order]


def _strategy_rows(results: Mapping) -> list[tuple[str, str, str, str, str]]:
    strategies = results.get("strategies") or {}
    rows = []
    for name in _ordered(strategies, STRATEGY_ORDER):
        entry = strategies[name] or {}
        rows.append(
            (
                _strategy_label(name),
                _percent(entry.get("test_accuracy")),
                _seconds(entry.get("train_seconds")),
                _count(entry.get("parameters")),
                _mflops(entry.get("flops_per_image")),
            )
        )
    return rows


def _md_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_code(text) -> str:
    """``text`` as an inline Markdown code span, whatever backticks it holds."""
    text = str(text).replace("\n", " ")
    runs, current = [], 0
    for ch in text:
        current = current + 1 if ch == "`" else 0
        runs.append(current)
    longest = max(runs, default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _dims_text(values) -> str:
    return "×".join(str(v) for v in values) if values is not None else _MISSING


def results_table(results: Mapping) -> str:
    """The results as a Markdown table, one row per strategy that ran.

    Rows come in the order global, cnn_dnn, mean_probability, majority_vote, coherent, transfer (strategies not in
    ``results["strategies"]`` are skipped, unknown ones follow at the end); a missing number shows as "—".
    """
    lines = [
        "| " + " | ".join(_COLUMNS) + " |",
        "|:---|" + "---:|" * (len(_COLUMNS) - 1),
    ]
    for row in _strategy_rows(results):
        lines.append("| " + " | ".join(_md_cell(cell) for cell in row) + " |")
    return "\n".join(lines)


def print_table(results: Mapping) -> str:
    """The results as a plain text table with aligned columns, for the terminal (same rows as :func:`results_table`)."""
    rows = [_COLUMNS, *_strategy_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]

    def fmt(row):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        return "  ".join(cells).rstrip()

    lines = [fmt(rows[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(row) for row in rows[1:]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ figures


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, format="png")
    return path


def _curve(records, key) -> np.ndarray:
    return np.array([np.nan if _number(r.get(key)) is None else float(r[key]) for r in records], dtype=float)


def plot_learning_curves(metrics: Sequence[Mapping], path) -> Path:
    """Accuracy (top row) and loss (bottom row) against epoch, train and validation, one column per stage.

    The local stage also shows each subdomain's validation accuracy as faint lines. Where an epoch was logged twice
    (a resumed run), the last record wins. With no records the figure says so.
    """
    by_stage: dict[str, dict[int, Mapping]] = {}
    for record in metrics:
        stage, epoch = record.get("stage"), _number(record.get("epoch"))
        if stage is None or epoch is None:
            continue
        by_stage.setdefault(str(stage), {})[int(epoch)] = record
    stages = _ordered(by_stage, STAGE_ORDER)

    if not stages:
        fig = Figure(figsize=(5, 3), layout="constrained")
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no training metrics recorded", ha="center", va="center")
        ax.set_axis_off()
        return _save(fig, path)

    fig = Figure(figsize=(4.2 * len(stages), 6.0), layout="constrained")
    axes = fig.subplots(2, len(stages), squeeze=False, sharex="col")
    for column, stage in enumerate(stages):
        records = [by_stage[stage][e] for e in sorted(by_stage[stage])]
        epochs = np.array(sorted(by_stage[stage]))
        acc_ax, loss_ax = axes[0, column], axes[1, column]
        style = {"marker": "o", "markersize": 3}
        per_sub = [r.get("val_accuracy_per_subdomain") for r in records]
        if any(p for p in per_sub):
            n = max(len(p) for p in per_sub if p)
            table = np.full((len(records), n), np.nan)
            for i, p in enumerate(per_sub):
                for j, v in enumerate(p or []):
                    table[i, j] = np.nan if _number(v) is None else 100 * float(v)
            for j in range(n):
                acc_ax.plot(epochs, table[:, j], color="tab:orange", alpha=0.25, linewidth=0.8,
                            label="val, each subdomain" if j == 0 else None)
        acc_ax.plot(epochs, 100 * _curve(records, "train_accuracy"), color="tab:blue", label="train", **style)
        acc_ax.plot(epochs, 100 * _curve(records, "val_accuracy"), color="tab:orange", label="val", **style)
        loss_ax.plot(epochs, _curve(records, "train_loss"), color="tab:blue", label="train", **style)
        loss_ax.plot(epochs, _curve(records, "val_loss"), color="tab:orange", label="val", **style)

        seconds = _number(records[-1].get("seconds"))
        title = _stage_label(stage) + (f" ({seconds:,.1f} s)" if seconds is not None else "")
        acc_ax.set_title(title)
        acc_ax.set_ylabel("accuracy (%)")
        loss_ax.set_ylabel("loss")
        loss_ax.set_xlabel("epoch")
        for ax in (acc_ax, loss_ax):
            ax.set_xlim(epochs.min() - 0.5, epochs.max() + 0.5)
            ax.grid(True, alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.legend(fontsize="small")
    return _save(fig, path)


def _grid_index(decomposition: Decomposition, i: int) -> tuple[int, ...]:
    return tuple(int(v) for v in np.unravel_index(i, decomposition.grid))


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
) -> Path:
    """One value per subdomain painted on the image grid, with a colour bar and each value written at its centre.

    ``values`` (one per subdomain, e.g. accuracies in 0..1) are multiplied by ``scale`` for display. Where
    subimages overlap the colour is the mean of the subdomains covering the pixel. For a 3D decomposition there is
    one panel per grid layer along D, showing the middle slice of that layer.
    """
    painted = decomposition.paint(values).numpy().astype(float) * scale  # raises ShapeError on a count mismatch
    shown = np.asarray(torch.as_tensor(values, dtype=torch.float64).reshape(-1).numpy()) * scale
    finite = painted[np.isfinite(painted)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 1.0, vmax + 1.0
    norm = mcolors.Normalize(vmin=vmin, vmax=vmax)
    cmap = matplotlib.colormaps["viridis"]

    if decomposition.dims == 2:
        panels = [(None, painted, list(range(decomposition.n_subdomains)))]
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
    fig.colorbar(image, ax=list(axes), label=label, shrink=0.85)
    fig.suptitle(title)
    return _save(fig, path)


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
    """One image with every subimage's rectangle (distinct colours, overlaps tinted darker) and its index.

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
    for colour, ((y0, x0, y1, x1), indices) in zip(colours, boxes.items()):
        # Pixel i spans [i - 0.5, i + 0.5] in imshow coordinates.
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, facecolor=(*colour, 0.18), edgecolor="none"))
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
            f"grid {_dims_text(decomposition.grid)}, subimages {_dims_text(decomposition.subimage_size)}, "
            f"overlap {_dims_text(decomposition.overlap)}"
        )
    ax.set_title(title + (f"\n({note})" if note else ""), fontsize="medium")
    return _save(fig, path)


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
    ax.set_xticks(range(k), classes, rotation=45, ha="right", rotation_mode="anchor", fontsize=labelsize)
    ax.set_yticks(range(k), classes, fontsize=labelsize)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------------- report


def _decomposition_from(results: Mapping) -> Decomposition | None:
    try:
        return Decomposition(results["image_size"], results["grid"], results.get("overlap", 0) or 0)
    except (KeyError, TypeError, DDCNNError):
        return None


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _best_strategy(results: Mapping) -> tuple[str | None, str]:
    """The best strategy and how it was chosen."""
    best = results.get("best_strategy")
    if best:
        return str(best), ""
    strategies = results.get("strategies") or {}
    scored = [(n, _number((e or {}).get("test_accuracy"))) for n, e in strategies.items()]
    scored = [(n, a) for n, a in scored if a is not None]
    if not scored:
        return None, ""
    return max(scored, key=lambda item: item[1])[0], " (not recorded by the run; highest test accuracy)"


def _header_lines(results: Mapping, decomposition: Decomposition | None) -> list[str]:
    dataset = results.get("dataset") or "unknown dataset"
    grid = results.get("grid") or (decomposition.grid if decomposition else None)
    lines = [f"# ddcnn report: {dataset}" + (f", grid {_dims_text(grid)}" if grid else ""), ""]
    facts = []
    if results.get("name"):
        facts.append(f"Run: {results['name']}" + (f", seed {results['seed']}" if results.get("seed") is not None
                                                   else "") + ".")
    sizes = results.get("data_sizes") or {}
    if sizes:
        facts.append("Data: " + ", ".join(f"{_count(v)} {k}" for k, v in sizes.items()) + " images.")
    image_size = results.get("image_size") or (decomposition.image_size if decomposition else None)
    if image_size:
        shape = f"Images {_dims_text(image_size)}"
        if decomposition is not None:
            shape += (
                f", {decomposition.n_subdomains} subimages of {_dims_text(decomposition.subimage_size)} "
                f"(overlap {_dims_text(decomposition.overlap)})"
            )
        if results.get("num_classes") is not None:
            shape += f", {results['num_classes']} classes"
        facts.append(shape + ".")
    model = []
    if results.get("backbone"):
        model.append(f"backbone {results['backbone']}")
    if results.get("global_width") is not None:
        model.append(f"global width {results['global_width']}")
    if results.get("local_width") is not None:
        model.append(f"local width {results['local_width']}")
    if model:
        facts.append("Model: " + ", ".join(model) + ".")
    versions = []
    if results.get("device"):
        device = str(results["device"])
        if results.get("device_name"):
            device += f" ({results['device_name']})"
        versions.append(f"device {device}")
    if results.get("torch_version"):
        versions.append(f"torch {results['torch_version']}")
    if results.get("ddcnn_version"):
        versions.append(f"ddcnn {results['ddcnn_version']}")
    if results.get("python"):
        versions.append(f"Python {results['python']}")
    if versions:
        facts.append("Run on " + ", ".join(versions) + ".")
    if results.get("command"):
        facts.append("Command: " + _md_code(results["command"]))
    lines += [f"- {_md_cell(f) if not f.startswith('Command: ') else f}" for f in facts]
    return lines


def _train_time_note(results: Mapping) -> list[str]:
    present = _ordered(results.get("strategies") or {}, STRATEGY_ORDER)
    parts = []
    for name in present:
        stages = STRATEGY_STAGES.get(name)
        if name == "transfer" and results.get("transfer_used_dnn") is not None:
            stages = "local + combine + transfer" if results["transfer_used_dnn"] else "local + transfer"
        if stages:
            parts.append(f"{_strategy_label(name)}: {stages}")
    if not parts:
        return []
    text = "Train time is the measured wall time of the training stages a strategy needs (" + "; ".join(parts) + ")."
    if any(n in present for n in ("mean_probability", "majority_vote")):
        text += " Mean probability and majority vote train nothing beyond the local CNNs."
    if any("local" in STRATEGY_STAGES.get(n, "") for n in present):
        text += (
            " The local stage counts all local CNNs trained together on this one device"
            " (see the critical-path estimate below)."
        )
    return [text]


def write_report(
    run_dir,
    results: Mapping,
    metrics: Sequence[Mapping],
    decomposition: Decomposition | None = None,
    sample_image=None,
) -> Path:
    """Write ``report.md`` and its plots (under ``plots/``) into ``run_dir``; returns the path of ``report.md``.

    Parts of a run that are missing (strategies, the local stage, the confusion matrix, metrics, a sample image)
    are left out of the report. ``decomposition`` defaults to the one described by ``results`` (image_size, grid,
    overlap).
    """
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    results = results or {}
    metrics = list(metrics or [])
    if decomposition is None:
        decomposition = _decomposition_from(results)

    lines = _header_lines(results, decomposition)
    strategies = results.get("strategies") or {}

    lines += ["", "## Results", ""]
    if strategies:
        lines += [results_table(results), ""]
        lines += _train_time_note(results)
    else:
        lines.append("No strategy was evaluated in this run.")
    best, how = _best_strategy(results)
    if best is not None:
        accuracy = _number((strategies.get(best) or {}).get("test_accuracy"))
        score = f" ({_percent(accuracy)} % test accuracy)" if accuracy is not None else ""
        lines += ["", f"**Best strategy:** {_md_cell(_strategy_label(best))}{score}{how}."]

    stage_seconds = results.get("stage_seconds") or {}
    if stage_seconds:
        lines += ["", "## Time per stage", "", "| stage | wall time (s) |", "|:---|---:|"]
        for stage in _ordered(stage_seconds, STAGE_ORDER):
            lines.append(f"| {_md_cell(_stage_label(stage))} | {_seconds(stage_seconds[stage])} |")

    local = results.get("local")
    if local:
        lines += _local_section(local, decomposition, plots, run_dir)

    if metrics:
        path = plot_learning_curves(metrics, plots / "learning_curves.png")
        lines += ["", "## Learning curves", "", f"![learning curves]({_relative(path, run_dir)})"]

    if sample_image is not None and decomposition is not None:
        path = plot_decomposition(sample_image, decomposition, plots / "decomposition.png")
        lines += ["", "## Decomposition", "", f"![decomposition of a sample image]({_relative(path, run_dir)})"]

    confusion = results.get("confusion_matrix")
    if confusion and confusion.get("matrix"):
        label = _strategy_label(confusion.get("strategy") or best or "")
        path = plot_confusion_matrix(
            confusion["matrix"], _class_names(results, len(confusion["matrix"])), plots / "confusion_matrix.png",
            title=f"confusion matrix: {label} (test set)" if label else "confusion matrix (test set)",
        )
        heading = f"## Confusion matrix ({_md_cell(label)})" if label else "## Confusion matrix"
        lines += ["", heading, "", f"![confusion matrix]({_relative(path, run_dir)})"]

    report = run_dir / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report


def _class_names(results: Mapping, k: int) -> list[str]:
    classes = results.get("classes")
    if classes and len(classes) == k:
        return [str(c) for c in classes]
    return [str(i) for i in range(k)]


def _local_section(local: Mapping, decomposition: Decomposition | None, plots: Path, run_dir: Path) -> list[str]:
    lines = ["", "## Local stage", ""]
    test = [_number(v) for v in (local.get("test_accuracy") or [])]
    val = [_number(v) for v in (local.get("val_accuracy") or [])]
    n = max(len(test), len(val)) or (decomposition.n_subdomains if decomposition else 0)
    measured, critical = _number(local.get("measured_seconds")), _number(local.get("critical_path_seconds"))
    if measured is not None:
        lines.append(f"- Measured time: {_seconds(measured)} s, training all {n} local CNNs on this one device "
                     "(measured wall time).")
    if critical is not None:
        text = (
            f"- Critical path if each local CNN had its own device and they trained in parallel: "
            f"{_seconds(critical)} s (an estimate, not a measurement)."
        )
        note = str(local.get("critical_path_note") or "").strip().rstrip(".")
        if note.lower().startswith("estimated:"):
            note = note[len("estimated:"):].strip()
        if note:
            text += f" Estimated as: {_md_cell(note)}."
        lines.append(text)
    if measured is None and critical is None:
        lines.append("- No local-stage timing was recorded.")

    known = [v for v in test if v is not None]
    if known:
        lines += [
            "",
            "### Per-subdomain accuracy",
            "",
            f"Test accuracy of the {len(test)} local CNNs, each on its own subimage: "
            f"min {_percent(min(known))} %, mean {_percent(sum(known) / len(known))} %, "
            f"max {_percent(max(known))} %.",
            "",
        ]
        header = ["subdomain"]
        locations = None
        if decomposition is not None and decomposition.n_subdomains == len(test):
            header += ["grid position", "pixels (start:stop per axis)"]
            locations = decomposition.locations.tolist()
        header += ["test accuracy (%)"] + (["val accuracy (%)"] if val else [])
        lines += ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
        for i, accuracy in enumerate(test):
            row = [str(i)]
            if locations is not None:
                d = decomposition.dims
                row.append(_dims_text(_grid_index(decomposition, i)).replace("×", ", "))
                row.append(" × ".join(f"{a}:{b}" for a, b in zip(locations[i][:d], locations[i][d:])))
            row.append(_percent(accuracy))
            if val:
                row.append(_percent(val[i]) if i < len(val) else _MISSING)
            lines.append("| " + " | ".join(row) + " |")
        if decomposition is not None and decomposition.n_subdomains == len(test) and all(
            v is not None for v in test
        ):
            path = plot_subdomain_heatmap(test, decomposition, plots / "local_accuracy.png")
            lines += ["", f"![test accuracy per subdomain]({_relative(path, run_dir)})"]
        elif decomposition is not None and decomposition.n_subdomains != len(test):
            lines += ["", f"(No heat map: {len(test)} accuracies for {decomposition.n_subdomains} subdomains.)"]
    return lines
