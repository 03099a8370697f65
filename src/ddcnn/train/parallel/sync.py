"""Several processes (``torchrun``): how the processes combine a stage's epoch statistics, one rule per split.

* ``local``: rank ``r`` of ``P`` trains a contiguous shard of the N local CNNs (:func:`shard_range`) as one batched
  ensemble, on every training image, in the same order as a single process would, with no communication until
  the end of each epoch; then the shards are gathered (for the checkpoint and the metrics). Each rank keeps its
  shard after the stage. Every rank holds at least one local CNN: ``P > N`` is refused.
* ``combine``: the features are computed shard by shard and gathered; the DNN is trained on rank 0 and broadcast.
* ``coherent``, ``transfer``: model-parallel by default (:mod:`ddcnn.train.parallel.model`), or
  DistributedDataParallel with ``parallel: data``.
* ``global``: DistributedDataParallel (each global batch split into ``P`` parts), or spatial-parallel.
* Only rank 0 prints, writes metrics, checkpoints, plots and the report.

Every gathered state is concatenated along dim 0 in rank order: because the shards are contiguous and every
ensemble tensor is stacked slot-major along dim 0, the result is exactly the state of one N-slot ensemble, so
checkpoints do not depend on the number of processes (a run can be resumed with another ``P``).

The rules: each rank saw every image with its own local CNNs (:class:`ShardSync`), its part of every batch
(:class:`DataParallelSync`), or every batch whole with the same loss (:class:`ReplicatedSync`: model and spatial
parallelism). The ways that use them are :mod:`ddcnn.train.parallel` (one class each); the savers that gather the
states are :mod:`ddcnn.train.parallel.savers`.
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
