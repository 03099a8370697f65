"""Datasets given from Python (``ddcnn.fit``): checked whole before anything is written, then held in memory or
streamed.

:func:`prepare` reads every sample once (``DataLoader`` workers), checks it (:mod:`ddcnn.data.samples`: shape,
kind, label, NaN), takes the normaliser's statistics and a fingerprint, and chooses how training reads the data:

* ``memory``: the images are kept as one tensor per split, as a ddcnn reader gives them. Without ``transform``
  training batches are sliced from it (on the device when it fits) like every CLI run's; with ``transform`` the
  workers apply it to every image of every epoch. Cost: the images' bytes in host memory, one pass to read them.
* ``stream``: nothing is kept but the labels; every epoch, every evaluation and the combine stage read the samples
  again from the dataset in the workers. Cost: the dataset's own reading and transforms, on every pass.

``auto`` takes memory when the splits fit in a quarter of the free host memory and ``dataset[0]`` gives the same
image twice; a dataset that draws at random is streamed, so that its draws are made again every epoch.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ddcnn.data.datasets import check_against_config
from ddcnn.data.loading import Normalizer, val_mask
from ddcnn.data.readers import ImageDataset
from ddcnn.data.samples import (
    SampleBatches,
    Samples,
    StreamedImages,
    TensorSamples,
    as_sample,
    check_label,
    chunks,
    kept_generators,
    transformed,
)
from ddcnn.errors import ConfigError, DataError
from ddcnn.memory import free_memory, gib

LOADS = ("auto", "memory", "stream")
CHUNK = 256  # samples per read of the checking pass


@dataclass
class PythonData:
    """The splits of a run from Python, ready for the trainer: ``train``, ``val``, ``test`` (their ``images`` a
    tensor, or :class:`StreamedImages`), the class names, the normaliser fitted on ``train``, ``facts`` (what
    data.json records under ``python``) and ``feed`` (training batches, when they are not plain tensor slices)."""

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    classes: list[str]
    normalizer: Normalizer
    facts: dict
    feed: Callable | None = None

    def summary(self) -> str:
        """One line: which path the run takes and what it cost."""
        f = self.facts
        sizes = f"{len(self.train):,} training, {len(self.val):,} validation, {len(self.test):,} test images"
        how = f"held in memory ({gib(f['bytes'])})" if f["load"] == "memory" else "streamed from the Datasets"
        each = "; the transform runs per image every epoch" if f["transform"] else ""
        return (f"data from Python: {sizes} {list(self.train.images.shape[1:])}, {how}: {f['why']}; read and "
                f"checked in {f['seconds']:.1f} s with {f['workers']} worker(s){each}")


@dataclass
class _Scan:
    labels: torch.Tensor
    fingerprint: str
    images: torch.Tensor | None  # kept for memory
    sums: torch.Tensor  # per sample and channel: sum of values, sum of squares (M, 2, C) float64


def dataset_length(dataset, name: str) -> int:
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__getitem__"):
        raise DataError(f"{name} is a {type(dataset).__name__}, not a map-style dataset; give one with __len__ and "
                        f"__getitem__ returning (image, label)")
    try:
        length = len(dataset)
    except TypeError:
        raise DataError(f"{name} has no length; give a map-style dataset with __len__ and __getitem__") from None
    if length == 0:
        raise DataError(f"{name} is empty; give at least one (image, label) pair")
    return length


def class_names(classes, dataset) -> list[str] | None:
    """``classes`` as given, else the dataset's own ``classes`` attribute (torchvision's), else None (the labels
    decide: 0..max)."""
    names = classes if classes is not None else getattr(dataset, "classes", None)
    if names is None:
        return None
    names = [str(c) for c in names]
    if len(names) < 2 or len(set(names)) != len(names):
        raise ConfigError(f"classes = {names} must name two or more distinct classes, one per label 0..K-1")
    return names


def prepare(train, test, val=None, *, data, seed: int, classes=None, transform=None, load: str = "auto",
            preprocessing=None) -> PythonData:
    """Check and read the datasets (``data``: the run's :class:`~ddcnn.config.DataConfig`: limits, validation
    split, workers, image_size and channels checks); see the module's docstring for ``load``."""
    if load not in LOADS:
        raise ConfigError(f"load = {load!r} is not valid; use one of {', '.join(LOADS)}")
    if transform is not None and not callable(transform):
        raise ConfigError(f"transform = {transform!r} is not callable; give a function image -> image, e.g. "
                          f"torchvision's v2.Compose([...])")
    given = {"train": train, "test": test, **({"val": val} if val is not None else {})}
    lengths = {name: dataset_length(ds, name) for name, ds in given.items()}
    limits = {"train": data.limit_train, "test": data.limit_test}
    counts = {name: min(n, limits.get(name) or n) for name, n in lengths.items()}
    names = class_names(classes, train)
    with kept_generators():
        first, _ = as_sample(train[0], "train[0]")
        again, _ = as_sample(train[0], "train[0]")
        shape, uint8 = tuple(first.shape), first.dtype == torch.uint8
        if transform is not None:  # a transform that breaks the images is refused before anything is written
            transformed(transform, first, "train[0]", shape, uint8)
    random_draws = not torch.equal(first, again)
    one = first.numel() * first.element_size()
    total = one * sum(counts.values())
    free = free_memory(torch.device("cpu"))
    fits = free is None or total <= free // 4
    if load == "memory" and not fits:
        raise ConfigError(f"load = 'memory' but the datasets take {gib(total)} and only {gib(free or 0)} of memory "
                          f"are free; use load='stream' (or 'auto')")
    if load == "auto":
        load = "stream" if random_draws or not fits else "memory"
        why = ("train[0] gave two different images: the Dataset draws at random, so it is read again every epoch"
               if random_draws else f"{gib(total)} take more than a quarter of the free memory ({gib(free or 0)})"
               if not fits else f"{gib(total)} fit in a quarter of the free memory")
    else:
        why = f"load = {load!r} was asked for"
    workers = int(data.workers)
    start = time.perf_counter()
    scans = {name: _scan(Samples(ds, name, shape, uint8, torch.arange(counts[name])), seed, workers,
                         load == "memory", names) for name, ds in given.items()}
    k = len(names) if names is not None else max(int(s.labels.max()) for s in scans.values()) + 1
    names = names or [str(c) for c in range(k)]
    if len(names) < 2:
        raise DataError("every label of the data is 0: a classifier needs two or more classes")
    whole = scans["train"]
    if val is None:
        in_val = val_mask(whole.labels, k, data.val_fraction, data.split_seed)
        parts = {"train": (~in_val).nonzero().flatten(), "val": in_val.nonzero().flatten()}
    else:
        parts = {"train": torch.arange(counts["train"])}
    sums = whole.sums[parts["train"]].sum(0)
    normalizer = Normalizer.from_sums(sums[0], sums[1], len(parts["train"]) * math.prod(shape[1:]))

    def split(name: str, source: str, positions: torch.Tensor | None = None) -> ImageDataset:
        scan = scans[source]
        positions = positions if positions is not None else torch.arange(len(scan.labels))
        if scan.images is not None:
            images = scan.images[positions] if len(positions) != len(scan.images) else scan.images
        else:
            samples = Samples(given[source], source, shape, uint8, positions)
            images = StreamedImages(samples, seed, workers)  # type: ignore[assignment]
        return ImageDataset(images, scan.labels[positions], list(names))

    train_set = split("train", "train", parts["train"])
    val_set = split("val", "train", parts["val"]) if val is None else split("val", "val")
    test_set = split("test", "test")
    check_against_config(data, train_set)
    feed = None
    if load == "stream":
        source = Samples(train, "train", shape, uint8, parts["train"])
        feed = _feed(source, transform, workers)
    elif transform is not None:
        feed = _feed(TensorSamples(train_set.images), transform, workers)
    facts = {"source": "python", "load": load, "why": why, "bytes": total if load == "memory" else 0,
             "seconds": round(time.perf_counter() - start, 3), "workers": workers,
             "dtype": "uint8" if uint8 else "float32",
             "transform": repr(transform) if transform is not None else None,
             "random_draws": random_draws,
             "val": "given" if val is not None else "split from train by data.val_fraction",
             "sizes": counts, "fingerprints": {name: scan.fingerprint for name, scan in scans.items()},
             "preprocessing": preprocessing}
    return PythonData(train_set, val_set, test_set, names, normalizer, facts, feed)


