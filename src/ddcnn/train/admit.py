"""Every check that can refuse a run, in the order a run makes them; all of them come before the run directory is
touched, so a refused run leaves every file as it was.

1. The config: keys, types and ranges (:func:`ddcnn.config.load_config`, when it is read); whether its imported
   backbone is trusted is decided then, from the command line (:func:`ddcnn.cli._trusted`), before any import.
   The run directory's refusals that need no import: a file in its place, a linked folder of the run, a --resume
   with no run or with a changed frozen setting (:func:`admit_run_dir_early`, first in :func:`admit`).
2. The device (:func:`ddcnn.train.runtime.make_runtime`) and the stages' dependencies (:func:`check_stages`); the
   models' names and an imported backbone, imported only when trusted
   (:func:`ddcnn.models.settings.check_model_settings`, first in :func:`ddcnn.train.context.build_context`).
3. The data: files, shapes, classes, and whether the images fit in memory (:func:`ddcnn.data.datasets.load_splits`;
   Datasets given from Python: :func:`ddcnn.data.python.prepare`, before the run is set up).
4. The models: the grid against the backbone's depth, a foreign CNN run once on a sample
   (:class:`ddcnn.build.Models`).
5. The models against the machine (:func:`admit_models`): the memory each stage needs per process
   (:func:`ddcnn.train.budget.check_budget`), and the number of processes against the local CNNs
   (:func:`check_processes`), and a spatial-parallel global CNN's slabs against the image size
   (:func:`check_ways`).
6. The run directory: a new one, ``--force``, or a ``--resume`` read whole against the config and the models
   (:func:`admit_run_dir`); the store then only writes (:meth:`ddcnn.train.store.rundir.RunDir.prepare`).

:func:`admit` runs the run directory's early refusals of step 1, then steps 2 (the models' names) to 6 in this
order for a run; the first two of step 2 run when the
run is set up (:class:`ddcnn.train.protocol.Experiment`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from ddcnn.build import Models, Shapes, meta_model, weight_shapes, with_backend
from ddcnn.config import STAGES, Config, active, builtin_backbone_only
from ddcnn.data.balance import class_weights
from ddcnn.data.datasets import load_splits
from ddcnn.data.python import PythonData
from ddcnn.data.readers import ImageDataset
from ddcnn.errors import CheckpointError, ConfigError
from ddcnn.files import refuse_linked_folders
from ddcnn.models.settings import check_model_settings
from ddcnn.train.budget import check_budget
from ddcnn.train.dist import DistEnv
from ddcnn.train.parallel.choose import choose
from ddcnn.train.store.rundir import FOLDERS, RunDir
from ddcnn.train.store.schema import check_resumable


@dataclass
class Admitted:
    """What a run admitted by :func:`admit` trains on: the config as it runs (with the backend that runs), the
    data splits and their classes, the models' builder, and the settings changed on ``--resume`` (records of
    ``metrics.jsonl``)."""

    cfg: Config
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    classes: list[str]
    models: Models
    events: list[dict]
    given: bool = False  # whether the folder came split (train/, val/, test/), for splits.json


def admit(cfg: Config, run_dir: RunDir, device: torch.device, env: DistEnv, resume: bool, force: bool,
          trusted: bool = True, source: str = "the config", python: PythonData | None = None) -> Admitted:
    """Steps 2 to 6, in order, before anything is written: the models' names (an imported backbone is imported
    only when ``trusted``; ``source`` names the config's file in the refusal), the data (``python``: the datasets
    given from Python, read and checked already), the models, the models against the machine, and (on rank 0,
    which writes it) the run directory."""
    cfg = with_backend(cfg)  # config.yaml records the backend that runs (and a resumed run is checked against it)
    if env.is_main:
        admit_run_dir_early(run_dir, cfg, resume, force)  # the refusals that need no import, before any import
    check_model_settings(cfg.model, cfg.combiner, trusted, source, builtin_only=builtin_backbone_only(cfg))
    given = False
    if python is None:
        train, val, test, given = load_splits(cfg.data)
        classes = list(train.classes)
    else:
        train, val, test, classes = python.train, python.val, python.test, python.classes
    if cfg.data.balance is not None:  # a class with no training image cannot be weighted or drawn
        class_weights(train.labels, len(classes))
    if cfg.data.balance == "sampler" and python is not None and python.feed is not None:
        raise ConfigError("data.balance = sampler draws each epoch from images held in memory, but this Dataset "
                          "is read sample by sample; use data.balance: weights")
    models = Models(cfg, Shapes(train.in_channels, len(classes), train.image_size))
    if env.is_main:
        for note in models.notes:
            print(f"ddcnn: note: {note}", file=sys.stderr)
    admit_models(cfg, models, device, len(train), env)
    events = admit_run_dir(run_dir, cfg, resume, force, models) if env.is_main else []
    return Admitted(cfg, train, val, test, classes, models, events, given)


def admit_run_dir(run_dir: RunDir, cfg: Config, resume: bool, force: bool, models: Models | None = None
                  ) -> list[dict]:
    """Step 6: a new run needs an empty or absent directory (or ``force``); a resumed one is read whole against
    the config and (with ``models``) the data's shapes and the checkpoints' weights. Returns the accepted changes
    of started stages' settings, to be recorded."""
    path = run_dir.path
    admit_run_dir_early(run_dir, cfg, resume, force)
    if resume:
        if models is None:
            return check_resumable(run_dir, cfg)
        shapes = models.shapes
        return check_resumable(run_dir, cfg, (shapes.num_classes, shapes.in_channels, list(shapes.image_size)),
                               lambda stage: weight_shapes(stage, meta_model(models, stage)))
    if path.exists() and any(path.iterdir()) and not force:
        if run_dir.is_run:
            raise ConfigError(f"output directory {str(path)!r} already holds a ddcnn run; use --resume to "
                              f"continue it, --force to start over there, or choose another --out")
        raise ConfigError(f"output directory {str(path)!r} already holds files that are not a ddcnn run; use "
                          f"--force to start a run there anyway (only the files a run writes are replaced), "
                          f"or choose another --out")
    return []


