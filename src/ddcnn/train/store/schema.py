"""The schema of every file a run directory holds, and the check of a whole run directory before ``--resume``.

Each file is read back through :func:`ddcnn.files.read_json` with its schema below, so a damaged file is one
:class:`~ddcnn.errors.CheckpointError` that names it and what is wrong, wherever it is read (``evaluate``,
``predict``, ``--resume``). :func:`check_resumable` reads everything a resumed run will read, before the run
directory is touched: a refused ``--resume`` leaves every file as it was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ddcnn.config import STAGES, Config, active
from ddcnn.errors import CheckpointError
from ddcnn.files import CLASS_NAMES, Check, MapOf, Opt

POSITIVE = Check(int, lambda v: v > 0, "a positive whole number")
COUNT = Check(int, lambda v: v >= 0, "a whole number >= 0")
SECONDS = Check(float, lambda v: v >= 0, "a number >= 0")
FRACTION = Check(float, lambda v: 0 <= v <= 1, "a number from 0 to 1")
SIZE = Check([POSITIVE], lambda v: len(v) in (2, 3), "[H, W] or [D, H, W]")

MARKER = {"format": Check(int, lambda v: v == 1, "1 (the format this ddcnn writes)"), "launch?": Opt(str)}

DATA_FACTS = {
    "classes": CLASS_NAMES,
    "in_channels": POSITIVE, "image_size": SIZE,
    "normalizer": {"mean": [float], "std": [Check(float, lambda v: v > 0, "a positive number")]},
    "train?": COUNT, "val?": COUNT, "test?": COUNT,
}

LOCAL_TIMING = {"measured_seconds": SECONDS, "critical_path_seconds": SECONDS, "processes": POSITIVE,
                "critical_path_note?": str}

_COST = {"seconds": SECONDS, "critical_path_seconds": SECONDS, "train_flops": COUNT}
_STRATEGY = {"test_accuracy": FRACTION, "val_accuracy?": Opt(FRACTION), "train_seconds?": Opt(SECONDS),
             "parameters?": Opt(COUNT), "flops_per_image?": Opt(SECONDS),
             "cost?": {**_COST, "epochs": MapOf(COUNT)},
             "time_to_target?": Opt({**_COST, "stage": str, "epoch": POSITIVE}), "test_predicted?": [COUNT]}
RESULTS = {
    "strategies": MapOf(_STRATEGY), "best_strategy": str,
    "dataset?": str, "name?": str, "image_size?": SIZE, "grid?": [POSITIVE], "overlap?": [COUNT],
    "subimage_size?": [POSITIVE], "num_classes?": POSITIVE, "classes?": [str], "backbone?": str,
    "global_width?": POSITIVE, "local_width?": POSITIVE, "n_local?": POSITIVE, "device?": str, "device_name?": str,
    "torch_version?": str, "ddcnn_version?": str, "python?": str, "command?": str, "seed?": COUNT,
    "data_sizes?": MapOf(COUNT), "stage_seconds?": MapOf(SECONDS), "transfer_used_dnn?": Opt(bool),
    "best_strategy_basis?": str, "target?": {"val_accuracy": Opt(FRACTION), "source": str},
    "confusion_matrix?": {"strategy": str, "matrix": [[COUNT]]},
    "local?": {"test_accuracy": [FRACTION], "val_accuracy?": Opt([FRACTION]), **LOCAL_TIMING},
    # the end-of-stage records (ddcnn.train.engine.loop.FitResult.summary): the report and a study's regime read
    # them; lr_fraction: the kept epoch's learning rate over the peak; reused_from: a stage from a stage store
    "stages?": MapOf({"epochs_run?": COUNT, "cap?": COUNT, "kept_epoch?": Opt(COUNT), "best_epoch?": Opt(COUNT),
                      "monitor?": Opt(str), "best_value?": Opt(float), "stop_reason?": Opt(str),
                      "patience?": Opt(COUNT), "seconds?": SECONDS, "train_flops?": COUNT,
                      "lr_fraction?": Opt(SECONDS), "reused_from?": str}),
    "test_predictions?": MapOf(str),  # each strategy's class per test image, packed (ddcnn.predicted)
}

_RECORD = {"epoch": POSITIVE, "train_loss": float, "train_accuracy": FRACTION, "lr": float, "seconds": SECONDS,
           "train_flops?": COUNT,
           "val_loss?": Opt(float), "val_accuracy?": Opt(FRACTION), "val_accuracy_per_subdomain?": Opt([FRACTION])}
# The state of a stage in its checkpoint manifest (what ddcnn.train.engine.loop.fit saves).
TRAINING_STATE = Check(
    {"epoch": COUNT, "seconds": SECONDS, "history": [_RECORD], "done": bool, "step": COUNT, "epochs?": POSITIVE,
     "batch_size?": POSITIVE, "optimizer?": str, "feature_seconds?": SECONDS, "feature_flops?": COUNT,
     "monitor?": str, "keep?": str, "flops?": COUNT, "best_epoch?": Opt(POSITIVE), "best_value?": Opt(float),
     "bad_epochs?": COUNT, "stop_reason?": Opt(Check(str, lambda v: v in ("patience", "cap"), "patience or cap")),
     "kept_epoch?": Opt(POSITIVE), "lr_scale?": Check(float, lambda v: 0 < v <= 1, "a number above 0, at most 1")},
    lambda s: len(s["history"]) == s["epoch"] and ("epochs" not in s or s["epoch"] <= s["epochs"]) and (
        s["done"] == (s.get("stop_reason") is not None) if "stop_reason" in s
        else "epochs" not in s or s["done"] == (s["epoch"] == s["epochs"])),
    "a stage's state whose history has one record per epoch reached, done when it stopped",
)


def fix_for(name: str) -> str:
    """How to recover from a damaged ``name`` of a run directory."""
    if name == "config.yaml":
        return "restore the run's config.yaml or rerun the experiment"
    if name in ("data.json", "local_timing.json", "results.json", "evaluation.json"):
        return "restore it, or delete it and --resume the run (it is written again)"
    return "restore it, or start the run over with --force"


# What a resumed stage that has started (has a checkpoint) may change. Everything else of its StageConfig -- every
# field, also one added later -- is refused: config.yaml must keep describing the weights. While the stage is
# unfinished, the knobs that rescue a run (a NaN: the learning rate and its schedule, the clip, the optimizer's
# regularisation) may change for the epochs still to come, and more epochs may be added; each accepted change is
# recorded in metrics.jsonl. ``enabled`` says whether the stage runs, not how it trained.
FREE_STAGE_KEYS = ("enabled", "parallel")  # checkpoints do not depend on the parallelism or P
UNFINISHED_STAGE_KEYS = ("lr", "schedule", "warmup_epochs", "step_every", "step_gamma", "plateau_factor",
                         "plateau_floor", "weight_decay", "momentum", "grad_clip")


def check_stage_settings(stage: str, state: dict, settings) -> None:
    """A checkpointed stage keeps the batch size and optimizer (its data order and optimizer state depend on
    them), and what its best-so-far means and whether a best epoch's weights are kept (monitor, keep); its epochs
    may only grow, and only while it is unfinished. Checked for the whole run before ``--resume`` touches a file,
    and by ``ddcnn.train.engine.loop.fit`` when it loads the stage, which then takes the new number of epochs."""
    for key in ("epochs", "batch_size", "optimizer", "monitor", "keep"):
        new = settings.kept() if key == "keep" else getattr(settings, key)
        old = state.get(key, new)
        if old == new or (key == "epochs" and not state["done"] and new > old):
            continue
        more = " (or more: the stage is unfinished)" if key == "epochs" and not state["done"] else ""
        fix = f"resume with --set stages.{stage}.{key}={old}{more}"
        raise CheckpointError(
            f"--resume: stage {stage!r} was checkpointed with {key} = {old} but the config now says {new}; "
            f"{fix}, or start a new run"
        )


def stage_changes(stage: str, state: dict, saved: dict, settings) -> list[dict]:
    """Compare ``stage``'s section of the saved config.yaml (``saved``, plain data) with its new settings (a
    StageConfig) for a stage that has started (``state``: its checkpointed state). A change other than the ones
    :data:`FREE_STAGE_KEYS` and :data:`UNFINISHED_STAGE_KEYS` allow is a CheckpointError naming the key; the
    accepted changes are returned as ``metrics.jsonl`` records."""
    check_stage_settings(stage, state, settings)
    events = []
    for f in dataclasses.fields(settings):
        key, new = f.name, getattr(settings, f.name)
        old = saved.get(key, new)
        if old == new or key in FREE_STAGE_KEYS:
            continue
        if state["done"] or key not in (*UNFINISHED_STAGE_KEYS, "epochs"):
            how = "finished" if state["done"] else f"trained {state['epoch']} epoch(s)"
            raise CheckpointError(
                f"--resume: stages.{stage}.{key} was {old!r} when stage {stage!r} {how} but is {new!r} now; a "
                f"resumed run keeps the settings its weights were trained with: resume with --set "
                f"stages.{stage}.{key}={old!r}, or start a new run in another --out")
        events.append({"event": "setting changed on --resume", "stage": stage, "key": f"stages.{stage}.{key}",
                       "was": old, "now": new, "after_epoch": state["epoch"]})
    return events


def check_checkpoints(run_dir, cfg: Config, expected: Callable[[str], dict] | None = None, stages=STAGES
                      ) -> dict[str, Any]:
    """Read every checkpoint of ``stages`` as loading will (manifest, SHA-256, safetensors) and, with ``expected``
    (a stage's weights' names and shapes, as the config's models have them), check its weights against them.
    Returns ``{stage: state}``."""
    ckpt, states = run_dir.checkpoints, {}
    for stage in stages:
        if not ckpt.has(stage):
            continue
        weights, states[stage], _ = ckpt.load(stage)
        if expected is not None:
            ckpt.check_weights(stage, weights, expected(stage))
    return states


def check_resumable(run_dir, cfg: Config, data_shape: tuple | None = None,
                    expected: Callable[[str], dict] | None = None) -> list[dict]:
    """Everything a resumed run reads, read now: nothing has been written, moved or deleted yet. ``data_shape``:
    ``(classes, channels, [image size])`` of the data now, checked against data.json; ``expected``: see
    :func:`check_checkpoints`. Returns the accepted changes of started stages' settings (:func:`stage_changes`),
    to be recorded."""
    path = run_dir.path
    run_dir.read_marker()
    if run_dir.checkpoints.root.exists() and not run_dir.checkpoints.root.is_dir():
        raise CheckpointError(f"{str(run_dir.checkpoints.root)!r} is a file where the run's checkpoint folder "
                              f"belongs; move it away, or start the run over with --force")
    saved = run_dir.check_same_config(cfg)
    if (path / "data.json").exists():
        facts = run_dir.read_json("data.json", DATA_FACTS)
        if data_shape is not None:
            now = (len(facts["classes"]), facts["in_channels"], list(facts["image_size"]))
            data = tuple(data_shape)
            if now != data:
                raise CheckpointError(
                    f"--resume: the run was trained on {now[0]} classes of {now[1]}-channel images of {now[2]} "
                    f"({str(path / 'data.json')!r}) but the data now has {data[0]} classes of {data[1]}-channel "
                    f"images of {data[2]}; resume with the run's own data, or start a new run")
    if (path / "local_timing.json").exists():
        run_dir.read_json("local_timing.json", LOCAL_TIMING)
    states = check_checkpoints(run_dir, cfg, expected)
    events = []
    for stage, state in states.items():
        if not active(cfg, stage):
            continue  # a stage switched off is not trained on: its settings do not matter
        events += stage_changes(stage, state, saved["stages"].get(stage) or {}, cfg.stages.get(stage))
    return events
