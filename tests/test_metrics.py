"""The metrics beyond accuracy against scikit-learn's own functions, and against their definitions, on fixed
predictions."""

import numpy as np
import pytest
import torch

from ddcnn.config import from_dict
from ddcnn.errors import ConfigError
from ddcnn.metrics import classification_metrics
from ddcnn.train.best import best_strategy

sklearn_metrics = pytest.importorskip("sklearn.metrics")

# 12 images, 3 classes, unbalanced (6, 4, 2); fixed scores whose argmax gets some wrong in every class
LABELS = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
SCORES = torch.tensor([[2.0, 0.1, 0.3], [1.5, 0.2, 0.9], [0.3, 1.1, 0.2], [1.0, 0.0, 0.5], [0.2, 0.4, 1.3],
                       [2.2, 1.0, 0.1], [0.1, 1.9, 0.3], [1.2, 0.8, 0.5], [0.0, 0.7, 0.6], [0.3, 2.0, 1.0],
                       [0.1, 0.2, 1.4], [0.9, 0.1, 0.8]])


def test_metrics_equal_scikit_learn_on_fixed_predictions():
    got = classification_metrics(SCORES, LABELS, ["a", "b", "c"])
    y, p = LABELS.numpy(), SCORES.argmax(-1).numpy()
    prob = SCORES.softmax(-1).double().numpy()
    assert got["balanced_accuracy"] == pytest.approx(sklearn_metrics.balanced_accuracy_score(y, p))
    assert got["macro_f1"] == pytest.approx(sklearn_metrics.f1_score(y, p, average="macro"))
    assert got["macro_precision"] == pytest.approx(sklearn_metrics.precision_score(y, p, average="macro"))
    assert got["macro_recall"] == pytest.approx(sklearn_metrics.recall_score(y, p, average="macro"))
    assert got["roc_auc"] == pytest.approx(sklearn_metrics.roc_auc_score(y, prob, multi_class="ovr"))
    assert got["confusion_matrix"] == sklearn_metrics.confusion_matrix(y, p).tolist()
    f1 = sklearn_metrics.f1_score(y, p, average=None)
    assert [got["per_class"][c]["f1"] for c in "abc"] == pytest.approx(list(f1))


def test_metrics_follow_their_definitions_from_the_confusion_matrix():
    got = classification_metrics(SCORES, LABELS, ["a", "b", "c"])
    m = np.array(got["confusion_matrix"], dtype=float)
    recall, precision = np.diag(m) / m.sum(1), np.diag(m) / m.sum(0)
    assert got["balanced_accuracy"] == pytest.approx(recall.mean())
    assert got["macro_f1"] == pytest.approx(np.mean(2 * precision * recall / (precision + recall)))
    assert got["accuracy"] == pytest.approx(np.trace(m) / m.sum())
    # ROC AUC of class c: the share of (positive, negative) pairs ranked correctly (ties count one half)
    prob = SCORES.softmax(-1).numpy()
    for c, name in enumerate("abc"):
        pos, neg = prob[LABELS.numpy() == c, c], prob[LABELS.numpy() != c, c]
        pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
        assert got["per_class"][name]["roc_auc"] == pytest.approx(pairs)


def test_votes_have_no_roc_auc_and_an_absent_class_no_area():
    assert classification_metrics(SCORES, LABELS, ["a", "b", "c"], probabilities=False)["roc_auc"] is None
    two = classification_metrics(SCORES[:10], LABELS[:10], ["a", "b", "c"])
    assert two["per_class"]["c"]["roc_auc"] is None and two["roc_auc"] is not None


def test_evaluation_metric_chooses_the_best_strategy_and_monitor_takes_the_same_names():
    strategies = {"global": {"val_accuracy": 0.9, "val_metrics": {"balanced_accuracy": 0.6, "roc_auc": 0.7}},
                  "majority_vote": {"val_accuracy": 0.8, "val_metrics": {"balanced_accuracy": 0.7, "roc_auc": None}}}
    assert best_strategy(strategies, "accuracy")[0] == "global"
    assert best_strategy(strategies, "balanced_accuracy") == ("majority_vote", "validation balanced accuracy")
    assert best_strategy(strategies, "roc_auc")[0] == "global"
    cfg = from_dict({"stages": {"local": {"monitor": "macro_f1", "patience": 2}}, "evaluation": {"metric": "roc_auc"}})
    assert cfg.stages.local.monitor == "val_macro_f1"
    with pytest.raises(ConfigError, match="evaluation.metric"):
        from_dict({"evaluation": {"metric": "f1"}})
