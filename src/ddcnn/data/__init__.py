"""Datasets for ddcnn: file readers, synthetic data, batching and fetching.

Every reader returns an :class:`ImageDataset` (images (M, C, H, W) or (M, C, D, H, W), labels (M,) int64, class
names); :mod:`ddcnn.data.loading` turns it into normalised, augmented batches on a device.
"""

from ddcnn.data.fetch import DATASETS, fetch, find_dataset
from ddcnn.data.generated import make_generated
from ddcnn.data.loading import (
    Augment,
    DeviceBatches,
    LoaderBatches,
    Normalizer,
    make_batches,
    make_dataloader,
    split_dataset,
    to_float,
    use_device_resident,
)
from ddcnn.data.readers import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    ImageDataset,
    load_cifar10,
    load_idx_dataset,
    load_image_folder,
    read_idx,
)
from ddcnn.data.volume_folder import load_volume_folder

__all__ = [
    "Augment", "CIFAR10_CLASSES", "DATASETS", "DeviceBatches", "FASHION_MNIST_CLASSES", "ImageDataset",
    "LoaderBatches", "MNIST_CLASSES", "Normalizer", "fetch", "find_dataset", "load_cifar10", "load_idx_dataset",
    "load_image_folder", "load_volume_folder", "make_batches", "make_dataloader", "make_generated", "read_idx",
    "split_dataset", "to_float", "use_device_resident",
]
