"""A map-style ``torch.utils.data.Dataset`` given from Python, read one sample at a time.

* :func:`as_sample` turns ``dataset[i]`` into a checked ``(C, *size)`` image (uint8 or float32) and an integer
  label, or one error naming the sample (``train[17]``) and the fix.
* :class:`Samples` reads a dataset (or a subset of its indices) that way, each read under a seed of its own:
  the dataset's and a transform's random draws (torch's, numpy's and Python's global generators, which
  torchvision, MONAI and torchio use) depend only on the run's seed, the epoch and the sample, never on the
  order, the workers or the processes, so a resumed run sees the same images as an uninterrupted one.
* :class:`StreamedImages` stands in for an images tensor ``(M, C, *size)`` whose rows are read when asked, in
  order, by ``DataLoader`` workers: what the evaluation and the combine stage need of a set too large to hold.
* :class:`SampleBatches` are training batches whose images are read (and transformed per sample, every epoch) in
  the workers, then moved to the device and finished there like every ddcnn batch.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from ddcnn.data.loading import LoaderBatches, _PlanSampler
from ddcnn.errors import DataError, DDCNNError, ShapeError
from ddcnn.seeds import derive_seed


def as_sample(item, where: str) -> tuple[torch.Tensor, int]:
    """``dataset[i]`` (``where`` names it, e.g. ``"train[17]"``) as ``(image (C, *size), label)``: a tensor, numpy
    array or PIL image; uint8 kept, other numbers as float32; a label an integer (a Python, numpy or one-element
    tensor integer)."""
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise DataError(f"{where} is {_kind(item)}; a dataset for ddcnn gives (image, label) pairs")
    image, label = item
    if isinstance(label, torch.Tensor) and label.numel() == 1 and not (label.is_floating_point() or
                                                                       label.dtype == torch.bool):
        label = int(label.item())
    elif isinstance(label, np.integer):
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int):
        raise DataError(f"{where} has label {label!r}; a label is the class index, an integer 0..K-1 (map class "
                        f"names to indices in the dataset)")
    image = _as_tensor(image, where)
    if image.dim() not in (3, 4):
        fix = "add the channel axis (image[None])" if image.dim() == 2 else "give one image per sample"
        raise ShapeError(f"{where} is an image of shape {list(image.shape)}; ddcnn takes (C, H, W) images or "
                         f"(C, D, H, W) volumes: {fix}")
    if image.dtype == torch.bool or image.is_complex():
        raise DataError(f"{where} is a {image.dtype} image; give uint8 (0-255) or floating-point pixels")
    if image.dtype != torch.uint8:
        image = image.to(torch.float32)
        if not torch.isfinite(image).all():
            raise DataError(f"{where} holds NaN or infinite values; clean the data or fix the dataset's transform")
    return image.contiguous(), label


def _as_tensor(image, where: str) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        return image.as_subclass(torch.Tensor)  # torchvision's tv_tensors.Image and kin: plain pixels
    if isinstance(image, np.ndarray):
        return torch.from_numpy(np.array(image, copy=True))
    from PIL import Image

    if isinstance(image, Image.Image):  # (H, W) or (H, W, C): channels first, as the models take them
        array = torch.from_numpy(np.array(image, copy=True))
        return array[None] if array.dim() == 2 else array.permute(2, 0, 1)
    raise DataError(f"{where} gives an image of type {type(image).__name__}; give a tensor, a numpy array or a PIL "
                    f"image (e.g. with torchvision's v2.ToImage() in the dataset's transform)")


def _kind(item) -> str:
    return f"a {type(item).__name__} of {len(item)} items" if isinstance(item, (tuple, list)) else \
        f"a {type(item).__name__}"


def check_like(image: torch.Tensor, where: str, shape: tuple[int, ...], uint8: bool, first: str) -> None:
    """Every image of a run has the shape ``(C, *size)`` and the kind (uint8, or float) of the first one."""
    if tuple(image.shape) != shape:
        raise ShapeError(f"{where} is {list(image.shape)} but {first} is {list(shape)}; every image must have the "
                         f"same channels and size: resize them in the dataset's transform (e.g. "
                         f"v2.Resize({list(shape[1:])}))")
    if (image.dtype == torch.uint8) != uint8:
        kinds = ("uint8", "float") if uint8 else ("float", "uint8")
        raise DataError(f"{where} is a {kinds[1]} image but {first} is {kinds[0]}; give every image as one kind: "
                        f"uint8 (0-255) or floats")


def check_label(label: int, where: str, num_classes: int | None) -> None:
    if label < 0 or (num_classes is not None and label >= num_classes):
        limit = f"0..{num_classes - 1} ({num_classes} classes)" if num_classes is not None else "0 or more"
        raise DataError(f"{where} has label {label}, outside {limit}; fix the labels, or pass classes=[...] with "
                        f"one name per class")


@contextlib.contextmanager
def kept_generators():
    """The global generators (torch's CPU one, numpy's, Python's) as they were, whatever is drawn inside."""
    state = torch.random.default_generator.get_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.random.default_generator.set_state(state[0])
        np.random.set_state(state[1])
        random.setstate(state[2])


def reseed(seed: int) -> None:
    """Seed the global generators that datasets and transforms draw from (CUDA's is left alone: training's)."""
    torch.random.default_generator.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class Samples:
    """``dataset[indices[i]]`` as a checked image ``(C, *size)`` like the run's first (``shape``, ``uint8``):
    ``read(i, seed)`` reads it with the global generators seeded by ``seed``."""

    def __init__(self, dataset, name: str, shape: tuple[int, ...], uint8: bool, indices: torch.Tensor | None = None,
                 first: str = "train[0]"):
        self.dataset, self.name, self.shape, self.uint8, self.first = dataset, name, shape, uint8, first
        self.indices = indices if indices is not None else torch.arange(len(dataset))

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, positions: torch.Tensor) -> Samples:
        return Samples(self.dataset, self.name, self.shape, self.uint8, self.indices[positions], self.first)

    def read_pair(self, i: int, seed: int) -> tuple[torch.Tensor, int]:
        index = int(self.indices[i])
        where = f"{self.name}[{index}]"
        reseed(seed)
        image, label = as_sample(self.dataset[index], where)
        check_like(image, where, self.shape, self.uint8, self.first)
        return image, label

    def read(self, i: int, seed: int) -> torch.Tensor:
        return self.read_pair(i, seed)[0]


