"""A study's report: ``study.md`` (tables and plots), the one-screen summary, and the plots, from ``study.json``'s
data (:func:`ddcnn.study.aggregate.aggregate`). Accuracies and differences are shown in percent (points)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from ddcnn.files import atomic_write_text, own_folder
from ddcnn.metrics import LABELS
from ddcnn.report.plots import save_figure
from ddcnn.report.tables import md_code, ordered, strategy_label
from ddcnn.strategies import STRATEGIES
from ddcnn.study.spec import value_text

MISSING = "—"
_MARKERS = "osD^v<>ph*"


def _pp(value, signed: bool = False) -> str:
    if value is None:
        return MISSING
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def _interval(summary: Mapping, signed: bool = False) -> str:
    if summary.get("ci_low") is None:
        return MISSING
    return f"[{_pp(summary['ci_low'], signed)}, {_pp(summary['ci_high'], signed)}]"


def format_seconds(summary: Mapping) -> str:
    return MISSING if summary.get("mean") is None else f"{summary['mean']:.1f}"


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
                         _interval(claim, True), f"{claim.get('holds_in', 0)}/{n}" if n else MISSING,
                         claim["verdict"] + _noninferiority(claim)))
    return rows


def _noninferiority(claim: Mapping) -> str:
    """``; non-inferior at 0.5 pp`` (or ``; non-inferiority at 0.5 pp not shown``) for a claim that tests it."""
    test = claim.get("noninferiority")
    if not test:
        return ""
    margin = _pp(test["margin"], False)
    return f"; non-inferior at {margin} pp" if test["verdict"] == "non-inferior" else \
        f"; non-inferiority at {margin} pp not shown"


def claims_table(data: Mapping) -> str:
    """The claims as a Markdown table: one row per cell and claim."""
    lines = ["| cell | claim | mean difference (pp) | 95% CI (pp) | seeds where it holds | verdict |",
             "|:---|:---|---:|:---:|---:|:---|"]
    lines += ["| " + " | ".join(row) + " |" for row in _claim_rows(data)]
    return "\n".join(lines)


def _ratio(value) -> str:
    return MISSING if value is None else f"{value:.2f}"


def _time_rows(data: Mapping, short: bool = False) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for cell in data["cells"]:
        for claim in (cell.get("time_claims") or {}).values():
            missed = len(claim.get("not_reached") or {})
            if not missed and not any((claim.get(key) or {}).get("n") for key in ("seconds", "critical_path_seconds")):
                continue  # runs without times to target (made before they were measured, or a missing strategy)
            for key, what in (("seconds", "measured"), ("critical_path_seconds", "critical path")):
                entry = claim.get(key) or {}
                interval = MISSING if entry.get("ci_low") is None else \
                    f"[{_ratio(entry['ci_low'])}, {_ratio(entry['ci_high'])}]"
                rows.append((cell["id" if short else "label"], f"{strategy_label(claim['a'])} / "
                             f"{strategy_label(claim['b'])}", what, _ratio(entry.get("geometric_mean")), interval,
                             str(entry.get("n", 0)), str(missed), entry.get("verdict", "not measured"),
                             cell.get("regime", MISSING)))
    return rows


def time_claims_table(data: Mapping) -> str:
    """The time claims as Markdown: per cell, claim and time measure the geometric mean of the paired ratio of the
    times to target, its 95% interval, the seeds with a ratio, the seeds where one never reached the target, the
    verdict and the regime the runs were trained in."""
    lines = ["| cell | claim (time to target, ratio) | time | geometric mean | 95% CI | seeds | not reached | "
             "verdict | regime |", "|:---|:---|:---|---:|:---:|---:|---:|:---|:---|"]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in _time_rows(data)]
    return "\n".join(lines)


def equal_cost_lines(data: Mapping) -> list[str]:
    """The equal-cost claims of width cells (none elsewhere): per cell, claim and cost measure the paired
    difference of the best validation accuracies within the smaller of the two costs."""
    rows = []
    for cell in data["cells"]:
        for claim in (cell.get("equal_cost_claims") or {}).values():
            for key, what in (("seconds", "measured"), ("critical_path_seconds", "critical path"),
                              ("train_flops", "training FLOPs")):
                entry = claim.get(key) or {}
                n = entry.get("n", 0)
                rows.append((cell["label"], _claim_label(claim), what, _pp(entry.get("mean"), True),
                             _interval(entry, True), f"{entry.get('holds_in', 0)}/{n}" if n else MISSING,
                             str(len(entry.get("not_reached") or [])), entry.get("verdict", "not measured")))
    if not rows:
        return []
    return ["## At equal cost (paired over seeds)", "",
            "Per seed, the budget is the smaller of the two strategies' whole training costs; each counts the best "
            "validation accuracy its curve reached within it (the accuracy-against-cost frontier at that budget).",
            "", "| cell | claim | cost | mean difference (pp) | 95% CI (pp) | seeds where it holds | not reached | "
            "verdict |", "|:---|:---|:---|---:|:---:|---:|---:|:---|",
            *["| " + " | ".join(_md(c) for c in row) + " |" for row in rows], ""]


def _md(text: str) -> str:
    return str(text).replace("|", "\\|")


def regime_lines(data: Mapping) -> list[str]:
    """One line per cell: the regime of its claims, how its stages stopped, and its warnings."""
    lines = []
    for cell in data["cells"]:
        stops = "; ".join(f"{stage}: " + ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
                          for stage, reasons in (cell.get("stop_reasons") or {}).items())
        regime = cell.get("regime", MISSING)
        what = {"converged": "converged under early stopping (patience on every stage, every stage stopped at a "
                             "tenth of its peak learning rate or less)",
                "early stopping, not annealed": "early stopping, **not converged**: some stage stopped at more "
                                                "than a tenth of its peak learning rate"}.get(
            regime, "a fixed budget (not every stage under early stopping)")
        lines.append(f"- {cell['label']}: {what}" + (f"; stages stopped by {stops}" if stops else "") + ".")
        lines += [f"  - **warning**: {w}" for w in cell.get("warnings") or []]
    return lines


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
            word += _noninferiority(claim)
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
                         f"{_clipped(acc)} | {acc['n']} | {format_seconds(entry['train_seconds'])} | {parameters} |")
    return "\n".join(lines)


def _clipped(summary: Mapping) -> str:
    """The 95% CI of an accuracy-like value in percent, clipped to [0, 100] as the plots clip it."""
    if summary.get("ci_low") is None:
        return MISSING
    _, low, high = _accuracy_bounds(summary)
    return f"[{low:.2f}, {high:.2f}]"


def metrics_table(data: Mapping) -> str:
    """Balanced accuracy, macro F1 and ROC AUC per cell and strategy: mean over the seeds and 95% CI (clipped)."""
    keys = ("balanced_accuracy", "macro_f1", "roc_auc")
    lines = ["| cell | strategy | " + " | ".join(f"{LABELS[k]} (%)" for k in keys) + " |",
             "|:---|:---|" + ":---:|" * len(keys)]
    for cell in data["cells"]:
        for name in ordered(cell["strategies"], tuple(STRATEGIES)):
            metrics = cell["strategies"][name].get("metrics") or {}
            values = [f"{_pp(metrics[k]['mean'])} {_clipped(metrics[k])}" if (metrics.get(k) or {}).get("n")
                      else MISSING for k in keys]
            lines.append(f"| {cell['label']} | {strategy_label(name)} | " + " | ".join(values) + " |")
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
    time_rows = _time_rows(data, short=True)
    if time_rows:
        lines.append("time to target (ratio a/b, below 1: a is faster)")
        for row in time_rows:
            lines.append(f"  {row[0]}  {row[1]} ({row[2]}): {row[3]} {row[4]} n={row[5]} not reached={row[6]} "
                         f"{row[7]} ({row[8]})")
    for cell in data["cells"]:
        lines += [f"warning: {cell['id']}: {w}" for w in cell.get("warnings") or []]
        for state in ("failed",):
            for seed in cell["seeds"][state]:
                lines.append(f"failed: {cell['id']} seed {seed} (log: logs/{cell['id']}/seed-{seed}.log)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ plots


def _accuracy_bounds(acc: Mapping) -> tuple[float, float, float]:
    """Mean, low and high end of an accuracy's 95% CI in percent, the interval clipped to [0, 100] (a t interval of
    few seeds can pass either end of what an accuracy can be); the mean itself when there is no interval."""
    mean = 100 * acc["mean"]
    low = mean if acc.get("ci_low") is None else min(max(100 * acc["ci_low"], 0.0), mean)
    high = mean if acc.get("ci_high") is None else max(min(100 * acc["ci_high"], 100.0), mean)
    return mean, low, high


# Beside the axes, so that a legend never covers an error bar.
_LEGEND_RIGHT: dict[str, Any] = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "borderaxespad": 0.0,
                                 "fontsize": 9}


def plot_accuracy(data: Mapping, path) -> Path:
    """Mean test accuracy with its 95% CI (clipped to 0-100 %) as error bars, per strategy (colour, marker and a
    side offset) and cell (group); the legend beside the axes, never over a bar."""
    cells, names = data["cells"], _strategies(data)
    fig = Figure(figsize=(max(6.0, 1.6 * len(cells) + 2) + 2.0, 4.2), layout="constrained")
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
            mean, low, high = _accuracy_bounds(acc)
            xs.append(i + (j - (len(names) - 1) / 2) * width)
            means.append(mean)
            errors[0].append(mean - low)
            errors[1].append(high - mean)
        ax.errorbar(xs, means, yerr=errors, fmt=_MARKERS[j % len(_MARKERS)], capsize=3, color=f"C{j % 10}",
                    label=strategy_label(name))
    ax.set_xticks(range(len(cells)), [cell["label"].replace(", ", "\n") for cell in cells], fontsize=8)
    ax.set_ylabel("test accuracy (%), mean and 95% CI")
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a study with no finished run has nothing to name
        ax.legend(**_LEGEND_RIGHT)
    return save_figure(fig, path)


def plot_accuracy_vs_time(data: Mapping, path) -> Path:
    """Mean test accuracy (95% CI, clipped to 0-100 %) against mean train time: one point per cell (marker) and
    strategy (colour). Open markers, so that two strategies with the same train time and accuracy (mean
    probability and majority vote train the same stages) both stay visible; the legends beside the axes."""
    names = _strategies(data)
    fig = Figure(figsize=(9.0, 4.8), layout="constrained")
    ax = fig.add_subplot()
    colours = {name: f"C{j % 10}" for j, name in enumerate(names)}
    for i, cell in enumerate(data["cells"]):
        for j, name in enumerate(names):
            entry = cell["strategies"].get(name)
            if not entry or entry["accuracy"]["mean"] is None or entry["train_seconds"]["mean"] is None:
                continue
            mean, low, high = _accuracy_bounds(entry["accuracy"])
            # Later strategies are drawn smaller, so that one on top of another leaves a ring of it showing.
            ax.errorbar([entry["train_seconds"]["mean"]], [mean], yerr=[[mean - low], [high - mean]], capsize=2,
                        fmt=_MARKERS[i % len(_MARKERS)], color=colours[name], markerfacecolor="none",
                        markeredgewidth=1.6, markersize=10 - 4 * j / max(1, len(names) - 1))
    strategies = ax.legend([Patch(color=colours[name]) for name in names], [strategy_label(n) for n in names],
                           title="strategy", **_LEGEND_RIGHT)
    ax.add_artist(strategies)
    cells = [Line2D([], [], linestyle="none", marker=_MARKERS[i % len(_MARKERS)], color="grey",
                    markerfacecolor="none", markeredgewidth=1.6, markersize=8) for i in range(len(data["cells"]))]
    axes = ", ".join(data["cells"][0]["values"]) if data["cells"] else ""
    ax.legend(cells, [_short_label(cell) for cell in data["cells"]], title=f"cell ({axes})" if axes else "cell",
              **{**_LEGEND_RIGHT, "loc": "lower left", "bbox_to_anchor": (1.01, 0.0)})
    ax.set_xlabel("train time (s), mean over seeds")
    ax.set_ylabel("test accuracy (%), mean and 95% CI")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_curves(data: Mapping, path) -> Path:
    """The figure of :func:`curves_figure` as a PNG."""
    return save_figure(curves_figure(data), path)


def curves_figure(data: Mapping) -> Figure:
    """Validation accuracy per epoch of the transfer and coherent stages, mean over seeds with the 95% CI band
    (clipped to 0-100 %), one panel per cell; whole epochs on the axis, one legend above the panels."""
    cells = data["cells"]
    fig = Figure(figsize=(3.4 * len(cells), 3.5), layout="constrained")
    axes = fig.subplots(1, len(cells), squeeze=False)[0]
    drawn: dict[str, Line2D] = {}
    for ax, cell in zip(axes, cells):
        for j, (stage, curve) in enumerate(cell["curves"].items()):
            points = [p for p in curve if p["mean"] is not None]
            if not points:
                continue
            bounds = [_accuracy_bounds(p) for p in points]
            epochs = [p["epoch"] for p in points]
            (drawn[stage],) = ax.plot(epochs, [b[0] for b in bounds], marker=_MARKERS[j % len(_MARKERS)],
                                      color=f"C{j}")
            band = [(e, b) for e, b, p in zip(epochs, bounds, points) if p["ci_low"] is not None]
            if band:
                ax.fill_between([e for e, _ in band], [b[1] for _, b in band], [b[2] for _, b in band],
                                color=f"C{j}", alpha=0.2)
        ax.set_title(cell["label"], fontsize=8)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy (%)")
    if drawn:
        fig.legend(list(drawn.values()), [strategy_label(s) for s in drawn], loc="outside upper center",
                   ncols=len(drawn), fontsize=9, frameon=False)
    return fig


def write_report(data: Mapping, folder: Path) -> Path:
    """``study.md`` with its plots under ``folder/plots``; returns the path of study.md."""
    plots = own_folder(folder / "plots", folder)  # a plots/ that is a link is refused, not written through
    plot_accuracy(data, plots / "accuracy.png")
    plot_accuracy_vs_time(data, plots / "accuracy_vs_time.png")
    plot_curves(data, plots / "learning_curves.png")
    env = data.get("environment") or {}
    lines = [
        f"# Study `{data['name']}`",
        "",
        f"{_runs_line(data)}. Device: {env.get('device_name') or MISSING} ({env.get('device') or MISSING}); "
        f"torch {env.get('torch_version') or MISSING}; Python {env.get('python') or MISSING}; ddcnn "
        f"{env.get('ddcnn_version') or MISSING}; dataset {env.get('dataset') or MISSING}.",
        "",
        f"Command: {md_code(data.get('command') or MISSING)}"
        + (f" (last run: {md_code(data['last_command'])})" if data.get("last_command") else ""),
        "",
        f"Method: {data['method']}.",
        "",
        "## Claims (paired over seeds)",
        "",
        f"Columns: {', '.join(data['cells'][0]['values']) or 'the base config'}. Each entry: the mean difference in "
        f"test {LABELS.get(data['cells'][0].get('claims_metric', 'accuracy'), 'accuracy')} (percentage points; "
        f"evaluation.metric) over the seeds, its 95% CI, the seeds where it holds, and the verdict.",
        "",
        claims_matrix(data),
        "",
        claims_table(data),
        "",
        "## Time to target (paired ratios over seeds)",
        "",
        f"Method: {data.get('time_method') or MISSING}. The target of a run is its global CNN's best validation "
        "accuracy minus a margin (evaluation.target_margin) unless evaluation.target_accuracy sets it.",
        "",
        time_claims_table(data),
        "",
        *equal_cost_lines(data),
        "## Regime of the claims",
        "",
        *regime_lines(data),
        "",
        "## Strategies",
        "",
        strategies_table(data),
        "",
        "Train time is what each strategy's training stages took (the CNN-DNN's includes the local CNNs'). "
        "Intervals are clipped to 0-100 %, as in the plots.",
        "",
        "Metrics beyond accuracy (test set; mean over the seeds and 95% CI; macro: every class counts once; "
        "majority vote gives votes, so no ROC AUC):",
        "",
        metrics_table(data),
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
    atomic_write_text(path, "\n".join(lines))
    return path
