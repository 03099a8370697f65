"""ddcnn.data.samples and ddcnn.data.python: samples as the models take them, read lazily, seeded per sample."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from ddcnn.config import DataConfig
from ddcnn.data.loading import Normalizer
from ddcnn.data.python import prepare
from ddcnn.data.samples import Samples, StreamedImages, as_sample, kept_generators, reseed


class Pairs(torch.utils.data.Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def test_as_sample_takes_tensors_arrays_and_pil_images_channels_first():
    pixels = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)  # (H, W, C) as PIL holds it
    image, label = as_sample((Image.fromarray(pixels), np.int64(2)), "x")
    assert image.dtype == torch.uint8 and torch.equal(image, torch.from_numpy(pixels).permute(2, 0, 1))
    assert label == 2 and isinstance(label, int)
    image, label = as_sample((np.ones((1, 4, 4), dtype=np.float64), torch.tensor(1)), "x")
    assert image.dtype == torch.float32 and image.shape == (1, 4, 4) and label == 1


def test_streamed_images_read_what_the_dataset_holds_in_any_slices():
    images = torch.rand(23, 1, 4, 4)
    samples = Samples(Pairs(images, list(range(23))), "train", (1, 4, 4), False)
    streamed = StreamedImages(samples, seed=0, workers=0)
    assert len(streamed) == 23 and streamed.shape == images.shape and streamed.dim() == 4
    assert torch.equal(streamed[5], images[5]) and torch.equal(streamed[-1], images[-1])
    for size in (4, 7, 23):  # consecutive slices, as batched inference asks, and a fresh start each time
        assert torch.equal(torch.cat([streamed[lo:lo + size] for lo in range(0, 23, size)]), images)
    assert torch.equal(streamed[3:9], images[3:9]) and torch.equal(streamed[9:10], images[9:10])


def test_the_generators_are_kept_and_reseeding_repeats_the_draws():
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    before = torch.rand(3), np.random.rand(3), random.random()
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    with kept_generators():
        reseed(7)
        first = torch.rand(2), np.random.rand(2), random.random()
        reseed(7)
        again = torch.rand(2), np.random.rand(2), random.random()
    after = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]


@pytest.mark.parametrize("load", ["memory", "stream"])
def test_prepare_splits_normalises_and_fingerprints_like_the_tensors_would(load):
    images = torch.randint(0, 256, (40, 2, 6, 6), dtype=torch.uint8)
    labels = [i % 4 for i in range(40)]
    data = prepare(Pairs(images, labels), Pairs(images[:8], labels[:8]), data=DataConfig(val_fraction=0.25,
                   workers=0), seed=0, load=load)
    assert (len(data.train), len(data.val), len(data.test)) == (30, 10, 8) and data.classes == list("0123")
    train_images = torch.stack([data.train.images[i] for i in range(len(data.train))])
    expected = Normalizer.fit(train_images)
    assert data.normalizer.mean == pytest.approx(expected.mean) and data.normalizer.std == pytest.approx(expected.std)
    in_train = {tuple(image.flatten().tolist()) for image in train_images}
    assert in_train | {tuple(data.val.images[i].flatten().tolist()) for i in range(10)} == \
        {tuple(image.flatten().tolist()) for image in images}
    assert data.facts["load"] == load and data.facts["dtype"] == "uint8"
    other = prepare(Pairs(images, labels), Pairs(images[:8], labels[:8]), data=DataConfig(workers=0), seed=0,
                    load="stream" if load == "memory" else "memory")
    assert other.facts["fingerprints"] == data.facts["fingerprints"]
    changed = images.clone()
    changed[3, 0, 0, 0] ^= 1
    moved = prepare(Pairs(changed, labels), Pairs(images[:8], labels[:8]), data=DataConfig(workers=0), seed=0)
    assert moved.facts["fingerprints"]["train"] != data.facts["fingerprints"]["train"]
    assert moved.facts["fingerprints"]["test"] == data.facts["fingerprints"]["test"]
