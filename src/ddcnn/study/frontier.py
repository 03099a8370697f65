"""The accuracy–cost frontier of a budget study, and the claims read off it.

:func:`frontier` is a pure function of the finished runs of one cell (``RunData`` with their budget ``point``).
Every strategy a run reports is a **point** of that strategy: its cost is the sum of the stages it depends on
(:func:`ddcnn.train.time_to_target.strategy_costs`), its training FLOPs the frontier's axis (deterministic, the same
for every seed); the same strategy at the same stages' epochs in several runs (the CNN-DNN of local 6 under every
transfer budget) is one point, its stages being one shared, bit-identical stage. Per point: the test accuracy over seeds
(mean, 95 % Student-t interval from ``scipy.stats``) and the validation accuracy that chooses.

The claims, all with the global CNN as the baseline:

- **equal cost**: at each budget of the global CNN, each other strategy's point of highest mean validation accuracy
  among those that cost no more training FLOPs; the difference of test accuracies;
- **non-inferiority at the top budget**: each strategy's most expensive point against the global CNN's, with the
  margin :data:`MARGIN` declared here, before any run: *holds* when the interval's lower end is above −margin,
  *fails* when its upper end is below −margin, else *inconclusive*;
- **time to a study-level target** fixed as AlgoPerf fixes it: the median over seeds of the top-budget global CNN's
  validation accuracy, minus the base config's ``evaluation.target_margin``; the same target for every seed and
  strategy; per seed the cheapest point (FLOPs) whose validation accuracy reaches it.

A difference is **paired** by seed only where both strategies start from the same local CNNs (the CNN-DNN, the
rules and transfer); against the global CNN or the coherent CNN-DNN it is unpaired (Welch). Beside every interval
is a bootstrap over seeds *and* test images (the runs' packed predictions, :mod:`ddcnn.predicted`), whose verdict
is reported where it differs.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

from ddcnn.predicted import unpack_classes
from ddcnn.study.stats import LEVEL

MARGIN = 0.01  # non-inferiority margin: within 1 pp of the global CNN's test accuracy
BOOTSTRAP = 2000  # replicates of the bootstrap over seeds and test images
BOOTSTRAP_SEED = 0
SHARED = {"local"}  # a stage two strategies share makes their difference paired by seed
BASELINE = "global"
# The paper's other claims, "a beats b", at a's top budget: against b at the same local CNNs where b has them (paired
# by seed), else against b's top budget (unpaired).
BEATS = (("transfer", "cnn_dnn"), ("transfer", "coherent"), ("cnn_dnn", "mean_probability"),
         ("cnn_dnn", "majority_vote"))


def _t_interval(values: Sequence[float]) -> dict:
    n = len(values)
    mean = float(np.mean(values)) if n else None
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci_low": None, "ci_high": None}
    std = float(np.std(values, ddof=1))
    half = float(stats.t.ppf(1 - (1 - LEVEL) / 2, n - 1)) * std / n ** 0.5
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def _welch(a: Sequence[float], b: Sequence[float]) -> dict:
    """The unpaired difference of means a − b with Welch's 95 % interval."""
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return {"n": min(na, nb), "mean": float(np.mean(a) - np.mean(b)) if na and nb else None,
                "ci_low": None, "ci_high": None}
    va, vb = np.var(a, ddof=1) / na, np.var(b, ddof=1) / nb
    se = float(np.sqrt(va + vb))
    df = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1)) if va + vb > 0 else na + nb - 2
    half = float(stats.t.ppf(1 - (1 - LEVEL) / 2, df)) * se
    mean = float(np.mean(a) - np.mean(b))
    return {"n": min(na, nb), "mean": mean, "ci_low": mean - half, "ci_high": mean + half}


def point_label(epochs: Mapping[str, int]) -> str:
    """``local 6 + combine 10 + transfer 2`` from a strategy's cost epochs."""
    return " + ".join(f"{stage} {n}" for stage, n in epochs.items())


def collect_points(runs) -> dict[str, list[dict]]:
    """strategy -> its points (cheapest first), each ``{"label", "epochs", "train_flops", "seeds": {seed: {...}}}``
    with per seed the test and validation accuracy, the packed predictions and the stages' stop labels."""
    points: dict[tuple[str, str], dict] = {}
    for run in runs:
        results = run.results
        packed = results.get("test_predictions") or {}
        stages_summary = results.get("stages") or {}
        for name, entry in (results.get("strategies") or {}).items():
            cost = entry.get("cost") or {}
            epochs = cost.get("epochs") or {}
            key = (name, json.dumps(epochs, sort_keys=True))
            point = points.setdefault(key, {"strategy": name, "label": point_label(epochs), "epochs": epochs,
                                            "train_flops": int(cost.get("train_flops") or 0), "seeds": {}})
            if run.seed in point["seeds"]:
                continue  # the same shared stages in another run: the same numbers
            point["seeds"][run.seed] = {
                "test_accuracy": entry["test_accuracy"], "val_accuracy": entry.get("val_accuracy"),
                "seconds": cost.get("seconds"), "predictions": packed.get(name),
                "lr_fraction": {s: stages_summary.get(s, {}).get("lr_fraction") for s in epochs},
                "reused": sorted(s for s in epochs if stages_summary.get(s, {}).get("reused_from"))}
    out: dict[str, list[dict]] = {}
    for (name, _), point in points.items():
        out.setdefault(name, []).append(point)
    return {name: sorted(pts, key=lambda p: p["train_flops"]) for name, pts in out.items()}


