"""A finished run loaded by the processes of a torchrun launch: each holds only its shard of the local CNNs (and the
whole DNN and global CNN); every function of :meth:`ShardedRun.strategies` is then called by all processes
together. One process: :class:`ddcnn.finished.run.SavedRun`, which loads no training code."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ddcnn.errors import ConfigError
from ddcnn.finished.run import SavedRun
from ddcnn.models.deployed import Deployed
from ddcnn.shards import shard_range
from ddcnn.train import dist
from ddcnn.train.admit import check_processes
from ddcnn.train.budget import check_budget
from ddcnn.train.dist import DistEnv, slice_state
from ddcnn.train.parallel.model import ShardedCNNDNN, ShardedLocalCNNs
from ddcnn.train.parallel.savers import CNNDNNState
from ddcnn.train.runtime import Runtime, make_runtime

SHARDED = ("local", "coherent", "transfer")  # loaded as each process's shard of the local CNNs under torchrun


class ShardedRun(SavedRun):
    """:class:`SavedRun` for ``env``'s processes: the process count and the memory are checked before anything is
    loaded, and under torchrun each process loads its shard of the local CNNs and CNN-DNNs."""

    def __init__(self, path: str | Path, device: str | None = None, env: DistEnv | None = None,
                 trust_code: bool = False, data_root: str | None = None):
        self.env = env or DistEnv()
        super().__init__(path, device, trust_code, data_root)

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def _runtime(self) -> Runtime:
        return make_runtime(self.cfg, self.env)

    def _admit(self, done: list[str]) -> None:
        check_processes(self.cfg, self.models, self.env, [stage for stage in done if stage in SHARDED])
        check_budget(self.cfg, self.models, self.runtime.device, training=False, stages=done, world=self.env.world)
        dist.init(self.env, self.runtime.device.type)

    def _load(self, stage: str, weights: dict) -> nn.Module:
        """This process's part of the local CNNs and CNN-DNNs under torchrun (both saved with the local CNNs
        stacked, whatever the backend and process count); the whole model otherwise."""
        if not (self.env.enabled and stage in SHARDED):
            return super()._load(stage, weights)
        shard = shard_range(self.models.n_local, self.env.rank, self.env.world)
        ensemble = self.models.ensemble(shard)
        if stage == "local":
            ensemble.load_stacked_state_dict(slice_state(weights, self.models.n_local, shard))
            return ShardedLocalCNNs(self.decomposition, ensemble, self.env)
        model = ShardedCNNDNN(self.decomposition, ensemble, self.models.dnn(stage), self.env)
        CNNDNNState(model, self.env, shard).load_weights(weights)
        return model

    def model(self, name: str, layout: str | None = None) -> Deployed:
        if self.env.enabled:
            raise ConfigError("a strategy as one module needs the whole run in one process; run without torchrun")
        return super().model(name, layout)
