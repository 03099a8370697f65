"""Synthetic datasets: learnable images of any size, in 2D or 3D, with no download.

Each class has a fixed pattern made of two parts:

* stripes (a plane wave) with a class-specific orientation and frequency and a random phase per sample: visible
  in every part of the image, so each subimage of a domain decomposition carries some evidence;
* a Gaussian blob at a class-specific position (jittered a little per sample): it lies in one part of the image,
  so a model that combines information from the WHOLE image does better than one that sees a single subimage.

Gaussian noise is added on top. The class patterns depend only on ``num_classes`` and the number of spatial
dimensions, never on ``seed``: a training set made with seed 0 and a test set made with seed 1 share the same
classes. Everything random comes from one ``torch.Generator`` seeded by ``seed``, so a set is reproducible.
"""

from __future__ import annotations

import math

import torch

from ddcnn.checks import whole, wholes
from ddcnn.data.readers import ImageDataset
from ddcnn.errors import ConfigError

_GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))
_BLOB_SIGMA = 0.25      # in the [-1, 1] image coordinates: a blob covers about an eighth of the width
_BLOB_JITTER = 0.1      # per-sample shift of the blob centre, so the position is not pixel-exact
_STRIPE_AMPLITUDE = 0.5


def _class_patterns(num_classes: int, ndim: int):
    """Fixed per-class stripe directions (K, ndim), stripe frequencies (K,) and blob centres (K, ndim).

    2D: directions at angles pi*c/K (a direction and its opposite give the same stripes, hence pi, not 2 pi);
    blob centres on a circle of radius 0.5. 3D: directions on a Fibonacci spiral over the upper half sphere and
    centres on a Fibonacci spiral over the whole sphere of radius 0.5. Coordinates are ordered like the tensor
    dimensions: (H, W) or (D, H, W).
    """
    c = torch.arange(num_classes, dtype=torch.float64)
    if ndim == 2:
        angle = math.pi * c / num_classes
        dirs = torch.stack([torch.sin(angle), torch.cos(angle)], dim=1)
        around = 2 * math.pi * c / num_classes + math.pi / 4
        centres = 0.5 * torch.stack([torch.sin(around), torch.cos(around)], dim=1)
    else:
        def spiral(z):
            r = torch.sqrt((1 - z * z).clamp_min(0))
            return torch.stack([z, r * torch.cos(c * _GOLDEN_ANGLE), r * torch.sin(c * _GOLDEN_ANGLE)], dim=1)

        dirs = spiral(1 - (c + 0.5) / num_classes)            # z in (0, 1): no two directions are opposite
        centres = 0.5 * spiral(1 - 2 * (c + 0.5) / num_classes)
    freqs = 2.0 + (c % 3)                                       # 2, 3 or 4 periods across the image
    return dirs.float(), freqs.float(), centres.float()


def make_generated(n: int, image_size, num_classes: int = 4, channels: int = 1, seed: int = 0,
                   noise: float = 0.3) -> ImageDataset:
    """A synthetic dataset: images (n, channels, *image_size) float32, labels (n,) int64, balanced classes.

    ``image_size`` is (H, W) or (D, H, W). Pixel values are about in [-0.5, 1.5] before noise of standard
    deviation ``noise``. All channels show the same pattern with independent noise.
    """
    size = tuple(wholes("image_size", image_size, example="(28, 28)"))
    if len(size) not in (2, 3):
        raise ConfigError(f"image_size must be (H, W) or (D, H, W), got {image_size!r}.")
    whole("the number of generated images", n, 0), whole("num_classes", num_classes, 2), whole("channels", channels)
    if not noise >= 0:
        raise ConfigError(f"noise must be a non-negative standard deviation, got {noise!r}.")

    g = torch.Generator().manual_seed(int(seed))
    ndim = len(size)
    # Balanced labels in random order.
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    dirs, freqs, centres = _class_patterns(num_classes, ndim)
    # Pixel-centre coordinates in [-1, 1] along each spatial axis, as (ndim, *size).
    axes = [(2 * torch.arange(s, dtype=torch.float32) + 1) / s - 1 for s in size]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    flat = grid.reshape(ndim, -1)                                              # (ndim, P)

    phase = 2 * math.pi * torch.rand(n, generator=g)
    jitter = _BLOB_JITTER * (2 * torch.rand(n, ndim, generator=g) - 1)
    images = torch.empty((n, channels, *size), dtype=torch.float32)
    chunk = max(1, (1 << 22) // max(1, flat.shape[1] * channels))              # bound temporary memory
    for lo in range(0, n, chunk):
        lab = labels[lo:lo + chunk]
        proj = dirs[lab] @ flat                                                # (b, P)
        stripes = torch.cos(math.pi * freqs[lab, None] * proj + phase[lo:lo + chunk, None])
        centre = centres[lab] + jitter[lo:lo + chunk]                          # (b, ndim)
        dist2 = ((flat[None] - centre[:, :, None]) ** 2).sum(1)                # (b, P)
        pattern = _STRIPE_AMPLITUDE * stripes + torch.exp(-dist2 / (2 * _BLOB_SIGMA ** 2))
        b = lab.shape[0]
        noisy = pattern[:, None] + noise * torch.randn(b, channels, flat.shape[1], generator=g)
        images[lo:lo + b] = noisy.reshape(b, channels, *size)
    classes = [f"pattern{c}" for c in range(num_classes)]
    return ImageDataset(images, labels.to(torch.int64), classes)
