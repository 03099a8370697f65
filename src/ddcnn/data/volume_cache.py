"""Preprocessed volumes on disk, so that a second run skips reading, reorienting and resampling.

An entry is one ``.npz`` file (plain arrays only, read with ``allow_pickle=False``): the prepared volume
``(D, H, W)`` float32, the voxel spacing and the orientation it was stored with. Its name is the SHA-256 of the
source's content (every file of a DICOM series, with their names) and of the whole
:class:`~ddcnn.data.volumes.VolumeRecipe`: a changed file or setting is a new entry, never a stale one. Entries are
written atomically; an unreadable one is prepared again and replaced.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch

from ddcnn.data.dicom import series_files
from ddcnn.data.volumes import Prepared, VolumeRecipe
from ddcnn.errors import ConfigError
from ddcnn.files import atomic_write

FORMAT = 2  # bumped when what an entry holds, or how a volume is prepared, changes


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

    def get(self, key: str) -> Prepared | None:
        """The entry ``key``, or None when it is absent or unreadable."""
        path = self.folder / f"{key}.npz"
        try:
            with np.load(path, allow_pickle=False) as entry:
                volume, spacing, stored = entry["volume"], entry["spacing"], str(entry["stored"])
        except (OSError, ValueError, KeyError, EOFError):
            self.misses += 1
            return None
        if volume.dtype != np.float32 or tuple(volume.shape) != tuple(self.recipe.size) or spacing.shape != (3,):
            self.misses += 1
            return None
        self.hits += 1
        own = (float(spacing[0]), float(spacing[1]), float(spacing[2])) if np.all(spacing > 0) else None
        return Prepared(torch.from_numpy(volume), own, stored or None)

    def put(self, key: str, prepared: Prepared) -> None:
        buffer = io.BytesIO()
        spacing = prepared.spacing if prepared.spacing is not None else (0.0, 0.0, 0.0)
        np.savez(buffer, volume=prepared.volume.numpy().astype(np.float32),
                 spacing=np.asarray(spacing, dtype=np.float64), stored=np.asarray(prepared.stored or ""))
        atomic_write(self.folder / f"{key}.npz", buffer.getvalue())

    def summary(self) -> str:
        total = self.hits + self.misses
        return (f"volumes: {self.hits} of {total} read from the preprocessing cache {self.folder} (reading, "
                f"reorienting and resampling skipped), {self.misses} prepared and cached")
