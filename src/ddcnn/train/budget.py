"""The memory one of several processes holds in each stage (its way's share of :mod:`ddcnn.sizing`'s sizes), and
the check of a run's stages against the training set and the memory free on its device, before anything is
written."""

from __future__ import annotations

import torch

from ddcnn.build import meta_model
from ddcnn.config import Config
from ddcnn.errors import ConfigError
from ddcnn.sizing import StageSize, check_memory, stage_sizes
from ddcnn.train.dist import DistEnv
from ddcnn.train.parallel.base import Parallelism
from ddcnn.train.parallel.choose import choose


def held_per_process(cfg: Config, models, size: StageSize, world: int, mode: str | None = None) -> StageSize:
    """The part of ``size`` one of ``world`` processes holds: a model-parallel stage holds the largest shard of the
    local CNNs (and the whole DNN) with their activations, and the whole batch; a data-parallel one the whole model
    and its part of the batch; a spatial-parallel one the whole model and its slab of the batch; the combine stage
    (rank 0) all of it. ``mode``: the stage's parallelism (the config's when None)."""
    if world <= 1:
        return size
    dnn = lambda: sum(p.numel() for p in meta_model(models, "combine").parameters())  # noqa: E731
    return way(cfg, models, size.stage, world, mode).held(size, dnn)


def way(cfg: Config, models, stage: str, world: int, mode: str | None = None) -> Parallelism:
    """How ``stage`` would use ``world`` processes (``mode``: a way other than the config's)."""
    return choose(cfg, stage, DistEnv(0, world), models.shapes.image_size, models.n_local, mode)


def check_budget(cfg: Config, models, device: torch.device, n_train: int | None = None, world: int = 1,
                 free: int | None = None, training: bool = True, stages=None) -> list[StageSize]:
    """Build the model of every enabled stage (or of ``stages``) on the meta device, check that each stage gets
    training batches (given ``n_train`` images) and fits into the memory free on ``device`` (``free`` bytes;
    measured when None) for training, or for evaluation only. Returns the sizes."""
    sizes = stage_sizes(cfg, models, stages)
    if n_train is not None:
        for size in sizes:
            batch = cfg.stages.get(size.stage).batch_size
            parts = way(cfg, models, size.stage, world).parts()
            # The protocol leaves out a last batch too small to split among the processes (BatchNorm).
            steps = n_train // batch + (1 if n_train % batch >= 2 * parts or size.stage == "combine" else 0)
            if steps == 0 or (size.stage == "combine" and n_train == 0):
                raise ConfigError(f"stages.{size.stage}.batch_size = {batch} leaves the stage no training batch: "
                                  f"the training set has {n_train} images; lower stages.{size.stage}.batch_size")
    return check_memory(cfg, models, device, sizes, free, training,
                        lambda size: held_per_process(cfg, models, size, world), per_process=world > 1)
