"""Splitting, normalising, augmenting and batching."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ddcnn.data.loading import (
    Augment,
    DeviceBatches,
    Normalizer,
    make_batches,
    make_dataloader,
    split_dataset,
    to_float,
    use_device_resident,
)
from ddcnn.data.readers import ImageDataset
from ddcnn.errors import ConfigError, DataError, ShapeError


def numbered(m=10, size=(3, 4), channels=1, classes=2, uint8=True) -> ImageDataset:
    """Image i is filled with i (so a batch's content names its samples); label i % classes."""
    images = torch.arange(m).view(m, *([1] * (len(size) + 1))).expand(m, channels, *size).clone()
    images = images.to(torch.uint8 if uint8 else torch.float32)
    return ImageDataset(images, torch.arange(m) % classes, [str(c) for c in range(classes)])


def test_to_float():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert to_float(x).tolist() == pytest.approx([0.0, 0.2, 1.0]) and to_float(x).dtype == torch.float32
    f = torch.tensor([3.5, -1.0])
    assert to_float(f) is f


# ---------------------------------------------------------------------------------------------------- split --
def test_split_stratified_deterministic():
    ds = numbered(m=40, classes=4)
    train, val = split_dataset(ds, 0.25, seed=7)
    assert len(train) == 30 and len(val) == 10
    # 2.5 per class: two each, and the two left over go to the first classes.
    assert val.labels.bincount(minlength=4).tolist() == [3, 3, 2, 2]
    ids = sorted(train.images[:, 0, 0, 0].tolist() + val.images[:, 0, 0, 0].tolist())
    assert ids == list(range(40))                                  # disjoint and complete
    again = split_dataset(ds, 0.25, seed=7)[1]
    assert torch.equal(again.images, val.images)
    assert not torch.equal(split_dataset(ds, 0.25, seed=8)[1].images, val.images)
    assert train.classes == ds.classes


def test_split_plain_and_edges():
    ds = numbered(m=10)
    train, val = split_dataset(ds, 0.3, seed=0, stratified=False)
    assert len(val) == 3 and len(train) == 7
    train, val = split_dataset(numbered(m=7, classes=3), 0.5, seed=0)   # shares 1.5, 1, 1 -> 2, 1, 1
    assert val.labels.tolist().count(0) == 2 and len(val) == 4 and len(train) == 3
    train, val = split_dataset(ds, 0.0, seed=0)
    assert len(val) == 0 and val.images.shape == (0, 1, 3, 4) and len(train) == 10
    for bad in (1.0, -0.1, "0.2"):
        with pytest.raises(ConfigError, match="fraction"):
            split_dataset(ds, bad, seed=0)


# ----------------------------------------------------------------------------------------------- normaliser --
def test_normalizer_fit_apply_and_state():
    images = torch.zeros(4, 2, 2, 2, dtype=torch.uint8)
    images[:2, 0] = 255                      # channel 0: half 1.0, half 0.0 -> mean 0.5, std 0.5
    images[:, 1] = 51                        # channel 1: constant 0.2 -> std taken as 1
    norm = Normalizer.fit(images, chunk=3)
    assert norm.mean == pytest.approx([0.5, 0.2]) and norm.std == pytest.approx([0.5, 1.0])
    out = norm(images)
    assert out[0, 0].tolist() == [[1.0, 1.0], [1.0, 1.0]] and out[3, 0, 0, 0] == -1.0
    assert out[:, 1].abs().max() < 1e-6
    restored = Normalizer.from_state(json.loads(json.dumps(norm.state_dict())))
    assert torch.equal(restored(images), out)
    volume = torch.full((1, 2, 2, 2, 2), 0.5)
    assert restored(volume)[0, 0].unique().tolist() == [0.0] and restored(volume)[0, 1].unique().item() \
        == pytest.approx(0.3)


def test_normalizer_errors():
    with pytest.raises(ShapeError, match="2 channels"):
        Normalizer([0, 0], [1, 1])(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ConfigError):
        Normalizer([0.0], [0.0])
    with pytest.raises(ConfigError):
        Normalizer.from_state({"mean": [0.0]})
    with pytest.raises(DataError):
        Normalizer.fit(torch.zeros(0, 1, 2, 2))


# ------------------------------------------------------------------------------------------------ augmenting --
def test_augment_identity_when_off():
    x = torch.rand(3, 2, 5, 6)
    assert torch.equal(Augment(crop_padding=0, hflip=False)(x, torch.Generator().manual_seed(0)), x)


def test_flip_twice_is_identity_and_flips_last_axis():
    aug = Augment(crop_padding=0, hflip=True)
    x = torch.rand(16, 1, 3, 4, 5)
    params = aug.draw(16, 3, torch.Generator().manual_seed(1))
    once = aug.apply(x, params)
    assert torch.equal(aug.apply(once, params), x)
    for i in range(16):
        expected = x[i].numpy()[..., ::-1] if params["flips"][i] else x[i].numpy()
        assert np.array_equal(once[i].numpy(), expected)
    assert 0 < int(params["flips"].sum()) < 16


@pytest.mark.parametrize("size", [(5, 6), (3, 4, 5)])
def test_crop_equals_padded_slice(size):
    p = 2
    aug = Augment(crop_padding=p, hflip=False)
    x = torch.rand(6, 2, *size)
    params = aug.draw(6, len(size), torch.Generator().manual_seed(3))
    out = aug.apply(x, params)
    assert out.shape == x.shape
    offsets = params["offsets"]
    assert offsets.min() >= 0 and offsets.max() <= 2 * p
    for i in range(6):
        padded = np.pad(x[i].numpy(), [(0, 0)] + [(p, p)] * len(size))
        window = (slice(None),) + tuple(slice(o, o + s) for o, s in zip(offsets[i].tolist(), size))
        assert np.array_equal(out[i].numpy(), padded[window])


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 3), st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**31))
def test_crop_keeps_values_from_the_image_or_zero(pad, h, w, seed):
    x = torch.arange(1, 2 * h * w + 1, dtype=torch.float32).view(2, 1, h, w)
    out = Augment(crop_padding=pad, hflip=True)(x, torch.Generator().manual_seed(seed))
    assert out.shape == x.shape
    values = set(out.flatten().tolist())
    assert values <= set(x.flatten().tolist()) | {0.0}


