"""This process's place among the processes and the collectives (``torchrun``): rank, world size, joining and
leaving the process group, and the rank-order concatenation of stacked ensemble states.

A leaf of :mod:`ddcnn.train`: it knows nothing of the training loop, so anything that needs a rank (the runtime,
the run directory, the stages) imports it without importing the loop.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ddcnn.errors import ConfigError


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
