"""Model-parallel CNN-DNN: process ``r`` of ``P`` holds only the local CNNs of its shard, and the whole DNN.

Every process sees the whole batch (the same batches, in the same order, as a single process) but cuts only its own
subimages. The local logits ``(B, N_r, K)`` of all processes are gathered into ``(B, N, K)``; every process runs
the (tiny) DNN on them and gets the same loss, the same DNN gradients and, for the gathered logits, the same
gradient: the backward pass keeps the slice of its own subdomains and needs no communication. So one step moves
``B x N x K`` numbers (forward only), where data parallelism all-reduces every parameter; and every local CNN sees
the whole batch, so its BatchNorm statistics are those of a single process.

Checkpoints hold the whole CNN-DNN with the ensemble in the stacked layout, whatever the backend and the number
of processes (:class:`~ddcnn.train.parallel.savers.CNNDNNState`), so a run can be resumed with another ``P`` or
another parallelism. :class:`ModelParallel` is the way of the coherent and transfer stages that uses them.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.distributed as dist
from torch import nn

from ddcnn.decomposition import Decomposition
from ddcnn.models import LocalEnsemble
from ddcnn.models.combiners import Combiner
from ddcnn.shards import shard_range
from ddcnn.train.dist import DistEnv
from ddcnn.train.parallel.base import FLOAT, Parallelism, local_share
from ddcnn.train.parallel.savers import CNNDNNState
from ddcnn.train.parallel.sync import ReplicatedSync


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

    spans_processes = True  # scored by all processes together

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

    spans_processes = True  # scored by all processes together

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


class ModelParallel(Parallelism):
    """The coherent and transfer stages' default under torchrun: each process holds a contiguous shard of the local
    CNNs and the whole DNN, sees every whole batch and computes the same loss; the gradient norm is one over the
    whole CNN-DNN; the checkpoint is the whole CNN-DNN gathered from the shards."""

    name = "model"

    @property
    def processes(self) -> int:
        return self.env.world

    @property
    def shares_model(self) -> bool:
        return True

    def shard(self, n_local: int) -> range:
        return shard_range(n_local, self.env.rank, self.env.world)

    def cnn_dnn(self, decomposition: Decomposition, ensemble: LocalEnsemble, combiner: Combiner) -> ShardedCNNDNN:
        return ShardedCNNDNN(decomposition, ensemble, combiner, self.env)

    def batch_options(self, wrapped: nn.Module) -> dict:
        return {"shard": cast(ShardedCNNDNN, wrapped).shard}

    def step_bytes(self, cfg, models, stage: str) -> int | None:
        """The gather of the local logits, forward only: ``(P-1) x 4 B ceil(N/P) K`` (None: more processes than
        local CNNs)."""
        world, n = self.env.world, self.n_local
        if world > n:
            return None
        return (world - 1) * FLOAT * cfg.stages.get(stage).batch_size * -(-n // world) * models.shapes.num_classes

    def held(self, size, dnn_parameters):
        """The largest shard of the local CNNs with their activations, the whole DNN and the whole batch."""
        return local_share(size, self.env.world, self.n_local, dnn_parameters)

    def sync(self) -> ReplicatedSync:
        return ReplicatedSync(self.env)

    def saver(self, model: nn.Module) -> CNNDNNState:
        return CNNDNNState(model, self.env, cast(ShardedCNNDNN, model).shard)

    def clip(self, model: nn.Module):
        return cast(ShardedCNNDNN, model).clip_grad_norm_