def read_split(dataset, name: str, shape: tuple[int, ...], uint8: bool, num_classes: int, seed: int,
               workers: int, classes: list[str]) -> tuple[ImageDataset, str]:
    """One dataset given again (to evaluate a run), checked against the run's images: held in memory, with its
    fingerprint."""
    dataset_length(dataset, name)
    scan = _scan(Samples(dataset, name, shape, uint8, first="the run's images"), seed, workers, True, classes)
    assert scan.images is not None  # kept
    return ImageDataset(scan.images, scan.labels, list(classes)), scan.fingerprint


def _feed(source, transform, workers: int):
    def batches(ds, batch_size, device, shuffle, drop_last, augment, normalizer, seed):
        return SampleBatches(ds, source, transform, batch_size, shuffle, drop_last, augment, normalizer, device,
                             seed, workers)

    return batches


def _scan(samples: Samples, seed: int, workers: int, keep: bool, classes: list[str] | None) -> _Scan:
    """Every sample read and checked once, in order: labels, the fingerprint, per-sample sums and (``keep``) the
    images. The fingerprint is the SHA-256 of the images' bytes (as held: uint8 or float32) and the labels
    (int64), after a header of the kind, shape and count: the same for the same data on either path."""
    digest = hashlib.sha256(f"ddcnn-dataset:1:{'uint8' if samples.uint8 else 'float32'}:{list(samples.shape)}:"
                            f"{len(samples)}".encode())
    labels, kept, sums = [], [], []
    k = len(classes) if classes is not None else None
    done = 0
    for images, chunk_labels in chunks(samples, seed, CHUNK, workers):
        for j, label in enumerate(chunk_labels.tolist()):
            check_label(label, f"{samples.name}[{int(samples.indices[done + j])}]", k)
        digest.update(images.numpy().tobytes())
        flat = images.to(torch.float64).div_(255.0 if samples.uint8 else 1.0).flatten(2)
        sums.append(torch.stack([flat.sum(2), (flat * flat).sum(2)], 1))
        labels.append(chunk_labels)
        if keep:
            kept.append(images)
        done += len(images)
    every = torch.cat(labels)
    digest.update(every.numpy().tobytes())
    return _Scan(every, "sha256:" + digest.hexdigest(), torch.cat(kept) if keep else None, torch.cat(sums))
