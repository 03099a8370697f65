"""From the runs of a study to its numbers: per cell and strategy, the paper's claims, averaged learning curves.

:func:`aggregate` is a pure function of the runs' contents (results.json and metrics.jsonl as read by
:func:`read_run`); it returns the plain data written as ``study.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ddcnn.config import METRICS
from ddcnn.files import read_json
from ddcnn.study.stats import METHOD, paired_differences, ratio_summary, summarize, verdict
from ddcnn.train.schedule import converged
from ddcnn.train.store.schema import RESULTS, fix_for

# The paper's claims, as (a, b): "a beats b". Everything else is read from each run's results.json.
CLAIMS = (("cnn_dnn", "mean_probability"), ("cnn_dnn", "majority_vote"), ("transfer", "coherent"),
          ("transfer", "cnn_dnn"), ("transfer", "global"))
# A width decomposition's claims (Gu et al.; Klawonn, Lanser, Weber 2410.23359), in cells that trained
# global_transfer: the recomposed global CNN against the global CNN and against the sub-networks without transfer.
WIDTH_CLAIMS = (("global_transfer", "global"), ("global_transfer", "sub_networks"), ("sub_networks", "global"))
# "a is not worse than b by more than the margin": the paired interval's lower end above -margin (0.5 pp, the
# default evaluation.target_margin).
NONINFERIORITY = {("global_transfer", "global"): 0.005}
# The paper's time claim: "a reaches the target validation accuracy in less time than b", as a paired ratio.
TIME_CLAIMS = (("transfer", "global"), ("cnn_dnn", "global"))
WIDTH_TIME_CLAIMS = (("global_transfer", "global"), ("sub_networks", "global"))
WIDTH_EQUAL_COST = (("global_transfer", "global"),)  # validation accuracy at the same training cost
EQUAL_COST_KEYS = ("seconds", "critical_path_seconds", "train_flops")
TIME_KEYS = ("seconds", "critical_path_seconds")
# the stages that train CNNs (not the combine DNN)
CNN_STAGES = ("global", "local", "coherent", "transfer", "global_transfer")
TIME_METHOD = ("time claims are paired ratios a/b of the time to reach the target validation accuracy, per seed; "
               "geometric mean over the seeds where both reached it, 95% interval exp(mean ± t · s / sqrt(n)) of "
               "the log ratios; a claim holds when the interval lies below 1, fails when it lies above 1, else (or "
               "with n < 2) is inconclusive; seeds where either strategy never reached the target give no ratio and "
               "are counted as not reached")
CURVE_STAGES = ("transfer", "coherent")  # trained end to end: does starting from the trained parts speed it up?
ENVIRONMENT_KEYS = ("device", "device_name", "torch_version", "python", "ddcnn_version", "dataset")


@dataclass
class RunData:
    """What one finished run contributes: its results.json and its per-epoch records."""

    cell: str
    seed: int
    results: dict
    metrics: list[dict] = field(default_factory=list)


def read_run(cell: str, seed: int, out: Path) -> RunData:
    """Read a finished run directory; unreadable metrics lines are skipped (a kill can cut the last one). A damaged
    results.json is a CheckpointError naming it and the wrong entry."""
    results = read_json(out / "results.json", RESULTS, fix_for("results.json"))
    metrics = []
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            metrics.append(record)
    return RunData(cell, seed, results, metrics)


def _accuracies(runs: Sequence[RunData], metric: str = "accuracy") -> dict[str, dict[int, float]]:
    """strategy -> seed -> test ``metric`` (ddcnn.metrics' names; accuracy is results.json's test_accuracy), for
    the strategies the runs report."""
    table: dict[str, dict[int, float]] = {}
    for run in runs:
        for name, entry in (run.results.get("strategies") or {}).items():
            if not isinstance(entry, dict):
                continue
            value = entry.get("test_accuracy") if metric == "accuracy" else \
                (entry.get("test_metrics") or {}).get(metric)
            if isinstance(value, int | float) and not isinstance(value, bool):
                table.setdefault(name, {})[run.seed] = float(value)
    return table


def claims_metric(runs: Sequence[RunData]) -> str:
    """The metric the claims compare: the runs' evaluation.metric (results.json), accuracy for earlier runs."""
    return next((run.results["evaluation_metric"] for run in runs if run.results.get("evaluation_metric") in METRICS),
                "accuracy")


def _strategy_stats(runs: Sequence[RunData], name: str, accuracy: Mapping[int, float],
                    others: Mapping[str, Mapping[str, Mapping[int, float]]] | None = None) -> dict:
    entries = [run.results["strategies"][name] for run in runs if name in (run.results.get("strategies") or {})]
    seconds = [e["train_seconds"] for e in entries if isinstance(e.get("train_seconds"), int | float)]
    parameters = sorted({e["parameters"] for e in entries if isinstance(e.get("parameters"), int)})
    return {"accuracy": summarize(list(accuracy.values())).as_dict(),
            # the metrics beyond accuracy, mean and CI over the seeds (absent for runs of earlier versions)
            "metrics": {metric: summarize(list(table.get(name, {}).values())).as_dict()
                        for metric, table in (others or {}).items()},
            "train_seconds": summarize(seconds).as_dict(),
            "parameters": parameters[0] if len(parameters) == 1 else parameters,
            "per_seed": {str(s): a for s, a in sorted(accuracy.items())}}


