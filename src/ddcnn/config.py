"""Every option of an experiment as dataclasses; YAML in, resolved YAML out.

Unknown keys, wrong types and out-of-range values are :class:`~ddcnn.errors.ConfigError`s that name the key (and
the closest valid key for a typo). ``--set key=value`` overrides use dotted keys (``stages.local.epochs=5``); a
``*`` in place of a stage name sets the key on every stage (``stages.*.epochs=2``). Values are parsed as YAML
scalars or flow lists (``[2, 2]``), never evaluated as code.

Just past 400 lines on purpose: the option dataclasses, their type check and their range checks are read together
when an option is added; the YAML loading that bounds alias expansion is in :mod:`ddcnn.files`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from ddcnn.checks import choice
from ddcnn.errors import ConfigError, did_you_mean
from ddcnn.files import load_yaml
from ddcnn.paths import anchored

# global_transfer, last, runs only with decomposition.kind: width (the global CNN recomposed from sub-networks).
STAGES = ("global", "local", "combine", "coherent", "transfer", "global_transfer")
KINDS = ("spatial", "width")  # decomposition.kind: subimages of the image, or sub-networks of the width
WIDTH_INPUTS = ("whole", "subimage")  # what each sub-network of a width decomposition sees
# "python": the datasets were given from Python (ddcnn.fit); no reader can read them back
DATASETS = ("fashion-mnist", "mnist", "cifar10", "image-folder", "volume-folder", "generated", "python")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step", "plateau")  # plateau: reduce on plateau (ddcnn.train.schedule)
# The metrics a run reports per strategy (ddcnn.metrics): evaluation.metric chooses the best strategy and the
# study's claims by one of them; stages.*.monitor watches it (or the loss) on the validation split.
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc")
# what early stopping watches (lower loss, higher everything else is better); the bare names are accepted too
MONITORS = ("val_accuracy", "val_loss", "val_balanced_accuracy", "val_macro_f1", "val_roc_auc")
KEEPS = ("best", "last")
INTENSITIES = ("window", "percentile", "zscore", "stored")
BALANCES = ("weights", "sampler")
# The ways a stage can use several processes, the default first (docs/scaling.md).
PARALLEL = {"global": ("data", "spatial"), "coherent": ("model", "data"), "transfer": ("model", "data"),
            "global_transfer": ("data", "spatial")}
CNN_DNN_STAGES = ("combine", "coherent", "transfer")  # they combine subimages: not with width on whole images


@dataclass
class AugmentConfig:
    crop_padding: int = 0  # random crop after zero padding by this many pixels (0: off)
    hflip: bool = False  # random horizontal flip
    # Volumes (and images): flips, a small random affine and intensity jitter, drawn per image (data/augment.py).
    flip_axes: list[int] = field(default_factory=list)  # spatial axes each flipped with p = 1/2: 0 = D (or H), ...
    rotate_degrees: float = 0.0  # largest rotation about each axis
    scale: float = 0.0  # largest relative zoom in or out (0.1: 0.9 to 1.1)
    translate: float = 0.0  # largest shift, a fraction of the size along each axis
    intensity_scale: float = 0.0  # values times 1 + u, |u| <= this
    intensity_shift: float = 0.0  # values plus v, |v| <= this (in the [0, 1] scale of windowed volumes)


@dataclass
class DataConfig:
    name: str = "fashion-mnist"
    root: str | None = None  # folder with the files; known places are searched when None. Relative: to the config
    #                          file that names it (to the current directory for --set); a run records it absolute
    root_as_written: str | None = None  # written by ddcnn: data.root as given, and where (data.root: resolved)
    image_size: list[int] | None = None  # resize image/volume folders to this; checked against other datasets
    channels: int | None = None  # 1 or 3 for image folders; checked against other datasets
    val_fraction: float = 0.1  # validation split taken from the training set
    test_fraction: float = 0.2  # test split for image/volume folders, which ship none
    split_seed: int = 0
    limit_train: int | None = None  # use only N training images (quick runs): the first N; a stratified sample
    #                                  of image and volume folders, which list the classes one after the other
    limit_test: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Volumes (data/volumes.py): read in a canonical frame, intensity mapped, resampled, fitted to image_size.
    intensity: str = "window"  # window (CT: HU clipped to data.window) | percentile | zscore | stored
    window: list[float] | None = field(default_factory=lambda: [-1000.0, 400.0])  # [low, high] of intensity: window
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])  # intensity: percentile -> [0, 1]
    orientation: str = "RAS"  # the canonical frame NIfTI and DICOM volumes are turned to (nibabel axis codes)
    spacing: list[float] | None = None  # target voxel spacing [D, H, W] in mm (then cropped/padded to image_size);
    #                                     None: each volume stretched to image_size as stored
    cache: str | None = None  # folder of preprocessed volumes, keyed by file checksums and these settings
    balance: str | None = None  # class imbalance: weights (in every stage's loss) | sampler (balanced batches)
    class_map: dict[str, str] | None = None  # merge folders into classes, e.g. {"CT-1": "abnormal"}
    num_classes: int = 4  # generated data only
    generated_train: int = 2000  # generated data only
    generated_test: int = 500  # generated data only
    noise: float = 0.3  # generated data only
    device_resident_limit_gb: float = 2.0  # larger training sets stream through a DataLoader
    workers: int = 2  # DataLoader workers for large sets


@dataclass
class DecompositionConfig:
    grid: list[int] = field(default_factory=lambda: [2, 2])
    overlap: int | list[int] = 0
    # spatial: one local CNN per subimage of the grid. width: the global CNN's channels split into ``parts``
    # sub-networks of width w / parts (default prod(grid)), recomposed into the global CNN (global_transfer).
    kind: str = "spatial"
    parts: int | None = None
    input: str = "whole"  # width: every sub-network sees the whole image, or its own subimage of the grid
    cross_scale: float = 0.0  # width: cross-group weights start at this times the global CNN's initialisation


@dataclass
class ModelConfig:
    backbone: str = "vgg"  # vgg | resnet | an import path: torchvision.models.resnet18, my_package.nets:SmallNet
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # more arguments for an imported backbone
    width: int = 32  # the global CNN's first-stage width (an imported backbone gets it as a `width` keyword)
    local_width: int | None = None  # default round(width / sqrt(N))
    depth: list[int] | None = None  # layers per stage of vgg / resnet (their default when None; ignored, with a
    #                                 note, for an imported backbone)
    # How the local CNNs run on one device: grouped (vgg, resnet) | vmap | loop | auto (grouped for vgg and resnet;
    # for an imported backbone vmap from 16 local CNNs on, else loop). A run's config.yaml records the one chosen.
    backend: str = "auto"


@dataclass
class CombinerConfig:
    hidden: list[int] | None = None  # DNN hidden sizes; default two layers of min(512, max(64, 4*N*K))
    activation: str = "relu"
    dropout: float = 0.0


@dataclass
class StageConfig:
    enabled: bool = True
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    schedule: str = "cosine"  # per step, after warmup
    warmup_epochs: float = 0.0
    step_every: int = 10  # 'step' schedule: epochs between decays
    step_gamma: float = 0.1
    # 'plateau' schedule (with patience): times plateau_factor when patience runs out; patience stops the stage
    # only at plateau_floor of the peak (ddcnn.train.schedule)
    plateau_factor: float = 0.1
    plateau_floor: float = 0.1
    grad_clip: float | None = None  # per local CNN in the local stage
    label_smoothing: float = 0.0
    init_dnn: bool = True  # transfer stage: also start from the combine stage's DNN
    # coherent and transfer under torchrun: "model" (each process holds its shard of the local CNNs; the default)
    # or "data" (DistributedDataParallel: each process holds the whole CNN-DNN). global: "data" (the default) or
    # "spatial" (each process holds a slab of every image, vgg and resnet). The other stages have one way.
    parallel: str | None = None
    # Early stopping: ``epochs`` is the cap; the stage stops after ``patience`` epochs without an improvement of
    # ``monitor`` by more than ``min_delta`` (None: off). ``keep``: whose weights the stage hands on, the best
    # epoch's or the last one's (None: best when patience is set, else last).
    patience: int | None = None
    min_delta: float = 0.0
    monitor: str = "val_accuracy"
    keep: str | None = None

    def kept(self) -> str:
        """Whose weights the stage keeps: ``best`` or ``last``."""
        return self.keep or ("best" if self.patience is not None else "last")


@dataclass
class EvaluationConfig:
    # The validation accuracy whose time to reach is measured per strategy (a fraction, e.g. 0.9); None: the
    # global CNN's best validation accuracy minus target_margin.
    target_accuracy: float | None = None
    target_margin: float = 0.005
    # The metric that chooses the best strategy (on validation) and that the study's claims compare (on test):
    # accuracy, balanced_accuracy, macro_f1 or roc_auc (ddcnn.metrics).
    metric: str = "accuracy"


@dataclass
class StagesConfig:
    # 'global' is a Python keyword, hence the trailing underscore; YAML and --set use 'global'.
    global_: StageConfig = field(default_factory=StageConfig)
    local: StageConfig = field(default_factory=StageConfig)
    combine: StageConfig = field(default_factory=lambda: StageConfig(epochs=20, batch_size=256, lr=1e-2))
    coherent: StageConfig = field(default_factory=StageConfig)
    transfer: StageConfig = field(default_factory=lambda: StageConfig(epochs=5, lr=1e-4))
    global_transfer: StageConfig = field(default_factory=lambda: StageConfig(epochs=5, lr=1e-4))  # as transfer

    def get(self, stage: str) -> StageConfig:
        return getattr(self, "global_" if stage == "global" else stage)


@dataclass
class Config:
    name: str = "experiment"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False  # torch.compile the models
    eval_batch_size: int = 1024
    data: DataConfig = field(default_factory=DataConfig)
    decomposition: DecompositionConfig = field(default_factory=DecompositionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    combiner: CombinerConfig = field(default_factory=CombinerConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


def _yaml_name(name: str) -> str:
    return name.rstrip("_")


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """Return ``value`` converted to ``annotation`` (int -> float allowed) or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[-1] if len(errors) == 1 else ConfigError(
            f"{key} = {value!r} has the wrong type; expected {_describe(annotation)}"
        )
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} = {value!r} must be a list, e.g. [2, 2]")
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {value!r} must be a mapping")
        if typing.get_args(annotation)[1] is Any:  # arguments for the user's code, checked where they are used
            return {str(k): copy.deepcopy(v) for k, v in value.items()}
        return {str(k): str(v) for k, v in value.items()}
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r} must be true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r} must be a whole number")
        if not -(2**63) <= value < 2**63:  # torch and numpy hold 64-bit integers: seeds, sizes, counts
            raise ConfigError(f"{key} = {value} is too large: whole numbers must be below 2**63 "
                              f"(9223372036854775808) in size")
        return value
    if annotation is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string: accept what float() accepts
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} = {value!r} must be a number")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{key} = {value!r} must be a finite number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r} must be a string")
        return value
    raise ConfigError(f"{key}: unsupported option type {annotation}")


