"""A budget study's report: the frontier plot per cell (test accuracy, mean and 95 % interval over seeds, against
training FLOPs; one line per strategy) and the claims table read off it (:mod:`ddcnn.study.frontier`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from ddcnn.report.plots import save_figure
from ddcnn.report.tables import md_table, ordered, strategy_label
from ddcnn.strategies import STRATEGIES
from ddcnn.study.report import _MARKERS, MISSING, _pp
from ddcnn.study.report import _interval as _ci
from ddcnn.train.schedule import CONVERGED


def _flops(value) -> str:
    return MISSING if value is None else f"{value / 1e12:.3g}"


def plot_frontier(cell: Mapping, path) -> Path:
    """Test accuracy (mean, 95 % interval over seeds) against training FLOPs (log scale), one line per strategy."""
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    points = cell["frontier"]["points"]
    for i, name in enumerate(ordered(list(points), tuple(STRATEGIES))):
        pts = points[name]
        x = [p["train_flops"] / 1e12 for p in pts]
        y = [100 * p["test_accuracy"]["mean"] for p in pts]
        low = [100 * (p["test_accuracy"]["mean"] - (p["test_accuracy"]["ci_low"] or p["test_accuracy"]["mean"]))
               for p in pts]
        high = [100 * ((p["test_accuracy"]["ci_high"] or p["test_accuracy"]["mean"]) - p["test_accuracy"]["mean"])
                for p in pts]
        ax.errorbar(x, y, yerr=[low, high], marker=_MARKERS[i % len(_MARKERS)], capsize=3, label=strategy_label(name))
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "125" else ""))
    ax.set_xlabel("training FLOPs (10^12, log scale)")
    ax.set_ylabel("test accuracy (%), mean and 95% CI over seeds")
    ax.set_title(f"{cell['label']}: accuracy against training cost")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


def _verdict(claim: Mapping) -> str:
    boot = claim.get("bootstrap")
    if boot and boot["verdict"] != claim["verdict"]:
        return f"{claim['verdict']} (bootstrap: {boot['verdict']})"
    return claim["verdict"]


def _claim_row(cell: Mapping, claim: Mapping, budget: str) -> tuple[str, ...]:
    boot = claim.get("bootstrap") or {}
    return (cell["id"], budget, f"{strategy_label(claim['a'])} ({claim['a_label']})", _flops(claim["a_flops"]),
            _pp(claim.get("mean"), True), _ci(claim, True), _ci(boot, True), "yes" if claim["paired"] else "no",
            _verdict(claim))


CLAIM_HEADER = ("cell", "global CNN at", "strategy (its budget)", "its TFLOPs", "diff (pp)", "95% CI (pp)",
                "bootstrap CI (pp)", "paired", "within 1 pp?")


def claims_rows(data: Mapping) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """(equal-cost rows, non-inferiority rows) over the cells."""
    equal, top = [], []
    for cell in data["cells"]:
        front = cell["frontier"]
        equal += [_claim_row(cell, c, c["budget"]) for c in front["equal_cost"]]
        top += [_claim_row(cell, c, c["b_label"]) for c in front["non_inferiority"]]
    return equal, top


BEATS_HEADER = ("cell", "a (its budget)", "b (its budget)", "a − b (pp)", "95% CI (pp)", "bootstrap CI (pp)",
                "paired", "a beats b?")


def beats_rows(data: Mapping) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for cell in data["cells"]:
        for c in cell["frontier"].get("beats", []):
            rows.append((cell["id"], f"{strategy_label(c['a'])} ({c['a_label']})",
                         f"{strategy_label(c['b'])} ({c['b_label']})", _pp(c.get("mean"), True), _ci(c, True),
                         _ci(c.get("bootstrap") or {}, True), "yes" if c["paired"] else "no", _verdict(c)))
    return rows


def frontier_table(cell: Mapping) -> str:
    rows = []
    points = cell["frontier"]["points"]
    for name in ordered(list(points), tuple(STRATEGIES)):
        for p in points[name]:
            fraction = p.get("max_lr_fraction")
            annealed = MISSING if fraction is None else ("yes" if fraction <= CONVERGED else f"no ({fraction:.2g})")
            timed = p.get("timed") or {}
            rows.append((strategy_label(name), p["label"], _flops(p["train_flops"]), _seconds(timed.get("seconds")),
                         _seconds(timed.get("critical_path_seconds")), _pp(p["test_accuracy"]["mean"]),
                         _ci(p["test_accuracy"]), _pp(p["test_accuracy"].get("std")), _pp(p["val_accuracy"]["mean"]),
                         str(p["test_accuracy"]["n"]), annealed))
    return md_table(("strategy", "budget (epochs)", "TFLOPs", "s (timed alone)", "s (critical path)", "test acc (%)",
                     "95% CI", "sd (pp)", "val acc (%)", "seeds", f"annealed (LR ≤ {CONVERGED:g} of peak)"), rows)


def _seconds(value) -> str:
    return MISSING if value is None else f"{value:.3g}"


def _median_seconds(points, per_seed: Mapping, key: str):
    """The median over seeds of the timed seconds of the point each seed reached the target at (a seed that never
    did counts as infinitely long); None without the timing pass or when half of the seeds or more never did."""
    by_flops = {p["train_flops"]: (p.get("timed") or {}).get(key) for p in points}
    found = [float("inf") if f is None else by_flops.get(f) for f in per_seed.values()]
    values = sorted(v for v in found if v is not None)
    if not values or len(values) < len(found):
        return None
    mid = len(values) // 2
    median = values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
    return median if median != float("inf") else None


def target_table(data: Mapping) -> str:
    rows = []
    for cell in data["cells"]:
        front = cell["frontier"]
        if not front.get("target"):
            continue
        for name in ordered(list(front["time_to_target"]), tuple(STRATEGIES)):
            t = front["time_to_target"][name]
            pts = front["points"][name]
            rows.append((cell["id"], strategy_label(name), f"{t['reached']}/{t['seeds']}",
                         _flops(t["median_flops"]), _seconds(_median_seconds(pts, t["per_seed"], "seconds")),
                         _seconds(_median_seconds(pts, t["per_seed"], "critical_path_seconds"))))
    return md_table(("cell", "strategy", "seeds reaching it", "median TFLOPs to reach it", "median s (timed alone)",
                     "median s (critical path)"), rows)


def sharing_lines(data: Mapping) -> list[str]:
    share = data.get("sharing") or {}
    trained, reused = share.get("trained"), share.get("reused")
    if not trained or not reused:
        return []
    return [f"Stages trained: {trained['stages']} ({trained['seconds']:.0f} s, {_flops(trained['train_flops'])} "
            f"TFLOPs); stages reused from the study's store instead of retrained: {reused['stages']} "
            f"({reused['seconds']:.0f} s, {_flops(reused['train_flops'])} TFLOPs) — sharing saved "
            f"{100 * share.get('saved_fraction_flops', 0.0):.0f} % of the training FLOPs and "
            f"{100 * share['saved_fraction_seconds']:.0f} % of the (contended) training seconds the runs would have "
            f"spent."]


def frontier_markdown(data: Mapping, folder: Path) -> str:
    """study.md of a budget study; the plots are written to ``folder/plots``."""
    lines = [f"# Study {data['name']}: the accuracy–cost frontier", ""]
    env = data.get("environment") or {}
    lines += [f"Command: `{data.get('command')}`", "",
              f"Device: {env.get('device_name')}, torch {env.get('torch_version')}, Python {env.get('python')}, "
              f"ddcnn {env.get('ddcnn_version')}; dataset {env.get('dataset')}.", "",
              f"Every budget is its own run whose schedule ends at its own last epoch; training FLOPs (forward and "
              f"backward over the images seen, deterministic) are the cost axis. {data['method']}", ""]
    lines += sharing_lines(data) + [""]
    for cell in data["cells"]:
        front = cell["frontier"]
        plot = plot_frontier(cell, folder / "plots" / f"frontier_{cell['id']}.png")
        lines += [f"## {cell['label']}", "", f"![frontier](plots/{plot.name})", "", frontier_table(cell), ""]
        target = front.get("target")
        if target:
            lines += [f"Study-level target: {_pp(target['val_accuracy'])} % validation accuracy (median over "
                      f"{target['seeds']} seeds of the global CNN at {target['from']}: {_pp(target['median'])} %, "
                      f"minus {_pp(target['margin'])} pp).", ""]
    equal, top = claims_rows(data)
    lines += ["## Claims", "",
              f"Non-inferiority margin: {_pp(data['margin'])} pp, declared before the runs. A claim *holds* when "
              f"the 95% interval of (strategy − global CNN) lies above −{_pp(data['margin'])} pp, *fails* when it "
              f"lies below, else is *inconclusive*. Paired by seed only where both start from the same local CNNs; "
              f"against the global CNN the difference is unpaired (Welch).", "",
              "### Non-inferiority at the top budget", "", md_table(CLAIM_HEADER, top), "",
              "### At equal cost", "",
              "At each budget of the global CNN, each strategy's point of highest mean validation accuracy among "
              "those that cost no more training FLOPs.", "", md_table(CLAIM_HEADER, equal), "",
              "### The paper's other claims", "",
              "\"a beats b\" at a's top budget, against b at the same local CNNs where b has them (paired by seed), "
              "else at b's top budget (unpaired): *holds* when the 95% interval of a − b lies above 0, *fails* when "
              "below, else *inconclusive*.", "", md_table(BEATS_HEADER, beats_rows(data)), "",
              "### Time to the study-level target", "", target_table(data), ""]
    timing = data.get("timing")
    if timing:
        lines += timing_lines(timing)
    return "\n".join(lines) + "\n"


def timing_lines(timing: Mapping) -> list[str]:
    rows = []
    for row in timing.get("stages", []):
        rows.append((row["cell"], row["stage"].replace("_", " "), f"{row['step_seconds']['median'] * 1e3:.1f}",
                     f"[{row['step_seconds']['min'] * 1e3:.1f}, {row['step_seconds']['max'] * 1e3:.1f}]",
                     str(row["repeats"]), f"{row['epoch_seconds']:.2f}"))
    return ["## Seconds (a timing pass run alone)", "", timing.get("note", ""), "",
            md_table(("cell", "stage", "step (ms), median", "min–max (ms)", "repeats", "epoch (s)"), rows), ""]


def frontier_summary(data: Mapping) -> str:
    """The one-screen summary of a budget study: runs, sharing, and the claims at the top budget."""
    runs: dict[str, int] = {}
    for cell in data["cells"]:
        for state, n in cell["runs"].items():
            runs[state] = runs.get(state, 0) + n
    lines = [f"study {data['name']}: " + ", ".join(f"{n} {state}" for state, n in sorted(runs.items())) + " runs"]
    lines += sharing_lines(data)
    _, top = claims_rows(data)
    width = max([len(r[2]) for r in top] + [8])
    lines.append(f"{'cell':<10}  {'strategy (budget) vs the global CNN at its top budget':<{width}}  {'diff (pp)':>9}  "
                 f"{'95% CI (pp)':>16}  within {_pp(data['margin'])} pp?")
    for row in top:
        lines.append(f"{row[0]:<10}  {row[2]:<{width}}  {row[4]:>9}  {row[5]:>16}  {row[8]}")
    return "\n".join(lines)
