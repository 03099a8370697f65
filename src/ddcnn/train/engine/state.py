"""The state of a stage between epochs, declared once: what :func:`ddcnn.train.engine.loop.fit` keeps, checkpoints
with the weights each epoch, and reads back on ``--resume``; and Keras-style early stopping on it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ddcnn.config import StageConfig
from ddcnn.train.schedule import reduce_on_plateau

# the early-stopping state all ranks share (lr_scale: schedule plateau's reductions, ddcnn.train.schedule)
TRACKED = ("best_epoch", "best_value", "bad_epochs", "stop_reason", "lr_scale")


@dataclass
class StageState:
    """One stage's progress. ``epochs``, ``batch_size``, ``optimizer``, ``monitor`` and ``keep`` are the settings
    it trained with (a resumed stage is checked against them); ``flops`` counts the training FLOPs so far;
    ``best_*``, ``bad_epochs`` and ``stop_reason`` are early stopping's; ``kept_epoch`` is the epoch whose weights
    a finished stage holds. ``extra``: what a stage saves besides (the combine stage's feature cost), and keys of
    a newer checkpoint this one does not know, kept as they are."""

    epochs: int
    batch_size: int
    optimizer: str
    monitor: str
    keep: str
    epoch: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    done: bool = False
    step: int = 0
    flops: int = 0
    best_epoch: int | None = None
    best_value: float | None = None
    bad_epochs: int = 0
    stop_reason: str | None = None
    kept_epoch: int | None = None
    lr_scale: float = 1.0  # schedule plateau: the fraction of the peak learning rate its reductions left
    extra: dict = field(default_factory=dict)

    # The checkpoint's order of the keys (the manifest of earlier versions).
    ORDER = ("epoch", "seconds", "history", "done", "step", "epochs", "batch_size", "optimizer", "monitor", "keep",
             "flops", "best_epoch", "best_value", "bad_epochs", "stop_reason", "kept_epoch", "lr_scale")

    @classmethod
    def new(cls, cfg: StageConfig, extra: dict | None = None) -> StageState:
        """A stage that has not trained yet, with ``cfg``'s settings."""
        return cls(cfg.epochs, cfg.batch_size, cfg.optimizer, cfg.monitor, cfg.kept(), extra=dict(extra or {}))

    def updated(self, saved: dict) -> StageState:
        """This state with a checkpoint's ``saved`` state over it: a checkpoint of an earlier ddcnn lacks the
        early-stopping keys, which keep their defaults."""
        known = {f.name for f in dataclasses.fields(self)} - {"extra"}
        values = {k: v for k, v in saved.items() if k in known}
        return dataclasses.replace(self, **values, extra={**self.extra, **{k: v for k, v in saved.items()
                                                                        if k not in known}})

    def as_dict(self) -> dict:
        """The JSON object a checkpoint holds (:data:`ddcnn.train.store.schema.TRAINING_STATE`)."""
        return {**{k: getattr(self, k) for k in self.ORDER}, **self.extra}

    def tracked(self) -> dict:
        return {k: getattr(self, k) for k in TRACKED}


def improved(value: float | None, best: float | None, cfg: StageConfig) -> bool:
    """Whether the monitored ``value`` improves on ``best`` by more than ``min_delta`` (the first value does)."""
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    if cfg.monitor == "val_loss":
        return value < best - cfg.min_delta
    return value > best + cfg.min_delta


def early_stopping(state: StageState, record: dict, cfg: StageConfig) -> None:
    """Update the best-so-far and the epochs without improvement in ``state`` from the epoch's ``record``; set
    ``stop_reason`` when the stage ends here (patience run out -- under ``schedule: plateau`` only at its floor
    learning rate, :func:`ddcnn.train.schedule.reduce_on_plateau` -- or the cap reached)."""
    value = record.get(cfg.monitor)
    if improved(value, state.best_value, cfg):
        state.best_epoch, state.best_value, state.bad_epochs = record["epoch"], value, 0
    else:
        state.bad_epochs += 1
    if cfg.patience is not None and state.bad_epochs >= cfg.patience and not reduce_on_plateau(state, cfg):
        state.stop_reason = "patience"
    elif record["epoch"] >= cfg.epochs:
        state.stop_reason = "cap"
