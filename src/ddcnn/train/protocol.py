"""The paper's protocol into one run directory: every enabled stage in order, then one test evaluation and the
report. The stages are in :mod:`ddcnn.train.stages`, the strategies they give in :mod:`ddcnn.train.strategies`.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

import ddcnn
from ddcnn.config import STAGES, Config
from ddcnn.data.loading import to_float
from ddcnn.models import count_parameters, forward_flops
from ddcnn.train import distributed, stages
from ddcnn.train.context import Context, StageResult, accuracy, build_context, check_stages
from ddcnn.train.distributed import DistEnv
from ddcnn.train.rundir import RunDir
from ddcnn.train.runtime import device_name, make_runtime
from ddcnn.train.strategies import STRATEGIES, score_all


class Experiment:
    """One run of the protocol into the run directory ``out``: ``Experiment(cfg, out).run()``.

    What can be checked without the data (the device, the stages' dependencies) is checked here, the rest by
    :func:`~ddcnn.train.context.build_context` before the run directory is touched.
    """

    def __init__(self, cfg: Config, out: str | Path, resume: bool = False, force: bool = False, command: str = "",
                 verbose: bool = True, log=None, env: DistEnv | None = None):
        self.cfg, self.command, self.force, self.verbose, self.print_line = cfg, command, force, verbose, log
        self.env = env or distributed.env_from_environment()
        self.run_dir = RunDir(out)
        self.runtime = make_runtime(cfg, self.env)
        # A worker that torchrun restarted continues from the checkpoints of its own launch.
        self.resume = resume or (distributed.is_restart() and self.run_dir.launched_by(distributed.launch_id()))
        check_stages(cfg)

    def setup(self) -> Context:
        return build_context(self.cfg, self.run_dir, self.runtime, self.env, self.resume, self.force,
                             self.verbose, self.print_line)

    def run(self) -> dict | None:
        """All enabled stages, then the test evaluation and the report; returns the results (None on ranks > 0)."""
        ctx = None
        try:
            ctx = self.setup()
            done: dict[str, StageResult] = {}
            for stage in STAGES:
                if self.cfg.stages.get(stage).enabled:
                    done[stage] = stages.STAGES[stage](ctx, done)
            if not self.env.is_main:
                return None
            return finish(ctx, done, self.command)
        finally:
            if ctx is not None and hasattr(ctx.log, "close"):
                ctx.log.close()
            if self.env.enabled:
                distributed.shutdown()


def finish(ctx: Context, done: dict[str, StageResult], command: str = "") -> dict:
    """The epoch records in stage order, the test results in ``results.json``, then the report and its plots."""
    ctx.run_dir.rewrite_metrics([r for stage in STAGES if stage in done for r in done[stage].history])
    results = evaluate_test(ctx, done, command)
    ctx.run_dir.write_json("results.json", results)
    from ddcnn.report import write_report

    write_report(ctx.run_dir.path, results, ctx.run_dir.metrics(), ctx.decomposition,
                 sample_image=to_float(ctx.test.images[0]))
    return results


def evaluate_test(ctx: Context, done: dict[str, StageResult], command: str = "") -> dict:
    """Every strategy that was trained, on the test set: accuracy, train time, parameters, FLOPs."""
    trained = {stage: result.model.eval() for stage, result in done.items()}
    labels, k, n = ctx.test.labels, len(ctx.classes), ctx.n_local
    shapes = ctx.models.shapes
    image_shape = (shapes.in_channels, *shapes.image_size)
    names, fn = score_all(trained, ctx.decomposition, k)
    *scores, local = ctx.predict(fn, ctx.test.images)
    seconds = {stage: result.seconds for stage, result in done.items()}
    initialised_from = tuple(done["transfer"].extras["initialised_from"]) if "transfer" in done else ()

    def cost(name: str) -> tuple[int, int]:
        """Parameters and forward FLOPs per image of the models a strategy runs."""
        if STRATEGIES[name].combiner is None:
            model = trained[STRATEGIES[name].stages[0]]
            return count_parameters(model), forward_flops(model, image_shape)
        ensemble = trained["local"]
        params = count_parameters(ensemble)
        flops = forward_flops(ensemble, (n, shapes.in_channels, *ctx.decomposition.subimage_size))
        if "combine" in STRATEGIES[name].stages:
            params += count_parameters(trained["combine"])
            flops += forward_flops(trained["combine"], (n, k))
        return params, flops

    strategies, predictions = {}, {}
    for name, logits in zip(names, scores):
        parameters, flops = cost(name)
        predictions[name] = logits.argmax(-1)
        strategies[name] = {"test_accuracy": accuracy(logits, labels),
                            "train_seconds": STRATEGIES[name].train_seconds(seconds, initialised_from),
                            "parameters": parameters, "flops_per_image": flops}
    best = max(strategies, key=lambda name: strategies[name]["test_accuracy"])
    d = ctx.decomposition
    results = {
        "dataset": ctx.cfg.data.name, "name": ctx.cfg.name, "image_size": list(shapes.image_size),
        "grid": list(d.grid), "overlap": list(d.overlap), "subimage_size": list(d.subimage_size),
        "num_classes": k, "classes": ctx.classes, "backbone": ctx.cfg.model.backbone,
        "global_width": ctx.cfg.model.width, "local_width": ctx.models.local_width, "n_local": n,
        "device": ctx.runtime.device.type, "device_name": device_name(ctx.runtime.device),
        "torch_version": torch.__version__, "ddcnn_version": ddcnn.__version__, "python": platform.python_version(),
        "command": command, "seed": ctx.cfg.seed,
        "data_sizes": {"train": len(ctx.train), "val": len(ctx.val), "test": len(ctx.test)},
        "strategies": strategies, "stage_seconds": seconds, "best_strategy": best,
        "transfer_used_dnn": ("combine" in initialised_from) if "transfer" in done else None,
        "confusion_matrix": {"strategy": best, "matrix": confusion(predictions[best], labels, k)},
    }
    if "local" in done:
        history = done["local"].history or [{}]
        results["local"] = {"test_accuracy": (local.argmax(-1) == labels[:, None]).float().mean(0).tolist(),
                            "val_accuracy": history[-1].get("val_accuracy_per_subdomain"),
                            **done["local"].extras["local_timing"]}
    return results


def confusion(predicted: torch.Tensor, labels: torch.Tensor, k: int) -> list[list[int]]:
    """``k x k`` counts: row = true class, column = predicted class."""
    return torch.bincount(labels * k + predicted, minlength=k * k).view(k, k).tolist()
