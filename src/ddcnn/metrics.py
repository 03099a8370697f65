"""The classification metrics a run reports per strategy, beyond accuracy, computed by scikit-learn.

scikit-learn is the reference the other libraries test against (torchmetrics' own tests compare with it): its
``roc_auc_score`` integrates the exact ROC curve (every threshold, ties included) and ``balanced_accuracy_score``
and ``precision_recall_fscore_support`` follow the textbook definitions, on the few thousand CPU predictions a run
scores once. torchmetrics would add nothing a run needs here (its metrics accumulate over batches on the device,
and a run has every prediction in one tensor already).

Names (:data:`METRICS`): ``accuracy``, ``balanced_accuracy`` (the mean recall over the classes, as MONAI and
torchmetrics' ``average="macro"`` recall give it), ``macro_f1`` (F1 per class, averaged over the classes with equal
weight), ``roc_auc`` (one-vs-rest, the mean of the per-class areas; only for strategies whose scores are
probabilities). ``evaluation.metric`` and ``stages.*.monitor`` take these names.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc")
LABELS = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro F1",
          "roc_auc": "ROC AUC (one-vs-rest)"}


def confusion(predicted: torch.Tensor, labels: torch.Tensor, k: int) -> list[list[int]]:
    """``k x k`` counts: row = true class, column = predicted class."""
    return torch.bincount(labels * k + predicted, minlength=k * k).view(k, k).tolist()


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, classes: list[str],
                           probabilities: bool = True) -> dict:
    """Every metric of ``scores`` ``(M, K)`` (the strategy's scores: their softmax is the class probability, their
    argmax the decision) against ``labels`` ``(M,)``: accuracy, balanced accuracy (mean recall over the classes
    present in ``labels``), precision, recall and F1 per class and their macro means, ROC AUC (one-vs-rest, per
    class and their mean; None when ``probabilities`` is False, and for a class absent from ``labels``, whose curve
    is undefined) and the confusion matrix."""
    from sklearn.metrics import balanced_accuracy_score, precision_recall_fscore_support, roc_auc_score

    k = len(classes)
    predicted = scores.argmax(-1)
    y, p = labels.cpu().numpy(), predicted.cpu().numpy()
    if len(y) == 0:
        return {"accuracy": None, "balanced_accuracy": None, "macro_precision": None, "macro_recall": None,
                "macro_f1": None, "roc_auc": None, "per_class": {}, "confusion_matrix": confusion(predicted, labels, k)}
    everyone = list(range(k))
    with warnings.catch_warnings():  # a class predicted but absent from the labels: its recall is left out, known
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(balanced_accuracy_score(y, p))
    precision, recall, f1, support = precision_recall_fscore_support(y, p, labels=everyone, zero_division=0)
    auc: list[float | None] = [None] * k
    if probabilities:
        prob = scores.float().softmax(-1).cpu().numpy().astype(np.float64)
        for c in everyone:
            if 0 < support[c] < len(y):
                auc[c] = float(roc_auc_score(y == c, prob[:, c]))
    areas = [a for a in auc if a is not None]
    return {
        "accuracy": float((p == y).mean()),
        "balanced_accuracy": balanced,
        # macro: every class counts once, a class never predicted with precision 0 (scikit-learn's average="macro"
        # over labels=range(K), zero_division=0)
        "macro_precision": float(precision.mean()), "macro_recall": float(recall.mean()), "macro_f1": float(f1.mean()),
        "roc_auc": float(np.mean(areas)) if areas else None,  # over the classes whose curve is defined
        "per_class": {name: {"precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
                             "roc_auc": auc[c], "support": int(support[c])} for c, name in enumerate(classes)},
        "confusion_matrix": confusion(predicted, labels, k),
    }


def metric_value(scores: torch.Tensor, labels: torch.Tensor, name: str, k: int) -> float | None:
    """One metric of :data:`METRICS` (what early stopping and the best-strategy choice read)."""
    classes = [str(c) for c in range(k)]
    return classification_metrics(scores, labels, classes, probabilities=name == "roc_auc")[name]
