"""What a config will allocate, known before anything is allocated or written.

Every model of the enabled stages is built on the ``meta`` device (shapes, no memory) and run once on a meta batch,
so parameters and activation bytes are counted exactly, and every check that building a model makes (a DNN's
hidden sizes, a backbone too deep for the subimages) runs before a run directory is touched. A stage's training
needs about ``16 bytes x parameters`` (fp32 weights, gradients and two Adam moments) plus twice its activations
(kept for the backward pass, and their gradients) plus the input batch; a config that cannot fit in the memory
that is free on its device is refused with the figure and the fix.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ddcnn.config import STAGES, Config, DataConfig, parallelism
from ddcnn.errors import ConfigError, DDCNNError

GIB = 2**30


def stage_model(models, stage: str) -> nn.Module:
    """The model ``stage`` trains, built as training, evaluation and prediction build it."""
    if stage == "global":
        return models.global_cnn()
    if stage == "local":
        return models.ensemble()
    if stage == "combine":
        return models.dnn("combine")
    return models.cnn_dnn(stage)


def weight_shapes(stage: str, model: nn.Module) -> dict[str, tuple]:
    """``{name: shape}`` of what ``stage``'s checkpoint holds for ``model``: the local CNNs in the stacked layout,
    a CNN-DNN as :class:`~ddcnn.train.model_parallel.CNNDNNState` saves it (works on the meta device)."""
    from ddcnn.models import CNNDNN, LocalEnsemble
    from ddcnn.train.model_parallel import whole_state

    if isinstance(model, LocalEnsemble):
        state = model.stacked_state_dict()
    elif isinstance(model, CNNDNN):
        state = whole_state(model.ensemble.stacked_state_dict(), model.combiner.state_dict())
    else:
        state = model.state_dict()
    return {k: tuple(v.shape) for k, v in state.items()}


def meta_model(models, stage: str) -> nn.Module:
    """``stage``'s model on the meta device; a model too large even to describe is a ConfigError."""
    # Building seeds torch's global generators: a check before training must leave them as they were.
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=cuda), torch.device("meta"):
            return stage_model(models, stage)
    except (DDCNNError, RuntimeError, NotImplementedError) as err:
        if "meta" not in str(err).lower() or models.family_builtin:
            if isinstance(err, DDCNNError):
                raise
            raise ConfigError(f"the {stage!r} model of this config is too large to build ({err}); lower "
                              f"model.width, model.local_width or combiner.hidden") from None
        # A foreign network that reads its weights' values while it is built (an .item() in __init__) cannot be
        # built without memory; one global and one local CNN of it were built for real already (the pre-check of
        # ddcnn.train.build.Models), so it is built on the CPU to be counted.
        with torch.random.fork_rng(devices=cuda), torch.device("cpu"):
            return stage_model(models, stage)
    except (OverflowError, ValueError, MemoryError) as err:
        raise ConfigError(f"the {stage!r} model of this config is too large to build ({err}); lower model.width, "
                          f"model.local_width or combiner.hidden") from None


@dataclass
class StageSize:
    stage: str
    parameters: int
    activation_bytes: int  # outputs of every layer for one training batch (an upper bound where not exact)
    input_bytes: int  # the batch itself, zero-padded for random crops
    exact: bool = False  # counted by a meta forward pass, not bounded

    @property
    def training_bytes(self) -> int:
        return 16 * self.parameters + 2 * self.activation_bytes + self.input_bytes

    @property
    def inference_bytes(self) -> int:
        return 4 * self.parameters + self.activation_bytes + self.input_bytes


def _leaves(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if not list(m.children())]


