"""What a config will allocate, known before anything is allocated or written (below the trainer: a finished run
is sized by it too before it is loaded).

Every model of the enabled stages is built on the ``meta`` device (shapes, no memory) and run once on a meta batch,
so parameters and activation bytes are counted exactly, and every check that building a model makes (a DNN's
hidden sizes, a backbone too deep for the subimages) runs before a run directory is touched. A stage's training
needs about ``16 bytes x parameters`` (fp32 weights, gradients and two Adam moments) plus twice its activations
(kept for the backward pass, and their gradients) plus the input batch; a config that cannot fit in the memory
that is free on its device is refused with the figure and the fix. What one of several processes holds is its
way's (:func:`ddcnn.train.budget.held_per_process`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ddcnn.build import meta_model
from ddcnn.config import STAGES, Config, active
from ddcnn.errors import ConfigError, DDCNNError
from ddcnn.memory import free_memory, gib


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
    for stage in [s for s in STAGES if active(cfg, s)] if stages is None else stages:
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


def check_memory(cfg: Config, models, device: torch.device, sizes: list[StageSize], free: int | None = None,
                 training: bool = True, held: Callable[[StageSize], StageSize] = lambda size: size,
                 per_process: bool = False) -> list[StageSize]:
    """Refuse a stage of ``sizes`` that does not fit into the memory free on ``device`` (``free`` bytes; measured
    when None) for training, or for evaluation only; ``held(size)``: the part of a stage one process holds
    (``per_process``: of several). A bound that does not fit is counted exactly before it is refused."""
    free = free_memory(device) if free is None else free
    if free is None:
        return sizes
    for size in sizes:
        part = held(size)
        need = part.training_bytes if training else part.inference_bytes
        if need <= free:
            continue
        if not size.exact:  # the bound does not fit: count exactly before refusing
            count_exactly(cfg, models, size)
            part = held(size)
            need = part.training_bytes if training else part.inference_bytes
            if need <= free:
                continue
        params = (16 if training else 4) * part.parameters
        if size.stage == "combine":
            fix = "lower combiner.hidden or stages.combine.batch_size"
        elif params >= need / 2:
            fix = "lower model.width, model.local_width or combiner.hidden"
        else:
            fix = f"lower stages.{size.stage}.batch_size, data.image_size or data.augment.crop_padding"
        raise ConfigError(
            f"the {size.stage!r} stage needs about {gib(need)}{' per process' if per_process else ''} on "
            f"{device.type} ({part.parameters:,} parameters: "
            f"{gib(params)} of weights{' with gradients and optimizer state' if training else ''}; "
            f"{gib(need - params)} "
            f"of activations for a batch of {cfg.stages.get(size.stage).batch_size}) but only {gib(free)} are "
            f"free; {fix}")
    return sizes


def check_parameters(cfg: Config, models, stages, free: int | None = None) -> int:
    """Refuse models of ``stages`` whose fp32 weights, all held at once (``ddcnn show`` builds them together), do
    not fit into the free CPU memory (``free`` bytes; measured when None). Counted on the meta device; returns the
    bytes."""
    need = 4 * sum(size.parameters for size in stage_sizes(cfg, models, stages))
    free = free_memory(torch.device("cpu")) if free is None else free
    if free is not None and need > free:
        raise ConfigError(f"the models of this config hold {need // 4:,} parameters ({gib(need)}) but only "
                          f"{gib(free)} of memory are free; lower model.width, model.local_width or combiner.hidden")
    return need