def _describe(annotation) -> str:
    return str(annotation).replace("typing.", "").replace("NoneType", "null")


def _from_dict(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'the config'} must be a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {_yaml_name(f.name): f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key {full!r}{did_you_mean(str(key), fields)}; valid keys here: "
                              f"{', '.join(fields)}")
        f = fields[key]
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            base = getattr(cls(), f.name)  # keep stage-specific defaults (combine, transfer)
            values[f.name] = _merge(base, value, full)
        else:
            values[f.name] = _check_type(value, annotation, full)
    return cls(**values)


def _merge(base, data: Any, prefix: str):
    merged = _from_dict(type(base), data, prefix)
    explicit = {_yaml_name(k) for k in data}
    for f in dataclasses.fields(base):
        if _yaml_name(f.name) not in explicit:
            setattr(merged, f.name, copy.deepcopy(getattr(base, f.name)))
    return merged


def to_dict(obj) -> dict:
    """The config as plain data with YAML key names (``global`` rather than ``global_``)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out[_yaml_name(f.name)] = to_dict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return out


def parse_set(expression: str) -> tuple[list[str], Any]:
    """``"stages.local.epochs=5"`` -> (["stages", "local", "epochs"], 5)."""
    if "=" not in expression:
        raise ConfigError(f"--set {expression!r} is not of the form key=value, e.g. --set stages.local.epochs=5")
    key, raw = expression.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {expression!r} has an empty key; write it as key=value, e.g. seed=1")
    try:
        value = load_yaml(raw, f"--set {expression!r}") if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {expression!r}: the value {raw!r} is not a valid YAML value") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for expression in overrides:
        path, value = parse_set(expression)
        targets = [path]
        if len(path) >= 3 and path[0] == "stages" and path[1] == "*":
            targets = [["stages", s, *path[2:]] for s in STAGES]
        for target in targets:
            node = data
            for part in target[:-1]:
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    raise ConfigError(f"--set {expression!r}: {part!r} is a value, not a section")
                node = child
            node[target[-1]] = value
    return data


def parallelism(cfg: Config, stage: str) -> str:
    """How ``stage`` uses several processes: ``"model"`` (each holds a shard of the local CNNs and sees whole
    batches: the local stage, and coherent and transfer by default), ``"data"`` (each holds the whole model and a
    part of every batch: the global stage, or ``parallel: data``), ``"spatial"`` (the global stage with
    ``parallel: spatial``: each holds the whole model and a slab of every image) or ``"single"`` (the combine
    stage: rank 0)."""
    if stage == "local":
        return "model"
    if stage == "combine":
        return "single"
    return cfg.stages.get(stage).parallel or PARALLEL.get(stage, ("data",))[0]


def active(cfg: Config, stage: str) -> bool:
    """Whether ``stage`` runs: enabled, and meaningful for the decomposition's kind (global_transfer only with
    ``width``; the CNN-DNN stages not with ``width`` on whole images, where there are no subimages to combine)."""
    d = cfg.decomposition
    if stage == "global_transfer" and d.kind != "width":
        return False
    if stage in CNN_DNN_STAGES and d.kind == "width" and d.input == "whole":
        return False
    return cfg.stages.get(stage).enabled


# What a way that splits the built-in backbones' layers says when it is given another backbone, and its fix.
SPLITS_LAYERS = ("stages.global.parallel = spatial splits", "use stages.global.parallel: data")


def builtin_backbone_only(cfg: Config) -> tuple[str, str] | None:
    """``(the setting that splits the layers, its fix)`` when ``cfg`` trains a stage that only the built-in
    backbones can (the global stage spatial-parallel under torchrun), else None
    (:func:`ddcnn.models.settings.check_model_settings`)."""
    return SPLITS_LAYERS if cfg.stages.global_.enabled and parallelism(cfg, "global") == "spatial" else None


def validate(cfg: Config) -> Config:
    """Range checks that the types alone do not express. Nothing is imported or built here: the checks that need
    the models' names (backbone, backend, activation) are :func:`ddcnn.models.settings.check_model_settings`."""
    choice("data.name", cfg.data.name, DATASETS)
    choice("precision", cfg.precision, ("auto", "fp32", "bf16"))
    if not (cfg.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", cfg.device)):
        raise ConfigError(f"device = {cfg.device!r} is not valid; use auto, cpu, cuda or cuda:N (N a GPU number, "
                          f"e.g. cuda:0)")
    if cfg.seed < 0:
        raise ConfigError(f"seed = {cfg.seed} must not be negative; use e.g. seed: 0")
    size = cfg.data.image_size
    if size is not None and (len(size) not in (2, 3) or min(size) < 1):
        raise ConfigError(f"data.image_size = {size} must be [H, W] (images) or [D, H, W] (volumes) with positive "
                          f"sizes, e.g. [32, 32]")
    positive: dict[str, float] = {
        "model.width": cfg.model.width, "eval_batch_size": cfg.eval_batch_size,
        "data.generated_train": cfg.data.generated_train, "data.generated_test": cfg.data.generated_test,
        "data.num_classes": cfg.data.num_classes,
    }
    if cfg.model.local_width is not None:
        positive["model.local_width"] = cfg.model.local_width
    for name in ("limit_train", "limit_test", "channels"):
        if getattr(cfg.data, name) is not None:
            positive[f"data.{name}"] = getattr(cfg.data, name)
    for stage in STAGES:
        s = cfg.stages.get(stage)
        choice(f"stages.{stage}.optimizer", s.optimizer, OPTIMIZERS)
        choice(f"stages.{stage}.schedule", s.schedule, SCHEDULES)
        positive.update({f"stages.{stage}.epochs": s.epochs, f"stages.{stage}.batch_size": s.batch_size,
                         f"stages.{stage}.lr": s.lr, f"stages.{stage}.step_every": s.step_every,
                         f"stages.{stage}.step_gamma": s.step_gamma})
        if s.grad_clip is not None:
            positive[f"stages.{stage}.grad_clip"] = s.grad_clip
        for name in ("weight_decay", "warmup_epochs", "momentum", "label_smoothing"):
            if getattr(s, name) < 0:
                raise ConfigError(f"stages.{stage}.{name} = {getattr(s, name)} must not be negative")
        if s.monitor in (*METRICS, "loss"):
            s.monitor = f"val_{s.monitor}"  # the bare metric names of evaluation.metric watch the validation split
        choice(f"stages.{stage}.monitor", s.monitor, MONITORS)
        if s.keep is not None:
            choice(f"stages.{stage}.keep", s.keep, KEEPS)
        if s.patience is not None:
            positive[f"stages.{stage}.patience"] = s.patience
        for name in ("plateau_factor", "plateau_floor"):
            if not 0 < getattr(s, name) < 1 and not (name == "plateau_floor" and getattr(s, name) == 1):
                raise ConfigError(f"stages.{stage}.{name} = {getattr(s, name)} must be above 0 and below 1, e.g. 0.1")
        if s.schedule == "plateau" and s.patience is None and s.enabled:
            raise ConfigError(f"stages.{stage}.schedule = plateau lowers the learning rate when patience runs out, "
                              f"but stages.{stage}.patience is not set; set it (e.g. 3) or choose schedule cosine")
        if s.min_delta < 0:
            raise ConfigError(f"stages.{stage}.min_delta = {s.min_delta} must not be negative, e.g. 0.001")
        if active(cfg, stage) and cfg.data.val_fraction == 0 and (s.patience is not None or s.kept() == "best"):
            raise ConfigError(f"stages.{stage}.patience / keep: best watch the validation split but "
                              f"data.val_fraction = 0 leaves none; set data.val_fraction (e.g. 0.1) or remove "
                              f"stages.{stage}.patience and keep")
        if s.label_smoothing >= 1:
            raise ConfigError(f"stages.{stage}.label_smoothing = {s.label_smoothing} must be below 1, e.g. 0.1")
        if s.parallel is not None:
            ways = PARALLEL.get(stage, ())
            if s.parallel not in ways:
                fix = (f"choose one of {', '.join(ways)}" if ways else
                       f"the {stage} stage has one way to use several processes: remove the key")
                raise ConfigError(f"stages.{stage}.parallel = {s.parallel!r} is not valid"
                                  f"{did_you_mean(str(s.parallel), ways) if ways else ''}; {fix}")
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} = {value} must be positive")
    for key, value in (("data.augment.crop_padding", cfg.data.augment.crop_padding),
                       ("data.workers", cfg.data.workers), ("data.split_seed", cfg.data.split_seed),
                       ("data.noise", cfg.data.noise),
                       ("data.device_resident_limit_gb", cfg.data.device_resident_limit_gb)):
        if value < 0:
            raise ConfigError(f"{key} = {value} must not be negative, e.g. 0")
    for key, value in (("data.val_fraction", cfg.data.val_fraction), ("data.test_fraction", cfg.data.test_fraction)):
        if not 0 <= value < 1:
            raise ConfigError(f"{key} = {value} must be in [0, 1), e.g. 0.1")
    if cfg.model.depth is not None and (not cfg.model.depth or min(cfg.model.depth) < 1):
        raise ConfigError(f"model.depth = {cfg.model.depth} must list positive layer counts, e.g. [2, 2, 2]")
    if any(g < 1 for g in cfg.decomposition.grid) or not cfg.decomposition.grid:
        raise ConfigError(f"decomposition.grid = {cfg.decomposition.grid} must hold positive numbers, e.g. [2, 2]")
    overlap = cfg.decomposition.overlap
    if any(o < 0 for o in (overlap if isinstance(overlap, list) else [overlap])):
        raise ConfigError(f"decomposition.overlap = {overlap} must not be negative")
    if cfg.data.channels is not None and cfg.data.channels not in (1, 3):
        raise ConfigError(f"data.channels = {cfg.data.channels} must be 1 (grey) or 3 (RGB), or null for the data's "
                          f"own")
    if cfg.data.num_classes < 2:
        raise ConfigError(f"data.num_classes = {cfg.data.num_classes} must be at least 2 (a classifier needs two "
                          f"classes)")
    if not 0 <= cfg.combiner.dropout < 1:
        raise ConfigError(f"combiner.dropout = {cfg.combiner.dropout} must be in [0, 1), e.g. 0.1")
    _validate_volumes(cfg.data)
    target, margin = cfg.evaluation.target_accuracy, cfg.evaluation.target_margin
    if target is not None and not 0 < target <= 1:
        raise ConfigError(f"evaluation.target_accuracy = {target} must be a fraction in (0, 1], e.g. 0.9, or null "
                          f"for the global CNN's best validation accuracy minus evaluation.target_margin")
    choice("evaluation.metric", cfg.evaluation.metric, METRICS)
    if not 0 <= margin < 1:
        raise ConfigError(f"evaluation.target_margin = {margin} must be a fraction in [0, 1), e.g. 0.005 (0.5 pp)")
    _validate_kind(cfg)
    if not any(active(cfg, s) for s in STAGES):
        raise ConfigError("every stage is disabled; enable at least one of " +
                          ", ".join(s for s in STAGES if s != "global_transfer" or cfg.decomposition.kind == "width"))
    return cfg


