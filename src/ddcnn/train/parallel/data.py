"""Data parallelism: every process holds the whole model (DistributedDataParallel) and trains on its part of
every batch; the global stage's default under torchrun, and the coherent and transfer stages' with
``parallel: data``."""

from __future__ import annotations

import torch
from torch import nn

from ddcnn.build import meta_model
from ddcnn.train.parallel.base import FLOAT, Parallelism, batch_part, ring
from ddcnn.train.parallel.sync import DataParallelSync


class DataParallel(Parallelism):
    """Each global batch is split into ``P`` parts, one per process (a last batch too small to split is left out:
    BatchNorm cannot train on one image); the gradients are all-reduced by DistributedDataParallel, the epoch's
    sums added up. The checkpoint is the plain model's (a CNN-DNN: the whole one), as one process saves it."""

    name = "data"

    @property
    def processes(self) -> int:
        return self.env.world

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def parts(self) -> int:
        return self.env.world

    def step_bytes(self, cfg, models, stage: str) -> int:
        """The all-reduce of every gradient: ``2 (P-1)/P x 4 x parameters``."""
        return round(ring(self.env.world) * FLOAT * sum(p.numel() for p in meta_model(models, stage).parameters()))

    def held(self, size, dnn_parameters):
        """The whole model, and this process's part of the batch."""
        return batch_part(size, self.env.world)

    def split(self, batches):
        return batches.shard(self.env.rank, self.env.world)

    def sync(self) -> DataParallelSync:
        return DataParallelSync(self.env)
