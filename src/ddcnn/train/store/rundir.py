"""The run directory: what a run writes, how a run is recognised, resumed or refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from ddcnn.config import STAGES, Config, dump_config, from_dict, recorded, to_dict
from ddcnn.errors import CheckpointError, ConfigError
from ddcnn.files import atomic_write_text, load_yaml, naming, open_append, read_json, read_text
from ddcnn.train.store.checkpoint import CheckpointDir
from ddcnn.train.store.schema import MARKER as MARKER_SCHEMA
from ddcnn.train.store.schema import TRAINING_STATE, fix_for

MARKER = "ddcnn-run.json"
# Settings that the saved weights depend on: a resumed run must not change them.
FROZEN_SECTIONS = ("seed", "data", "decomposition", "model", "combiner")
FREE_DATA_KEYS = ("workers", "device_resident_limit_gb", "root", "root_as_written")  # how and where, not what
# Sections added after runs were first written: a run's config.yaml from before lacks them (their defaults hold).
LATER_SECTIONS = ("evaluation",)
LATER_STAGES = ("global_transfer",)  # likewise a stage added later
# The marker first: --force removes it before anything else, so a kill in the middle never leaves a marked run
# without its config.yaml.
OUTPUTS = (MARKER, "checkpoints", "plots", "tensorboard", "metrics.jsonl", "results.json", "report.md",
           "config.yaml", "data.json", "splits.json", "local_timing.json", "evaluation.json", ".write-test")
# The folders a run writes into: one that is a symbolic link (a received run's plots/ pointing elsewhere) is refused
# before anything is written (ddcnn.train.admit.admit_run_dir_early), so nothing is written through it.
FOLDERS = ("checkpoints", "plots", "tensorboard")


class RunDir:
    """``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``results.json``, ``report.md``, ``plots/``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = CheckpointDir(self.path / "checkpoints", state_schema=TRAINING_STATE)

    @property
    def is_run(self) -> bool:
        return (self.path / MARKER).exists()  # a damaged marker is still one: reading it says what is wrong

    def read_marker(self) -> dict:
        return self.read_json(MARKER, MARKER_SCHEMA)

    def launched_by(self, launch: str | None) -> bool:
        """Whether the run here was started by the torchrun launch ``launch`` (then a restarted worker resumes)."""
        if launch is None or not self.is_run:
            return False
        try:
            return self.read_marker().get("launch") == launch
        except CheckpointError:
            return False

    def prepare(self, cfg: Config, resume: bool, force: bool, launch: str | None = None,
                events: list[dict] | None = None) -> None:
        """Create, resume or (with ``force``) restart the run in this directory, once admitted
        (:func:`ddcnn.train.admit.admit_run_dir` refuses what is surprising, before anything is written).
        ``launch`` (torchrun's run id) is recorded so that only a restart of the same launch resumes by itself;
        ``events``: the settings changed on ``--resume``, recorded in metrics.jsonl."""
        path = self.path
        if resume:
            self._remove_leftovers()
        elif force and path.exists() and any(path.iterdir()):
            try:
                for name in OUTPUTS:  # only what a run writes; other files stay
                    target = path / name
                    if target.is_dir() and not target.is_symlink():
                        shutil.rmtree(target)
                    elif target.exists() or target.is_symlink():
                        target.unlink()
                self._remove_temporary_files()
            except OSError as err:
                raise ConfigError(f"--force: cannot remove {err.filename or str(path)!r} ({err.strerror}); remove "
                                  f"it yourself or choose another --out") from None
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test"
            open_append(probe, "w").close()  # O_NOFOLLOW: a link of that name is refused, not written through
            probe.unlink()
        except OSError as err:
            raise ConfigError(f"output directory {str(path)!r} is not writable ({err.strerror}); choose another "
                              f"--out") from None
        # config.yaml before the marker: a directory with the marker always has the config --resume checks against.
        atomic_write_text(path / "config.yaml", dump_config(cfg))
        if not resume:
            atomic_write_text(path / MARKER, json.dumps({"format": 1, "launch": launch}))
        for event in events or ():  # what config.yaml now says differently, and from when
            self.append_metrics(event)

    def _remove_leftovers(self) -> None:
        """After a kill: delete temporary files of interrupted writes, and checkpoint files that no manifest names
        (a kill between writing a manifest and deleting the previous version's files). Nothing else is touched:
        a stage's files are read through the one manifest reader loading uses (already checked by
        :func:`ddcnn.train.store.schema.check_resumable`), and only files of that stage's own name that its
        manifest does not keep go."""
        self._remove_temporary_files()
        (self.path / ".write-test").unlink(missing_ok=True)
        root = self.checkpoints.root
        if not root.is_dir():
            return
        kept = {stage: self.checkpoints.named_files(stage) if self.checkpoints.has(stage) else set()
                for stage in STAGES}
        for stage, named in kept.items():
            for weights in root.glob(f"{stage}-*.safetensors"):
                if weights.name not in named and weights.is_file():
                    weights.unlink(missing_ok=True)

    def _remove_temporary_files(self) -> None:
        """The ``.NAME.XXXXXXXX.tmp`` files that :func:`atomic_write` leaves when the process dies mid-write."""
        for name in OUTPUTS:
            for tmp in self.path.glob(f".{name}.*.tmp"):
                tmp.unlink(missing_ok=True)
        if self.checkpoints.root.is_dir():
            for tmp in self.checkpoints.root.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)

    def read_config(self) -> dict:
        """The run's ``config.yaml`` as plain data (a mapping), or one CheckpointError naming it. Reading it imports
        nothing: an imported backbone it names is checked, and trusted or refused, by
        :func:`ddcnn.models.settings.check_model_settings`."""
        path = self.path / "config.yaml"
        text = read_text(path, fix_for("config.yaml"))
        try:
            saved = load_yaml(text, repr(str(path)), CheckpointError)
        except yaml.YAMLError:
            raise CheckpointError(f"{str(path)!r} is corrupt (not valid YAML); {fix_for('config.yaml')}") from None
        if not isinstance(saved, dict):
            raise CheckpointError(f"{str(path)!r} does not hold a config (a mapping of keys to values); "
                                  f"{fix_for('config.yaml')}")
        # A run writes every section of the resolved config: one that is missing means a file cut short.
        lacking = [key for key in to_dict(Config()) if key not in saved and key not in LATER_SECTIONS] or \
            [f"stages.{s}" for s in STAGES if s not in (saved.get("stages") or {}) and s not in LATER_STAGES]
        if lacking:
            raise CheckpointError(f"{str(path)!r} is corrupt (it lacks {lacking[0]}, which a run always writes: cut "
                                  f"short?); {fix_for('config.yaml')}")
        try:
            from_dict(saved)
        except ConfigError as err:
            raise CheckpointError(f"{str(path)!r} is not a valid config ({err}); {fix_for('config.yaml')}") from None
        return saved

    def check_same_config(self, cfg: Config) -> dict:
        """Refuse a config that changes a setting the saved weights depend on; returns the saved config."""
        saved = self.read_config()
        # keys added later or left out: their defaults held; both sides in the form a run records
        old, new = recorded(from_dict(saved)), recorded(cfg)
        for key in FREE_DATA_KEYS:  # how the data is fed, not what it is
            for config in (old, new):
                if isinstance(config.get("data"), dict):
                    config["data"].pop(key, None)
        for section in FROZEN_SECTIONS:
            diff = _first_difference(old.get(section), new.get(section), section)
            if diff:
                key, old_value, new_value = diff
                raise CheckpointError(
                    f"--resume: {key} was {old_value!r} when the checkpoints were written but is {new_value!r} now; "
                    f"resume with the run's own config (or start a new run in another --out)"
                )
        return saved

    def append_metrics(self, record: dict) -> None:
        with naming(self.path / "metrics.jsonl"), open_append(self.path / "metrics.jsonl") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        records = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue  # a line cut by a kill; the checkpointed history is authoritative
            if isinstance(record, dict):
                records.append(record)
        return records

    def rewrite_metrics(self, records: list[dict]) -> None:
        atomic_write_text(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))

    def write_json(self, name: str, data: dict) -> None:
        atomic_write_text(self.path / name, json.dumps(data, indent=2))

    def read_json(self, name: str, schema=Any, optional: bool = False):
        """The JSON file ``name`` of the run, checked against ``schema`` (:mod:`ddcnn.files`); a damaged file is a
        CheckpointError naming it. A missing file is None when ``optional``, else an error too."""
        path = self.path / name
        if not path.exists() and not path.is_symlink():
            if optional:
                return None
            raise CheckpointError(f"{str(path)!r} does not exist; is {str(self.path)!r} a finished ddcnn run?")
        return read_json(path, schema, fix_for(name))


def _first_difference(old, new, key):
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            diff = _first_difference(old.get(k), new.get(k), f"{key}.{k}")
            if diff:
                return diff
        return None
    return None if old == new else (key, old, new)
