"""data/augment.py: flips on chosen axes, a small random affine and intensity jitter, seeded like the batch plan."""

import pytest
import torch

from ddcnn.config import AugmentConfig
from ddcnn.data.augment import Chain, SpatialAugment, make_augment
from ddcnn.data.loading import Augment, DeviceBatches
from ddcnn.data.readers import ImageDataset
from ddcnn.errors import ConfigError


def test_flips_reverse_exactly_the_chosen_axes_of_the_chosen_images():
    x = torch.randn(6, 1, 3, 4, 5)
    aug = SpatialAugment(flip_axes=(0, 2))
    params = aug.draw(6, 3, torch.Generator().manual_seed(0))
    out = aug.apply(x, params)
    for i in range(6):
        expected = x[i]
        for k, axis in enumerate((0, 2)):
            if params["flip_axes"][i, k]:
                expected = expected.flip(1 + axis)
        assert torch.equal(out[i], expected)
    assert params["flip_axes"].any() and not params["flip_axes"].all()


def test_a_quarter_turn_about_the_depth_axis_is_rot90_of_each_slice():
    x = torch.randn(1, 2, 3, 6, 6)
    aug = SpatialAugment(rotate_degrees=90.0)
    params = {"angles": torch.tensor([[0.0, 0.0, 1.0]]), "zoom": torch.zeros(1), "shift": torch.zeros(1, 3)}
    out = aug.apply(x, params)
    candidates = [torch.rot90(x, 1, dims=(3, 4)), torch.rot90(x, -1, dims=(3, 4))]
    assert min(float((out - c).abs().max()) for c in candidates) < 1e-5


def test_no_rotation_zoom_or_shift_leaves_the_volume_as_it_is():
    x = torch.randn(2, 1, 4, 5, 6)
    aug = SpatialAugment(rotate_degrees=5.0, scale=0.1, translate=0.1)
    params = {"angles": torch.zeros(2, 3), "zoom": torch.zeros(2), "shift": torch.zeros(2, 3)}
    assert torch.allclose(aug.apply(x, params), x, atol=1e-5)


def test_a_shift_of_one_voxel_moves_the_volume_by_one_voxel():
    x = torch.randn(1, 1, 4, 4, 8)
    aug = SpatialAugment(translate=0.5)
    # u = 0.25 of translate 0.5 -> 2 * 0.125 of the [-1, 1] span = one voxel of 8 along W
    params = {"angles": torch.zeros(1, 3), "zoom": torch.zeros(1), "shift": torch.tensor([[0.0, 0.0, 0.25]])}
    out = aug.apply(x, params)
    assert torch.allclose(out[..., :-1], x[..., 1:], atol=1e-5)


def test_intensity_jitter_is_a_gain_and_an_offset_per_image():
    x = torch.rand(3, 1, 2, 2, 2)
    aug = SpatialAugment(intensity_scale=0.2, intensity_shift=0.1)
    params = aug.draw(3, 3, torch.Generator().manual_seed(1))
    out = aug.apply(x, params)
    for i in range(3):
        gain, bias = 1 + 0.2 * params["gain"][i], 0.1 * params["bias"][i]
        assert torch.allclose(out[i], x[i] * gain + bias)


def test_the_chain_is_seeded_like_the_batch_plan_and_differs_between_epochs():
    ds = ImageDataset(torch.randn(8, 1, 4, 6, 6), torch.arange(8) % 2, ["a", "b"])
    aug = make_augment(AugmentConfig(crop_padding=1, flip_axes=[0, 1, 2], rotate_degrees=10, scale=0.1,
                                     translate=0.05, intensity_scale=0.1, intensity_shift=0.05))
    assert isinstance(aug, Chain) and len(aug.parts) == 2

    def epoch(e):
        batches = DeviceBatches(ds, 4, augment=aug, seed=3)
        batches.set_epoch(e)
        return torch.cat([x for x, _ in batches])

    assert torch.equal(epoch(0), epoch(0)) and not torch.equal(epoch(0), epoch(1))
    assert make_augment(AugmentConfig()).identity


def test_an_axis_the_images_lack_is_refused():
    with pytest.raises(ConfigError, match="flip_axes = \\[2\\]"):
        SpatialAugment(flip_axes=(2,)).draw(1, 2, torch.Generator())
    assert Chain([Augment(0, False), SpatialAugment()]).identity


def test_a_flip_axis_the_images_lack_is_refused_before_anything_is_read_or_written(tiny_config):
    from ddcnn.config import DataConfig
    from ddcnn.data.datasets import check_against_config

    with pytest.raises(ConfigError, match=r"flip_axes = \[2\] must list distinct spatial axes from 0 to 1"):
        tiny_config(2, augment={"flip_axes": [2]})
    # without data.image_size (IDX, CIFAR) the images' own size decides, before the run directory is made
    data = DataConfig(name="mnist", augment=AugmentConfig(flip_axes=[2]))
    images = ImageDataset(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.int64), ["a", "b"])
    with pytest.raises(ConfigError, match=r"flip_axes = \[2\] names an axis the mnist images do not have"):
        check_against_config(data, images)
