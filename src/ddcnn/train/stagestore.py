"""Finished stages shared between runs: a stage is trained once per identity and reused wherever it recurs.

A stage's **identity** is everything its weights and records depend on (:func:`stage_identity`): the data and its
split, the seed, the model, the backend, the device type and precision, the stage's own settings, the identities
of the stages it starts from, the number of processes and the ddcnn and torch versions. Two runs of a study that
agree on it train bit-identical weights on the CPU (the global CNN of every grid, the local CNNs and the DNN under
every transfer budget), so the second one need not train it.

The store is a folder (``ddcnn study`` gives ``STUDY/stages``; ``ddcnn run --stage-store DIR``)::

    DIR/<stage>-<key>/    key: the first 20 hex digits of the identity's SHA-256
        <stage>.json        the stage's checkpoint manifest (SHA-256 of every weights file), as the run wrote it
        <stage>-eN.weights.safetensors
        origin.json         the identity in full, and the run directory that trained it
        local_timing.json   the local stage's critical-path timing (ddcnn.train.engine.timing), when it has one

A run that trains a stage publishes it there (hard links to its own checkpoint files, a copy across file systems);
a run that meets the identity again takes the files into its own ``checkpoints/`` (again a hard link or a copy),
after checking them against the manifest, so it stays self-contained; the run's ``checkpoints/reused.json`` and its
end record (``reused_from``) say where each reused stage came from. Checkpoint files are only ever replaced by a
rename (:func:`ddcnn.files.atomic_write`), never written in place, so a shared file never changes under a run, and
no run writes into another run's directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from ddcnn.config import Config
from ddcnn.errors import CheckpointError
from ddcnn.files import atomic_write_text, own_folder
from ddcnn.train.store.checkpoint import CheckpointDir
from ddcnn.train.store.rundir import FREE_DATA_KEYS, RunDir
from ddcnn.train.store.schema import FREE_STAGE_KEYS, TRAINING_STATE

ORIGIN = "origin.json"
REUSED = "reused.json"  # in a run's checkpoints/: stage -> where its reused files came from
LOCAL_TIMING = "local_timing.json"
# The stages each stage starts from (transfer from the combine stage's DNN only with init_dnn); the stages that
# can be shared (another stage, e.g. global_transfer of a width decomposition, is always trained by its run).
UPSTREAM = {"global": (), "local": (), "combine": ("local",), "coherent": (), "transfer": ("local", "combine")}
MODEL_KEYS = {"global": ("backbone", "backbone_kwargs", "width", "depth")}  # the global CNN's part of the model


def device_type(cfg: Config) -> str:
    """The device type a run of ``cfg`` trains on (``auto``: CUDA when there is one), as its runtime resolves it."""
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device.split(":")[0]


def stage_identity(cfg: Config, stage: str, device: str, ddcnn_version: str, processes: int = 1) -> dict:
    """Everything a finished ``stage`` of a run of ``cfg`` depends on, as plain data (upstream stages nested);
    ``ddcnn_version``: ``ddcnn.__version__`` (given by the caller: this layer does not import the package root)."""
    settings = {k: v for k, v in dataclasses.asdict(cfg.stages.get(stage)).items() if k not in FREE_STAGE_KEYS}
    model = dataclasses.asdict(cfg.model)
    if stage in MODEL_KEYS:
        model = {k: model[k] for k in MODEL_KEYS[stage]}
    identity = {
        "stage": stage, "seed": cfg.seed,
        "data": {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in FREE_DATA_KEYS},
        "model": model, "settings": settings, "device": device, "precision": cfg.precision,
        "compile": cfg.compile, "eval_batch_size": cfg.eval_batch_size, "processes": processes,
        "versions": {"ddcnn": ddcnn_version, "torch": torch.__version__},
    }
    if stage != "global":
        identity["decomposition"] = dataclasses.asdict(cfg.decomposition)
    if stage in ("combine", "coherent", "transfer"):
        identity["combiner"] = dataclasses.asdict(cfg.combiner)
    upstream = [s for s in UPSTREAM[stage] if cfg.stages.get(s).enabled and
                (s != "combine" or cfg.stages.transfer.init_dnn)]
    identity["upstream"] = {s: stage_identity(cfg, s, device, ddcnn_version, processes) for s in upstream}
    return identity


def stage_key(identity: dict) -> str:
    """The folder name of a stage in the store: ``<stage>-<20 hex digits of the identity's SHA-256>``."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return f"{identity['stage']}-{digest[:20]}"


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` becomes the file ``source`` (a hard link, or a copy across file systems); neither may be a
    symbolic link, and a leftover ``target`` (a file no manifest names) is replaced, never written through."""
    if source.is_symlink() or not source.is_file():
        raise CheckpointError(f"stage store file {str(source)!r} is missing or a symbolic link; delete its folder "
                              f"{str(source.parent)!r} (the stage is trained again)")
    if target.is_symlink() or target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        tmp = target.with_name(f".{target.name}.copy.tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)


class StageStore:
    """The folder of finished stages that runs share (see the module's docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def entry(self, identity: dict) -> Path:
        return self.root / stage_key(identity)

    def has(self, identity: dict) -> bool:
        return (self.entry(identity) / ORIGIN).is_file()

    def _checked(self, identity: dict) -> tuple[CheckpointDir, dict] | None:
        """The stored stage of ``identity`` with its origin, its manifest and weights verified; None if absent."""
        folder = self.entry(identity)
        stage = identity["stage"]
        if not self.has(identity):
            return None
        try:
            origin = json.loads((folder / ORIGIN).read_text())
        except (OSError, ValueError):
            origin = None
        if not isinstance(origin, dict) or origin.get("identity") != identity:
            raise CheckpointError(f"stage store entry {str(folder)!r} does not hold the stage its name says "
                                  f"(origin.json differs); delete that folder (the stage is trained again)")
        store = CheckpointDir(folder, state_schema=TRAINING_STATE)
        _, state, _ = store.load(stage)  # every file's SHA-256 against the manifest
        if not state.get("done"):
            raise CheckpointError(f"stage store entry {str(folder)!r} holds an unfinished stage; delete that folder")
        return store, origin

    def fetch(self, run_dir: RunDir, identity: dict) -> dict | None:
        """Give ``run_dir`` the stored stage of ``identity`` unless it has that stage already: its files (linked or
        copied), checked against the manifest in the run's own folder, then the manifest; return where it came
        from (None: nothing stored, or the run has the stage: it trains or resumes it as usual)."""
        stage = identity["stage"]
        if run_dir.checkpoints.has(stage):
            return None
        found = self._checked(identity)
        if found is None:
            return None
        store, origin = found
        target = run_dir.checkpoints
        own_folder(target.root, run_dir.path)  # never a link out of the run
        for name in sorted(store.named_files(stage)):
            _link_or_copy(store.root / name, target.root / name)
        source = self.entry(identity)
        timing = source / LOCAL_TIMING
        if stage == "local" and timing.is_file() and not (run_dir.path / LOCAL_TIMING).exists():
            atomic_write_text(run_dir.path / LOCAL_TIMING, timing.read_text())
        provenance = {"run": origin.get("run"), "store": str(source), "key": stage_key(identity)}
        reused = target.root / REUSED
        try:
            recorded = json.loads(reused.read_text()) if reused.is_file() else {}
        except (OSError, ValueError):
            recorded = {}
        atomic_write_text(reused, json.dumps({**recorded, stage: provenance}, indent=1))
        # The manifest last: until it is there, the run does not have the stage (a kill leaves files it cleans up).
        atomic_write_text(target.manifest_path(stage), store.manifest_path(stage).read_text())
        target.load(stage)  # the run's own copy, checked again
        return provenance

    def publish(self, run_dir: RunDir, identity: dict) -> None:
        """Keep the finished stage of ``identity`` that ``run_dir`` trained, unless the store has it already (two
        runs that trained it at once: the first to finish is kept). The entry appears whole (a rename)."""
        stage = identity["stage"]
        folder = self.entry(identity)
        if self.has(identity) or not run_dir.checkpoints.has(stage) or \
                not run_dir.checkpoints.state(stage).get("done"):
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{folder.name}.{os.getpid()}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            for name in sorted(run_dir.checkpoints.named_files(stage)):
                _link_or_copy(run_dir.checkpoints.root / name, tmp / name)
            atomic_write_text(tmp / f"{stage}.json", run_dir.checkpoints.manifest_path(stage).read_text())
            if stage == "local" and (run_dir.path / LOCAL_TIMING).is_file():
                atomic_write_text(tmp / LOCAL_TIMING, (run_dir.path / LOCAL_TIMING).read_text())
            atomic_write_text(tmp / ORIGIN, json.dumps({"identity": identity, "run": str(run_dir.path)}, indent=1))
            try:
                os.rename(tmp, folder)
            except OSError:  # another run published it first
                pass
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)


def shared_stage(store: StageStore | None, ctx, stage: str, train, ddcnn_version: str):
    """``train()`` the ``stage`` of the run ``ctx`` (a :class:`~ddcnn.train.context.Context`), first taking it
    from ``store`` when it holds the stage's identity, and publishing it there when this run trained it; returns
    what ``train()`` returns (a StageResult, whose end record then names where a reused stage came from)."""
    # data from Python: the config does not name it; a stage without a declared identity (UPSTREAM) is not shared
    if store is None or getattr(ctx, "python", None) is not None or stage not in UPSTREAM:
        return train()
    identity = stage_identity(ctx.cfg, stage, ctx.runtime.device.type, ddcnn_version, ctx.env.world)
    origin = store.fetch(ctx.run_dir, identity) if ctx.env.is_main else None
    if ctx.env.enabled:
        origin = ctx.env.broadcast(origin)  # every process loads the files rank 0 put in place
    if origin is not None:
        ctx.echo(f"[{stage:>8}] reused the finished stage of {origin['run']} ({origin['key']})")
    else:  # a stage reused by an earlier launch of this run says so in checkpoints/reused.json
        origin = _recorded(ctx.run_dir, stage)
    result = train()
    if origin is not None:
        result.summary["reused_from"] = origin["run"]
    elif ctx.env.is_main:
        store.publish(ctx.run_dir, identity)
    return result


def _recorded(run_dir: RunDir, stage: str) -> dict | None:
    try:
        recorded = json.loads((run_dir.checkpoints.root / REUSED).read_text())
    except (OSError, ValueError):
        return None
    entry = recorded.get(stage) if isinstance(recorded, dict) else None
    return entry if isinstance(entry, dict) and "run" in entry else None