def _validate_volumes(data: DataConfig) -> None:
    """The volume settings (data.intensity, window, percentiles, orientation, spacing, balance, augment)."""
    choice("data.intensity", data.intensity, INTENSITIES)
    if data.balance is not None:
        choice("data.balance", data.balance, BALANCES)
    window = data.window
    if window is not None and (len(window) != 2 or window[0] >= window[1]):
        raise ConfigError(f"data.window = {window} must be [low, high] with low < high, e.g. [-1000, 400], or null")
    if window is None and data.intensity == "window":
        raise ConfigError("data.window = null but data.intensity = window needs one; set data.intensity to stored "
                          "(values as they are), percentile or zscore (MRI and other non-CT volumes), or give "
                          "data.window, e.g. [-1000, 400]")
    p = data.percentiles
    if len(p) != 2 or not 0 <= p[0] < p[1] <= 100:
        raise ConfigError(f"data.percentiles = {p} must be [low, high] with 0 <= low < high <= 100, e.g. [0.5, 99.5]")
    axes = ("LR", "PA", "IS")
    o = data.orientation
    if len(o) != 3 or sorted(next((i for i, a in enumerate(axes) if c in a), 9) for c in o.upper()) != [0, 1, 2]:
        raise ConfigError(f"data.orientation = {o!r} must be three axis codes, one of L/R, one of P/A and one of "
                          f"I/S, e.g. RAS (the nibabel canonical frame) or LPS (DICOM's)")
    if data.spacing is not None and (len(data.spacing) != 3 or min(data.spacing) <= 0):
        raise ConfigError(f"data.spacing = {data.spacing} must be three positive voxel sizes [D, H, W] in mm, e.g. "
                          f"[2.0, 1.5, 1.5], or null to keep each volume's own")
    a = data.augment
    for key in ("rotate_degrees", "scale", "translate", "intensity_scale", "intensity_shift"):
        if getattr(a, key) < 0:
            raise ConfigError(f"data.augment.{key} = {getattr(a, key)} must not be negative, e.g. 0.1")
    if a.rotate_degrees > 180 or a.scale >= 1 or a.translate >= 1:
        raise ConfigError(f"data.augment rotate_degrees = {a.rotate_degrees}, scale = {a.scale}, translate = "
                          f"{a.translate} must be at most 180 degrees, below 1 and below 1; use small values, "
                          f"e.g. 10, 0.1, 0.05")
    size = data.image_size
    dims = len(size) if size is not None else 3
    if any(not 0 <= axis < dims for axis in a.flip_axes) or len(set(a.flip_axes)) != len(a.flip_axes):
        raise ConfigError(f"data.augment.flip_axes = {a.flip_axes} must list distinct spatial axes from 0 to "
                          f"{dims - 1} (0 = depth of a volume, {dims - 1} = width), e.g. [0, 1, 2]")


