"""Preprocessed volumes on disk, so that a second run skips reading, reorienting and resampling.

An entry is one ``.npz`` file (numeric arrays only, read with ``allow_pickle=False``): the prepared volume
``(D, H, W)`` float32 and the voxel spacing it was stored with. Its name is the SHA-256 of the source's content
(every file of a DICOM series, with their names) and of the whole :class:`~ddcnn.data.volumes.VolumeRecipe`: a
changed file or setting is a new entry, never a stale one. Entries are written atomically; an unreadable one is
prepared again and replaced.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch

from ddcnn.data.dicom import series_files
from ddcnn.data.volumes import VolumeRecipe
from ddcnn.errors import ConfigError
from ddcnn.files import atomic_write

FORMAT = 1  # bumped when what an entry holds, or how a volume is prepared, changes


def content_digest(source: Path) -> str:
    """SHA-256 of a file's bytes, or of a DICOM series folder's file names and bytes."""
    digest = hashlib.sha256()
    for path in series_files(source) if source.is_dir() else [source]:
        if source.is_dir():
            digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class VolumeCache:
    """Prepared volumes of one recipe in ``folder``; counts its ``hits`` and ``misses``."""

    def __init__(self, folder: Path, recipe: VolumeRecipe):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"data.cache = {str(folder)!r} is a file; give a folder for the preprocessed volumes")
        self.folder, self.recipe = folder, recipe
        self._settings = json.dumps({"format": FORMAT, "recipe": recipe.to_json()}, sort_keys=True).encode()
        self.hits = self.misses = 0

    def key(self, source: Path) -> str:
        return hashlib.sha256(content_digest(source).encode() + self._settings).hexdigest()

    def get(self, key: str) -> tuple[torch.Tensor, tuple[float, float, float] | None] | None:
        """The entry ``key`` (volume, stored spacing), or None when it is absent or unreadable."""
        path = self.folder / f"{key}.npz"
        try:
            with np.load(path, allow_pickle=False) as entry:
                volume, spacing = entry["volume"], entry["spacing"]
        except (OSError, ValueError, KeyError, EOFError):
            self.misses += 1
            return None
        if volume.dtype != np.float32 or tuple(volume.shape) != tuple(self.recipe.size) or spacing.shape != (3,):
            self.misses += 1
            return None
        self.hits += 1
        stored = tuple(float(v) for v in spacing) if np.all(spacing > 0) else None
        return torch.from_numpy(volume), stored  # type: ignore[return-value]

    def put(self, key: str, volume: torch.Tensor, spacing: tuple[float, float, float] | None) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, volume=volume.numpy().astype(np.float32),
                 spacing=np.asarray(spacing if spacing is not None else (0.0, 0.0, 0.0), dtype=np.float64))
        atomic_write(self.folder / f"{key}.npz", buffer.getvalue())

    def summary(self) -> str:
        total = self.hits + self.misses
        return (f"volumes: {self.hits} of {total} read from the preprocessing cache {self.folder} (reading, "
                f"reorienting and resampling skipped), {self.misses} prepared and cached")
