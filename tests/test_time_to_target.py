"""Cost per strategy and time to a target accuracy (ddcnn.train.time_to_target), on hand-made stage records."""

import pytest

from ddcnn.config import EvaluationConfig
from ddcnn.train.time_to_target import strategy_costs, target_accuracy, time_to_target


def _stage(name, seconds, flops, accuracies, setup=(0.0, 0), key="val_accuracy"):
    """End-of-stage record and epoch records of a stage whose epochs take ``seconds`` and ``flops`` each, after a
    ``setup`` (seconds, FLOPs) that every epoch's cumulative record counts, as the training loop writes them."""
    history = [{"stage": name, "epoch": e, "seconds": setup[0] + seconds * e, "train_flops": setup[1] + flops * e,
                key: a} for e, a in enumerate(accuracies, start=1)]
    summary = {"stage": name, "epochs_run": len(accuracies), "seconds": setup[0] + seconds * len(accuracies),
               "train_flops": setup[1] + flops * len(accuracies), "setup_seconds": setup[0], "setup_flops": setup[1]}
    return summary, history


STAGES = {
    "global": (*_stage("global", 10.0, 100, [0.80, 0.90, 0.92, 0.91]), None),
    "local": (*_stage("local", 4.0, 40, [0.6, 0.7], key="val_accuracy_mean_probability"), 2.0),  # critical: 2 s
    "combine": (*_stage("combine", 1.0, 1, [0.85, 0.88, 0.89], setup=(3.0, 30)), None),
    "transfer": (*_stage("transfer", 5.0, 50, [0.90, 0.95]), None),
}


def test_a_strategy_counts_every_stage_it_depends_on_and_its_curve_starts_after_them():
    cost, curve = strategy_costs("transfer", STAGES, initialised_from=("combine",))
    local, combine = 8.0, 3.0 + 3.0  # the combine stage's pass over the data counts
    assert cost["seconds"] == pytest.approx(local + combine + 10.0)
    assert cost["critical_path_seconds"] == pytest.approx(2.0 + combine + 10.0)  # the local stage's estimate
    assert cost["train_flops"] == 80 + 33 + 100 and cost["epochs"] == {"local": 2, "combine": 3, "transfer": 2}
    assert [(p["epoch"], p["seconds"], p["val_accuracy"]) for p in curve] == [(1, local + combine + 5, 0.90),
                                                                               (2, local + combine + 10, 0.95)]
    without_dnn, _ = strategy_costs("transfer", STAGES)
    assert without_dnn["epochs"] == {"local": 2, "transfer": 2}


def test_the_rules_curve_is_the_local_stage_with_its_critical_path_spread_over_its_epochs():
    _, curve = strategy_costs("mean_probability", STAGES)
    assert [(p["critical_path_seconds"], p["seconds"], p["val_accuracy"]) for p in curve] == [(1.0, 4.0, 0.6),
                                                                                               (2.0, 8.0, 0.7)]
    _, cnn_dnn = strategy_costs("cnn_dnn", STAGES)
    assert cnn_dnn[0]["seconds"] == pytest.approx(8.0 + 3.0 + 1.0) and cnn_dnn[0]["train_flops"] == 80 + 30 + 1


def test_time_to_target_is_the_first_epoch_that_reaches_it():
    target, source = target_accuracy(EvaluationConfig(), STAGES["global"][1])
    assert target == pytest.approx(0.915) and "global CNN" in source
    _, curve = strategy_costs("global", STAGES)
    assert time_to_target(curve, target)["epoch"] == 3
    _, cnn_dnn = strategy_costs("cnn_dnn", STAGES)
    assert time_to_target(cnn_dnn, target) is None  # never reached
    assert time_to_target(curve, None) is None
    assert target_accuracy(EvaluationConfig(target_accuracy=0.5), None) == (0.5, "evaluation.target_accuracy")
    assert target_accuracy(EvaluationConfig(), None)[0] is None
