"""The timing pass of a budget study (``ddcnn study FILE --time``): seconds that can be trusted, measured apart.

Seconds measured while J runs share the cores (and other work shares the machine) are not evidence: identical
runs differed up to 4x between cells. The frontier's axis is therefore training FLOPs; its seconds come from this
pass, run alone, after the sweep: per cell and per distinct stage (the global CNN, the local CNNs, the DNN, the
CNN-DNN that coherent and transfer both train), ``repeats`` timings of ``steps`` training steps each on a batch of
the stage's size (after warm-up steps), their median, minimum and maximum; an epoch is the median step times the
stage's steps per epoch. The local stage also gets its **critical path**: one local CNN trained alone, the time if
every local CNN had its own device (the slowest of them; all have the same architecture). A point's seconds are
then its stages' epochs times these (:func:`point_seconds`); the DNN's pass of the frozen local CNNs over the data
is not included.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ddcnn.build import Models, Shapes, with_backend
from ddcnn.config import from_dict
from ddcnn.data.datasets import load_datasets
from ddcnn.models import local_loss
from ddcnn.study.spec import Study
from ddcnn.train.engine.loop import make_optimizer

REPEATS = 5
STEPS = 10
WARMUP = 3
# the stages each budgeted strategy trains, timed once per cell (coherent and transfer train the same CNN-DNN)
TIMED = {"global": ("global",), "local": ("local", "combine"), "transfer": ("cnn_dnn",), "coherent": ("cnn_dnn",)}


def _step_seconds(step: Callable[[], None], repeats: int, steps: int) -> list[float]:
    """``repeats`` timings of ``steps`` calls of ``step`` (after warm-up calls), as seconds per step."""
    for _ in range(WARMUP):
        step()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        out.append((time.perf_counter() - start) / steps)
    return out


def _trainer(model, forward, loss, cfg) -> Callable[[], None]:
    optimizer = make_optimizer(model.parameters(), cfg)
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss(forward()).backward()
        optimizer.step()

    return step


def _stage_steps(models: Models, stage: str, batch: int) -> dict[str, Callable[[], None]]:
    """name -> one training step of ``stage`` on random data of the right shapes (``critical_path``: one local CNN
    alone)."""
    cfg, shapes, d = models.cfg, models.shapes, models.decomposition
    x = torch.randn(batch, shapes.in_channels, *shapes.image_size)
    y = torch.randint(0, shapes.num_classes, (batch,))

    def ce(out):
        return F.cross_entropy(out.float(), y)

    if stage == "global":
        net = models.global_cnn()
        return {"global": _trainer(net, lambda: net(x), ce, cfg.stages.global_)}
    if stage == "local":
        ensemble, sub = models.ensemble(), d.split(x)
        single = models.ensemble(range(1)).local_model(0)
        return {"local": _trainer(ensemble, lambda: ensemble(sub), lambda out: local_loss(out, y)[0],
                                  cfg.stages.local),
                "local_critical_path": _trainer(single, lambda: single(sub[:, 0]), ce, cfg.stages.local)}
    if stage == "combine":
        dnn = models.dnn()
        features = torch.randn(batch, models.n_local, shapes.num_classes)
        return {"combine": _trainer(dnn, lambda: dnn(features), ce, cfg.stages.combine)}
    cnn_dnn = models.cnn_dnn()
    return {"cnn_dnn": _trainer(cnn_dnn, lambda: cnn_dnn(x), ce, cfg.stages.transfer)}


def time_study(study: Study, repeats: int = REPEATS, steps: int = STEPS, echo=print) -> dict:
    """The timing pass over every cell of ``study`` (see the module's doc); what ``timing.json`` holds."""
    rows = []
    data_cache: dict[str, tuple[Shapes, int]] = {}
    for cell in study.cells():
        cfg = with_backend(from_dict(study.base, cell.overrides()))
        key = repr(cfg.data)
        if key not in data_cache:
            train, _ = load_datasets(cfg.data)
            n_train = len(train) - round(len(train) * cfg.data.val_fraction)
            data_cache[key] = Shapes(train.in_channels, len(train.classes), tuple(train.image_size)), n_train
        shapes, n_train = data_cache[key]
        models = Models(cfg, shapes)
        kinds = dict.fromkeys(s for strategy in study.budgets or {} for s in TIMED[strategy])
        for kind in kinds:
            stage = "transfer" if kind == "cnn_dnn" else kind
            batch = cfg.stages.get(stage).batch_size
            per_epoch = math.ceil(n_train / batch)
            torch.manual_seed(0)
            for name, step in _stage_steps(models, stage, batch).items():
                echo(f"[timing] {cell.id}: {name}, {repeats} x {steps} steps of {batch} images")
                seconds = _step_seconds(step, repeats, steps)
                rows.append({"cell": cell.id, "stage": name, "batch_size": batch, "steps_per_epoch": per_epoch,
                             "repeats": repeats, "steps": steps,
                             "step_seconds": {"median": statistics.median(seconds), "min": min(seconds),
                                              "max": max(seconds), "all": seconds},
                             "epoch_seconds": statistics.median(seconds) * per_epoch})
    return {"note": f"measured alone (one process, {torch.get_num_threads()} thread(s)), after the sweep: "
                    f"{repeats} timings of {steps} training steps per stage after {WARMUP} warm-up steps; an epoch "
                    f"is the median step times the steps per epoch",
            "threads": torch.get_num_threads(), "torch_version": torch.__version__, "stages": rows}


def point_seconds(timing: dict, cell: str, epochs: dict[str, int]) -> dict | None:
    """A frontier point's seconds (measured-alone and critical path) from its stages' ``epochs`` (None when the
    timing pass lacks one of its stages)."""
    table = {row["stage"]: row["epoch_seconds"] for row in timing.get("stages", []) if row["cell"] == cell}
    seconds = critical = 0.0
    for stage, n in epochs.items():
        name = "cnn_dnn" if stage in ("coherent", "transfer") else stage
        if name not in table:
            return None
        seconds += n * table[name]
        critical += n * table.get("local_critical_path", table[name]) if stage == "local" else n * table[name]
    return {"seconds": seconds, "critical_path_seconds": critical}
