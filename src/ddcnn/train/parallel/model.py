"""Model-parallel CNN-DNN: process ``r`` of ``P`` holds only the local CNNs of its shard, and the whole DNN.

Every process sees the whole batch (the same batches, in the same order, as a single process) but cuts only its own
subimages. The local logits ``(B, N_r, K)`` of all processes are gathered into ``(B, N, K)``; every process runs
the (tiny) DNN on them and gets the same loss, the same DNN gradients and, for the gathered logits, the same
gradient: the backward pass keeps the slice of its own subdomains and needs no communication. So one step moves
``B x N x K`` numbers (forward only), where data parallelism all-reduces every parameter; and every local CNN sees
the whole batch, so its BatchNorm statistics are those of a single process.

Checkpoints hold the whole CNN-DNN with the ensemble in the stacked layout, whatever the backend and the number
of processes (:class:`CNNDNNState`), so a run can be resumed with another ``P`` or another parallelism.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ddcnn.decomposition import Decomposition
from ddcnn.models import CNNDNN, LocalEnsemble
from ddcnn.models.cnn_dnn import split_whole_state, whole_state
from ddcnn.models.combiners import Combiner
from ddcnn.shards import shard_range
from ddcnn.train.dist import DistEnv, cat_optimizer, cat_states, slice_optimizer, slice_state
from ddcnn.train.engine.loop import ModelState
from ddcnn.train.parallel.sync import RankSync


class _GatherSubdomains(torch.autograd.Function):
    """``(B, N_r, K)`` of this rank -> ``(B, N, K)`` of all ranks; the gradient is this rank's slice."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, shards: list[range], rank: int) -> torch.Tensor:
        ctx.own = shards[rank]
        width = max(len(s) for s in shards)  # all_gather needs equal shapes: pad the smaller shards
        padded = local.new_zeros((local.shape[0], width, *local.shape[2:]))
        padded[:, :len(ctx.own)] = local
        parts = [torch.empty_like(padded) for _ in shards]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:, :len(s)] for part, s in zip(parts, shards)], dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank computed the same DNN on the same gathered logits: its gradient is already complete here.
        return grad[:, ctx.own.start:ctx.own.stop], None, None


def gather_subdomains(local: torch.Tensor, shards: list[range], rank: int) -> torch.Tensor:
    """Autograd-aware gather of every rank's local logits along the subdomain axis (ranks in order)."""
    return _GatherSubdomains.apply(local, shards, rank)


class ShardedLocalCNNs(nn.Module):
    """This process's local CNNs (``ensemble``, of its shard) on their own subimages, gathered over the processes:
    ``(B, C, *image_size) -> (B, N, K)``, the same on every process. All processes must call it together."""

    def __init__(self, decomposition: Decomposition, ensemble: LocalEnsemble, env: DistEnv):
        super().__init__()
        self.decomposition, self.ensemble, self.env = decomposition, ensemble, env
        self.n_total = decomposition.n_subdomains
        self.shards = [shard_range(self.n_total, r, env.world) for r in range(env.world)]
        self.shard = self.shards[env.rank]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        own = self.ensemble(self.decomposition.split(images, self.shard))
        return gather_subdomains(own, self.shards, self.env.rank)


class ShardedCNNDNN(nn.Module):
    """This process's part of a CNN-DNN: ``(B, C, *image_size) -> (B, K)``, the same on every process.

    ``ensemble`` holds the local CNNs of ``shard`` (:func:`ddcnn.shards.shard_range` of the N subdomains for this
    rank), ``combiner`` is the whole DNN. All processes must call it together (it gathers).
    """

    def __init__(self, decomposition: Decomposition, ensemble: LocalEnsemble, combiner: Combiner, env: DistEnv):
        super().__init__()
        self.local, self.combiner = ShardedLocalCNNs(decomposition, ensemble, env), combiner
        self.decomposition, self.env, self.shard = decomposition, env, self.local.shard

    @property
    def ensemble(self) -> LocalEnsemble:
        return self.local.ensemble

    def local_logits(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, *image_size) -> (B, N, K)``: this rank's local CNNs on its own subimages, then gathered."""
        return self.local(images)

    def forward(self, images: torch.Tensor, return_local: bool = False):
        local = self.local_logits(images)
        out = self.combiner(local)
        return (out, local) if return_local else out

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """One gradient norm over the whole CNN-DNN (all ranks' local CNNs and the DNN), as a single process
        clips it; returns the norm before clipping."""
        own = sum((p.grad.float().pow(2).sum() for p in self.ensemble.parameters() if p.grad is not None),
                  torch.zeros((), device=next(self.parameters()).device))
        dnn = sum((p.grad.float().pow(2).sum() for p in self.combiner.parameters() if p.grad is not None),
                  torch.zeros_like(own))
        total = (self.env.sum(own) + dnn).sqrt()
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(scale.to(p.grad.dtype))
        return total


class ModelParallelSync(RankSync):
    """Every rank saw the whole batch and computed the same loss: the statistics are already complete."""

    def reduce(self, loss_sum, correct, seen):
        return loss_sum, correct, seen


class CNNDNNState(ModelState):
    """Saves a CNN-DNN (whole, or this rank's :class:`ShardedCNNDNN`) as the whole model: the ensemble's stacked
    state under ``ensemble.net.`` and the DNN's under ``combiner.``; the optimizer's state per parameter position
    the same way. The checkpoint is the same for any number of processes, parallelism and backend."""

    def __init__(self, model: CNNDNN | ShardedCNNDNN, env: DistEnv | None = None):
        super().__init__(model)
        self.ensemble, self.combiner = model.ensemble, model.combiner
        self.sharded = isinstance(model, ShardedCNNDNN)
        self.env = env if self.sharded and env is not None else DistEnv()
        self.n_total = model.decomposition.n_subdomains
        self.shard = model.shard if isinstance(model, ShardedCNNDNN) else range(self.n_total)

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

