"""Splits you can see and give: a folder that comes split (``train/``, ``val/``, ``test/`` sub-folders, each of
class sub-folders) is used as given, and every run records which items went to train, val and test
(``splits.json``): the file names for folders, index ranges and a checksum for the array datasets."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from ddcnn.data.readers import ImageDataset
from ddcnn.errors import DataError

SPLITS = ("train", "val", "test")


def given_splits(root) -> list[str] | None:
    """The split folders of a pre-split folder (``train`` and ``test``, and ``val`` when there), or None when
    ``root`` holds class folders. A folder is pre-split when its sub-folders are exactly train and test (and val)."""
    root = Path(root)
    if not root.is_dir():
        return None
    folders = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if {"train", "test"} <= folders and folders <= set(SPLITS):
        return [s for s in SPLITS if s in folders]
    return None


def with_classes(ds: ImageDataset, classes: list[str], where: Path) -> ImageDataset:
    """``ds`` with its labels renumbered into ``classes`` (the training split's), matched by class name, and its
    file names prefixed with the split folder ``where``'s name; a class the training split lacks is an error."""
    unknown = [c for c in ds.classes if c not in classes]
    if unknown:
        raise DataError(f"{where} has class folder {unknown[0]!r}, which {where.parent / 'train'} lacks; the splits "
                        f"of a pre-split folder must use the training split's classes")
    mapping = torch.tensor([classes.index(c) for c in ds.classes], dtype=torch.int64)
    names = [f"{where.name}/{n}" for n in ds.names] if ds.names is not None else None
    return ImageDataset(ds.images, mapping[ds.labels], list(classes), ds.origin, names)


def _ranges(index: np.ndarray) -> list[list[int]]:
    """Sorted indices as ``[start, stop)`` runs of consecutive numbers: [0, 1, 2, 5] -> [[0, 3], [5, 6]]."""
    if len(index) == 0:
        return []
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    starts, stops = np.r_[index[0], index[breaks]], np.r_[index[breaks - 1] + 1, index[-1] + 1]
    return [[int(a), int(b)] for a, b in zip(starts, stops)]


def members(ds: ImageDataset, source: str) -> dict:
    """Which items of ``source`` (a file name, ``"the training file"``) ``ds`` holds: its file names when read from
    a folder; else the sorted indices as ranges and the SHA-256 of the indices as little-endian int64."""
    origin = ds.origin if ds.origin is not None else torch.arange(len(ds))
    index = np.sort(origin.numpy().astype("<i8"))
    if ds.names is not None:
        files = [ds.names[i] for i in index]
        digest = hashlib.sha256("\n".join(files).encode()).hexdigest()
        return {"count": len(files), "files": files, "sha256": digest}
    return {"count": len(index), "source": source, "ranges": _ranges(index),
            "sha256": hashlib.sha256(index.tobytes()).hexdigest()}


def split_record(name: str, train: ImageDataset, val: ImageDataset, test: ImageDataset, given: bool) -> dict:
    """``splits.json``: per split what it holds (:func:`members`); file names are relative to ``data.root``, and
    indices count in the dataset's training file (train and val) or test file (test)."""
    how = "given by the folder's train/, val/, test/ sub-folders" if given else \
        "drawn by ddcnn (data.test_fraction, data.val_fraction, data.split_seed)"
    return {"format": 1, "dataset": name, "split": how,
            "train": members(train, "training set"), "val": members(val, "training set"),
            "test": members(test, "test set")}