def _validate_kind(cfg: Config) -> None:
    """The width decomposition's own keys (the widths themselves are checked with the data's shapes, in
    :mod:`ddcnn.build`)."""
    d = cfg.decomposition
    choice("decomposition.kind", d.kind, KINDS)
    choice("decomposition.input", d.input, WIDTH_INPUTS)
    if d.kind == "spatial":
        if d.parts is not None:
            raise ConfigError(f"decomposition.parts = {d.parts} applies to decomposition.kind: width; the spatial "
                              f"decomposition has one local CNN per subimage of decomposition.grid: remove it")
        return
    if d.parts is not None and d.parts < 2:
        raise ConfigError(f"decomposition.parts = {d.parts} must be at least 2 sub-networks, e.g. 4")
    if d.input == "subimage" and d.parts is not None and d.parts != math.prod(d.grid):
        raise ConfigError(f"decomposition.parts = {d.parts} but decomposition.input: subimage gives one sub-network "
                          f"per subimage of grid {d.grid} ({math.prod(d.grid)}); set decomposition.parts="
                          f"{math.prod(d.grid)} or remove it")
    if d.cross_scale < 0:
        raise ConfigError(f"decomposition.cross_scale = {d.cross_scale} must not be negative; 0 starts the "
                          f"cross-group weights at zero, e.g. 0.1 at a tenth of the global CNN's initialisation")
    if cfg.model.local_width is not None:
        raise ConfigError(f"model.local_width = {cfg.model.local_width} does not apply to decomposition.kind: width, "
                          f"whose sub-networks have width model.width / decomposition.parts; remove it")