def _summaries(point: Mapping) -> dict:
    seeds = point["seeds"]
    test = [s["test_accuracy"] for s in seeds.values()]
    val = [s["val_accuracy"] for s in seeds.values() if s["val_accuracy"] is not None]
    fractions = [f for s in seeds.values() for f in s["lr_fraction"].values() if isinstance(f, int | float)]
    return {"strategy": point["strategy"], "label": point["label"], "epochs": point["epochs"],
            "train_flops": point["train_flops"], "seeds": sorted(seeds), "test_accuracy": _t_interval(test),
            "val_accuracy": _t_interval(val), "max_lr_fraction": max(fractions) if fractions else None,
            "per_seed": {str(s): v["test_accuracy"] for s, v in sorted(seeds.items())}}


def _correct(point: Mapping, labels: np.ndarray | None) -> dict[int, np.ndarray] | None:
    """seed -> whether each test image was classified right, from the packed predictions (None without them)."""
    if labels is None:
        return None
    out = {}
    for seed, entry in point["seeds"].items():
        if not entry.get("predictions"):
            return None
        predicted = np.asarray(unpack_classes(entry["predictions"]))
        if predicted.shape != labels.shape:
            return None
        out[seed] = predicted == labels
    return out


def bootstrap_difference(a: Mapping[int, np.ndarray], b: Mapping[int, np.ndarray], paired: bool,
                         replicates: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> dict:
    """Percentile interval of mean test accuracy a − b, resampling the seeds (the same ones for both when
    ``paired``) and the test images (always the same for both: one test set). ``a``, ``b``: seed -> ``(M,)`` bool."""
    rng = np.random.default_rng(seed)
    seeds_a, seeds_b = sorted(a), sorted(b)
    if paired:
        seeds_a = seeds_b = sorted(set(a) & set(b))
    if len(seeds_a) < 2 or len(seeds_b) < 2:
        return {"ci_low": None, "ci_high": None, "replicates": 0}
    ca = np.stack([a[s] for s in seeds_a]).astype(np.float32)  # (n_a, M)
    cb = np.stack([b[s] for s in seeds_b]).astype(np.float32)
    m = ca.shape[1]
    differences = []
    for start in range(0, replicates, 250):
        k = min(250, replicates - start)
        weights = rng.multinomial(m, np.full(m, 1 / m), size=k).astype(np.float32) / m  # (k, M) image weights
        acc_a, acc_b = ca @ weights.T, cb @ weights.T  # (n, k): each seed's accuracy on the resampled images
        pick_a = rng.integers(0, len(seeds_a), size=(k, len(seeds_a)))
        pick_b = pick_a if paired else rng.integers(0, len(seeds_b), size=(k, len(seeds_b)))
        cols = np.arange(k)[:, None]
        differences.append(acc_a[pick_a, cols].mean(1) - acc_b[pick_b, cols].mean(1))
    low, high = np.quantile(np.concatenate(differences), [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2])
    return {"ci_low": float(low), "ci_high": float(high), "replicates": replicates}


def non_inferiority(summary: Mapping, margin: float = MARGIN) -> str:
    """holds / fails / inconclusive for "a is within ``margin`` of b" from the interval of a − b."""
    if summary.get("ci_low") is None:
        return "inconclusive"
    if summary["ci_low"] > -margin:
        return "holds"
    if summary["ci_high"] < -margin:
        return "fails"
    return "inconclusive"


def superiority(summary: Mapping) -> str:
    """holds / fails / inconclusive for "a beats b" from the interval of a − b (above 0, below 0, else)."""
    if summary.get("ci_low") is None:
        return "inconclusive"
    return "holds" if summary["ci_low"] > 0 else "fails" if summary["ci_high"] < 0 else "inconclusive"


def beats(a: Mapping, b: Mapping, labels: np.ndarray | None) -> dict:
    """The claim "point a beats point b": :func:`compare` with the superiority verdict (its own and the
    bootstrap's)."""
    out = compare(a, b, labels)
    out["verdict"] = superiority(out)
    if "bootstrap" in out:
        out["bootstrap"]["verdict"] = superiority(out["bootstrap"])
    return out


def compare(a: Mapping, b: Mapping, labels: np.ndarray | None, margin: float = MARGIN) -> dict:
    """Point ``a`` against point ``b``: the difference of test accuracies (paired by seed only when they share the
    local CNNs), its t interval and verdict, and the bootstrap's interval and verdict."""
    paired = bool(SHARED & set(a["epochs"]) & set(b["epochs"])) and a["epochs"].get("local") == \
        b["epochs"].get("local")
    ta = {s: v["test_accuracy"] for s, v in a["seeds"].items()}
    tb = {s: v["test_accuracy"] for s, v in b["seeds"].items()}
    if paired:
        common = sorted(set(ta) & set(tb))
        diff = _t_interval([ta[s] - tb[s] for s in common])
    else:
        diff = _welch(list(ta.values()), list(tb.values()))
    out = {"a": a["strategy"], "a_label": a["label"], "a_flops": a["train_flops"], "b": b["strategy"],
           "b_label": b["label"], "b_flops": b["train_flops"], "paired": paired, **diff,
           "verdict": non_inferiority(diff, margin)}
    correct_a, correct_b = _correct(a, labels), _correct(b, labels)
    if correct_a is not None and correct_b is not None:
        boot = bootstrap_difference(correct_a, correct_b, paired)
        out["bootstrap"] = {**boot, "verdict": non_inferiority(boot, margin)}
    return out


def _best_within(points: Sequence[Mapping], flops: int) -> Mapping | None:
    """The point of highest mean validation accuracy among those costing at most ``flops``."""
    affordable = [p for p in points if p["train_flops"] <= flops]
    if not affordable:
        return None
    return max(affordable, key=lambda p: statistics.mean(
        [s["val_accuracy"] or 0.0 for s in p["seeds"].values()]))


def study_target(points: Mapping[str, Sequence[Mapping]], margin: float) -> dict | None:
    """The study-level target: median over seeds of the top-budget global CNN's validation accuracy − margin."""
    glob = points.get(BASELINE)
    if not glob:
        return None
    top = glob[-1]
    values = [s["val_accuracy"] for s in top["seeds"].values() if s["val_accuracy"] is not None]
    if not values:
        return None
    median = float(np.median(values))
    return {"val_accuracy": median - margin, "median": median, "margin": margin, "from": top["label"],
            "seeds": len(values)}


def time_to_target(points: Sequence[Mapping], target: float) -> dict:
    """Per seed the cheapest point whose validation accuracy reaches ``target``: its FLOPs (None: never); the median
    over seeds counts a seed that never reached it as infinitely costly (None when half of them or more did not)."""
    per_seed: dict[str, int | None] = {}
    seeds = sorted({s for p in points for s in p["seeds"]})
    for seed in seeds:
        reached = [p["train_flops"] for p in points if seed in p["seeds"] and
                   (p["seeds"][seed]["val_accuracy"] or 0.0) >= target]
        per_seed[str(seed)] = min(reached) if reached else None
    hits = [v for v in per_seed.values() if v is not None]
    median = float(np.median([np.inf if v is None else v for v in per_seed.values()])) if seeds else np.inf
    return {"per_seed": per_seed, "reached": len(hits), "seeds": len(seeds),
            "median_flops": median if np.isfinite(median) else None}


def frontier(runs, labels: Sequence[int] | None, target_margin: float, margin: float = MARGIN) -> dict:
    """The frontier and claims of one cell's finished runs; ``labels``: the test set's classes (None: no
    bootstrap)."""
    points = collect_points(runs)
    truth = np.asarray(labels) if labels is not None else None
    out: dict = {"points": {name: [_summaries(p) for p in pts] for name, pts in points.items()}, "equal_cost": [],
                 "non_inferiority": [], "time_to_target": {}, "margin": margin}
    glob = points.get(BASELINE, [])
    for g in glob:
        for name, pts in points.items():
            best = _best_within(pts, g["train_flops"]) if name != BASELINE else None
            if best is not None:
                out["equal_cost"].append({"budget": g["label"], **compare(best, g, truth, margin)})
    if glob:
        for name, pts in points.items():
            if name != BASELINE:
                out["non_inferiority"].append(compare(pts[-1], glob[-1], truth, margin))
    out["beats"] = []
    for a, b in BEATS:
        if a in points and b in points:
            top = points[a][-1]
            same = [p for p in points[b] if p["epochs"].get("local") == top["epochs"].get("local")]
            out["beats"].append(beats(top, same[-1] if same and "local" in top["epochs"] else points[b][-1], truth))
    target = study_target(points, target_margin)
    out["target"] = target
    if target is not None:
        out["time_to_target"] = {name: time_to_target(pts, target["val_accuracy"]) for name, pts in points.items()}
    return out
