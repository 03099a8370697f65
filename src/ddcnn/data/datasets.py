"""From a ``data:`` config section to (train, test) datasets, whatever the format."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from ddcnn.config import DataConfig
from ddcnn.data.fetch import find_dataset
from ddcnn.data.generated import make_generated
from ddcnn.data.loading import split_dataset
from ddcnn.data.readers import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    ImageDataset,
    load_cifar10,
    load_idx_dataset,
    load_image_folder,
)
from ddcnn.data.splits import given_splits, with_classes
from ddcnn.data.volume_folder import load_volume_folder
from ddcnn.errors import ConfigError, DataError, DataNotFoundError, ShapeError
from ddcnn.memory import free_memory, gib
from ddcnn.paths import user_path


def _root(data, name: str):
    root = find_dataset(name, data.root, only_dir=data.root is not None)
    named = Path(data.root).expanduser() if data.root is not None else None
    if root is None and named is not None and named.is_dir() and any(named.iterdir()):
        return named  # a folder the user named that holds something: the reader says what is missing or wrong
    if root is None:
        where = named_root(data) if data.root else "the known places"
        raise DataNotFoundError(
            f"the {name} files are not in {where}; run `ddcnn data fetch {name}` and set data.root to the folder it "
            f"prints (or remove data.root to search the known places)"
        )
    return root


def named_root(data) -> str:
    """``data.root = /resolved/path (written as 'x' in FILE)``: what the missing-data errors say."""
    written = f" (written as {data.root_as_written})" if data.root_as_written else ""
    return f"data.root = {data.root}{written}"


# The one line every command that would read a Python-given dataset back from files says.
PYTHON_DATA = ("this run's data came from Python (data.name = 'python': Datasets given to ddcnn.fit), which no ddcnn "
               "reader can read back; give the datasets again from Python: ddcnn.evaluate(run, test), "
               "ddcnn.fit(..., resume=True)")


def _limit(ds: ImageDataset, limit: int | None, sorted_by_class: bool, seed: int) -> ImageDataset:
    """``limit`` images of ``ds``: the first ones of a file that mixes the classes (IDX, CIFAR, generated), a
    stratified sample (``seed``, original order kept) of a folder dataset, whose images come class by class."""
    if limit is None or limit >= len(ds):
        return ds
    if sorted_by_class:
        return split_dataset(ds, limit / len(ds), seed=seed)[1]
    origin = ds.origin if ds.origin is not None else torch.arange(len(ds))
    return ImageDataset(ds.images[:limit], ds.labels[:limit], ds.classes, origin[:limit], ds.names)


def load_datasets(data) -> tuple[ImageDataset, ImageDataset]:
    """``(train, test)`` for a :class:`~ddcnn.config.DataConfig`; image and volume folders are split by
    ``test_fraction`` (stratified, ``split_seed``) unless they come split (:func:`load_splits`)."""
    train, _, test, _ = _load(data)
    return train, test


def load_splits(data) -> tuple[ImageDataset, ImageDataset, ImageDataset, bool]:
    """``(train, val, test, given)``: val is a pre-split folder's ``val/`` as given, else drawn from the training
    set (``val_fraction``, stratified, ``split_seed``); ``given``: whether the folder came split."""
    train_full, val, test, given = _load(data)
    if val is None:
        train, val = split_dataset(train_full, data.val_fraction, data.split_seed)
        return train, val, test, given
    return train_full, val, test, given


def _load(data) -> tuple[ImageDataset, ImageDataset | None, ImageDataset, bool]:
    """``(train, val or None, test, given)``: the validation split only where a pre-split folder gives it;
    ``given``: whether the folder came split."""
    val, given = None, None
    if data.root is not None:  # '~' read as everywhere else, and impossible paths refused, before any search
        data = dataclasses.replace(data, root=str(user_path(data.root, "data.root")))
    name = data.name
    if name == "python":
        raise DataError(PYTHON_DATA)
    check_data_size(data)
    if data.class_map and name != "volume-folder":
        raise ConfigError(f"data.class_map merges class folders of a volume-folder dataset; data.name = {name!r} "
                          f"does not use it: remove data.class_map")
    if name in ("fashion-mnist", "mnist"):
        root = _root(data, name)
        classes = FASHION_MNIST_CLASSES if name == "fashion-mnist" else MNIST_CLASSES
        train, test = (load_idx_dataset(root, split, classes=classes) for split in ("train", "test"))
    elif name == "cifar10":
        root = _root(data, name)
        train, test = load_cifar10(root, "train"), load_cifar10(root, "test")
        if list(train.classes) != list(test.classes):
            train.classes = test.classes = list(CIFAR10_CLASSES)
    elif name in ("image-folder", "volume-folder"):
        if not data.root:
            raise ConfigError(f"data.root must name the folder of class sub-folders for data.name = {name!r}")
        if data.image_size is None:
            raise ConfigError(f"data.image_size must say the size to resize to for data.name = {name!r}, "
                              f"e.g. [128, 128]" + (" or [64, 128, 128]" if name == "volume-folder" else ""))
        dims = 2 if name == "image-folder" else 3
        if not Path(data.root).is_dir():
            raise DataNotFoundError(f"{named_root(data)} is not a directory; give the folder that holds one "
                                    f"sub-folder per class, or train/ and test/ sub-folders (--set data.root=DIR, "
                                    f"relative to the current directory)")
        if len(data.image_size) != dims:
            raise ConfigError(f"data.image_size = {list(data.image_size)} has {len(data.image_size)} entries but "
                              f"{name} needs {dims}: " + ("[H, W], e.g. [128, 128]" if dims == 2 else
                                                          "[D, H, W], e.g. [64, 128, 128]"))

        def read(folder):
            if name == "image-folder":
                return load_image_folder(folder, data.image_size, data.channels or 3)
            cache = str(user_path(data.cache, "data.cache")) if data.cache is not None else None
            return load_volume_folder(folder, data.image_size, data.window, data.class_map,
                                      intensity=data.intensity, percentiles=data.percentiles,
                                      orientation=data.orientation, spacing=data.spacing, cache=cache)

        given = given_splits(data.root)
        if given:  # train/, test/ (and val/) as the folder gives them
            root = Path(data.root)
            train = read(root / "train")
            parts = {s: with_classes(read(root / s), train.classes, root / s) for s in given if s != "train"}
            train = with_classes(train, train.classes, root / "train")
            test, val = parts["test"], parts.get("val")
        else:
            train, test = split_dataset(read(data.root), data.test_fraction, seed=data.split_seed + 1)
        if len(test) == 0:
            raise ConfigError(f"data.test_fraction = {data.test_fraction} leaves no test images; use e.g. 0.2")
    else:  # generated
        if data.image_size is None:
            raise ConfigError("data.image_size must say the size of the generated images, e.g. [32, 32] or "
                              "[16, 32, 32]")
        channels = data.channels or 1
        train = make_generated(data.generated_train, data.image_size, data.num_classes, channels,
                               seed=data.split_seed, noise=data.noise)
        test = make_generated(data.generated_test, data.image_size, data.num_classes, channels,
                              seed=data.split_seed + 10_000, noise=data.noise)
    folder = name in ("image-folder", "volume-folder")
    train = _limit(train, data.limit_train, folder, data.split_seed + 2)
    test = _limit(test, data.limit_test, folder, data.split_seed + 3)
    check_against_config(data, train)
    if len(train.classes) < 2:
        raise DataError(f"the {name} data has {len(train.classes)} class ({', '.join(map(str, train.classes))}); a "
                        f"classifier needs at least 2: add class folders" + (" or map the folders to two or more "
                                                                          "classes in data.class_map"
                                                                          if data.class_map else ""))
    for part, ds in (("training", train), ("test", test)):
        if len(ds) == 0:
            raise DataError(f"the {part} set of {name} is empty")
        if ds.images.is_floating_point() and not torch.isfinite(ds.images).all():
            raise DataError(f"the {part} set of {name} holds NaN or infinite pixel values; clean the files")
    return train, val, test, bool(given)


def check_against_config(data, train: ImageDataset) -> None:
    """``data.image_size`` and ``data.channels``, where set, against the images of ``train``."""
    if data.image_size is not None and tuple(data.image_size) != train.image_size:
        raise ShapeError(
            f"data.image_size = {list(data.image_size)} but the {data.name} images are {list(train.image_size)}; "
            f"set data.image_size to {list(train.image_size)} (or remove it)"
        )
    dims = len(train.image_size)
    if any(axis >= dims for axis in data.augment.flip_axes):
        raise ConfigError(f"data.augment.flip_axes = {data.augment.flip_axes} names an axis the {data.name} images "
                          f"do not have: they have {dims} spatial axes, 0 to {dims - 1}")
    if data.channels is not None and data.channels != train.in_channels:
        raise ShapeError(
            f"data.channels = {data.channels} but the {data.name} images have {train.in_channels} channels; set "
            f"data.channels to {train.in_channels} (or remove it)"
        )


def check_data_size(data: DataConfig, free: int | None = None) -> None:
    """Refuse an ``image_size`` whose images cannot be held in memory, before any file is read or generated."""
    if data.image_size is None:
        return
    channels = data.channels or (1 if data.name in ("volume-folder", "generated") else 3)
    one = math.prod(data.image_size) * channels * 4
    count = data.generated_train + data.generated_test if data.name == "generated" else 1
    free = free_memory(torch.device("cpu")) if free is None else free
    if free is not None and one * count > free:
        what = f"{count:,} generated images" if count > 1 else "one image"
        raise ConfigError(f"data.image_size = {data.image_size} makes {what} take {gib(one * count)} but only "
                          f"{gib(free)} of memory are free; lower data.image_size"
                          + (" or data.generated_train" if count > 1 else ""))
