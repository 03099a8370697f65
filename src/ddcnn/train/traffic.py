"""What each way of using P processes sends per training step and holds per process, from the config alone
(``ddcnn show``'s table).

Bytes are those one process sends per step (the largest over the processes), float32, each way's
:meth:`~ddcnn.train.parallel.base.Parallelism.step_bytes`: a ring all-reduce of ``n`` bytes sends
``2 (P-1)/P n``, a ring all-gather of ``P`` parts of ``n`` bytes ``(P-1) n``. Memory per process is
:func:`ddcnn.train.budget.held_per_process` of the stage's size (weights, gradients and Adam state, activations
kept for the backward pass and their gradients, the input batch).
"""

from __future__ import annotations

from ddcnn.config import PARALLEL, Config
from ddcnn.sizing import StageSize, count_exactly, stage_sizes
from ddcnn.train.budget import held_per_process, way

# The stages whose ways ``ddcnn show`` compares (coherent stands for transfer: the same CNN-DNN and ways).
SHOWN = {"global": "global CNN", "coherent": "CNN-DNN"}


def _row(cfg: Config, models, size: StageSize, world: int, mode: str | None, label: str):
    """``(label, bytes sent per step, bytes held per process)`` of ``size.stage`` the way ``mode``."""
    sent = way(cfg, models, size.stage, world, mode).step_bytes(cfg, models, size.stage)
    held = None if sent is None else held_per_process(cfg, models, size, world, mode).training_bytes
    return label, sent, held


def parallelisms(cfg: Config, models, world: int) -> list[tuple[str, int | None, int | None]]:
    """``(name, bytes sent per step, bytes held per process)`` of every way of training with ``world``
    processes; ``None`` where that way cannot use ``world`` processes."""
    sizes = {s.stage: s for s in stage_sizes(cfg, models, [*SHOWN, "local"])}
    for size in sizes.values():  # counted by a meta forward pass, not bounded
        count_exactly(cfg, models, size)
    rows = [_row(cfg, models, sizes[stage], world, mode, f"{name}, {mode}-parallel")
            for stage, name in SHOWN.items() for mode in PARALLEL[stage]]
    return rows + [_row(cfg, models, sizes["local"], world, None, "local stage")]


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
