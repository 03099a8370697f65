"""How the processes combine a stage's epoch statistics (the ``Sync`` of :func:`ddcnn.train.engine.loop.fit`), one
rule per kind of split: each rank saw all images with its own local CNNs (:class:`ShardSync`), its part of every
batch (:class:`DataParallelSync`), or every batch whole with the same loss (:class:`ReplicatedSync`: model and
spatial parallelism). Any flag raised anywhere counts, a stage lasts as long as its slowest rank, and only rank 0
prints, writes metrics, checkpoints, plots and the report.

The ways that use them are :mod:`ddcnn.train.parallel` (one class each); under torchrun the local stage is always
sharded (:mod:`~ddcnn.train.parallel.local`), the global stage data- or spatial-parallel, the coherent and transfer
stages model-parallel by default or data-parallel, and the combine stage's DNN trains on rank 0 and is broadcast.
"""

from __future__ import annotations

import torch

from ddcnn.train.dist import DistEnv
from ddcnn.train.engine.loop import Sync


class RankSync(Sync):
    """Statistics of several processes: any flag raised anywhere, the slowest rank's seconds."""

    distributed = True

    def __init__(self, env: DistEnv):
        self.env, self.is_main = env, env.is_main

    def any(self, flag: bool) -> bool:
        return any(self.env.all_gather(bool(flag)))

    def seconds(self, value: float) -> float:
        return self.env.max(value)  # the ranks work in parallel: a stage lasts as long as the slowest

    def agree(self, obj):
        return self.env.broadcast(obj)

    def barrier(self) -> None:
        self.env.barrier()


class ShardSync(RankSync):
    """Local stage: each rank saw every image with its own local CNNs; losses add up, per-CNN counts concatenate."""

    def reduce(self, loss_sum, correct, seen):
        correct = torch.cat(self.env.all_gather(correct.cpu())).to(loss_sum.device)
        return self.env.sum(loss_sum), correct, seen


class DataParallelSync(RankSync):
    """Data-parallel stages: each rank saw part of every batch; sums add up."""

    def reduce(self, loss_sum, correct, seen):
        seen = int(self.env.sum(torch.tensor(float(seen), device=loss_sum.device)).item())
        return self.env.sum(loss_sum), self.env.sum(correct), seen


class ReplicatedSync(RankSync):
    """Every rank saw the whole batch (model parallelism) or its slab of every image (spatial parallelism) and
    computed the same loss: the statistics are already complete."""

    def reduce(self, loss_sum, correct, seen):
        return loss_sum, correct, seen