class TensorSamples:
    """Images held in memory ``(M, C, *size)``, read like :class:`Samples` (the seed drives the transform)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def read(self, i: int, seed: int) -> torch.Tensor:
        reseed(seed)
        return self.images[i].clone()  # a transform that works in place must not change the held set


def item_seed(seed: int, index: int) -> int:
    """The seed of reading sample ``index`` outside training: checking, the evaluation, the combine stage."""
    return derive_seed(seed, "item", index)


class Chunks(torch.utils.data.Dataset):
    """Items are whole chunks: ``chunks[range]`` -> (images (b, C, *size), labels (b,)), or the ddcnn error of the
    first bad sample (returned, not raised, so that a worker's error arrives as one line)."""

    def __init__(self, samples: Samples, seed: int):
        self.samples, self.seed = samples, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, positions):
        try:
            with kept_generators():
                pairs = [self.samples.read_pair(i, item_seed(self.seed, int(self.samples.indices[i])))
                         for i in positions]
        except DDCNNError as err:
            return err
        return torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs], dtype=torch.int64)


def chunks(samples: Samples, seed: int, size: int, workers: int, start: int = 0):
    """``(images, labels)`` of ``samples`` in order, ``size`` at a time from ``start``, read by ``workers``
    DataLoader workers; the first bad sample is one ddcnn error."""
    ranges = [range(lo, min(lo + size, len(samples))) for lo in range(start, len(samples), size)]
    loader = torch.utils.data.DataLoader(Chunks(samples, seed), sampler=ranges, batch_size=None,
                                         num_workers=workers if len(ranges) > 1 else 0)
    for chunk in loader:
        if isinstance(chunk, DDCNNError):
            raise chunk
        yield chunk


class StreamedImages:
    """A read-only stand-in for an images tensor ``(M, C, *size)`` of :class:`Samples`: ``len``, ``shape``,
    ``dim()``, ``images[i]`` and ``images[a:b]`` (a tensor). Consecutive slices of one size, as batched inference
    asks for them, come from one ``DataLoader`` whose workers read ahead."""

    def __init__(self, samples: Samples, seed: int, workers: int):
        self.samples, self.seed, self.workers = samples, seed, workers
        self.shape = torch.Size((len(samples), *samples.shape))
        self.dtype = torch.uint8 if samples.uint8 else torch.float32
        self._stream = None
        self._next = (-1, 0)  # where the stream's next chunk starts, and its size

    def __len__(self) -> int:
        return self.shape[0]

    def dim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key):
        if isinstance(key, int):
            index = key + len(self) if key < 0 else key
            with kept_generators():
                return self.samples.read(index, item_seed(self.seed, int(self.samples.indices[index])))
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("images read from a Dataset can be taken one at a time or as a slice a:b")
        start, stop, _ = key.indices(len(self))
        if stop <= start:
            return torch.empty((0, *self.shape[1:]), dtype=self.dtype)
        size = stop - start
        if self._stream is None or self._next[0] != start or (size != self._next[1] and stop != len(self)):
            self._stream = chunks(self.samples, self.seed, size, self.workers, start)
            self._next = (start, size)
        images, _ = next(self._stream)
        self._next = (stop, self._next[1])
        return images


