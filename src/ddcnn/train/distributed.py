"""Several processes (``torchrun``): local CNNs sharded over ranks, the global CNN data-parallel.

* ``local``: rank ``r`` of ``P`` trains a contiguous shard of the N local CNNs (:func:`shard_range`) as one batched
  ensemble, on every training image, in the same order as a single process would, with no communication until
  the end of each epoch; then the shards are gathered (for the checkpoint and the metrics). Each rank keeps its
  shard after the stage. Every rank holds at least one local CNN: ``P > N`` is refused.
* ``combine``: the features are computed shard by shard and gathered; the DNN is trained on rank 0 and broadcast.
* ``coherent``, ``transfer``: model-parallel by default (:mod:`ddcnn.train.model_parallel`), or
  DistributedDataParallel with ``parallel: data``.
* ``global``: DistributedDataParallel; each global batch is split into ``P`` parts.
* Only rank 0 prints, writes metrics, checkpoints, plots and the report.

Every gathered state is concatenated along dim 0 in rank order: because the shards are contiguous and every
ensemble tensor is stacked slot-major along dim 0, the result is exactly the state of one N-slot ensemble, so
checkpoints do not depend on the number of processes (a run can be resumed with another ``P``).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ddcnn.errors import ConfigError
from ddcnn.train.loop import ModelState, Sync


@dataclass
class DistEnv:
    """This process's place among the ranks (``world == 1``: a single process, no communication)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_gather(self, obj) -> list:
        """Every rank's ``obj`` (CPU tensors, dicts, numbers), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj, src: int = 0):
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def max(self, value: float) -> float:
        return max(self.all_gather(value)) if self.enabled else value


def env_from_environment() -> DistEnv:
    """The ranks torchrun (or SLURM via torchrun) set in ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    return DistEnv(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(env: DistEnv, device_type: str) -> None:
    """Join the process group: NCCL on CUDA (each rank on GPU ``LOCAL_RANK``), gloo on the CPU."""
    if not env.enabled or dist.is_initialized():
        return
    if device_type == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {env.local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                              f"start at most that many processes per node (--nproc-per-node)")
        torch.cuda.set_device(env.local_rank)
    from torch.distributed.rendezvous import rendezvous

    # torch.distributed.nn binds ``group=group.WORLD`` as default arguments when it is imported; imported after the
    # process group exists (torch._dynamo imports it with the first optimizer), it would keep the group alive past
    # destroy_process_group, and gloo's worker threads then race the interpreter's shutdown (a SIGABRT at exit,
    # "terminate called without an active exception"). Imported now, its defaults hold None.
    importlib.import_module("torch.distributed.nn")

    # Keys of an earlier attempt may survive in torchrun's store after a restart: give each attempt its own
    # namespace, or the new processes can read the dead ones' addresses.
    store, rank, world = next(rendezvous("env://"))
    store = dist.PrefixStore(f"ddcnn/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", store=store, rank=rank, world_size=world)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_restart() -> bool:
    """True in a worker that torchrun restarted after a failure (it then resumes from the checkpoints)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def launch_id() -> str | None:
    """torchrun's id of this launch (the same in every attempt of it), or None outside torchrun."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def cat_states(states: list[dict | None]) -> dict:
    """Concatenate per-rank stacked states along dim 0 (ranks holding nothing give ``None``); scalars from the
    first rank that has them."""
    present = [s for s in states if s is not None]
    out = {}
    for key, first in present[0].items():
        if isinstance(first, torch.Tensor) and first.dim() > 0:
            out[key] = torch.cat([s[key] for s in present])
        else:
            out[key] = first
    return out


def slice_state(state: dict, n_total: int, shard: range) -> dict:
    """Rows of a stacked N-slot state that belong to ``shard`` (inverse of :func:`cat_states`)."""
    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            out[key] = value.unflatten(0, (n_total, -1))[shard.start:shard.stop].flatten(0, 1).clone()
        else:
            out[key] = value
    return out


def cat_optimizer(states: list[dict]) -> dict:
    return {"state": {j: cat_states([s["state"][j] for s in states]) for j in states[0]["state"]},
            "param_groups": states[0]["param_groups"]}


def slice_optimizer(state: dict, n_total: int, shard: range) -> dict:
    return {"state": {int(j): slice_state(entry, n_total, shard) for j, entry in state["state"].items()},
            "param_groups": state["param_groups"]}


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


class _RankSync(Sync):
    distributed = True

    def __init__(self, env: DistEnv):
        self.env, self.is_main = env, env.is_main

    def any(self, flag: bool) -> bool:
        return any(self.env.all_gather(bool(flag)))

    def seconds(self, value: float) -> float:
        return self.env.max(value)  # the ranks work in parallel: a stage lasts as long as the slowest

    def agree(self, obj):
        return self.env.broadcast(obj)


class ShardSync(_RankSync):
    """Local stage: each rank saw every image with its own local CNNs; losses add up, per-CNN counts concatenate."""

    def reduce(self, loss_sum, correct, seen):
        correct = torch.cat(self.env.all_gather(correct.cpu())).to(loss_sum.device)
        return self.env.sum(loss_sum), correct, seen


class DataParallelSync(_RankSync):
    """Data-parallel stages: each rank saw part of every batch; sums add up."""

    def reduce(self, loss_sum, correct, seen):
        seen = int(self.env.sum(torch.tensor(float(seen), device=loss_sum.device)).item())
        return self.env.sum(loss_sum), self.env.sum(correct), seen
