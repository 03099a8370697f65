"""How a stage's model is checkpointed whatever the parallelism and the process count: the local CNNs (a shard of
them, gathered from every rank) as the full N-slot stacked state, and a CNN-DNN (whole, or this rank's part of a
model-parallel one) as the whole model in :func:`ddcnn.models.cnn_dnn.whole_state`'s layout. So a run can be
resumed with another ``P`` or another parallelism."""

from __future__ import annotations

import torch

from ddcnn.models.cnn_dnn import split_whole_state, whole_state
from ddcnn.train.dist import DistEnv, cat_optimizer, cat_states, slice_optimizer, slice_state
from ddcnn.train.engine.loop import ModelState


class EnsembleSaver(ModelState):
    """Saves a (shard of a) local ensemble as the full N-slot stacked state, gathered from every rank, so that the
    checkpoint is the same for any number of processes and either backend."""

    def __init__(self, ensemble, env: DistEnv, shard: range, n_total: int):
        super().__init__(ensemble)
        self.ensemble, self.env, self.shard, self.n_total = ensemble, env, shard, n_total

    def weights(self) -> dict:
        local = {k: v.cpu() for k, v in self.ensemble.stacked_state_dict().items()}
        return cat_states(self.env.all_gather(local))

    def load_weights(self, weights: dict) -> None:
        self.ensemble.load_stacked_state_dict(slice_state(weights, self.n_total, self.shard))

    def optimizer_state(self, optimizer) -> dict:
        return cat_optimizer(self.env.all_gather(self.ensemble.stacked_optimizer_state(optimizer)))

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        self.ensemble.load_stacked_optimizer_state(optimizer, slice_optimizer(state, self.n_total, self.shard))


class CNNDNNState(ModelState):
    """Saves a CNN-DNN (whole, or this rank's part of a model-parallel one) as the whole model: the ensemble's stacked
    state under ``ensemble.net.`` and the DNN's under ``combiner.``; the optimizer's state per parameter position
    the same way. The checkpoint is the same for any number of processes, parallelism and backend."""

    def __init__(self, model, env: DistEnv | None = None, shard: range | None = None):
        """``model``: a whole CNN-DNN, or with ``shard`` (the local CNNs it holds) and ``env`` this rank's part of
        a model-parallel one."""
        super().__init__(model)
        self.ensemble, self.combiner = model.ensemble, model.combiner
        self.sharded = shard is not None
        self.env = env if self.sharded and env is not None else DistEnv()
        self.n_total = model.decomposition.n_subdomains
        self.shard = shard if shard is not None else range(self.n_total)

    def weights(self) -> dict:
        stacked = {k: v.cpu() for k, v in self.ensemble.stacked_state_dict().items()}
        if self.sharded:
            stacked = cat_states(self.env.all_gather(stacked))
        return whole_state(stacked, {k: v.detach().cpu().clone() for k, v in self.combiner.state_dict().items()})

    def load_weights(self, weights: dict) -> None:
        stacked, combiner = split_whole_state(weights)
        device = next(self.combiner.parameters()).device
        self.ensemble.load_stacked_state_dict(
            {k: v.to(device) for k, v in slice_state(stacked, self.n_total, self.shard).items()})
        self.combiner.load_state_dict({k: v.to(device) for k, v in combiner.items()})

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """``{"state": {j: ...}, "param_groups": [...]}``: positions ``0..E-1`` the ensemble's parameters
        (stacked over all local CNNs), then the DNN's."""
        stacked = self.ensemble.stacked_optimizer_state(optimizer)
        if self.sharded:
            stacked = cat_optimizer(self.env.all_gather(stacked))
        first = len(self.ensemble.parameters_by_position())
        state = dict(stacked["state"])
        for j, p in enumerate(self.combiner.parameters()):
            if optimizer.state.get(p):
                state[first + j] = {k: v.detach().cpu().clone() if torch.is_tensor(v) else v
                                    for k, v in optimizer.state[p].items()}
        return {"state": state, "param_groups": stacked["param_groups"]}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        first = len(self.ensemble.parameters_by_position())
        entries = {int(j): v for j, v in state["state"].items()}
        ensemble_part = {"state": {j: v for j, v in entries.items() if j < first},
                         "param_groups": state["param_groups"]}
        self.ensemble.load_stacked_optimizer_state(
            optimizer, slice_optimizer(ensemble_part, self.n_total, self.shard))
        for j, p in enumerate(self.combiner.parameters()):
            entry = entries.get(first + j)
            if entry is not None:
                optimizer.state[p] = {k: v.to(p.device).clone() if torch.is_tensor(v) and v.dim() > 0
                                      else (v.clone() if torch.is_tensor(v) else v) for k, v in entry.items()}