def admit_run_dir_early(run_dir: RunDir, cfg: Config, resume: bool, force: bool = False) -> None:
    """The refusals of the run directory that need neither the data nor the models, made before anything is
    imported or written: a file in its place, a folder of the run that is a symbolic link (without --force, which
    replaces it), a --resume with no run here or with a changed frozen setting."""
    path = run_dir.path
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output directory {str(path)!r} is a file; choose another --out")
    if not force:
        refuse_linked_folders(path, FOLDERS)
    if resume:
        if not run_dir.is_run:
            how = "without --resume" if not (path.is_dir() and any(path.iterdir())) else \
                "with --force instead of --resume (ddcnn replaces only the files a run writes)"
            raise CheckpointError(f"--resume: {str(path)!r} holds no ddcnn run (a run killed before it began "
                                  f"leaves none); start it {how}")
        run_dir.check_same_config(cfg)


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
    if sharded is None:  # the stages whose way holds a shard of the local CNNs on each process
        sharded = [stage for stage in STAGES if active(cfg, stage) and
                   choose(cfg, stage, env, models.shapes.image_size, models.n_local).shard(models.n_local) is not None]
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
    check_ways(cfg, models, env)


def check_ways(cfg: Config, models: Models, env: DistEnv) -> None:
    """Each enabled stage's way of using the processes refuses what it cannot split (a spatial-parallel global
    CNN: an image size whose slabs would not stay aligned through every downsampling)."""
    for stage in STAGES:
        if active(cfg, stage):
            choose(cfg, stage, env, models.shapes.image_size, models.n_local).admit(cfg)