class SampleBatches(LoaderBatches):
    """Training batches whose images ``source.read(i, seed)`` gives, with ``transform`` (the user's, per sample:
    ``(C, *size) -> (C, *size)``) applied every epoch, both in the ``DataLoader`` workers; each sample's draws are
    seeded by (seed, epoch, sample). Then, like :class:`LoaderBatches`: on the device, converted, augmented by
    ddcnn's batched augmentation (``augment``) and normalised."""

    def __init__(self, ds, source, transform, batch_size: int, shuffle: bool = True, drop_last: bool = False,
                 augment=None, normalizer=None, device="cpu", seed: int = 0, workers: int = 0):
        super().__init__(ds, batch_size, shuffle, drop_last, augment, normalizer, device, seed, workers,
                         pin_memory=True)
        self._view = _TransformedSamples(source, ds.labels, transform, seed, tuple(ds.images.shape[1:]),
                                         ds.images.dtype == torch.uint8)
        self.loader = self._make_loader()

    def _make_loader(self):
        return torch.utils.data.DataLoader(self._view, sampler=_EpochSampler(self), batch_size=None,
                                           num_workers=self._workers, pin_memory=self.pin_memory)

    def __iter__(self):
        self._params.clear()
        for batch in self.loader:
            if isinstance(batch, DDCNNError):
                raise batch
            x, y = batch
            params = self._params.popleft()
            x = x.to(self.device, non_blocking=self.pin_memory)
            yield self._finish(x, params), y.to(self.device, non_blocking=self.pin_memory)


class _EpochSampler(_PlanSampler):
    """The plan's index tensors, each with the epoch: the workers seed every sample's draws with both."""

    def __iter__(self):
        for index in super().__iter__():
            yield self.owner.epoch, index


class _TransformedSamples(torch.utils.data.Dataset):
    def __init__(self, source, labels: torch.Tensor, transform, seed: int, shape: tuple[int, ...], uint8: bool):
        self.source, self.labels, self.transform, self.seed = source, labels, transform, seed
        self.shape, self.uint8 = shape, uint8

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item):
        epoch, index = item
        try:
            with kept_generators():
                images = [self._one(int(i), epoch) for i in index]
        except DDCNNError as err:
            return err
        return torch.stack(images), self.labels[index]

    def _one(self, i: int, epoch: int) -> torch.Tensor:
        image = self.source.read(i, derive_seed(self.seed, "train", epoch, i))
        if self.transform is None:
            return image
        return transformed(self.transform, image, f"train sample {i}", self.shape, self.uint8)


def transformed(transform, image: torch.Tensor, where: str, shape: tuple[int, ...], uint8: bool) -> torch.Tensor:
    """``transform(image)``, checked: a tensor of the same shape and kind (uint8 or float) as its input."""
    out = transform(image)
    if not isinstance(out, torch.Tensor):
        raise DataError(f"the transform gave {_kind(out)} for {where}; it must return the image tensor (the label "
                        f"stays the dataset's)")
    out = out.as_subclass(torch.Tensor)
    if tuple(out.shape) != shape:
        raise ShapeError(f"the transform turned {where} from {list(shape)} into {list(out.shape)}; it must keep the "
                         f"size the models take (crop with padding: v2.RandomCrop({list(shape[1:])}, padding=4))")
    if (out.dtype == torch.uint8) != uint8:
        raise DataError(f"the transform turned {where} from {'uint8' if uint8 else 'float'} into {out.dtype}; "
                        f"convert types in the dataset's own transform and keep transform= for augmentation")
    if not uint8:
        out = out.to(torch.float32)
        if not torch.isfinite(out).all():
            raise DataError(f"the transform gave NaN or infinite values for {where}; fix the transform")
    return out.contiguous()
