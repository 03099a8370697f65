"""From an :class:`ImageDataset` to training batches: splitting, normalising, augmenting, batching.

Two batch sources share one interface (``set_epoch``, ``len``, iteration yielding ``(x, y)`` with ``x`` float32
normalised images on the device and ``y`` int64 labels, and ``shard(rank, world)``):

* :class:`DeviceBatches` keeps the whole set on the device and slices batches there (small sets: no copies,
  no workers);
* :func:`make_dataloader` wraps a standard ``torch.utils.data.DataLoader`` (large sets): raw batches are loaded,
  optionally pinned, moved to the device, and only then converted, augmented and normalised, so the workers do
  nothing but indexing and the augmentation runs batched on the device.

:func:`use_device_resident` chooses between them; :func:`make_batches` does both steps.

Both draw the sample order from a generator seeded by (seed, epoch) and the augmentation from another seeded by
(seed, epoch) too, for the whole global batch: the batches depend only on seed and epoch, so a resumed run, a
run on several processes, and the two sources all see the same batches.
"""

from __future__ import annotations

import collections
import copy
from typing import Protocol

import torch
import torch.nn.functional as F

from ddcnn.data.balance import balanced_order
from ddcnn.data.readers import ImageDataset
from ddcnn.errors import ConfigError, DataError, ShapeError
from ddcnn.seeds import derive_seed
from ddcnn.shards import shard_range


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]; floating-point images are returned unchanged."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if images.is_floating_point():
        return images
    return images.to(torch.float32)


def _subset(ds: ImageDataset, index: torch.Tensor) -> ImageDataset:
    origin = ds.origin if ds.origin is not None else torch.arange(len(ds))
    return ImageDataset(ds.images[index], ds.labels[index], list(ds.classes), origin[index], ds.names)


def split_dataset(ds: ImageDataset, fraction: float, seed: int = 0,
                  stratified: bool = True) -> tuple[ImageDataset, ImageDataset]:
    """Split ``ds`` into (train, val) with ``round(fraction * len(ds))`` samples in val (:func:`val_mask`); both
    parts keep the original order. ``fraction=0`` gives an empty val set.
    """
    mask = val_mask(ds.labels, ds.num_classes, fraction, seed, stratified)
    return _subset(ds, ~mask), _subset(ds, mask)


def val_mask(labels: torch.Tensor, num_classes: int, fraction: float, seed: int = 0,
             stratified: bool = True) -> torch.Tensor:
    """Which of the samples with ``labels`` (M,) go to the validation split: a bool mask (M,) with
    ``round(fraction * M)`` entries set.

    With ``stratified`` each class gives its share ``fraction * its count`` rounded down, and the samples left
    over go one each to the classes with the largest remainders (lower class index first on ties), so val keeps
    the class balance. Which samples go depends only on ``seed``.
    """
    if not (isinstance(fraction, (int, float)) and 0 <= fraction < 1):
        raise ConfigError(f"the validation fraction must be in [0, 1), got {fraction!r}.")
    g = torch.Generator().manual_seed(int(seed))
    groups = [torch.nonzero(labels == c).flatten() for c in range(num_classes)] if stratified \
        else [torch.arange(len(labels))]
    shares = [fraction * len(members) for members in groups]
    counts = [int(share) for share in shares]
    left = int(fraction * len(labels) + 0.5) - sum(counts)
    for c in sorted(range(len(groups)), key=lambda c: (counts[c] - shares[c], c))[:max(left, 0)]:
        counts[c] += 1
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for members, count in zip(groups, counts):
        mask[members[torch.randperm(len(members), generator=g)[:count]]] = True
    return mask


