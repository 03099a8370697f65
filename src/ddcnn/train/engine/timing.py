"""The local stage's critical path: how long it would take if every local CNN had its own device."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ddcnn.config import StageConfig
from ddcnn.models import LocalEnsemble
from ddcnn.train.dist import DistEnv
from ddcnn.train.engine.loop import make_optimizer
from ddcnn.train.runtime import Runtime


def critical_path(ensemble: LocalEnsemble, batches, split: Callable[[torch.Tensor], torch.Tensor],
                  cfg: StageConfig, runtime: Runtime, env: DistEnv, measured_seconds: float, total_steps: int,
                  steps: int = 6) -> dict:
    """Time each local CNN of ``ensemble`` trained alone for a few steps on copies of its weights; the slowest,
    scaled to the ``total_steps`` the stage trained (fewer than its cap when it stopped early), is the critical
    path. ``split``: images ``(B, C, *size)`` to the subimages of
    the ensemble's local CNNs ``(B, n_local, C, *sub)``.

    Returns what ``local_timing.json`` holds: the measured and the estimated seconds, and how it was estimated.
    """
    data = []
    batches.set_epoch(1)
    for x, y in batches:
        data.append((split(x), y))
        if len(data) == steps:
            break
    per_step = []
    cuda = runtime.device.type == "cuda"
    # The timed steps draw random numbers (dropout); the caller's generators must not notice.
    with torch.random.fork_rng(devices=[runtime.device.index or 0] if cuda else []):
        for i in range(ensemble.n_local):
            single = copy.deepcopy(ensemble.local_model(i)).train()
            optimizer = make_optimizer(single.parameters(), cfg)
            times = []
            for sub, y in data:
                runtime.synchronize()
                start = time.perf_counter()
                with runtime.autocast():
                    loss = F.cross_entropy(single(sub[:, i]).float(), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                runtime.synchronize()
                times.append(time.perf_counter() - start)
            after_warmup = times[1:] or times
            per_step.append(sorted(after_warmup)[len(after_warmup) // 2])  # the median after one warm-up step
    slowest = env.max(max(per_step))  # each rank timed its own local CNNs
    return {
        "measured_seconds": measured_seconds,
        "critical_path_seconds": slowest * total_steps,
        "processes": env.world,
        "critical_path_note": (f"estimated: the slowest local CNN trained alone ({len(data)} timed steps each, "
                               f"median after one warm-up step) times the {total_steps} steps the stage trained, i.e. "
                               f"the local stage's time if each local CNN had its own device"
                               + (f"; measured with {env.world} processes" if env.enabled else "")),
    }
