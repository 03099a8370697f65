"""The local stage's way: process ``r`` of ``P`` trains a contiguous shard of the N local CNNs as one batched
ensemble, on every training image, in the same order as one process would, with no communication until the end
of each epoch; the shards are then gathered for the checkpoint (the full N-slot stacked state) and the metrics.
Each process keeps its shard after the stage. One process is the shard of all N."""

from __future__ import annotations

from torch import nn

from ddcnn.decomposition import Decomposition
from ddcnn.models import LocalEnsemble
from ddcnn.shards import shard_range
from ddcnn.train.parallel.base import Parallelism, local_share
from ddcnn.train.parallel.model import ShardedLocalCNNs
from ddcnn.train.parallel.savers import EnsembleSaver
from ddcnn.train.parallel.sync import ShardSync


class LocalShards(Parallelism):
    """The local CNNs sharded over the processes (the local stage, whatever the config's choice of the others)."""

    name = "shards"

    @property
    def processes(self) -> int:
        return self.env.world

    @property
    def shares_model(self) -> bool:
        return self.env.enabled

    def shard(self, n_local: int | None = None) -> range:
        return shard_range(self.n_local if n_local is None else n_local, self.env.rank, self.env.world)

    def batch_options(self, wrapped: nn.Module) -> dict:
        return {"shard": self.shard()}

    def step_bytes(self, cfg, models, stage: str) -> int | None:
        """Nothing between the epochs' ends (None: more processes than local CNNs)."""
        return 0 if self.env.world <= self.n_local else None

    def held(self, size, dnn_parameters):
        """The largest shard of the local CNNs with their activations, and the whole batch."""
        return local_share(size, self.env.world, self.n_local, lambda: 0)

    def sync(self) -> ShardSync:
        # Also in one process: the NaN guard looks at the end of the epoch, as several processes decide together.
        return ShardSync(self.env)

    def saver(self, model: nn.Module) -> EnsembleSaver:
        """This process's shard of the local CNNs saved as the full N-slot stacked state, gathered."""
        return EnsembleSaver(model, self.env, self.shard(), self.n_local)

    def clip(self, model: nn.Module):
        return model.clip_grad_norm_

    def scored(self, decomposition: Decomposition, ensemble: LocalEnsemble) -> nn.Module:
        """The trained shard as :func:`ddcnn.train.scoring.score_strategies` takes it: gathered over the processes
        under torchrun (a model of whole images), else the ensemble itself (it takes subimages)."""
        if self.env.enabled:
            return ShardedLocalCNNs(decomposition, ensemble, self.env)
        return ensemble

    def on_images(self, decomposition: Decomposition, ensemble: LocalEnsemble):
        """Whole images ``(M, C, *size)`` -> every local CNN's logits ``(M, N, K)`` on every process."""
        scored = self.scored(decomposition, ensemble)
        return scored if scored is not ensemble else (lambda x: ensemble(decomposition.split(x)))
