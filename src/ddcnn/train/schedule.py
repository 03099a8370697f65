"""Schedules that end where training ends, and what a stage's end says about its learning rate.

A cosine schedule runs over the cap (``epochs``): a stage that early stopping ends at epoch 10 of 20 keeps half of
its peak learning rate, so its weights are those of a run still moving. Two rules end a stage annealed:

- a **budget**: no ``patience``, the cosine over exactly the epochs the stage trains (Budgeted Training, Li et al.
  2020: anneal to zero at the end of each budget); ``ddcnn study``'s ``budgets:`` makes each budget its own run;
- ``schedule: plateau`` with ``patience`` (Keras' ``ReduceLROnPlateau`` before ``EarlyStopping``): the learning
  rate stays at its peak (after warmup) until ``patience`` epochs pass without improvement, then is multiplied by
  ``plateau_factor``; patience ends the stage only once the rate is down to ``plateau_floor`` of its peak. With
  the defaults (factor 0.1, floor 0.1) a stage stops by patience only after it trained at a tenth of its peak.

Every stage's end record gives ``lr_fraction``: the learning rate of its kept epoch (its last step) over its peak
(``lr``). A stage is "converged" only when that fraction is :data:`CONVERGED` or less; otherwise
:func:`stop_text` names the stop as it was ("stopped by patience at LR 0.5", "cap at LR 0.5").
"""

from __future__ import annotations

CONVERGED = 0.1  # the largest fraction of the peak learning rate at which a stopped stage counts as converged
_EPS = 1e-9  # a fraction is computed from floats: 0.1 of the peak must count as 0.1


def reduce_on_plateau(state, cfg) -> bool:
    """Patience ran out in ``state`` (a stage's StageState, ``cfg`` its StageConfig): under ``schedule: plateau``
    above its floor, multiply ``state.lr_scale`` by ``plateau_factor``, count the epochs without improvement from
    zero again and return True (the stage goes on); else return False (the stage stops)."""
    if cfg.schedule != "plateau" or state.lr_scale <= cfg.plateau_floor + _EPS:
        return False
    state.lr_scale = max(state.lr_scale * cfg.plateau_factor, cfg.plateau_floor)
    state.bad_epochs = 0
    return True


def lr_fraction(history: list[dict], kept_epoch: int | None, peak: float) -> float | None:
    """The learning rate of the kept epoch's last step over the peak ``peak`` (None before any epoch)."""
    if not history or not kept_epoch or peak <= 0:
        return None
    record = history[min(kept_epoch, len(history)) - 1]
    lr = record.get("lr")
    return round(lr / peak, 6) if isinstance(lr, int | float) else None


def converged(summary: dict) -> bool:
    """Whether a stage's end record (``lr_fraction``) says it stopped at :data:`CONVERGED` of its peak or less."""
    fraction = summary.get("lr_fraction")
    return isinstance(fraction, int | float) and fraction <= CONVERGED + _EPS


def stop_text(summary: dict) -> str:
    """How a stage ended, from its end record: ``converged (patience, LR 0.01 of peak)``, ``stopped by patience at
    LR 0.5``, ``cap at LR 0.5``; an end record without ``lr_fraction`` (an earlier ddcnn) names only the stop."""
    reason = summary.get("stop_reason") or "cap"
    fraction = summary.get("lr_fraction")
    if not isinstance(fraction, int | float):
        return "stopped by patience" if reason == "patience" else "cap"
    if converged(summary):
        return f"converged ({reason}, LR {fraction:.2g} of peak)"
    return f"stopped by patience at LR {fraction:.2g}" if reason == "patience" else f"cap at LR {fraction:.2g}"
