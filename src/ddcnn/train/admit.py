"""Every check that can refuse a run, in the order a run makes them; all of them come before the run directory is
touched, so a refused run leaves every file as it was.

1. The config: keys, types and ranges (:func:`ddcnn.config.load_config`, when it is read).
2. The device (:func:`ddcnn.train.runtime.make_runtime`) and the stages' dependencies (:func:`check_stages`); the
   models' names and an imported backbone, imported only when trusted
   (:func:`ddcnn.models.settings.check_model_settings`, first in :func:`ddcnn.train.context.build_context`).
3. The data: files, shapes, classes, and whether the images fit in memory (:func:`ddcnn.data.datasets.load_datasets`).
4. The models: the grid against the backbone's depth, a foreign CNN run once on a sample
   (:class:`ddcnn.build.Models`).
5. The models against the machine (:func:`admit_models`): the memory each stage needs per process
   (:func:`ddcnn.train.budget.check_budget`), and the number of processes against the local CNNs
   (:func:`check_processes`), and a spatial-parallel global CNN's slabs against the image size
   (:func:`check_spatial`).
6. The run directory: a new one, ``--force``, or a ``--resume`` read whole against the config and the models
   (:meth:`ddcnn.train.rundir.RunDir.prepare`).
"""

from __future__ import annotations

import torch

from ddcnn.build import Models
from ddcnn.config import STAGES, Config, active, parallelism
from ddcnn.errors import ConfigError
from ddcnn.models.backbones import DEFAULT_DEPTH
from ddcnn.train.budget import check_budget
from ddcnn.train.dist import DistEnv
from ddcnn.train.spatial import slab_rows


def check_stages(cfg: Config) -> None:
    """Stages that need another stage's models: refused before anything is read or written."""
    for stage in ("combine", "transfer", "global_transfer"):
        if active(cfg, stage) and not cfg.stages.local.enabled:
            what = "sub-networks" if stage == "global_transfer" else "local CNNs"
            raise ConfigError(f"stage {stage!r} needs the trained {what}: enable stages.local or disable "
                              f"stages.{stage}")


def check_processes(cfg: Config, models: Models, env: DistEnv, sharded: list[str] | None = None) -> None:
    """A model-parallel stage gives every process at least one local CNN: more processes than local CNNs are
    refused, on every rank alike. ``sharded``: the stages loaded as shards (a finished run under torchrun);
    default the enabled model-parallel stages of ``cfg``."""
    if sharded is None:
        sharded = [stage for stage in STAGES if active(cfg, stage) and parallelism(cfg, stage) == "model"]
    if env.enabled and sharded and env.world > models.n_local:
        # Model and data parallelism together (a 2-D mesh of processes) is not built: refused, not half-done.
        raise ConfigError(
            f"{env.world} processes but only {models.n_local} local CNNs (grid {list(models.decomposition.grid)}): "
            f"in the {', '.join(sharded)} stage(s) every process holds at least one local CNN; start at most "
            f"{models.n_local} processes (--nproc-per-node), use a finer grid, or set stages.<stage>.parallel=data "
            f"for coherent and transfer"
        )


def admit_models(cfg: Config, models: Models, device: torch.device, n_train: int, env: DistEnv) -> None:
    """Step 5: every model built on the meta device and sized against the memory of ``device``, then the number
    of processes against the local CNNs."""
    check_budget(cfg, models, device, n_train, env.world)
    check_processes(cfg, models, env)
    check_spatial(cfg, models, env)


def check_spatial(cfg: Config, models: Models, env: DistEnv) -> None:
    """A spatial-parallel global CNN splits every image into ``world`` slabs that stay aligned through every
    downsampling: an image size that does not allow it is refused, naming the sizes that do."""
    for stage in ("global", "global_transfer"):
        if env.enabled and active(cfg, stage) and parallelism(cfg, stage) == "spatial":
            m = cfg.model
            slab_rows(models.shapes.image_size, env.world, m.depth or DEFAULT_DEPTH[m.backbone], m.backbone)
