"""Class imbalance in training (``data.balance``): class weights for every stage's loss, or balanced batches.

* ``weights``: class ``k`` weighs ``M / (K * n_k)`` in the cross-entropy of every stage (``M`` training images,
  ``n_k`` of class ``k``): each class contributes as much to the loss as it would in a balanced set;
* ``sampler``: each epoch draws ``M`` images with replacement, image ``i`` with probability proportional to
  ``1 / n_{label(i)}``: every class is seen about equally often (the order drawn from ``(seed, epoch)``).
"""

from __future__ import annotations

import torch

from ddcnn.errors import DataError


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Images per class ``(K,)`` int64 of ``labels`` ``(M,)``."""
    return torch.bincount(labels.cpu(), minlength=num_classes)


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(K,)`` float32: ``M / (K * n_k)``; a class with no training image is refused (it cannot be weighted)."""
    counts = class_counts(labels, num_classes)
    if (counts == 0).any():
        missing = [k for k in range(num_classes) if counts[k] == 0]
        raise DataError(f"data.balance needs training images of every class, but class(es) {missing} have none; "
                        f"add images of them or remove data.balance")
    return (len(labels) / (num_classes * counts.double())).float()


def balanced_order(labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """``(M,)`` indices drawn with replacement, each class equally likely: the ``sampler`` mode's epoch."""
    per_image = class_weights(labels, num_classes)[labels.cpu()].double()
    return torch.multinomial(per_image, len(labels), replacement=True, generator=generator)
