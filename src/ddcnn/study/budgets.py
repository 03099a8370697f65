"""Budget sweeps: a study's ``budgets:`` give each strategy its own list of epochs, each budget its own run.

```yaml
budgets:                # epochs; each budget is a run whose schedule ends (anneals) at its own last epoch
  global: [3, 6, 12, 24]    # the global CNN
  local: [3, 6, 12]         # the local CNNs, then the DNN (its epochs: the base's stages.combine), ...
  transfer: [2, 3, 6]       # ... then transfer, on every local budget: local 12 is trained once for 2, 3 and 6
  coherent: [12, 24]        # the CNN-DNN from scratch
split_seed: seed        # optional: each run's data split follows its seed (data.split_seed = seed)
```

Every budget of a cell is a **point**, a run of the stages it needs and no other: ``global-24``,
``local-12_transfer-6`` (the local CNNs, the DNN and transfer; with no ``transfer:`` list, ``local-12``: the local
CNNs and the DNN), ``coherent-24``. A budgeted stage has no early stopping (``patience: null``, ``keep: last``): its
cosine schedule runs to zero at its last epoch (Budgeted Training, Li et al. 2020; every budget an independent run,
as REX). The stages that points share -- the local CNNs and the DNN under every transfer budget, the global CNN of
every grid -- are trained once (:mod:`ddcnn.train.stagestore`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ddcnn.config import STAGES
from ddcnn.errors import ConfigError

BUDGETED = ("global", "local", "transfer", "coherent")  # the keys of budgets:, in the order their points run
MAX_EPOCHS = 100_000


@dataclass(frozen=True)
class Point:
    """One budget: ``id`` names its folder, ``epochs`` maps each budgeted stage to its epochs, ``stages`` are the
    stages its run trains (the others are disabled)."""

    id: str
    epochs: dict[str, int]
    stages: tuple[str, ...]

    def overrides(self) -> list[str]:
        sets = [f"stages.{stage}.enabled={'true' if stage in self.stages else 'false'}" for stage in STAGES]
        for stage, epochs in self.epochs.items():
            sets += [f"stages.{stage}.epochs={epochs}", f"stages.{stage}.patience=null", f"stages.{stage}.keep=last"]
        return sets


def parse_budgets(data, where: str) -> dict[str, list[int]]:
    """The ``budgets:`` mapping of a study file, checked: strategy -> its budgets (distinct positive epochs)."""
    example = "e.g. budgets: {global: [3, 6, 12], local: [3, 6], transfer: [2, 3], coherent: [6, 12]}"
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{where}: budgets must map strategies ({', '.join(BUDGETED)}) to lists of epochs, "
                          f"{example}")
    budgets = {}
    for key, values in data.items():
        if key not in BUDGETED:
            raise ConfigError(f"{where}: budgets.{key} is not a budgeted strategy; give {', '.join(BUDGETED)} "
                              f"(the DNN's epochs are the base's stages.combine.epochs), {example}")
        if not isinstance(values, list) or not values or any(
                isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= MAX_EPOCHS for v in values):
            raise ConfigError(f"{where}: budgets.{key} = {values!r} must be a non-empty list of whole numbers of "
                              f"epochs from 1 to {MAX_EPOCHS:,}, e.g. [3, 6, 12]")
        if len(set(values)) != len(values):
            raise ConfigError(f"{where}: budgets.{key} lists {next(v for v in values if values.count(v) > 1)} twice; "
                              f"give each budget once")
        budgets[key] = sorted(values)
    if "transfer" in budgets and "local" not in budgets:
        raise ConfigError(f"{where}: budgets.transfer needs budgets.local (transfer starts from the trained local "
                          f"CNNs), e.g. local: [3, 6]")
    return {key: budgets[key] for key in BUDGETED if key in budgets}


def points(budgets: dict[str, list[int]]) -> list[Point]:
    """Every budget as a run, in the order they run: cheaper first within each strategy."""
    out = [Point(f"global-{e}", {"global": e}, ("global",)) for e in budgets.get("global", [])]
    for local in budgets.get("local", []):
        if "transfer" in budgets:
            out += [Point(f"local-{local}_transfer-{t}", {"local": local, "transfer": t},
                          ("local", "combine", "transfer")) for t in budgets["transfer"]]
        else:
            out.append(Point(f"local-{local}", {"local": local}, ("local", "combine")))
    out += [Point(f"coherent-{e}", {"coherent": e}, ("coherent",)) for e in budgets.get("coherent", [])]
    return out


def extends_budgets(old, new: dict[str, list[int]] | None) -> bool:
    """Whether the recorded budgets ``old`` are ``new`` with fewer values (an extended study keeps its runs)."""
    if old is None or new is None:
        return old is None and new is None
    return isinstance(old, dict) and all(isinstance(v, list) and set(v) <= set(new.get(k, [])) for k, v in old.items())
