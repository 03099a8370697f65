"""A study's report: ``study.md`` (tables and plots), the one-screen summary, and the plots, from ``study.json``'s
data (:func:`ddcnn.study.aggregate.aggregate`). Accuracies and differences are shown in percent (points)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ddcnn.report.plots import save_figure
from ddcnn.report.tables import md_code, ordered, strategy_label
from ddcnn.strategies import STRATEGIES
from ddcnn.study.spec import value_text

_MISSING = "—"
_MARKERS = "osD^v<>ph*"


def _pp(value, signed: bool = False) -> str:
    if value is None:
        return _MISSING
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def _interval(summary: Mapping, signed: bool = False) -> str:
    if summary.get("ci_low") is None:
        return _MISSING
    return f"[{_pp(summary['ci_low'], signed)}, {_pp(summary['ci_high'], signed)}]"


def _seconds(summary: Mapping) -> str:
    return _MISSING if summary.get("mean") is None else f"{summary['mean']:.1f}"


def _strategies(data: Mapping) -> list[str]:
    return ordered([name for cell in data["cells"] for name in cell["strategies"]], tuple(STRATEGIES))


def _claim_label(claim: Mapping) -> str:
    return f"{strategy_label(claim['a'])} − {strategy_label(claim['b'])}"


def _claim_rows(data: Mapping, short: bool = False) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for cell in data["cells"]:
        for claim in cell["claims"].values():
            n = claim.get("n", 0)
            rows.append((cell["id" if short else "label"], _claim_label(claim), _pp(claim.get("mean"), True),
                         _interval(claim, True), f"{claim.get('holds_in', 0)}/{n}" if n else _MISSING,
                         claim["verdict"]))
    return rows


def claims_table(data: Mapping) -> str:
    """The claims as a Markdown table: one row per cell and claim."""
    lines = ["| cell | claim | mean difference (pp) | 95% CI (pp) | seeds where it holds | verdict |",
             "|:---|:---|---:|:---:|---:|:---|"]
    lines += ["| " + " | ".join(row) + " |" for row in _claim_rows(data)]
    return "\n".join(lines)


def _short_label(cell: Mapping) -> str:
    """The cell's axis values alone (``2x2, vgg``): the column header where the axes are named elsewhere."""
    return ", ".join(value_text(v) for v in cell["values"].values()) or cell["label"]


def claims_matrix(data: Mapping) -> str:
    """The claims at a glance, as Markdown: one row per claim, one column per cell; each entry the mean paired
    difference in points, its 95% CI, the seeds where it holds and the verdict."""
    cells = data["cells"]
    lines = ["| claim | " + " | ".join(_short_label(cell) for cell in cells) + " |",
             "|:---|" + ":---:|" * len(cells)]
    for key in data["claims"]:
        entries = []
        for cell in cells:
            claim = cell["claims"][key]
            if not claim.get("n"):
                entries.append(claim["verdict"])
                continue
            word = claim["verdict"] if claim["verdict"] == "inconclusive" else f"**{claim['verdict']}**"
            entries.append(f"{_pp(claim['mean'], True)} {_interval(claim, True)} {claim['holds_in']}/{claim['n']} "
                           f"{word}")
        lines.append(f"| {_claim_label(cells[0]['claims'][key])} | " + " | ".join(entries) + " |")
    return "\n".join(lines)


def strategies_table(data: Mapping) -> str:
    """Accuracy (mean, std, CI, n), mean train time and parameters per cell and strategy, as Markdown."""
    lines = ["| cell | strategy | test accuracy (%) | std (pp) | 95% CI (%) | n | train time (s) | parameters |",
             "|:---|:---|---:|---:|:---:|---:|---:|---:|"]
    for cell in data["cells"]:
        for name in ordered(cell["strategies"], tuple(STRATEGIES)):
            entry = cell["strategies"][name]
            acc = entry["accuracy"]
            parameters = entry["parameters"]
            parameters = f"{parameters:,}" if isinstance(parameters, int) else str(parameters)
            lines.append(f"| {cell['label']} | {strategy_label(name)} | {_pp(acc['mean'])} | {_pp(acc['std'])} | "
                         f"{_interval(acc)} | {acc['n']} | {_seconds(entry['train_seconds'])} | {parameters} |")
    return "\n".join(lines)


def _runs_line(data: Mapping) -> str:
    counts = {state: sum(len(cell["seeds"][state]) for cell in data["cells"])
              for state in ("finished", "failed", "interrupted", "new")}
    total = sum(counts.values())
    return f"{counts['finished']} of {total} runs finished" + "".join(
        f", {counts[s]} {'not started' if s == 'new' else s}" for s in ("failed", "interrupted", "new") if counts[s])