def _activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of every leaf layer's output for the meta batch ``x``."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        for out in output if isinstance(output, tuple | list) else (output,):
            if torch.is_tensor(out):
                total += out.numel() * out.element_size()

    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            # Its output has its input's shape; torch's meta BatchNorm imports the compiler stack (seconds).
            m.forward = lambda x: x  # type: ignore[method-assign,assignment]
    handles = [m.register_forward_hook(hook) for m in _leaves(model)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return total


def _activation_bound(model: nn.Module, batch: int, channels: int, spatial: tuple) -> int:
    """An upper bound of :func:`_activation_bytes` without running the model (a meta forward pass costs seconds
    the first time): no layer of these CNNs and DNNs has more channels than its widest weight (or its input) nor
    more pixels than its input."""
    widest = max([channels] + [p.shape[0] for p in model.parameters() if p.dim() >= 2])
    return len(_leaves(model)) * batch * widest * math.prod(spatial) * 4


def _meta_input(models, stage: str, batch: int) -> tuple[tuple, int, tuple]:
    """``(input shape, input channels, spatial size)`` of one batch of ``stage``'s model."""
    shapes, d = models.shapes, models.decomposition
    if stage == "local":
        return (batch, models.n_local, shapes.in_channels, *d.subimage_size), models.n_local * shapes.in_channels, \
            tuple(d.subimage_size)
    if stage == "combine":
        return (batch, models.n_local, shapes.num_classes), models.n_local * shapes.num_classes, ()
    return (batch, shapes.in_channels, *shapes.image_size), shapes.in_channels, tuple(shapes.image_size)


def stage_sizes(cfg: Config, models, stages=None) -> list[StageSize]:
    """Parameters of the model of every stage of ``stages`` (default: the enabled ones), and a bound of its
    activation bytes for one batch."""
    pad = cfg.data.augment.crop_padding
    sizes = []
    for stage in [s for s in STAGES if cfg.stages.get(s).enabled] if stages is None else stages:
        batch = cfg.stages.get(stage).batch_size
        model = meta_model(models, stage)
        _, channels, spatial = _meta_input(models, stage, batch)
        padded = 0 if stage == "combine" else \
            batch * models.shapes.in_channels * math.prod(s + 2 * pad for s in models.shapes.image_size) * 4
        sizes.append(StageSize(stage, sum(p.numel() for p in model.parameters()),
                               _activation_bound(model, batch, channels, spatial), padded))
    return sizes


def count_exactly(cfg: Config, models, size: StageSize) -> None:
    """Replace the bound in ``size`` by the activation bytes a meta forward pass counts."""
    shape = _meta_input(models, size.stage, cfg.stages.get(size.stage).batch_size)[0]
    model = meta_model(models, size.stage)
    if any(p.device.type != "meta" for p in model.parameters()):
        return  # built on the CPU (see meta_model): running it on a whole batch is what the check avoids
    try:
        size.activation_bytes = _activation_bytes(model, torch.empty(shape, device="meta"))
    except DDCNNError:
        raise
    except (RuntimeError, OverflowError, ValueError) as err:
        raise ConfigError(f"the {size.stage!r} model of this config cannot run on a batch of {list(shape)} ({err}); "
                          f"lower model.width, combiner.hidden or stages.{size.stage}.batch_size") from None
    size.exact = True


def free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` now (CPU: available RAM, within a cgroup's limit), or None when unknown."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:  # a container's own limit (cgroup v2)
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def held_per_process(cfg: Config, models, size: StageSize, world: int) -> StageSize:
    """The part of ``size`` one of ``world`` processes holds: a model-parallel stage holds the largest shard of the
    local CNNs (and the whole DNN) with their activations, and the whole batch; a data-parallel one the whole model
    and its part of the batch; the combine stage (rank 0) all of it."""
    mode = parallelism(cfg, size.stage)
    if world <= 1 or mode == "single":
        return size
    if mode == "data":
        return replace(size, activation_bytes=-(-size.activation_bytes // world),
                       input_bytes=-(-size.input_bytes // world))
    share = -(-models.n_local // world) / models.n_local
    dnn = 0 if size.stage == "local" else sum(p.numel() for p in meta_model(models, "combine").parameters())
    return replace(size, parameters=dnn + math.ceil((size.parameters - dnn) * share),
                   activation_bytes=math.ceil(size.activation_bytes * share))


def _gib(n: float) -> str:
    return f"{n / GIB:,.1f} GiB" if n >= GIB / 10 else f"{n / 2**20:,.1f} MiB"


def check_budget(cfg: Config, models, device: torch.device, n_train: int | None = None, world: int = 1,
                 free: int | None = None, training: bool = True, stages=None) -> list[StageSize]:
    """Build the model of every enabled stage (or of ``stages``) on the meta device, check that each stage gets
    training batches (given ``n_train`` images) and fits into the memory free on ``device`` (``free`` bytes;
    measured when None) for training, or for evaluation only. Returns the sizes."""
    sizes = stage_sizes(cfg, models, stages)
    if n_train is not None:
        for size in sizes:
            batch = cfg.stages.get(size.stage).batch_size
            parts = world if parallelism(cfg, size.stage) == "data" else 1
            # The protocol leaves out a last batch too small to split among the processes (BatchNorm).
            steps = n_train // batch + (1 if n_train % batch >= 2 * parts or size.stage == "combine" else 0)
            if steps == 0 or (size.stage == "combine" and n_train == 0):
                raise ConfigError(f"stages.{size.stage}.batch_size = {batch} leaves the stage no training batch: "
                                  f"the training set has {n_train} images; lower stages.{size.stage}.batch_size")
    free = free_memory(device) if free is None else free
    if free is None:
        return sizes
    for size in sizes:
        held = held_per_process(cfg, models, size, world)
        need = held.training_bytes if training else held.inference_bytes
        if need <= free:
            continue
        if not size.exact:  # the bound does not fit: count exactly before refusing
            count_exactly(cfg, models, size)
            held = held_per_process(cfg, models, size, world)
            need = held.training_bytes if training else held.inference_bytes
            if need <= free:
                continue
        params = (16 if training else 4) * held.parameters
        if size.stage == "combine":
            fix = "lower combiner.hidden or stages.combine.batch_size"
        elif params >= need / 2:
            fix = "lower model.width, model.local_width or combiner.hidden"
        else:
            fix = f"lower stages.{size.stage}.batch_size, data.image_size or data.augment.crop_padding"
        raise ConfigError(
            f"the {size.stage!r} stage needs about {_gib(need)}{' per process' if world > 1 else ''} on "
            f"{device.type} ({held.parameters:,} parameters: "
            f"{_gib(params)} of weights{' with gradients and optimizer state' if training else ''}; "
            f"{_gib(need - params)} "
            f"of activations for a batch of {cfg.stages.get(size.stage).batch_size}) but only {_gib(free)} are "
            f"free; {fix}")
    return sizes


def check_parameters(cfg: Config, models, stages, free: int | None = None) -> int:
    """Refuse models of ``stages`` whose fp32 weights, all held at once (``ddcnn show`` builds them together), do
    not fit into the free CPU memory (``free`` bytes; measured when None). Counted on the meta device; returns the
    bytes."""
    need = 4 * sum(size.parameters for size in stage_sizes(cfg, models, stages))
    free = free_memory(torch.device("cpu")) if free is None else free
    if free is not None and need > free:
        raise ConfigError(f"the models of this config hold {need // 4:,} parameters ({_gib(need)}) but only "
                          f"{_gib(free)} of memory are free; lower model.width, model.local_width or combiner.hidden")
    return need


def check_data_size(data: DataConfig, free: int | None = None) -> None:
    """Refuse an ``image_size`` whose images cannot be held in memory, before any file is read or generated."""
    if data.image_size is None:
        return
    channels = data.channels or (1 if data.name in ("volume-folder", "generated") else 3)
    one = math.prod(data.image_size) * channels * 4
    count = data.generated_train + data.generated_test if data.name == "generated" else 1
    free = free_memory(torch.device("cpu")) if free is None else free
    if free is not None and one * count > free:
        what = f"{count:,} generated images" if count > 1 else "one image"
        raise ConfigError(f"data.image_size = {data.image_size} makes {what} take {_gib(one * count)} but only "
                          f"{_gib(free)} of memory are free; lower data.image_size"
                          + (" or data.generated_train" if count > 1 else ""))
