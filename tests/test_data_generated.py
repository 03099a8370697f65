"""Synthetic datasets: shapes, determinism, and that the classes can be learned."""

import pytest
import torch
import torch.nn.functional as F

from ddcnn.data.generated import make_generated
from ddcnn.errors import ConfigError


@pytest.mark.parametrize("size", [(12, 10), (4, 6, 8)])
def test_shapes_and_balance(size):
    ds = make_generated(30, size, num_classes=3, channels=2, seed=5)
    assert ds.images.shape == (30, 2, *size) and ds.images.dtype == torch.float32
    assert ds.labels.dtype == torch.int64 and ds.labels.bincount().tolist() == [10, 10, 10]
    assert ds.num_classes == 3 and ds.in_channels == 2 and ds.image_size == size
    assert torch.isfinite(ds.images).all()


def test_deterministic_from_seed():
    a, b = make_generated(10, (8, 8), seed=3), make_generated(10, (8, 8), seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    c = make_generated(10, (8, 8), seed=4)
    assert not torch.equal(a.images, c.images)
    # The global RNG is neither used nor disturbed.
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    make_generated(3, (8, 8))
    assert torch.equal(torch.rand(1), before)


def test_noise_free_pattern_depends_on_class_only_up_to_phase_and_jitter():
    ds = make_generated(40, (16, 16), num_classes=2, noise=0.0, seed=1)
    assert ds.images.min() >= -0.5 - 1e-6 and ds.images.max() <= 1.5 + 1e-6
    # Mean images of the two classes differ (the blobs are at different places).
    mean0 = ds.images[ds.labels == 0].mean(0)
    mean1 = ds.images[ds.labels == 1].mean(0)
    assert (mean0 - mean1).abs().max() > 0.3


def accuracy_of_logistic_regression(train, test, steps=100, lr=0.5):
    # Plain gradient descent written out (torch.optim takes a second to import on a busy machine).
    x, xt = train.images.flatten(1), test.images.flatten(1)
    weight = torch.zeros(x.shape[1], train.num_classes, requires_grad=True)
    bias = torch.zeros(train.num_classes, requires_grad=True)
    for _ in range(steps):
        loss = F.cross_entropy(x @ weight + bias, train.labels)
        grad_w, grad_b = torch.autograd.grad(loss, (weight, bias))
        with torch.no_grad():
            weight -= lr * grad_w
            bias -= lr * grad_b
    with torch.no_grad():
        return ((xt @ weight + bias).argmax(1) == test.labels).float().mean().item()


@pytest.mark.parametrize("size,classes", [((16, 16), 4), ((8, 8, 8), 3)])
def test_learnable_across_seeds(size, classes, one_thread):
    # Train and test come from different seeds: the class patterns must not depend on the seed.
    train = make_generated(300, size, num_classes=classes, seed=0)
    test = make_generated(150, size, num_classes=classes, seed=1)
    assert accuracy_of_logistic_regression(train, test) > 1.0 / classes + 0.4


@pytest.mark.parametrize("kwargs", [dict(image_size=(8,)), dict(image_size=(0, 8)), dict(num_classes=1),
                                    dict(channels=0), dict(noise=-1.0), dict(n=-1)])
def test_bad_arguments(kwargs):
    args = dict(n=4, image_size=(8, 8)) | kwargs
    with pytest.raises(ConfigError):
        make_generated(**args)
