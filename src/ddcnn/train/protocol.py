"""The paper's protocol into one run directory: every enabled stage in order, then one test evaluation and the
report. The stages are in :mod:`ddcnn.train.stages`, the strategies they give in :mod:`ddcnn.strategies`.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import cast

import torch

import ddcnn
from ddcnn.config import STAGES, Config
from ddcnn.data.loading import to_float
from ddcnn.models import LocalEnsemble, count_parameters, forward_flops
from ddcnn.strategies import STRATEGIES, available
from ddcnn.train import dist, stages
from ddcnn.train.admit import check_stages
from ddcnn.train.context import Context, StageResult, accuracy, build_context
from ddcnn.train.dist import DistEnv
from ddcnn.train.metrics import MetricsLog
from ddcnn.train.model_parallel import ShardedCNNDNN
from ddcnn.train.rundir import RunDir
from ddcnn.train.runtime import device_name, make_runtime


class Experiment:
    """One run of the protocol into the run directory ``out``: ``Experiment(cfg, out).run()``.

    What can be checked without the data (the device, the stages' dependencies) is checked here, the rest by
    :func:`~ddcnn.train.context.build_context` before the run directory is touched.
    """

    def __init__(self, cfg: Config, out: str | Path, resume: bool = False, force: bool = False, command: str = "",
                 verbose: bool = True, log=None, env: DistEnv | None = None, trusted: bool = True,
                 source: str = "the config"):
        """``trusted``: whether an import path as backbone may be imported (False for a config read from a run or
        study directory without --trust-code; ``source`` names that file in the refusal)."""
        self.cfg, self.command, self.force, self.verbose, self.print_line = cfg, command, force, verbose, log
        self.trusted, self.source = trusted, source
        self.env = env or dist.env_from_environment()
        self.run_dir = RunDir(out)
        self.runtime = make_runtime(cfg, self.env)
        # A worker that torchrun restarted continues from the checkpoints of its own launch.
        self.resume = resume or (dist.is_restart() and self.run_dir.launched_by(dist.launch_id()))
        check_stages(cfg)

    def setup(self) -> Context:
        return build_context(self.cfg, self.run_dir, self.runtime, self.env, self.resume, self.force,
                             self.verbose, self.print_line, self.trusted, self.source)

    def run(self) -> dict | None:
        """All enabled stages, then the test evaluation and the report; returns the results (None on ranks > 0)."""
        ctx = None
        try:
            ctx = self.setup()
            done: dict[str, StageResult] = {}
            for stage in STAGES:
                if self.cfg.stages.get(stage).enabled:
                    done[stage] = stages.TRAINERS[stage](ctx, done)
            return finish(ctx, done, self.command)
        finally:
            if ctx is not None and isinstance(ctx.log, MetricsLog):
                ctx.log.close()
            if self.env.enabled:
                dist.shutdown()


def finish(ctx: Context, done: dict[str, StageResult], command: str = "") -> dict | None:
    """The test evaluation (every process takes part), then on rank 0 the epoch records in stage order,
    ``results.json`` and the report with its plots. Returns the results on rank 0, None elsewhere."""
    results = evaluate_test(ctx, done, command)
    if results is None:
        return None
    events = [r for r in ctx.run_dir.metrics() if "event" in r]  # settings changed on --resume (runfiles)
    ctx.run_dir.rewrite_metrics(events + [r for stage in STAGES if stage in done for r in done[stage].history])
    ctx.run_dir.write_json("results.json", results)
    from ddcnn.report import write_report

    write_report(ctx.run_dir.path, results, ctx.run_dir.metrics(), ctx.decomposition,
                 sample_image=to_float(ctx.test.images[0]))
    return results


def evaluate_test(ctx: Context, done: dict[str, StageResult], command: str = "") -> dict | None:
    """Every strategy that was trained, on the test set: accuracy, train time, parameters, FLOPs.

    Every process calls it: the local CNNs' logits and a model-parallel CNN-DNN are computed by all of them
    together; the results are returned on rank 0 (None elsewhere).
    """
    labels, k, n = ctx.test.labels, len(ctx.classes), ctx.n_local
    shapes, d, env = ctx.models.shapes, ctx.decomposition, ctx.env
    image_shape = (shapes.in_channels, *shapes.image_size)
    trained = {stage: result.model.eval() for stage, result in done.items()}
    local = stages.frozen_local_logits(ctx, done["local"], ctx.test.images) if "local" in done else None

    def local_cost(ensemble: LocalEnsemble) -> tuple[int, int]:
        """Parameters and forward FLOPs per image of the local CNNs, summed over the processes' shards (all
        processes call it)."""
        return _summed(env, count_parameters(ensemble), forward_flops(
            ensemble, (ensemble.n_local, shapes.in_channels, *d.subimage_size)))

    def with_dnn(cost: tuple[int, int], dnn) -> tuple[int, int]:
        return cost[0] + count_parameters(dnn), cost[1] + forward_flops(dnn, (n, k))

    ensemble_cost = local_cost(cast(LocalEnsemble, trained["local"])) if "local" in trained else (0, 0)
    scores, costs = {}, {}
    for name in available(done):
        strategy = STRATEGIES[name]
        if strategy.combiner is not None:  # a rule or the DNN on the local logits: rank 0 alone
            if env.is_main:
                assert local is not None  # a combiner's strategies need the local stage
                combiner = strategy.combiner(trained, n, k)
                with torch.no_grad(), torch.autocast(ctx.runtime.device.type, enabled=False):
                    scores[name] = combiner(local.to(ctx.runtime.device)).float().cpu()
                costs[name] = with_dnn(ensemble_cost, combiner) if "combine" in strategy.stages else ensemble_cost
            continue
        model = trained[strategy.stages[0]]
        if isinstance(model, ShardedCNNDNN):  # every process computes its part
            scores[name] = ctx.predict(model, ctx.test.images)
            costs[name] = with_dnn(local_cost(model.ensemble), model.combiner)
        elif env.is_main:
            scores[name] = ctx.predict(model, ctx.test.images)
            costs[name] = count_parameters(model), forward_flops(model, image_shape)
    if not env.is_main:
        return None
    seconds = {stage: result.seconds for stage, result in done.items()}
    initialised_from = tuple(done["transfer"].extras["initialised_from"]) if "transfer" in done else ()
    strategies = {name: {"test_accuracy": accuracy(scores[name], labels),
                         "train_seconds": STRATEGIES[name].train_seconds(seconds, initialised_from),
                         "parameters": costs[name][0], "flops_per_image": costs[name][1]} for name in scores}
    best = max(strategies, key=lambda name: strategies[name]["test_accuracy"])
    results = {
        "dataset": ctx.cfg.data.name, "name": ctx.cfg.name, "image_size": list(shapes.image_size),
        "grid": list(d.grid), "overlap": list(d.overlap), "subimage_size": list(d.subimage_size),
        "num_classes": k, "classes": ctx.classes, "backbone": ctx.cfg.model.backbone,
        "global_width": ctx.cfg.model.width, "local_width": ctx.models.local_width, "n_local": n,
        "device": ctx.runtime.device.type, "device_name": device_name(ctx.runtime.device),
        "torch_version": torch.__version__, "ddcnn_version": ddcnn.__version__, "python": platform.python_version(),
        "command": command, "seed": ctx.cfg.seed, "processes": env.world,
        "parallel": {stage: stages.parallel_mode(ctx, stage) for stage in ("coherent", "transfer") if stage in done},
        "data_sizes": {"train": len(ctx.train), "val": len(ctx.val), "test": len(ctx.test)},
        "strategies": strategies, "stage_seconds": seconds, "best_strategy": best,
        "transfer_used_dnn": ("combine" in initialised_from) if "transfer" in done else None,
        "confusion_matrix": {"strategy": best, "matrix": confusion(scores[best].argmax(-1), labels, k)},
    }
    if local is not None:
        history = done["local"].history or [{}]
        results["local"] = {"test_accuracy": (local.argmax(-1) == labels[:, None]).float().mean(0).tolist(),
                            "val_accuracy": history[-1].get("val_accuracy_per_subdomain"),
                            **done["local"].extras["local_timing"]}
    return results


def _summed(env: DistEnv, parameters: int, flops: int) -> tuple[int, int]:
    """Parameters and FLOPs of this process's shard, summed over the processes."""
    parts = env.all_gather((parameters, flops))
    return sum(p for p, _ in parts), sum(f for _, f in parts)


def confusion(predicted: torch.Tensor, labels: torch.Tensor, k: int) -> list[list[int]]:
    """``k x k`` counts: row = true class, column = predicted class."""
    return torch.bincount(labels * k + predicted, minlength=k * k).view(k, k).tolist()