def claim(a: Mapping[int, float], b: Mapping[int, float]) -> dict:
    """The paired claim "a beats b" over the seeds both hold: the difference's summary, how many seeds it holds
    in, and the verdict from its confidence interval."""
    differences = paired_differences(a, b)
    summary = summarize(list(differences.values()))
    return {**summary.as_dict(), "holds_in": sum(d > 0 for d in differences.values()), "verdict": verdict(summary),
            "per_seed": {str(s): d for s, d in differences.items()}}


def noninferiority(summary: Mapping, margin: float) -> dict:
    """``non-inferior`` when the paired interval's lower end lies above ``-margin``, else ``not shown``."""
    low = summary.get("ci_low")
    shown = summary.get("n", 0) >= 2 and low is not None and low > -margin
    return {"margin": margin, "verdict": "non-inferior" if shown else "not shown"}


def learning_curve(runs: Sequence[RunData], stage: str) -> list[dict]:
    """Validation accuracy per epoch of ``stage``, averaged over the runs, with its t interval per epoch."""
    by_epoch: dict[int, list[float]] = {}
    for run in runs:
        last: dict[int, float] = {}  # a resumed run may log an epoch twice: its last record counts
        for record in run.metrics:
            value, epoch = record.get("val_accuracy"), record.get("epoch")
            if record.get("stage") == stage and isinstance(epoch, int) and isinstance(value, int | float):
                last[epoch] = float(value)
        for epoch, value in last.items():
            by_epoch.setdefault(epoch, []).append(value)
    return [{"epoch": epoch, **summarize(values).as_dict()} for epoch, values in sorted(by_epoch.items())]


def time_claim(runs: Sequence[RunData], a: str, b: str) -> dict:
    """The paired claim "a reaches the target in less time than b": per seed the ratio of their times to target
    (measured and critical path), summarised on the log scale; seeds where either did not reach it are listed."""
    out: dict = {"a": a, "b": b, "not_reached": {}}
    ratios: dict[str, dict[int, float]] = {key: {} for key in TIME_KEYS}
    for run in runs:
        strategies = run.results.get("strategies") or {}
        if a not in strategies or b not in strategies or "time_to_target" not in strategies[a]:
            continue
        times = [strategies[name].get("time_to_target") for name in (a, b)]
        if None in times:
            out["not_reached"][str(run.seed)] = [name for name, t in zip((a, b), times) if t is None]
            continue
        for key in TIME_KEYS:
            if times[1][key] > 0 and times[0][key] > 0:
                ratios[key][run.seed] = times[0][key] / times[1][key]
    for key in TIME_KEYS:
        out[key] = {**ratio_summary(list(ratios[key].values())),
                    "per_seed": {str(s): r for s, r in sorted(ratios[key].items())}}
    return out


def best_within(curve: Sequence[Mapping], budget: float, key: str) -> float | None:
    """The best validation accuracy a strategy's curve reached at a cumulative cost ``key`` of at most ``budget``."""
    values = [p["val_accuracy"] for p in curve if isinstance(p.get("val_accuracy"), int | float)
              and isinstance(p.get(key), int | float) and p[key] <= budget * (1 + 1e-9)]
    return max(values) if values else None


def equal_cost_claim(runs: Sequence[RunData], a: str, b: str) -> dict:
    """The paired claim "at equal cost, a is more accurate than b", read off the accuracy-against-cost frontier:
    per seed and cost measure, the budget is the smaller of the two strategies' whole costs, and each strategy
    counts the best validation accuracy its curve reached within it (a strategy with no epoch inside the budget
    is counted as not reached)."""
    out: dict = {"a": a, "b": b}
    for key in EQUAL_COST_KEYS:
        differences, short = {}, []
        for run in runs:
            curves = run.results.get("curves") or {}
            if not curves.get(a) or not curves.get(b):
                continue
            budget = min(curves[a][-1].get(key, 0.0), curves[b][-1].get(key, 0.0))
            best_a, best_b = (best_within(curves[name], budget, key) for name in (a, b))
            if best_a is None or best_b is None:
                short.append(run.seed)
            else:
                differences[run.seed] = best_a - best_b
        summary = summarize(list(differences.values()))
        out[key] = {**summary.as_dict(), "verdict": verdict(summary), "not_reached": short,
                    "holds_in": sum(d > 0 for d in differences.values()),
                    "per_seed": {str(s): d for s, d in sorted(differences.items())}}
    return out