def test_augment_same_seed_same_result():
    aug = Augment(crop_padding=3)
    x = torch.rand(8, 1, 7, 7)
    a = aug(x, torch.Generator().manual_seed(11))
    b = aug(x, torch.Generator().manual_seed(11))
    assert torch.equal(a, b) and not torch.equal(a, aug(x, torch.Generator().manual_seed(12)))


# -------------------------------------------------------------------------------------------------- batches --
def ids(x):
    """Sample ids of a batch of `numbered` images (float in [0, 1] after to_float)."""
    return (x[:, 0, 0, 0] * 255).round().long().tolist()


def test_device_batches_cover_each_sample_once_and_depend_on_seed_and_epoch():
    ds = numbered(m=10)
    batches = DeviceBatches(ds, batch_size=4, seed=5)
    assert len(batches) == 3
    epoch0 = [(ids(x), y.tolist()) for x, y in batches]
    assert [len(i) for i, _ in epoch0] == [4, 4, 2]
    assert sorted(sum((i for i, _ in epoch0), [])) == list(range(10))
    assert all(y == [k % 2 for k in i] for i, y in epoch0)
    x, _ = next(iter(batches))
    assert x.dtype == torch.float32
    assert [(ids(x), y.tolist()) for x, y in batches] == epoch0       # same epoch, same order
    batches.set_epoch(1)
    epoch1 = [ids(x) for x, _ in batches]
    assert epoch1 != [i for i, _ in epoch0]
    fresh = DeviceBatches(ds, batch_size=4, seed=5)                   # a "resumed" run
    fresh.set_epoch(1)
    assert [ids(x) for x, _ in fresh] == epoch1
    other_seed = DeviceBatches(ds, batch_size=4, seed=6)
    assert [ids(x) for x, _ in other_seed] != [i for i, _ in epoch0]