class Normalizer:
    """Per-channel ``(x - mean) / std`` with statistics fitted on a training set.

    Works on uint8 or float images, 2D (N, C, H, W) or 3D (N, C, D, H, W), on any device. ``state_dict()`` is a
    small JSON-friendly dict ``{"mean": [...], "std": [...]}`` (one value per channel).
    """

    def __init__(self, mean, std):
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        if len(self.mean) != len(self.std) or not self.mean:
            raise ConfigError(f"a Normalizer needs one mean and one std per channel, got {len(self.mean)} means "
                              f"and {len(self.std)} stds.")
        if not all(s > 0 for s in self.std):
            raise ConfigError(f"every std of a Normalizer must be positive, got {self.std}.")
        self._cache: dict = {}

    @classmethod
    def fit(cls, images: torch.Tensor, chunk: int = 4096) -> Normalizer:
        """Mean and (population) std per channel of ``to_float(images)``; a constant channel gets std 1."""
        if images.dim() not in (4, 5) or images.shape[0] == 0:
            raise DataError(f"cannot fit a Normalizer on images of shape {tuple(images.shape)}; "
                            "give a non-empty (N, C, ...) training set.")
        channels = images.shape[1]
        total = torch.zeros(channels, dtype=torch.float64)
        square = torch.zeros(channels, dtype=torch.float64)
        for lo in range(0, images.shape[0], chunk):   # chunks bound the float64 copy of a uint8 set
            x = to_float(images[lo:lo + chunk]).to(torch.float64).transpose(0, 1).reshape(channels, -1)
            total += x.sum(1).cpu()
            square += (x * x).sum(1).cpu()
        return cls.from_sums(total, square, images.numel() // channels)

    @classmethod
    def from_sums(cls, total: torch.Tensor, square: torch.Tensor, count: int) -> Normalizer:
        """From per-channel sums ``(C,)`` of the values and of their squares over ``count`` values per channel
        (float64): population mean and std; a constant channel gets std 1."""
        mean = total / count
        std = (square / count - mean * mean).clamp_min(0).sqrt()
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        return cls(mean.tolist(), std.tolist())

    def state_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_state(cls, state: dict) -> Normalizer:
        if not isinstance(state, dict) or "mean" not in state or "std" not in state:
            raise ConfigError(f"a Normalizer state must be a dict with 'mean' and 'std' lists, got {state!r}.")
        return cls(state["mean"], state["std"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = to_float(x)
        if x.dim() < 2 or x.shape[1] != len(self.mean):
            raise ShapeError(f"the Normalizer was fitted on {len(self.mean)} channels but got images of shape "
                             f"{tuple(x.shape)}; fit it on this dataset.")
        key = (x.device, x.dtype, x.dim())
        if key not in self._cache:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            self._cache[key] = (torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape),
                                torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape))
        mean, std = self._cache[key]
        return (x - mean) / std


class Augment:
    """Batched random crop with zero padding and random horizontal flip, on any device.

    ``draw`` makes the random choices for a batch from a CPU ``torch.Generator`` (so they are the same whatever
    the device) and ``apply`` uses them: crop offsets ``(N, ndim)`` in ``[0, 2 * crop_padding]`` for every spatial
    axis (the image is zero-padded by ``crop_padding`` on each side and the window starting at the offsets is
    kept), then a flip of the last axis (width) with probability 1/2. Offsets are drawn before flips.
    """

    def __init__(self, crop_padding: int = 4, hflip: bool = True):
        if not isinstance(crop_padding, int) or crop_padding < 0:
            raise ConfigError(f"crop_padding must be a non-negative integer, got {crop_padding!r}.")
        self.crop_padding = crop_padding
        self.hflip = bool(hflip)

    @property
    def identity(self) -> bool:
        return self.crop_padding == 0 and not self.hflip

    def __repr__(self) -> str:
        return f"Augment(crop_padding={self.crop_padding}, hflip={self.hflip})"

    def draw(self, n: int, ndim: int, generator: torch.Generator) -> dict:
        """Random choices for ``n`` samples with ``ndim`` spatial axes: ``{"offsets": (n, ndim), "flips": (n,)}``."""
        params = {}
        if self.crop_padding:
            params["offsets"] = torch.randint(0, 2 * self.crop_padding + 1, (n, ndim), generator=generator)
        if self.hflip:
            params["flips"] = torch.rand(n, generator=generator) < 0.5
        return params

    def apply(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        """Apply choices from :meth:`draw` to a float batch (N, C, *spatial)."""
        n, ndim = x.shape[0], x.dim() - 2
        if "offsets" in params:
            p = self.crop_padding
            padded = F.pad(x, [p, p] * ndim)
            offsets = params["offsets"].to(x.device)
            # One advanced-indexing gather instead of a loop over samples: index tensors broadcast to
            # (N, C, *spatial) and pick padded[n, c, off_0 + i_0, off_1 + i_1, ...].
            view = [1] * (ndim + 2)
            index = [torch.arange(n, device=x.device).view([n] + view[1:]),
                     torch.arange(x.shape[1], device=x.device).view([1, -1] + view[2:])]
            for j, size in enumerate(x.shape[2:]):
                shape = [n, 1] + [1] * ndim
                shape[2 + j] = size
                index.append((offsets[:, j, None] + torch.arange(size, device=x.device)).view(shape))
            x = padded[tuple(index)]
        if "flips" in params:
            flips = params["flips"].to(x.device).view([n] + [1] * (ndim + 1))
            x = torch.where(flips, x.flip(-1), x)
        return x

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.draw(x.shape[0], x.dim() - 2, generator))


class Augmentation(Protocol):
    """What a batch source needs of an augmentation: :class:`Augment`, or a chain of augmentations
    (:mod:`ddcnn.data.augment`)."""

    @property
    def identity(self) -> bool: ...

    def draw(self, n: int, ndim: int, generator: torch.Generator) -> dict: ...

    def apply(self, x: torch.Tensor, params: dict) -> torch.Tensor: ...


class _Batches:
    """The batch plan shared by both sources: order, global batches, the rank's slice, augmentation choices."""

    def __init__(self, ds: ImageDataset, batch_size: int, shuffle: bool, drop_last: bool, augment: Augmentation | None,
                 normalizer: Normalizer | None, seed: int, device, balanced: bool = False):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.num_samples = len(ds)
        self.ndim = ds.images.dim() - 2
        self.batch_size, self.shuffle, self.drop_last = batch_size, bool(shuffle), bool(drop_last)
        self.augment = None if augment is None or augment.identity else augment
        self.normalizer, self.seed, self.device = normalizer, int(seed), torch.device(device)
        self.epoch, self.rank, self.world = 0, 0, 1
        # data.balance = sampler: each epoch's order drawn class-balanced, with replacement (data/balance.py)
        self.balanced = (ds.labels.cpu(), ds.num_classes) if balanced else None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration uses."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def shard(self, rank: int, world: int):
        """A view yielding, of each global batch, the ``rank``-th of ``world`` contiguous parts.

        ``batch_size`` must divide by ``world`` so full batches split equally; a last, smaller batch is split as
        ``torch.tensor_split`` would (use ``drop_last`` when every rank needs a sample in every step).
        """
        if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
            raise ConfigError(f"shard needs 0 <= rank < world, got rank={rank!r}, world={world!r}.")
        if self.batch_size % world:
            raise ConfigError(f"the global batch size {self.batch_size} does not divide among {world} processes; "
                              "choose a batch size that is a multiple of the number of processes.")
        view = copy.copy(self)
        view.rank, view.world = rank, world
        return view

    def _plan(self):
        """Per step: (indices of this rank's part, augmentation choices for them or None)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 0))
            order = balanced_order(*self.balanced, generator) if self.balanced else \
                torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        aug_gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 1))
        for step in range(len(self)):
            index = order[step * self.batch_size:(step + 1) * self.batch_size]
            # Choices are drawn for the whole global batch, then sliced: every rank consumes the generator alike.
            params = self.augment.draw(len(index), self.ndim, aug_gen) if self.augment else None
            part = shard_range(len(index), self.rank, self.world)
            if params is not None:
                params = {k: v[part.start:part.stop] for k, v in params.items()}
            yield index[part.start:part.stop], params

    def _finish(self, x: torch.Tensor, params) -> torch.Tensor:
        x = to_float(x)
        if params is not None and self.augment is not None:
            x = self.augment.apply(x, params)
        return self.normalizer(x) if self.normalizer is not None else x


class DeviceBatches(_Batches):
    """Batches sliced from a dataset held whole on ``device`` (images stay uint8 there when they are uint8).

    Yields ``(x, y)``: x (B, C, *spatial) float32, converted with :func:`to_float`, augmented, normalised; y (B,).
    """

    def __init__(self, ds: ImageDataset, batch_size: int, shuffle: bool = True, drop_last: bool = False,
                 augment: Augmentation | None = None, normalizer: Normalizer | None = None, device="cpu", seed: int = 0,
                 balanced: bool = False):
        super().__init__(ds, batch_size, shuffle, drop_last, augment, normalizer, seed, device, balanced)
        self.images = ds.images.to(self.device)
        self.labels = ds.labels.to(self.device)

    def __iter__(self):
        for index, params in self._plan():
            index = index.to(self.device)
            yield self._finish(self.images[index], params), self.labels[index]


class _IndexView(torch.utils.data.Dataset):
    """Dataset whose items are whole batches: ``view[indices]`` -> (images[indices], labels[indices])."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]


class LoaderBatches(_Batches):
    """Batches loaded by a standard ``DataLoader`` (attribute ``loader``), finished on ``device``.

    The loader's sampler yields this rank's indices of each global batch, the (optional) workers index the
    in-memory tensors, ``pin_memory`` pins the raw batch; the batch is then moved to ``device`` and converted,
    augmented and normalised there exactly like :class:`DeviceBatches` does, so both sources yield equal batches.
    """

    def __init__(self, ds: ImageDataset, batch_size: int, shuffle: bool = True, drop_last: bool = False,
                 augment: Augmentation | None = None, normalizer: Normalizer | None = None, device="cpu", seed: int = 0,
                 workers: int = 0, pin_memory: bool = False, balanced: bool = False):
        super().__init__(ds, batch_size, shuffle, drop_last, augment, normalizer, seed, device, balanced)
        if not isinstance(workers, int) or workers < 0:
            raise ConfigError(f"workers must be a non-negative integer, got {workers!r}.")
        self.pin_memory = bool(pin_memory) and self.device.type == "cuda"
        self._view: torch.utils.data.Dataset = _IndexView(ds.images, ds.labels)
        self._workers = workers
        self._params: collections.deque[dict | None] = collections.deque()
        self.loader = self._make_loader()

    def _make_loader(self):
        # batch_size=None: each sampler item is a whole index tensor, so a batch is one vectorised indexing.
        return torch.utils.data.DataLoader(self._view, sampler=_PlanSampler(self), batch_size=None,
                                           num_workers=self._workers, pin_memory=self.pin_memory)

    def shard(self, rank: int, world: int):
        view = super().shard(rank, world)
        view.loader = view._make_loader()    # the copy's sampler must read the copy's rank
        return view

    def __iter__(self):
        # The sampler runs in this process, ahead of the batches when workers prefetch, and queues the
        # augmentation choices of each step in order; each batch takes the oldest.
        self._params = collections.deque()
        for x, y in self.loader:
            params = self._params.popleft()
            x = x.to(self.device, non_blocking=self.pin_memory)
            yield self._finish(x, params), y.to(self.device, non_blocking=self.pin_memory)


class _PlanSampler(torch.utils.data.Sampler):
    """Yields the index tensors of the owner's plan and records the matching augmentation choices."""

    def __init__(self, owner: LoaderBatches):
        self.owner = owner

    def __len__(self) -> int:
        return len(self.owner)

    def __iter__(self):
        for index, params in self.owner._plan():
            self.owner._params.append(params)
            yield index


def make_dataloader(ds: ImageDataset, batch_size: int, shuffle: bool = True, workers: int = 0,
                    pin_memory: bool = False, augment: Augmentation | None = None, seed: int = 0, *,
                    drop_last: bool = False, normalizer: Normalizer | None = None, device="cpu",
                    balanced: bool = False) -> LoaderBatches:
    """Batches of a large set through a ``torch.utils.data.DataLoader``; see :class:`LoaderBatches`."""
    return LoaderBatches(ds, batch_size, shuffle, drop_last, augment, normalizer, device, seed, workers, pin_memory,
                         balanced)


def use_device_resident(ds: ImageDataset, device, limit_bytes: int = 2 << 30) -> bool:
    """Whether ``ds`` should be held whole on ``device`` (:class:`DeviceBatches`) rather than loaded per batch.

    On the CPU the set is in memory already, so always yes. On an accelerator: when it takes at most
    ``limit_bytes`` and (on CUDA) at most a quarter of the free memory, leaving room for the model.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return True
    nbytes = ds.images.numel() * ds.images.element_size() + ds.labels.numel() * ds.labels.element_size()
    if nbytes > limit_bytes:
        return False
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes <= free // 4
    return True


def make_batches(ds: ImageDataset, batch_size: int, device="cpu", shuffle: bool = True, drop_last: bool = False,
                 augment: Augmentation | None = None, normalizer: Normalizer | None = None, seed: int = 0,
                 workers: int = 0, pin_memory: bool = True, limit_bytes: int = 2 << 30, balanced: bool = False):
    """:class:`DeviceBatches` or :func:`make_dataloader`, as :func:`use_device_resident` decides; ``balanced``:
    each epoch drawn class-balanced (:func:`ddcnn.data.balance.balanced_order`)."""
    if use_device_resident(ds, device, limit_bytes):
        return DeviceBatches(ds, batch_size, shuffle, drop_last, augment, normalizer, device, seed, balanced)
    return make_dataloader(ds, batch_size, shuffle, workers, pin_memory, augment, seed, drop_last=drop_last,
                           normalizer=normalizer, device=device, balanced=balanced)
