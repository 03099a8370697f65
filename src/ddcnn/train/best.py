"""Per strategy the metrics beyond accuracy, and the choice of the best strategy by ``evaluation.metric``: shared
by the protocol's test evaluation and ``ddcnn evaluate``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import torch

from ddcnn.data.readers import ImageDataset
from ddcnn.metrics import LABELS, classification_metrics
from ddcnn.strategies import STRATEGIES


def strategy_metrics(name: str, scores: Mapping[str, torch.Tensor], splits: Mapping[str, ImageDataset],
                     classes: list[str]) -> dict:
    """``{"val_metrics": ..., "test_metrics": ...}`` of strategy ``name`` from its scores ``(M, K)`` per split (see
    :func:`ddcnn.metrics.classification_metrics`; ROC AUC for the strategies whose scores are probabilities)."""
    probabilities = STRATEGIES[name].outputs == "probabilities"  # votes have no ROC curve
    out: dict = {"val_metrics": None}
    for split, values in scores.items():
        out[f"{split}_metrics"] = classification_metrics(values, splits[split].labels, classes, probabilities)
    return out


def best_strategy(strategies: Mapping[str, dict], metric: str) -> tuple[str, str]:
    """The strategy with the highest validation ``metric`` (the first in registry order on ties; a strategy without
    the metric, e.g. majority vote's ROC AUC, is not a candidate unless none has it), and the basis in words."""
    def value(name: str) -> float | None:
        entry = strategies[name]
        return entry.get("val_accuracy") if metric == "accuracy" else (entry.get("val_metrics") or {}).get(metric)

    scored = [name for name in strategies if value(name) is not None]
    if not scored:
        return next(iter(strategies)), f"none: no strategy has a validation {LABELS[metric]}; the first trained"
    return max(scored, key=lambda name: cast(float, value(name))), f"validation {LABELS[metric]}"
