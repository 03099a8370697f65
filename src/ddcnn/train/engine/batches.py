"""Shuffled batches of tensors already in memory: the combine stage trains on the frozen local CNNs' logits."""

from __future__ import annotations

import torch

from ddcnn.data.balance import balanced_order
from ddcnn.seeds import derive_seed


class TensorBatches:
    """Batches of ``(x, y)`` in an order drawn from ``(seed, epoch)``, like the image batches of the other stages.

    ``x``: ``(M, ...)`` on the device, ``y``: ``(M,)``; the last batch may be smaller.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, balanced: int = 0):
        """``balanced``: the number of classes when each epoch is drawn class-balanced (``data.balance:
        sampler``), else 0."""
        self.x, self.y, self.batch_size, self.seed, self.epoch = x, y, batch_size, seed, 0
        self.balanced = balanced

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(derive_seed(self.seed, "batches", self.epoch))
        order = balanced_order(self.y, self.balanced, g) if self.balanced else torch.randperm(len(self.y), generator=g)
        order = order.to(self.x.device)
        for i in range(len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x[index], self.y[index]
