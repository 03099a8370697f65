"""What each way of using P processes sends per training step and holds per process, from the config alone.

Bytes are those one process sends per step (the largest over the processes), float32, with a ring all-reduce of
``n`` bytes sending ``2 (P-1)/P n`` and a ring all-gather of ``P`` parts of ``n`` bytes sending ``(P-1) n``:

* global CNN, data-parallel (DDP): ``2 (P-1)/P x 4 x parameters``;
* global CNN, spatial-parallel (:mod:`ddcnn.train.parallel.spatial`), batch ``B`` whole on every process: per
  convolution with input ``(B, C, *, R)`` (``R`` the size of a row: W, or H x W) the halo rows ``lo = p`` and
  ``hi = k - s - p`` forward (``4 B C R`` bytes a row) and the same rows' gradients backward (except for the
  first convolution, whose input is the image); plus ``2 (P-1)/P x 4 x`` (the parameters but the classifier's
  gradients, four sums of ``C`` per BatchNorm, the ``B x F`` pooled features once);
* CNN-DNN model-parallel: the gather of the local logits, ``(P-1) x 4 B ceil(N/P) K``, forward only;
* CNN-DNN data-parallel: as the global CNN's, with the CNN-DNN's parameters;
* local stage: nothing between the epochs' ends.

Memory per process is :func:`ddcnn.train.budget.held_per_process` of the stage's size (weights, gradients and Adam
state, activations kept for the backward pass and their gradients, the input batch).
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from ddcnn.build import meta_model
from ddcnn.config import Config
from ddcnn.errors import ConfigError
from ddcnn.models import GlobalCNN
from ddcnn.models.backbones import Head
from ddcnn.train.budget import count_exactly, held_per_process, stage_sizes
from ddcnn.train.parallel.spatial import slab_rows

FLOAT = 4


def ring(world: int) -> float:
    return 2 * (world - 1) / world


def spatial_step_bytes(cnn: nn.Module, input_shape: tuple[int, ...], world: int) -> int:
    """Bytes the busiest process sends in one training step of :class:`~ddcnn.train.parallel.spatial.SpatialCNN` for a
    batch of ``input_shape`` ``(B, C, *image_size)`` (``cnn`` may live on the meta device)."""
    halos: list[tuple[int, int, int]] = []  # (lo, hi, bytes of one row of the whole batch)
    reduced = 0
    hooks = []

    def on_conv(module, inputs):
        x = inputs[0]
        k, s, p = module.kernel_size[0], module.stride[0], int(module.padding[0])
        halos.append((p, max(0, k - s - p), x.shape[0] * x.shape[1] * math.prod(x.shape[3:]) * FLOAT))

    def on_bn(module, inputs):
        nonlocal reduced
        reduced += 4 * module.num_features  # sum and centred square sum, forward and backward

    def on_head(module, inputs):
        nonlocal reduced
        reduced += inputs[0].shape[0] * inputs[0].shape[1]

    for module in cnn.modules():
        if isinstance(module, nn.Conv2d | nn.Conv3d):
            hooks.append(module.register_forward_pre_hook(on_conv))
        elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm3d):
            hooks.append(module.register_forward_pre_hook(on_bn))
        elif isinstance(module, Head):
            hooks.append(module.register_forward_pre_hook(on_head))
            reduced -= sum(p.numel() for p in module.parameters())  # the classifier's gradient is whole already
    device = next(cnn.parameters()).device
    try:
        with torch.no_grad():
            cnn.eval()(torch.zeros(input_shape, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    reduced += sum(p.numel() for p in cnn.parameters())
    busiest = 0
    for rank in range(world):
        sent = 0
        for i, (lo, hi, row) in enumerate(halos):
            backward = i > 0  # the image needs no gradient
            if rank < world - 1:  # to rank + 1: my last lo rows forward, the gradient of my bottom halo backward
                sent += row * (lo + (hi if backward else 0))
            if rank > 0:  # to rank - 1: my first hi rows forward, the gradient of my top halo backward
                sent += row * (hi + (lo if backward else 0))
        busiest = max(busiest, sent)
    return busiest + round(ring(world) * FLOAT * reduced)


def parallelisms(cfg: Config, models, world: int) -> list[tuple[str, int | None, int | None]]:
    """``(name, bytes sent per step, bytes held per process)`` of every way of training with ``world``
    processes; ``None`` where that way cannot use ``world`` processes."""
    sizes = {s.stage: s for s in stage_sizes(cfg, models, ["global", "local", "coherent"])}
    for size in sizes.values():  # counted by a meta forward pass, not bounded
        count_exactly(cfg, models, size)
    n, k = models.n_local, models.shapes.num_classes
    batch = {stage: cfg.stages.get(stage).batch_size for stage in ("global", "local", "coherent")}
    parameters = {stage: sum(p.numel() for p in meta_model(models, stage).parameters())
                  for stage in ("global", "coherent")}

    def held(stage: str, mode: str) -> int:
        return held_per_process(cfg, models, sizes[stage], world, mode).training_bytes

    rows: list[tuple[str, int | None, int | None]] = [
        ("global CNN, data-parallel", round(ring(world) * FLOAT * parameters["global"]), held("global", "data"))]
    spatial: tuple[int | None, int | None] = (None, None)
    if cfg.model.backbone in ("vgg", "resnet"):
        cnn = meta_model(models, "global")
        try:
            slab_rows(models.shapes.image_size, world, cast(GlobalCNN, cnn).depth or (), cfg.model.backbone)
            shape = (batch["global"], models.shapes.in_channels, *models.shapes.image_size)
            spatial = spatial_step_bytes(cnn, shape, world), held("global", "spatial")
        except ConfigError:
            pass
    rows.append(("global CNN, spatial-parallel", *spatial))
    gather = (world - 1) * FLOAT * batch["coherent"] * -(-n // world) * k
    fits = world <= n
    rows.append(("CNN-DNN, model-parallel", gather if fits else None, held("coherent", "model") if fits else None))
    rows.append(("CNN-DNN, data-parallel", round(ring(world) * FLOAT * parameters["coherent"]),
                 held("coherent", "data")))
    rows.append(("local stage", 0 if fits else None, held("local", "model") if fits else None))
    return rows


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.2f}"


def scaling_lines(cfg: Config, models, worlds=(2, 4, 8, 64)) -> list[str]:
    """``ddcnn show``'s table: MiB sent per step / MiB held per process, for each parallelism and P."""
    columns = {world: parallelisms(cfg, models, world) for world in worlds}
    head = f"{'per process and training step':<30}" + "".join(f"{f'P={w}':>22}" for w in worlds)
    lines = ["MiB sent / MiB held per process in one training step (estimates; '-': not possible):", head]
    for i, (name, _, _) in enumerate(columns[worlds[0]]):
        cells = [f"{_mib(columns[w][i][1])} / {_mib(columns[w][i][2])}" for w in worlds]
        lines.append(f"{name:<30}" + "".join(f"{c:>22}" for c in cells))
    return lines
