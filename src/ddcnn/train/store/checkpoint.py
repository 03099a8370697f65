"""Atomic checkpoints that never unpickle: weights in safetensors, the rest in JSON.

A stage's checkpoint is three files in ``checkpoints/``: ``{stage}-{tag}.safetensors`` (model weights),
``{stage}-{tag}.optim.safetensors`` (optimizer tensors) and the manifest ``{stage}.json`` that names them with
their SHA-256, the epoch reached and the stage's JSON-serialisable state. Each file is written to a temporary name,
flushed, fsync'ed and renamed; the manifest is written last. A process killed at any point therefore leaves the
previous manifest pointing at complete files, and a file damaged later is detected by its hash before use.
A stage that keeps its best epoch's weights (early stopping) has its manifest also name the weights file of that
epoch (``best``), kept from the epoch that wrote it: no weights are written twice.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ddcnn.errors import CheckpointError
from ddcnn.files import Check, MapOf, Opt, atomic_write, atomic_write_text, read_bytes, read_json

# A bare file name inside checkpoints/: a manifest never reaches (or deletes) other files.
_FILE_NAME = Check(str, lambda n: n == Path(n).name and n.endswith(".safetensors") and not n.startswith(".")
                   and "\0" not in n, "a file name in checkpoints/ ending in .safetensors")
_FILE = {"file": _FILE_NAME, "sha256": Check(str, lambda h: re.fullmatch("[0-9a-f]{64}", h) is not None,
                                             "a SHA-256 in hexadecimal")}
_OPTIMIZER_META = {"param_groups": [MapOf(Any)], "state": MapOf(MapOf(Any))}


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and plain data (for JSON)."""
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, entry in state["state"].items():
        meta_entry = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
                meta_entry[name] = {"tensor": f"{pid}.{name}"}
            else:
                meta_entry[name] = value
        meta["state"][str(pid)] = meta_entry
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for pid, entry in meta["state"].items():
        state[int(pid)] = {
            name: tensors[value["tensor"]] if isinstance(value, dict) and "tensor" in value else value
            for name, value in entry.items()
        }
    return {"state": state, "param_groups": meta["param_groups"]}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CheckpointDir:
    """The ``checkpoints/`` folder of a run."""

    def __init__(self, root: str | Path, state_schema=Any):
        """``state_schema``: what the stage's state in every manifest must look like (see :mod:`ddcnn.files`)."""
        self.root = Path(root)
        self.schema = {"stage": str, "tag": str, "files": {"weights": _FILE, "optimizer?": _FILE, "best?": _FILE},
                       "state": state_schema, "optimizer_meta": Opt(_OPTIMIZER_META)}

    def manifest_path(self, stage: str) -> Path:
        return self.root / f"{stage}.json"

    def has(self, stage: str) -> bool:
        """Whether ``stage`` has a manifest (a folder in its place counts: reading it says what is wrong)."""
        return self.manifest_path(stage).exists()

    def save(self, stage: str, tag: str, weights: dict[str, torch.Tensor], state: dict[str, Any],
             optimizer: dict | None = None, keep_best: bool = False) -> None:
        """Save weights, optional optimizer state and JSON state of ``stage``; ``tag`` names this version.
        ``keep_best``: the previous version's best weights (its ``best`` file, else its weights) stay named as the
        ``best`` of this one: the best epoch was an earlier one."""
        files = {}
        payloads = {"weights": {k: v.detach().cpu().contiguous() for k, v in weights.items()}}
        optimizer_meta = None
        if optimizer is not None:
            payloads["optimizer"], optimizer_meta = _flatten_optimizer(optimizer)
        for kind, tensors in payloads.items():
            name = f"{stage}-{tag}.{kind}.safetensors"
            data = save_safetensors(tensors)
            atomic_write(self.root / name, data, under=self.root.parent)  # checkpoints/ a link: refused
            files[kind] = {"file": name, "sha256": _sha256(data)}
        try:
            old = self._read_manifest(stage) if self.has(stage) else None
        except CheckpointError:  # a broken old manifest is replaced; its files are left where they are
            old = None
        if keep_best:
            if old is None:
                raise CheckpointError(f"stage {stage!r} has no earlier checkpoint whose weights could be the best")
            files["best"] = old["files"].get("best", old["files"]["weights"])
        manifest = {"stage": stage, "tag": tag, "files": files, "state": state, "optimizer_meta": optimizer_meta}
        atomic_write_text(self.manifest_path(stage), json.dumps(manifest, indent=1), under=self.root.parent)
        if old:  # the previous version's files are no longer named by any manifest
            for entry in old["files"].values():
                if entry["file"] not in {e["file"] for e in files.values()}:
                    (self.root / entry["file"]).unlink(missing_ok=True)

    def _read_manifest(self, stage: str) -> dict:
        """The manifest of ``stage``, checked: the one reader of manifests (loading, resuming, cleaning up)."""
        path = self.manifest_path(stage)
        fix = f"delete it to restart the {stage!r} stage, or the run directory to start over"
        manifest = read_json(path, self.schema, fix)
        if manifest["stage"] != stage:
            raise CheckpointError(f"checkpoint manifest {str(path)!r} is corrupt: it describes stage "
                                  f"{manifest['stage']!r}; {fix}")
        if ("optimizer" in manifest["files"]) != (manifest["optimizer_meta"] is not None):
            raise CheckpointError(f"checkpoint manifest {str(path)!r} is corrupt: optimizer file and optimizer_meta "
                                  f"do not go together; {fix}")
        return manifest

    def named_files(self, stage: str) -> set[str]:
        """The files the (valid) manifest of ``stage`` keeps."""
        return {entry["file"] for entry in self._read_manifest(stage)["files"].values()}

    def _read_tensors(self, stage: str, entry: dict) -> dict[str, torch.Tensor]:
        path = self.root / entry["file"]
        restart = f"delete {str(self.manifest_path(stage))!r} to restart the {stage!r} stage"
        if not path.exists() and not path.is_symlink():
            raise CheckpointError(f"checkpoint file {str(path)!r} of stage {stage!r} is missing; {restart}")
        data = read_bytes(path, restart)
        if _sha256(data) != entry["sha256"]:
            raise CheckpointError(f"checkpoint file {str(path)!r} is truncated or corrupted (its SHA-256 does not "
                                  f"match the manifest); {restart}")
        try:
            return load_safetensors(data)
        except (SafetensorError, ValueError, RuntimeError):
            raise CheckpointError(f"checkpoint file {str(path)!r} is not a valid safetensors file; {restart}") from None

    def load(self, stage: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict | None]:
        """``(weights, state, optimizer_state_dict or None)`` of the stage's last checkpoint."""
        manifest = self._read_manifest(stage)
        weights = self._read_tensors(stage, manifest["files"]["weights"])
        optimizer = None
        if "optimizer" in manifest["files"]:
            tensors = self._read_tensors(stage, manifest["files"]["optimizer"])
            try:
                optimizer = _unflatten_optimizer(tensors, manifest["optimizer_meta"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(
                    f"checkpoint manifest {str(self.manifest_path(stage))!r} is corrupt: its optimizer_meta does not "
                    f"match {manifest['files']['optimizer']['file']!r}; delete it to restart the {stage!r} stage"
                ) from None
        return weights, manifest["state"], optimizer

    def load_best(self, stage: str) -> dict[str, torch.Tensor]:
        """The weights of the best epoch so far that the manifest names (its last weights when it names no other)."""
        files = self._read_manifest(stage)["files"]
        return self._read_tensors(stage, files.get("best", files["weights"]))

    def check_weights(self, stage: str, weights: dict[str, torch.Tensor], expected: dict[str, tuple]) -> None:
        """Refuse ``weights`` (of ``stage``'s checkpoint) whose names or shapes differ from ``expected``, the
        model's ``{name: shape}``: weights of another stage or config, even with a matching SHA-256."""
        problem = None
        missing = [k for k in expected if k not in weights]
        extra = [k for k in weights if k not in expected]
        if missing:
            problem = f"it lacks {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        elif extra:
            problem = f"it holds {extra[0]!r}, which the model has not"
        else:
            for key, shape in expected.items():
                if tuple(weights[key].shape) != tuple(shape):
                    problem = f"{key!r} is {list(weights[key].shape)} but the model's is {list(shape)}"
                    break
        if problem:
            name = self._read_manifest(stage)["files"]["weights"]["file"]
            raise CheckpointError(f"checkpoint file {str(self.root / name)!r} does not hold the weights of the "
                                  f"{stage!r} model that config.yaml describes ({problem}); restore the run's own "
                                  f"files, or delete {str(self.manifest_path(stage))!r} to restart that stage")

    def state(self, stage: str) -> dict[str, Any]:
        return self._read_manifest(stage)["state"]
