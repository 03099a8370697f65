"""Which runs of a study share a stage, and what sharing saved.

Every run's stages have an identity (:func:`ddcnn.train.stagestore.stage_identity`); the first run of the plan
that trains an identity is its **producer**, and every later run with the same identity reuses the producer's
stage from the study's ``stages/`` folder instead of training it. The runner starts a run only after its producers
have ended (:func:`producers`); a producer that failed leaves the stage to the first run that needs it.
"""

from __future__ import annotations

from collections.abc import Sequence

import ddcnn
from ddcnn.config import STAGES, active, from_dict
from ddcnn.train.stagestore import UPSTREAM, device_type, stage_identity, stage_key


def run_keys(base: dict, overrides: Sequence[str]) -> list[str]:
    """The store keys of the stages a run of ``base`` with ``overrides`` trains (one process)."""
    cfg = from_dict(base, list(overrides))
    device = device_type(cfg)
    return [stage_key(stage_identity(cfg, stage, device, ddcnn.__version__))
            for stage in STAGES if active(cfg, stage) and stage in UPSTREAM]


def producers(study, runs) -> dict[str, set[str]]:
    """For each run (by ``run.name``), the earlier runs of ``runs`` (the study's plan, in order) that train a stage it
    would train too."""
    first: dict[str, str] = {}
    out: dict[str, set[str]] = {}
    for run in runs:
        keys = run_keys(study.base, run.overrides or (*run.cell.overrides(), f"seed={run.seed}"))
        out[run.name] = {first[key] for key in keys if key in first}
        for key in keys:
            first.setdefault(key, run.name)
    return out


def sharing_summary(runs) -> dict:
    """What sharing saved over a study's finished runs (``RunData`` with ``results``): the stages trained and the
    stages reused, with the seconds and training FLOPs the reused ones would have cost again."""
    trained = {"stages": 0, "seconds": 0.0, "train_flops": 0}
    reused = {"stages": 0, "seconds": 0.0, "train_flops": 0}
    for run in runs:
        for summary in (run.results.get("stages") or {}).values():
            if not isinstance(summary, dict):
                continue
            side = reused if summary.get("reused_from") else trained
            side["stages"] += 1
            side["seconds"] += float(summary.get("seconds") or 0.0)
            side["train_flops"] += int(summary.get("train_flops") or 0)
    total = trained["seconds"] + reused["seconds"]
    flops = trained["train_flops"] + reused["train_flops"]
    return {"trained": trained, "reused": reused,
            "saved_fraction_seconds": reused["seconds"] / total if total else 0.0,
            "saved_fraction_flops": reused["train_flops"] / flops if flops else 0.0}
