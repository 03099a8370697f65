"""``report.md``: the results table, timings, per-subdomain accuracy and the plots of a run."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from ddcnn.config import STAGES
from ddcnn.decomposition import Decomposition
from ddcnn.errors import DDCNNError
from ddcnn.files import atomic_write_text, own_folder
from ddcnn.report.classes import metrics_section
from ddcnn.report.collapse import collapse_warnings
from ddcnn.report.plots import (
    _grid_index,
    plot_accuracy_vs_cost,
    plot_confusion_matrix,
    plot_decomposition,
    plot_learning_curves,
    plot_subdomain_heatmap,
)
from ddcnn.report.tables import (
    MISSING,
    dims_text,
    finite_number,
    format_count,
    format_percent,
    format_seconds,
    md_cell,
    md_code,
    ordered,
    results_table,
    stage_label,
    strategy_label,
    time_to_accuracy_table,
)
from ddcnn.report.volume_plots import plot_decomposition_3d, plot_subdomain_heatmap_3d
from ddcnn.strategies import STRATEGIES

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
    scored = [(n, a) for n, e in strategies.items() if (a := finite_number((e or {}).get("val_accuracy"))) is not None]
    if not scored:  # the test set never chooses
        return None, ""
    return max(scored, key=lambda item: item[1])[0], " (not recorded by the run; highest validation accuracy)"


def _header_lines(results: Mapping, decomposition: Decomposition | None) -> list[str]:
    dataset = results.get("dataset") or "unknown dataset"
    grid = results.get("grid") or (decomposition.grid if decomposition else None)
    lines = [f"# ddcnn report: {dataset}" + (f", grid {dims_text(grid)}" if grid else ""), ""]
    facts = []
    if results.get("name"):
        facts.append(f"Run: {results['name']}" + (f", seed {results['seed']}" if results.get("seed") is not None
                                                   else "") + ".")
    sizes = results.get("data_sizes") or {}
    if sizes:
        facts.append("Data: " + ", ".join(f"{format_count(v)} {k}" for k, v in sizes.items()) + " images.")
    source = results.get("data_source") or {}
    if source.get("source") == "python":  # ddcnn.fit: which path the data took, and which data it was
        how = "held in memory" if source.get("load") == "memory" else "streamed from the Datasets"
        prints = ", ".join(f"{k} {str(v)[:19]}..." for k, v in (source.get("fingerprints") or {}).items())
        facts.append(f"Data given from Python (ddcnn.fit), {how}: {source.get('why')}; fingerprints {prints}.")
    image_size = results.get("image_size") or (decomposition.image_size if decomposition else None)
    if image_size:
        shape = f"Images {dims_text(image_size)}"
        if decomposition is not None:
            shape += (
                f", {decomposition.n_subdomains} subimages of {dims_text(decomposition.subimage_size)} "
                f"(overlap {dims_text(decomposition.overlap)})"
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
    ways = _parallelism_text(results.get("stages") or {})
    if ways:
        facts.append("Processes: " + ways + ".")
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
        facts.append("Command: " + md_code(results["command"]))
    lines += [f"- {md_cell(f) if not f.startswith('Command: ') else f}" for f in facts]
    return lines


def _parallelism_text(stages: Mapping) -> str:
    """How each stage used the processes, e.g. ``global data (2), local shards (2), combine single (1)``."""
    parts = []
    for stage in ordered(stages, STAGES):
        entry = stages[stage]
        if isinstance(entry, Mapping) and entry.get("parallelism") is not None:
            count = finite_number(entry.get("processes"))
            parts.append(f"{stage_label(stage)} {entry['parallelism']}" + (f" ({int(count)})" if count else ""))
    return ", ".join(parts)


def _train_time_note(results: Mapping) -> list[str]:
    present = [n for n in ordered(results.get("strategies") or {}, tuple(STRATEGIES)) if n in STRATEGIES]
    used_dnn = results.get("transfer_used_dnn")
    parts = []
    for name in present:
        strategy = STRATEGIES[name]
        if strategy.init_stages and used_dnn is not None:
            note = " + ".join(strategy.counted_stages(strategy.init_stages if used_dnn else ()))
        else:
            note = strategy.time_note()
        parts.append(f"{strategy.label}: {note}")
    if not parts:
        return []
    text = "Train time is the measured wall time of the training stages a strategy needs (" + "; ".join(parts) + ")."
    if any(STRATEGIES[n].stages == ("local",) for n in present):
        text += " Mean probability and majority vote train nothing beyond the local CNNs."
    if any("local" in STRATEGIES[n].time_stages for n in present):
        processes = int(finite_number((results.get("local") or {}).get("processes")) or 1)
        where = "on this one device" if processes == 1 else f"by {processes} processes in parallel"
        text += (f" The local stage counts all local CNNs trained together {where}"
                 " (see the critical-path estimate below).")
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
    plots = own_folder(run_dir / "plots", run_dir)  # a received run's plots/ that is a link is refused
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
        entry = strategies.get(best) or {}
        val, test = finite_number(entry.get("val_accuracy")), finite_number(entry.get("test_accuracy"))
        score = (f" ({format_percent(val)} % validation, {format_percent(test)} % test accuracy)" if val is not None
                 else f" ({format_percent(test)} % test accuracy)" if test is not None else "")
        if results.get("best_strategy_basis"):
            how = how or f", chosen on {results['best_strategy_basis']}"
        lines += ["", f"**Best strategy:** {md_cell(strategy_label(best))}{score}{how}."]

    lines += metrics_section(results, best)

    collapses = collapse_warnings(results)
    if collapses:
        lines += ["", *[f"**Warning:** {md_cell(line)}." for line in collapses]]
        for line in collapses:
            print(f"ddcnn: warning: {line}", file=sys.stderr)

    if any((entry or {}).get("cost") for entry in strategies.values()):
        lines += _time_to_accuracy_section(results, plots, run_dir)

    stage_seconds = results.get("stage_seconds") or {}
    if stage_seconds:
        lines += ["", "## Time per stage", "", "| stage | wall time (s) |", "|:---|---:|"]
        for stage in ordered(stage_seconds, STAGES):
            lines.append(f"| {md_cell(stage_label(stage))} | {format_seconds(stage_seconds[stage])} |")

    local = results.get("local")
    if local:
        lines += _local_section(local, decomposition, plots, run_dir, sample_image, results.get("orientation"))

    if metrics:
        lines += ["", "## Learning curves", "",
                  _figure("learning curves", run_dir, plot_learning_curves, metrics, plots / "learning_curves.png")]

    if sample_image is not None and decomposition is not None and _on_grid(decomposition):
        figure = _figure("decomposition of a sample image", run_dir, plot_decomposition, sample_image, decomposition,
                         plots / "decomposition.png") if decomposition.dims == 2 else _figure(
            "decomposition of a test volume on three orthogonal slices", run_dir, plot_decomposition_3d,
            sample_image, decomposition, plots / "decomposition.png", results.get("orientation"))
        lines += ["", "## Decomposition", "", figure]

    confusion = results.get("confusion_matrix")
    if confusion and confusion.get("matrix"):
        label = strategy_label(confusion.get("strategy") or best or "")
        heading = f"## Confusion matrix ({md_cell(label)})" if label else "## Confusion matrix"
        lines += ["", heading, "", _figure(
            "confusion matrix", run_dir, plot_confusion_matrix, confusion["matrix"],
            _class_names(results, len(confusion["matrix"])), plots / "confusion_matrix.png",
            title=f"confusion matrix: {label} (test set)" if label else "confusion matrix (test set)",
        )]

    report = run_dir / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report


def _time_to_accuracy_section(results: Mapping, plots: Path, run_dir: Path) -> list[str]:
    target = results.get("target") or {}
    value = finite_number(target.get("val_accuracy"))
    what = (f"Target: {format_percent(value)} % validation accuracy ({md_cell(target.get('source', ''))})."
            if value is not None else f"No target: {md_cell(target.get('source') or 'none was set')}.")
    stages = results.get("stages") or {}
    stops = [f"{stage_label(s)} {e['epochs_run']} of {e['cap']} epochs ({e['stop_reason']}, kept epoch "
             f"{e['kept_epoch']})" for s in ordered(stages, STAGES) if (e := stages[s]) and "epochs_run" in e]
    curves = results.get("curves") or {}
    lines = ["", "## Time to accuracy", "", what, "", time_to_accuracy_table(results), "",
             "A strategy's cost counts every stage it depends on (all the epochs each ran); the critical path is the "
             "time if each local CNN had its own device (the local stage's estimate); FLOPs count forward and "
             "backward passes (3x the forward pass) over the training images seen. \"to target\" is the cost at "
             "the first epoch whose validation accuracy reached the target. The CNN-DNN's curve is its DNN's "
             "validation accuracy per combine epoch after the whole local stage; the rules' curves are measured "
             "every local epoch; the transfer CNN-DNN's starts after the local (and combine) stage."]
    if stops:
        lines += ["", "Epochs run: " + "; ".join(stops) + "."]
    if curves:
        labels = {name: strategy_label(name) for name in curves}
        lines += ["", _figure("validation accuracy against cumulative training cost", run_dir, plot_accuracy_vs_cost,
                              curves, value, plots / "accuracy_vs_cost.png", labels=labels)]
    return lines


def _figure(what: str, run_dir: Path, plot, *args, **kwargs) -> str:
    """The Markdown image of ``plot(*args, **kwargs)``; a plot that fails is a warning and a note in the report,
    never the loss of a finished run's report."""
    try:
        path = plot(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - matplotlib and fonts can fail in many ways; the numbers stand
        reason = (str(err).strip().splitlines() or [""])[0]
        message = f"the plot '{what}' could not be drawn ({type(err).__name__}: {reason})"
        print(f"ddcnn: warning: {message}; the report is written without it", file=sys.stderr)
        return f"({md_cell(message)}.)"
    return f"![{what}]({_relative(path, run_dir)})"


def _class_names(results: Mapping, k: int) -> list[str]:
    classes = results.get("classes")
    if classes and len(classes) == k:
        return [str(c) for c in classes]
    return [str(i) for i in range(k)]


def _on_grid(decomposition: Decomposition | None) -> bool:
    """Whether every local CNN has its own cell of the grid (not so for sub-networks of whole images)."""
    return decomposition is None or math.prod(decomposition.grid) == decomposition.n_subdomains


def _local_section(local: Mapping, decomposition: Decomposition | None, plots: Path, run_dir: Path,
                   sample_image=None, orientation: str | None = None) -> list[str]:
    lines = ["", "## Local stage", ""]
    test = [finite_number(v) for v in (local.get("test_accuracy") or [])]
    val = [finite_number(v) for v in (local.get("val_accuracy") or [])]
    n = max(len(test), len(val)) or (decomposition.n_subdomains if decomposition else 0)
    measured, critical = finite_number(local.get("measured_seconds")), finite_number(local.get("critical_path_seconds"))
    processes = int(finite_number(local.get("processes")) or 1)
    if measured is not None:
        where = "on this one device" if processes == 1 else f"shared among {processes} processes (the slowest)"
        lines.append(f"- Measured time: {format_seconds(measured)} s, training all {n} local CNNs {where} "
                     "(measured wall time).")
    if critical is not None:
        text = (
            f"- Critical path if each local CNN had its own device and they trained in parallel: "
            f"{format_seconds(critical)} s (an estimate, not a measurement)."
        )
        note = str(local.get("critical_path_note") or "").strip().rstrip(".")
        if note.lower().startswith("estimated:"):
            note = note[len("estimated:"):].strip()
        if note:
            text += f" Estimated as: {md_cell(note)}."
        lines.append(text)
    if measured is None and critical is None:
        lines.append("- No local-stage timing was recorded.")

    known = [v for v in test if v is not None]
    if known:
        lines += [
            "",
            "### Per-subdomain accuracy",
            "",
            f"Test accuracy of the {len(test)} local CNNs, each on "
            f"{'its own subimage' if _on_grid(decomposition) else 'the whole image (width decomposition)'}: "
            f"min {format_percent(min(known))} %, mean {format_percent(sum(known) / len(known))} %, "
            f"max {format_percent(max(known))} %.",
            "",
        ]
        header = ["subdomain"]
        locations = None
        if _on_grid(decomposition) and decomposition is not None and decomposition.n_subdomains == len(test):
            header += ["grid position", "pixels (start:stop per axis)"]
            locations = decomposition.locations.tolist()
        header += ["test accuracy (%)"] + (["val accuracy (%)"] if val else [])
        lines += ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
        for i, accuracy in enumerate(test):
            row = [str(i)]
            if locations is not None and decomposition is not None:
                d = decomposition.dims
                row.append(dims_text(_grid_index(decomposition, i)).replace("×", ", "))
                row.append(" × ".join(f"{a}:{b}" for a, b in zip(locations[i][:d], locations[i][d:])))
            row.append(format_percent(accuracy))
            if val:
                row.append(format_percent(val[i]) if i < len(val) else MISSING)
            lines.append("| " + " | ".join(row) + " |")
        if _on_grid(decomposition) and decomposition is not None and decomposition.n_subdomains == len(test) and all(
            v is not None for v in test
        ):
            heatmap = _figure("test accuracy per subdomain", run_dir, plot_subdomain_heatmap, test, decomposition,
                              plots / "local_accuracy.png") if decomposition.dims == 2 else _figure(
                "test accuracy per subdomain on three orthogonal slices", run_dir, plot_subdomain_heatmap_3d, test,
                decomposition, plots / "local_accuracy.png", sample_image, orientation)
            lines += ["", "The heat map's colour scale spans 0 to 100 %, so that a few points of spread do not look "
                          "like structure.", "", heatmap]
        elif decomposition is not None and not _on_grid(decomposition):
            lines += ["", f"(No heat map: the {len(test)} sub-networks all see the whole image.)"]
        elif decomposition is not None and decomposition.n_subdomains != len(test):
            lines += ["", f"(No heat map: {len(test)} accuracies for {decomposition.n_subdomains} subdomains.)"]
    return lines
