"""The run directory: what a run writes, how a run is recognised, resumed or refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from ddcnn.config import Config, dump_config, to_dict
from ddcnn.errors import CheckpointError, ConfigError
from ddcnn.train.checkpoint import CheckpointDir, atomic_write_text

MARKER = "ddcnn-run.json"
# Settings that the saved weights depend on: a resumed run must not change them.
FROZEN_SECTIONS = ("seed", "data", "decomposition", "model", "combiner")
FREE_DATA_KEYS = ("workers", "device_resident_limit_gb")
# The marker first: --force removes it before anything else, so a kill in the middle never leaves a marked run
# without its config.yaml.
OUTPUTS = (MARKER, "checkpoints", "plots", "tensorboard", "metrics.jsonl", "results.json", "report.md",
           "config.yaml", "data.json", "local_timing.json", "evaluation.json", ".write-test")


class RunDir:
    """``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``results.json``, ``report.md``, ``plots/``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = CheckpointDir(self.path / "checkpoints")

    @property
    def is_run(self) -> bool:
        return (self.path / MARKER).is_file()

    def launched_by(self, launch: str | None) -> bool:
        """Whether the run here was started by the torchrun launch ``launch`` (then a restarted worker resumes)."""
        if launch is None or not self.is_run:
            return False
        try:
            return json.loads((self.path / MARKER).read_text()).get("launch") == launch
        except (OSError, ValueError, AttributeError):
            return False

    def prepare(self, cfg: Config, resume: bool, force: bool, launch: str | None = None) -> None:
        """Create, resume or (with ``force``) restart the run in this directory; refuse anything surprising.
        ``launch`` (torchrun's run id) is recorded so that only a restart of the same launch resumes by itself."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise ConfigError(f"output directory {str(path)!r} is a file; choose another --out")
        if resume:
            if not self.is_run:
                how = "without --resume" if not (path.is_dir() and any(path.iterdir())) else \
                    "with --force instead of --resume (ddcnn replaces only the files a run writes)"
                raise CheckpointError(f"--resume: {str(path)!r} holds no ddcnn run (a run killed before it began "
                                      f"leaves none); start it {how}")
            self._check_same_config(cfg)
            self._remove_leftovers()
        elif path.exists() and any(path.iterdir()):
            if not force:
                if self.is_run:
                    raise ConfigError(f"output directory {str(path)!r} already holds a ddcnn run; use --resume to "
                                      f"continue it, --force to start over there, or choose another --out")
                raise ConfigError(f"output directory {str(path)!r} already holds files that are not a ddcnn run; use "
                                  f"--force to start a run there anyway (only the files a run writes are replaced), "
                                  f"or choose another --out")
            for name in OUTPUTS:  # only what a run writes; other files stay
                target = path / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
            self._remove_temporary_files()
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise ConfigError(f"output directory {str(path)!r} is not writable ({err.strerror}); choose another "
                              f"--out") from None
        # config.yaml before the marker: a directory with the marker always has the config --resume checks against.
        atomic_write_text(path / "config.yaml", dump_config(cfg))
        if not resume:
            atomic_write_text(path / MARKER, json.dumps({"format": 1, "launch": launch}))

    def _remove_leftovers(self) -> None:
        """After a kill: delete temporary files of interrupted writes, and checkpoint files that no manifest names
        (a kill between writing a manifest and deleting the previous version's files). Nothing else is touched."""
        self._remove_temporary_files()
        (self.path / ".write-test").unlink(missing_ok=True)
        root = self.checkpoints.root
        if not root.is_dir():
            return
        named = set()
        for manifest in root.glob("*.json"):
            try:
                named.update(entry["file"] for entry in json.loads(manifest.read_text())["files"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return  # a damaged manifest: keep every file, loading it will say what is wrong
        for weights in root.glob("*.safetensors"):
            if weights.name not in named:
                weights.unlink(missing_ok=True)

    def _remove_temporary_files(self) -> None:
        """The ``.NAME.XXXXXXXX.tmp`` files that :func:`atomic_write` leaves when the process dies mid-write."""
        for name in OUTPUTS:
            for tmp in self.path.glob(f".{name}.*.tmp"):
                tmp.unlink(missing_ok=True)
        if self.checkpoints.root.is_dir():
            for tmp in self.checkpoints.root.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)

    def _check_same_config(self, cfg: Config) -> None:
        try:
            saved = yaml.safe_load((self.path / "config.yaml").read_text())
            if not isinstance(saved, dict):
                raise ValueError
        except (OSError, ValueError, yaml.YAMLError):
            raise CheckpointError(f"--resume: {str(self.path / 'config.yaml')!r} is missing or unreadable; restore "
                                  f"it, or start over with --force") from None
        new = to_dict(cfg)
        for key in FREE_DATA_KEYS:  # how the data is fed, not what it is
            for config in (saved, new):
                if isinstance(config.get("data"), dict):
                    config["data"].pop(key, None)
        for section in FROZEN_SECTIONS:
            diff = _first_difference(saved.get(section), new.get(section), section)
            if diff:
                key, old_value, new_value = diff
                raise CheckpointError(
                    f"--resume: {key} was {old_value!r} when the checkpoints were written but is {new_value!r} now; "
                    f"resume with the run's own config (or start a new run in another --out)"
                )

    def append_metrics(self, record: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a kill; the checkpointed history is authoritative
        return records

    def rewrite_metrics(self, records: list[dict]) -> None:
        atomic_write_text(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))

    def write_json(self, name: str, data: dict) -> None:
        atomic_write_text(self.path / name, json.dumps(data, indent=2))

    def read_json(self, name: str) -> dict:
        path = self.path / name
        if not path.is_file():
            raise CheckpointError(f"{str(path)!r} does not exist; is {str(self.path)!r} a finished ddcnn run?")
        try:
            return json.loads(path.read_text())
        except ValueError:
            raise CheckpointError(f"{str(path)!r} is corrupt; rerun the experiment") from None


def _first_difference(old, new, key):
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            diff = _first_difference(old.get(k), new.get(k), f"{key}.{k}")
            if diff:
                return diff
        return None
    return None if old == new else (key, old, new)