def test_device_batches_no_shuffle_drop_last_and_normalizer():
    ds = numbered(m=10)
    norm = Normalizer([0.0], [2.0])
    batches = DeviceBatches(ds, batch_size=4, shuffle=False, drop_last=True, normalizer=norm)
    assert len(batches) == 2
    out = list(batches)
    assert [(x[:, 0, 0, 0] * 2 * 255).round().long().tolist() for x, _ in out] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def all_batches(batches):
    return [(x.clone(), y.clone()) for x, y in batches]


@pytest.mark.parametrize("m,bs,drop_last", [(13, 4, False), (12, 6, True)])
def test_shards_concatenate_to_the_global_batch(m, bs, drop_last):
    ds = ImageDataset(torch.rand(m, 1, 6, 6), torch.arange(m) % 3, ["a", "b", "c"])
    aug = Augment(crop_padding=2, hflip=True)
    whole = DeviceBatches(ds, batch_size=bs, drop_last=drop_last, augment=aug, seed=9)
    whole.set_epoch(2)
    parts = [whole.shard(rank, 2) for rank in range(2)]
    for part in parts:
        part.set_epoch(2)
        assert len(part) == len(whole)
    for (x, y), (x0, y0), (x1, y1) in zip(all_batches(whole), all_batches(parts[0]), all_batches(parts[1])):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
        assert len(x0) >= len(x1)
    with pytest.raises(ConfigError, match="multiple"):
        whole.shard(0, 5)
    with pytest.raises(ConfigError):
        whole.shard(2, 2)


@pytest.mark.parametrize("workers", [0, 1])
def test_dataloader_yields_the_same_batches_as_device_batches(workers):
    ds = numbered(m=11, size=(4, 4))
    aug, norm = Augment(crop_padding=1), Normalizer([0.1], [0.5])
    kw = dict(augment=aug, normalizer=norm, seed=3)
    resident = DeviceBatches(ds, batch_size=4, **kw)
    loader = make_dataloader(ds, 4, shuffle=True, workers=workers, pin_memory=False, **kw)
    assert isinstance(loader.loader, torch.utils.data.DataLoader) and len(loader) == len(resident) == 3
    for epoch in (0, 1):
        resident.set_epoch(epoch)
        loader.set_epoch(epoch)
        for (xa, ya), (xb, yb) in zip(all_batches(resident), all_batches(loader), strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    if workers == 0:
        shard = loader.shard(1, 2)
        whole = [x for x, _ in all_batches(loader)]
        assert [x.shape[0] for x, _ in all_batches(shard)] == [2, 2, 1]
        assert torch.equal(next(iter(shard))[0], whole[0][2:])


def test_use_device_resident_and_make_batches():
    ds = numbered(m=4)
    assert use_device_resident(ds, "cpu", limit_bytes=1)
    if not torch.cuda.is_available():
        assert use_device_resident(ds, "cuda", limit_bytes=1 << 20)
    assert not use_device_resident(ds, "cuda", limit_bytes=10)
    assert isinstance(make_batches(ds, 2, "cpu"), DeviceBatches)


def test_bad_batch_arguments():
    with pytest.raises(ConfigError, match="batch_size"):
        DeviceBatches(numbered(), batch_size=0)
    with pytest.raises(ConfigError, match="crop_padding"):
        Augment(crop_padding=-1)
    with pytest.raises(ConfigError, match="workers"):
        make_dataloader(numbered(), 2, workers=-1)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_batches_on_a_device_equal_the_cpu_ones(device):
    # On a machine with CUDA this runs the device path: data, augmentation choices and normaliser moved there.
    ds = ImageDataset(torch.randint(0, 256, (9, 3, 6, 6), dtype=torch.uint8), torch.arange(9) % 3, list("abc"))
    norm = Normalizer.fit(ds.images.to(device))
    kw = dict(augment=Augment(crop_padding=2), normalizer=norm, seed=1)
    expected = all_batches(DeviceBatches(ds, 4, **kw))
    for batches in (DeviceBatches(ds, 4, device=device, **kw),
                    make_dataloader(ds, 4, pin_memory=True, device=device, **kw)):
        got = all_batches(batches)
        assert len(got) == len(expected) == 3
        for (x, y), (xe, ye) in zip(got, expected):
            assert x.device.type == device and y.device.type == device
            assert torch.allclose(x.cpu(), xe, atol=1e-6) and torch.equal(y.cpu(), ye)
