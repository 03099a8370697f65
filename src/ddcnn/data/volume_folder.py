"""A folder of 3D volumes, one sub-folder per class (MosMedData ``CT-0`` ...), and single volume files.

Inside a class folder, volumes may sit in patient sub-folders at any depth: each ``.npy``, ``.nii`` or ``.nii.gz``
file is one volume, and each folder that directly holds DICOM files is one series (one volume). Every volume is
prepared by :func:`ddcnn.data.volumes.prepare_volume` (canonical frame, intensity, spacing, size), through the
preprocessing cache when ``cache`` names a folder.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from ddcnn.checks import choice
from ddcnn.data.dicom import is_dicom_file
from ddcnn.data.intensity import MODES
from ddcnn.data.readers import ImageDataset, _check_size, _class_files, _names, natural_key
from ddcnn.data.volume_cache import VolumeCache
from ddcnn.data.volumes import VolumeRecipe, describe, orientation_note, prepare_volume, spacing_note
from ddcnn.errors import ConfigError, DataError, DataNotFoundError
from ddcnn.memory import free_memory, gib

VOLUME_EXTENSIONS = (".npy", ".nii", ".nii.gz")


def say(line: str) -> None:
    """A line of the data log on stderr, beside the run's other notes."""
    print(f"ddcnn: {line}", file=sys.stderr)


def volume_items(folder: Path) -> list[Path]:
    """The volumes under a class folder: volume files and DICOM series folders, at any depth, sorted naturally."""
    entries = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: natural_key(p.name))
    files = [p for p in entries if p.is_file()]
    dicom = [p for p in files if is_dicom_file(p)]
    if dicom:
        raise DataError(f"{folder} holds DICOM files ({dicom[0].name}, ...) beside its sub-folders; put each series "
                        f"in its own folder (class/patient/series/*.dcm)")
    found = [p for p in files if p.name.lower().endswith(VOLUME_EXTENSIONS)]
    for sub in (p for p in entries if p.is_dir()):
        series = [p for p in sub.iterdir() if p.is_file() and not p.name.startswith(".") and is_dicom_file(p)]
        found += [sub] if series else volume_items(sub)
    return found


def _recipe(size, window, intensity, percentiles, orientation, spacing) -> VolumeRecipe:
    size = _check_size(size, 3, "size")
    choice("intensity", intensity, MODES)
    if window is not None:
        try:
            low, high = (float(v) for v in window)
        except (TypeError, ValueError):
            low = high = float("nan")
        if not low < high:
            raise ConfigError(f"window must be (low, high) with low < high, got {window!r}.")
        window = (low, high)
    if intensity == "window" and window is None:
        raise ConfigError("intensity = window needs a window (low, high); give one or choose another intensity mode")
    return VolumeRecipe(size, orientation.upper(), tuple(spacing) if spacing is not None else None, intensity,
                        window, tuple(percentiles))


def _check_fits(count: int, size, root) -> None:
    """Refuse, before any volume is read, a set whose prepared volumes cannot be held in memory together."""
    need = count * math.prod(size) * 4
    free = free_memory(torch.device("cpu"))
    if free is not None and need > free:
        raise ConfigError(f"the {count} volumes of {root} at data.image_size = {list(size)} take {gib(need)} as "
                          f"float32 but only {gib(free)} of memory are free; lower data.image_size (a coarser "
                          f"data.spacing keeps the field of view) or use fewer volumes")


def load_volume_folder(root, size=(64, 128, 128), window=(-1000.0, 400.0), class_map: dict[str, str] | None = None,
                       *, intensity: str = "window", percentiles=(0.5, 99.5), orientation: str = "RAS",
                       spacing=None, cache=None) -> ImageDataset:
    """Load 3D volumes from ``root/<class>/[<patient>/...]<file or series>``: images (M, 1, D, H, W) float32,
    labels (M,) int64.

    Each volume is prepared by :func:`~ddcnn.data.volumes.prepare_volume` with the recipe these arguments make
    (``size`` = (D, H, W)). Class folders are sorted naturally (``CT-2`` before ``CT-10``); ``class_map`` merges
    folders into classes, e.g. ``{"CT-0": "normal", "CT-1": "abnormal"}``. With ``cache`` (a folder) prepared
    volumes are kept there and read back by later runs; a line on stderr says how many were.
    """
    recipe = _recipe(size, window, intensity, percentiles, orientation, spacing)
    classes, items = _class_files(root, VOLUME_EXTENSIONS, "volumes", class_map, items_of=volume_items)
    _check_fits(len(items), recipe.size, root)
    store = VolumeCache(Path(cache), recipe) if cache is not None else None
    images = torch.empty((len(items), 1, *recipe.size), dtype=torch.float32)
    spacings, stored = {}, {}
    for i, (path, _) in enumerate(items):
        key = store.key(path) if store is not None else ""
        entry = store.get(key) if store is not None else None
        if entry is None:
            entry = prepare_volume(path, recipe)
            if store is not None:
                store.put(key, entry)
        images[i, 0] = entry.volume
        if entry.spacing is not None:
            spacings[str(path)] = entry.spacing
        if entry.stored is not None:
            stored[str(path)] = entry.stored
    if store is not None:
        say(store.summary())
    turned = orientation_note(stored, recipe.orientation)
    if turned:
        say(turned)
    note = spacing_note(spacings) if recipe.spacing is None else None
    if note:
        say(f"warning: {note}")
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    return ImageDataset(images, labels, classes, names=_names(root, items))


def read_volume_file(path, recipe: VolumeRecipe | None = None, notes: list[str] | None = None) -> torch.Tensor:
    """One ``.npy`` or NIfTI file, or a DICOM series folder, as ``(1, D, H, W)`` float32: prepared by ``recipe``
    as :func:`load_volume_folder` prepares its volumes, or (without one) as stored (canonical frame, stored
    values and size). ``notes`` receives a line on what preparing it changed (orientation, spacing)."""
    path = Path(path)
    if not path.exists():
        raise DataNotFoundError(f"{path} does not exist; give the path of a .npy or .nii(.gz) volume or of a DICOM "
                                f"series folder.")
    if path.is_dir() and not any(is_dicom_file(p) for p in path.iterdir() if p.is_file()):
        raise DataError(f"{path} is a folder with no DICOM files; give a volume file, or a series folder")
    if recipe is None:
        from ddcnn.data.volumes import read_raw

        return torch.from_numpy(read_raw(path).array)[None]
    prepared = prepare_volume(path, recipe)
    if notes is not None and (changes := describe(prepared, recipe)):
        notes.append(f"{path}: " + "; ".join(changes))
    return prepared.volume[None]