def regime(runs: Sequence[RunData]) -> dict:
    """How the cell's runs were trained: ``converged`` (every stage under early stopping, and every one stopped
    at a tenth of its peak learning rate or less: :func:`ddcnn.train.schedule.converged`), ``early stopping, not
    annealed`` (some stage stopped at a higher rate) or ``fixed budget``, with the stages' stops counted as
    :func:`ddcnn.train.schedule.stop_text` names them ("stopped by patience at LR 0.5"), and the runs whose
    global CNN stopped at its cap while another strategy trained more CNN epochs (its comparison may favour the
    other)."""
    stops: dict[str, dict[str, int]] = {}
    early = annealed = bool(runs)
    warnings = []
    for run in runs:
        stages = run.results.get("stages") or {}
        if not stages:
            early = False
        for stage, summary in stages.items():
            early = early and summary.get("patience") is not None
            annealed = annealed and converged(summary)
            reason = str(summary.get("stop_reason"))
            stops.setdefault(stage, {}).setdefault(reason, 0)
            stops[stage][reason] += 1
        glob = stages.get("global") or {}
        if glob.get("stop_reason") == "cap":
            cnn_epochs = {name: sum(n for stage, n in ((e.get("cost") or {}).get("epochs") or {}).items()
                                    if stage in CNN_STAGES)
                          for name, e in (run.results.get("strategies") or {}).items()}
            more = [name for name, n in cnn_epochs.items() if n > glob.get("epochs_run", 0)]
            if more:
                warnings.append(f"seed {run.seed}: the global CNN stopped at its cap ({glob.get('epochs_run')} "
                                f"epochs) while {', '.join(more)} trained more CNN epochs")
    kind = ("converged" if annealed else "early stopping, not annealed") if early else "fixed budget"
    return {"regime": kind, "stop_reasons": stops, "warnings": warnings}


def aggregate_cell(runs: Sequence[RunData]) -> dict:
    """Strategies, claims and learning curves of one cell's finished runs."""
    accuracies = _accuracies(runs)
    others = {metric: _accuracies(runs, metric) for metric in METRICS if metric != "accuracy"}
    metric = claims_metric(runs)
    compared = accuracies if metric == "accuracy" else others.get(metric, {})  # what the claims compare
    width = "global_transfer" in accuracies
    claims = {}
    # A width cell on whole images has no CNN-DNN: the paper's first claims are left out of it, not "not measured".
    for a, b in [c for c in CLAIMS if not width or {*c} <= set(accuracies)] + list(WIDTH_CLAIMS if width else ()):
        if a in compared and b in compared:
            claims[f"{a} - {b}"] = {"a": a, "b": b, **claim(compared[a], compared[b])}
            if (a, b) in NONINFERIORITY:
                claims[f"{a} - {b}"]["noninferiority"] = noninferiority(claims[f"{a} - {b}"], NONINFERIORITY[a, b])
        else:
            claims[f"{a} - {b}"] = not_measured(a, b, compared)
    times = [c for c in TIME_CLAIMS if not width or {*c} <= set(accuracies)] + list(WIDTH_TIME_CLAIMS if width else ())
    return {"strategies": {name: _strategy_stats(runs, name, acc, others) for name, acc in accuracies.items()},
            "claims_metric": metric, "claims": claims,
            "time_claims": {f"{a} / {b}": time_claim(runs, a, b) for a, b in times},
            **({"equal_cost_claims": {f"{a} - {b}": equal_cost_claim(runs, a, b) for a, b in WIDTH_EQUAL_COST}}
               if width else {}),
            **regime(runs),
            "curves": {stage: learning_curve(runs, stage) for stage in CURVE_STAGES}}


def not_measured(a: str, b: str, accuracies: Mapping) -> dict:
    return {"a": a, "b": b, "n": 0, "verdict": "not measured", "missing": [s for s in (a, b) if s not in accuracies]}


def aggregate(cells: Sequence[Mapping], runs: Sequence[RunData], status: Mapping[str, Mapping[int, str]]) -> dict:
    """The study's numbers. ``cells``: ``{"id", "label", "values"}`` per cell in order; ``runs``: the finished runs;
    ``status``: cell id -> seed -> finished / failed / interrupted / new."""
    out_cells = []
    for cell in cells:
        mine = [run for run in runs if run.cell == cell["id"]]
        seeds = status.get(cell["id"], {})
        out_cells.append({**cell, "seeds": {state: sorted(s for s, st in seeds.items() if st == state)
                                            for state in ("finished", "failed", "interrupted", "new")},
                          **aggregate_cell(mine)})
    environment: dict[str, object] = {}
    for run in runs:
        for key in ENVIRONMENT_KEYS:
            environment.setdefault(key, run.results.get(key))
    # Every cell answers every claim of the study: one a cell left out (a width cell's CNN-DNN) is "not measured".
    claims = list(dict.fromkeys([f"{a} - {b}" for a, b in CLAIMS] if not out_cells else
                                [key for cell in out_cells for key in cell["claims"]]))
    for cell in out_cells:
        for key in claims:
            if key not in cell["claims"]:
                a, b = key.split(" - ")
                cell["claims"][key] = not_measured(a, b, cell["strategies"])
    time_claims = list(dict.fromkeys([f"{a} / {b}" for a, b in TIME_CLAIMS] if not out_cells else
                                     [key for cell in out_cells for key in cell["time_claims"]]))
    return {"method": METHOD, "time_method": TIME_METHOD, "claims": claims,
            "time_claims": time_claims, "environment": environment,
            "cells": out_cells}