def summary_text(data: Mapping) -> str:
    """The one-screen summary for the terminal: the runs' state and every claim per cell."""
    env = data.get("environment") or {}
    rows = [("cell", "claim", "diff (pp)", "95% CI (pp)", "holds", "verdict"), *_claim_rows(data, short=True)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"study {data['name']}: {_runs_line(data)} ({env.get('device_name') or 'device unknown'}, torch "
             f"{env.get('torch_version') or '?'})"]
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j in (0, 1, 5) else c.rjust(w) for j, (c, w) in
                               enumerate(zip(row, widths))).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    for cell in data["cells"]:
        for state in ("failed",):
            for seed in cell["seeds"][state]:
                lines.append(f"failed: {cell['id']} seed {seed} (log: logs/{cell['id']}/seed-{seed}.log)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ plots


def plot_accuracy(data: Mapping, path) -> Path:
    """Mean test accuracy with its 95% CI as error bars, per strategy (colour) and cell (group)."""
    cells, names = data["cells"], _strategies(data)
    fig = Figure(figsize=(max(6.0, 1.6 * len(cells) + 2), 4.2), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        xs: list[float] = []
        means: list[float] = []
        errors: list[list[float]] = [[], []]
        for i, cell in enumerate(cells):
            acc = cell["strategies"].get(name, {}).get("accuracy")
            if not acc or acc["mean"] is None:
                continue
            xs.append(i + (j - (len(names) - 1) / 2) * width)
            means.append(100 * acc["mean"])
            low = acc["ci_low"] if acc["ci_low"] is not None else acc["mean"]
            high = acc["ci_high"] if acc["ci_high"] is not None else acc["mean"]
            errors[0].append(100 * (acc["mean"] - low))
            errors[1].append(100 * (high - acc["mean"]))
        ax.errorbar(xs, means, yerr=errors, fmt=_MARKERS[j % len(_MARKERS)], capsize=3, label=strategy_label(name))
    ax.set_xticks(range(len(cells)), [cell["label"].replace(", ", "\n") for cell in cells], fontsize=8)
    ax.set_ylabel("test accuracy (%), mean and 95% CI")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)


def plot_accuracy_vs_time(data: Mapping, path) -> Path:
    """Mean test accuracy against mean train time: one point per cell (marker) and strategy (colour)."""
    names = _strategies(data)
    fig = Figure(figsize=(7.0, 4.5), layout="constrained")
    ax = fig.add_subplot()
    colours = {name: f"C{j % 10}" for j, name in enumerate(names)}
    for i, cell in enumerate(data["cells"]):
        for name in names:
            entry = cell["strategies"].get(name)
            if not entry or entry["accuracy"]["mean"] is None or entry["train_seconds"]["mean"] is None:
                continue
            acc = entry["accuracy"]
            error = None if acc["ci_low"] is None else [[100 * (acc["mean"] - acc["ci_low"])],
                                                         [100 * (acc["ci_high"] - acc["mean"])]]
            ax.errorbar([entry["train_seconds"]["mean"]], [100 * acc["mean"]], yerr=error, capsize=2,
                        fmt=_MARKERS[i % len(_MARKERS)], color=colours[name])
    for name in names:
        ax.plot([], [], "s", color=colours[name], label=strategy_label(name))
    for i, cell in enumerate(data["cells"]):
        ax.plot([], [], _MARKERS[i % len(_MARKERS)], color="grey", label=cell["label"])
    ax.set_xlabel("train time (s), mean over seeds")
    ax.set_ylabel("test accuracy (%), mean and 95% CI")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def plot_curves(data: Mapping, path) -> Path:
    """Validation accuracy per epoch of the transfer and coherent stages, mean over seeds with the 95% CI band,
    one panel per cell."""
    cells = data["cells"]
    fig = Figure(figsize=(3.4 * len(cells), 3.2), layout="constrained")
    axes = fig.subplots(1, len(cells), squeeze=False)[0]
    for ax, cell in zip(axes, cells):
        for j, (stage, curve) in enumerate(cell["curves"].items()):
            points = [p for p in curve if p["mean"] is not None]
            if not points:
                continue
            epochs = np.array([p["epoch"] for p in points])
            ax.plot(epochs, [100 * p["mean"] for p in points], marker="o", color=f"C{j}",
                    label=strategy_label(stage))
            band = [p for p in points if p["ci_low"] is not None]
            if band:
                ax.fill_between([p["epoch"] for p in band], [100 * p["ci_low"] for p in band],
                                [100 * p["ci_high"] for p in band], color=f"C{j}", alpha=0.2)
        ax.set_title(cell["label"], fontsize=8)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy (%)")
    axes[0].legend(fontsize=7)
    return save_figure(fig, path)


def write_report(data: Mapping, folder: Path) -> Path:
    """``study.md`` with its plots under ``folder/plots``; returns the path of study.md."""
    plots = folder / "plots"
    plot_accuracy(data, plots / "accuracy.png")
    plot_accuracy_vs_time(data, plots / "accuracy_vs_time.png")
    plot_curves(data, plots / "learning_curves.png")
    env = data.get("environment") or {}
    lines = [
        f"# Study `{data['name']}`",
        "",
        f"{_runs_line(data)}. Device: {env.get('device_name') or _MISSING} ({env.get('device') or _MISSING}); "
        f"torch {env.get('torch_version') or _MISSING}; Python {env.get('python') or _MISSING}; ddcnn "
        f"{env.get('ddcnn_version') or _MISSING}; dataset {env.get('dataset') or _MISSING}.",
        "",
        f"Command: {md_code(data.get('command') or _MISSING)}",
        "",
        f"Method: {data['method']}.",
        "",
        "## Claims (paired over seeds)",
        "",
        f"Columns: {', '.join(data['cells'][0]['values']) or 'the base config'}. Each entry: the mean difference in "
        f"test accuracy (percentage points) over the seeds, its 95% CI, the seeds where it holds, and the verdict.",
        "",
        claims_matrix(data),
        "",
        claims_table(data),
        "",
        "## Strategies",
        "",
        strategies_table(data),
        "",
        "Train time is what each strategy's training stages took (the CNN-DNN's includes the local CNNs').",
        "",
        "![accuracy per strategy and cell](plots/accuracy.png)",
        "",
        "![accuracy against train time](plots/accuracy_vs_time.png)",
        "",
        "## Learning curves of the coherent and transfer stages",
        "",
        "Validation accuracy per epoch, mean over seeds; the band is the 95% t interval.",
        "",
        "![learning curves](plots/learning_curves.png)",
        "",
    ]
    path = folder / "study.md"
    path.write_text("\n".join(lines))
    return path