def n_parts(cfg: Config) -> int:
    """The number of local CNNs: the subimages of the grid, or the width decomposition's sub-networks."""
    d = cfg.decomposition
    return d.parts if d.kind == "width" and d.parts is not None else math.prod(d.grid)


def from_dict(data: dict, overrides: list[str] | None = None) -> Config:
    return validate(_from_dict(Config, apply_overrides(data or {}, overrides or []), ""))


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``--set`` overrides, check it."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder; give the path of a YAML file such as "
                          f"configs/fashion_mnist_2x2.yaml")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; give the path of a YAML file such as "
                          f"configs/fashion_mnist_2x2.yaml")
    try:
        data = load_yaml(path.read_text(), f"config file {str(path)!r}")
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}; fix its syntax") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not a text file; give a YAML file such as "
                          f"configs/fashion_mnist_2x2.yaml") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values, not a "
                          f"{type(data).__name__}")
    data, overrides, notes = anchor_paths(data, path, overrides or [])
    for note in notes:
        print(f"ddcnn: note: {note}", file=sys.stderr)
    return from_dict(data, overrides)


def anchor_paths(data: dict, named_in: Path | None, overrides: Sequence[str] = ()) -> tuple[dict, list[str], list[str]]:
    """``data`` (a config as plain data, read from the file ``named_in``) with ``data.root`` absolute, relative to
    ``named_in``'s folder, and ``overrides`` with a ``--set data.root=...`` made absolute from the current directory.
    ``data.root_as_written`` records the path as given and where. Returns both and the notes of
    :func:`ddcnn.paths.anchored` (a config that relied on the current directory)."""
    data, notes, sets = copy.deepcopy(data), [], []
    section = data.get("data")
    if isinstance(section, dict) and isinstance(section.get("root"), str) and named_in is not None:
        written = section["root"]
        section["root"], note = anchored(written, named_in, "data.root")
        notes += [note] if note else []
        if section["root"] != written:
            section["root_as_written"] = f"{written} (in {named_in})"
    for expression in overrides:
        key, value = parse_set(expression)
        if key == ["data", "root"] and isinstance(value, str):
            resolved, _ = anchored(value, None, "--set data.root")
            written = f"{value} (--set, from {os.getcwd()})" if resolved != value else None
            sets += [f"data.root={json.dumps(resolved)}", f"data.root_as_written={json.dumps(written)}"]
        else:
            sets.append(expression)
    return data, sets, notes


# data keys that only some datasets read: a run's config.yaml leaves them out for the others (their defaults hold)
ONLY_FOR = {"num_classes": "generated", "generated_train": "generated", "generated_test": "generated",
            "noise": "generated", "window": "volume-folder", "class_map": "volume-folder"}


def recorded(cfg: Config) -> dict:
    """The config as a run records it: without the data keys its dataset does not read (``window`` for photos,
    ``num_classes`` for a folder) and without an unset ``root_as_written``. A resumed run compares this form, so a
    key the record leaves out (its default read back) never differs from the value the new config carries."""
    data = to_dict(cfg)
    for key, dataset in ONLY_FOR.items():
        if cfg.data.name != dataset:
            data["data"].pop(key)
    if cfg.data.root_as_written is None:
        data["data"].pop("root_as_written")
    return data


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, as :func:`recorded` gives it."""
    return yaml.safe_dump(recorded(cfg), sort_keys=False)
