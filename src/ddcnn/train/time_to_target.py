"""What each strategy cost to train, and when its validation accuracy first reached a target.

A stage's cost curve has one point per epoch: its cumulative measured seconds, critical-path seconds and training
FLOPs (forward and backward, 3x the forward pass, over the images the stage saw), starting from the work it did
before its first epoch (the combine stage's pass of the local CNNs over the data). The critical path differs from
the measured time in the local stage only: the time if every local CNN had its own device
(:mod:`ddcnn.train.engine.timing`), spread over its epochs in proportion (every epoch has the same steps).

A strategy's curve is the validation accuracy of its own model after each epoch of the stage that trains it (the
global CNN, the coherent and the transfer CNN-DNN: their stage; the CNN-DNN: the combine stage's DNN on the frozen
local CNNs; mean probability and majority vote: the rule on the local CNNs of each local epoch), against the cost
of every stage it depends on, in dependency order: the stages before its own count in full (all the epochs they
ran, also those after their kept epoch). The transfer CNN-DNN's curve therefore starts after the whole local (and
combine) stage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ddcnn.config import EvaluationConfig
from ddcnn.strategies import STRATEGIES

COSTS = ("seconds", "critical_path_seconds", "train_flops")


def stage_curve(summary: Mapping, history: Sequence[Mapping], critical_path_seconds: float | None = None) -> list[dict]:
    """The cumulative cost after every epoch of one stage (``summary``: its end-of-stage record;
    ``critical_path_seconds``: the local stage's estimate, None for the others)."""
    epochs = max(1, len(history))
    setup_seconds = summary.get("setup_seconds", 0.0)
    points = []
    for i, record in enumerate(history, start=1):  # an epoch's record counts the stage's setup already
        seconds = record["seconds"]
        points.append({"epoch": record["epoch"], "seconds": seconds,
                       "critical_path_seconds": seconds if critical_path_seconds is None
                       else setup_seconds + critical_path_seconds * i / epochs,
                       "train_flops": record.get("train_flops", 0), "record": record})
    return points


def stage_total(summary: Mapping, critical_path_seconds: float | None = None) -> dict:
    """A whole stage's cost: measured seconds, critical-path seconds, training FLOPs, epochs run."""
    seconds = summary["seconds"]
    critical = seconds if critical_path_seconds is None else summary.get("setup_seconds", 0.0) + critical_path_seconds
    return {"seconds": seconds, "critical_path_seconds": critical, "train_flops": summary["train_flops"],
            "epochs": summary["epochs_run"]}


def strategy_costs(name: str, stages: Mapping[str, tuple[Mapping, Sequence[Mapping], float | None]],
                   initialised_from: tuple[str, ...] = ()) -> tuple[dict, list[dict]]:
    """``(cost, curve)`` of strategy ``name``. ``stages``: stage -> (end-of-stage record, epoch records, the
    local stage's critical-path seconds or None). ``cost`` sums every stage the strategy depends on; ``curve`` is
    its validation accuracy after each epoch of its own stage, at the cumulative cost (see the module's doc)."""
    strategy = STRATEGIES[name]
    counted = strategy.counted_stages(initialised_from)
    own = counted[-1]
    offset = dict.fromkeys(COSTS, 0.0)
    cost: dict = {**dict.fromkeys(COSTS, 0.0), "epochs": {}}
    for stage in counted:
        total = stage_total(stages[stage][0], stages[stage][2])
        for key in COSTS:
            cost[key] += total[key]
            if stage != own:
                offset[key] += total[key]
        cost["epochs"][stage] = total["epochs"]
    cost["train_flops"] = int(cost["train_flops"])
    summary, history, critical = stages[own]
    curve = []
    for point in stage_curve(summary, history, critical):
        value = point["record"].get(strategy.curve_key)
        curve.append({"stage": own, "epoch": point["epoch"], "val_accuracy": value,
                      **{key: offset[key] + point[key] for key in COSTS}})
    for point in curve:
        point["train_flops"] = int(point["train_flops"])
    return cost, curve


def target_accuracy(cfg: EvaluationConfig, global_history: Sequence[Mapping] | None) -> tuple[float | None, str]:
    """The validation accuracy whose time to reach is measured, and where it comes from."""
    if cfg.target_accuracy is not None:
        return cfg.target_accuracy, "evaluation.target_accuracy"
    values = [r["val_accuracy"] for r in global_history or [] if isinstance(r.get("val_accuracy"), float)]
    if not values:
        return None, ("no target: the global CNN was not trained (or has no validation accuracy) and "
                      "evaluation.target_accuracy is not set")
    # clipped at 0: a global CNN that got nothing right gives a target of 0, not a negative accuracy
    return max(max(values) - cfg.target_margin, 0.0), (
        f"the global CNN's best validation accuracy ({100 * max(values):.2f} %) minus evaluation.target_margin "
        f"({100 * cfg.target_margin:.2f} pp)")


def time_to_target(curve: Sequence[Mapping], target: float | None) -> dict | None:
    """The first point of ``curve`` whose validation accuracy reaches ``target`` (its costs, stage and epoch), or
    None when it never does (or there is no target)."""
    if target is None:
        return None
    for point in curve:
        value = point.get("val_accuracy")
        if isinstance(value, float) and value >= target:
            return {key: point[key] for key in ("stage", "epoch", *COSTS)}
    return None
