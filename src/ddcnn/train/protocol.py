"""The paper's protocol into one run directory: every enabled stage in order, then one test evaluation and the
report. The stages are in :mod:`ddcnn.train.stages`, the strategies they give in :mod:`ddcnn.strategies`.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import cast

import torch

import ddcnn
from ddcnn.config import STAGES, Config, active
from ddcnn.data.loading import to_float
from ddcnn.data.python import PythonData
from ddcnn.finished.predictions import accuracy
from ddcnn.models import LocalEnsemble, count_parameters
from ddcnn.predicted import pack_classes
from ddcnn.strategies import STRATEGIES, available
from ddcnn.train import dist, stages
from ddcnn.train.admit import check_stages
from ddcnn.train.best import best_strategy, strategy_metrics
from ddcnn.train.context import Context, StageResult, build_context
from ddcnn.train.dist import DistEnv
from ddcnn.train.runtime import device_name, make_runtime
from ddcnn.train.scoring import score_strategies
from ddcnn.train.stagestore import StageStore, shared_stage
from ddcnn.train.store.metrics import MetricsLog
from ddcnn.train.store.rundir import RunDir
from ddcnn.train.time_to_target import strategy_costs, target_accuracy, time_to_target


class Experiment:
    """One run of the protocol into the run directory ``out``: ``Experiment(cfg, out).run()``.

    What can be checked without the data (the device, the stages' dependencies) is checked here, the rest by
    :func:`~ddcnn.train.context.build_context` before the run directory is touched.
    """

    def __init__(self, cfg: Config, out: str | Path, resume: bool = False, force: bool = False, command: str = "",
                 verbose: bool = True, log=None, env: DistEnv | None = None, trusted: bool = True,
                 source: str = "the config", python: PythonData | None = None,
                 stage_store: str | Path | None = None):
        """``trusted``: whether an import path as backbone may be imported (False for a config read from a run or
        study directory without --trust-code; ``source`` names that file in the refusal). ``python``: the
        datasets given from Python (:func:`ddcnn.api.fit`), else the config's data section is read.
        ``stage_store``: a folder of finished stages that runs share (:mod:`ddcnn.train.stagestore`)."""
        self.store = StageStore(stage_store) if stage_store is not None else None
        self.cfg, self.command, self.force, self.verbose, self.print_line = cfg, command, force, verbose, log
        self.trusted, self.source, self.python = trusted, source, python
        self.env = env or dist.env_from_environment()
        self.run_dir = RunDir(out)
        self.runtime = make_runtime(cfg, self.env)
        # A worker that torchrun restarted continues from the checkpoints of its own launch.
        self.resume = resume or (dist.is_restart() and self.run_dir.launched_by(dist.launch_id()))
        check_stages(cfg)

    def setup(self) -> Context:
        return build_context(self.cfg, self.run_dir, self.runtime, self.env, self.resume, self.force,
                             self.verbose, self.print_line, self.trusted, self.source, self.python)

    def run(self) -> dict | None:
        """All enabled stages, then the test evaluation and the report; returns the results (None on ranks > 0)."""
        ctx = None
        try:
            ctx = self.setup()
            done: dict[str, StageResult] = {}
            for stage in STAGES:
                if active(self.cfg, stage):
                    train = lambda s=stage: stages.TRAINERS[s](ctx, done)  # noqa: E731
                    done[stage] = shared_stage(self.store, ctx, stage, train, ddcnn.__version__)
            return finish(ctx, done, self.command)
        finally:
            if ctx is not None and isinstance(ctx.log, MetricsLog):
                ctx.log.close()
            if self.env.enabled:
                dist.shutdown()


def finish(ctx: Context, done: dict[str, StageResult], command: str = "") -> dict | None:
    """The test evaluation (every process takes part), then on rank 0 the epoch records in stage order,
    ``results.json`` and the report with its plots. Returns the results on rank 0, None elsewhere."""
    ctx.echo(f"evaluating {', '.join(available(done, ctx.cfg.decomposition.kind))} on {len(ctx.test):,} test images")
    results = evaluate_test(ctx, done, command)
    if results is None:
        return None
    # settings changed on --resume (runfiles.stage_changes), then every stage's epochs and its end
    events = [r for r in ctx.run_dir.metrics() if r.get("event") not in (None, "end")]
    ctx.run_dir.rewrite_metrics(events + [r for stage in STAGES if stage in done
                                          for r in [*done[stage].history, done[stage].summary]])
    if ctx.python is not None:  # where the data came from, and the path it took
        results["data_source"] = ctx.python.facts
    ctx.run_dir.write_json("results.json", results)
    from ddcnn.report import write_report

    write_report(ctx.run_dir.path, results, ctx.run_dir.metrics(), ctx.decomposition,
                 sample_image=to_float(ctx.test.images[0]))
    return results


def evaluate_test(ctx: Context, done: dict[str, StageResult], command: str = "") -> dict | None:
    """Every strategy that was trained, on the validation and the test set: accuracy, cost, time to the target
    accuracy, parameters, FLOPs. The best strategy is chosen on validation accuracy; the test set only reports.

    Every process calls it: the local CNNs' logits and a model-parallel CNN-DNN are computed by all of them
    together; the results are returned on rank 0 (None elsewhere).
    """
    trained = {stage: result.model.eval() for stage, result in done.items()}
    if "local" in trained:
        trained["local"] = ctx.local_shards().scored(ctx.decomposition, cast(LocalEnsemble, trained["local"]))
    splits = {"test": ctx.test} if len(ctx.val) == 0 else {"val": ctx.val, "test": ctx.test}
    scored = {split: score_strategies(trained, ctx.decomposition, len(ctx.classes), ctx.predict, data.images,
                                      ctx.env, ctx.cfg.decomposition.kind) for split, data in splits.items()}
    scores = {split: s for split, (s, _) in scored.items()}
    costs = _model_costs(ctx, done, trained)
    if not ctx.env.is_main:
        return None
    strategies, curves, target = _strategy_records(ctx, done, scores, costs, splits)
    if "val" in scores:
        best, basis = best_strategy(strategies, ctx.cfg.evaluation.metric)
    else:  # the test set never chooses: without a validation split, the first strategy trained is reported
        best, basis = next(iter(strategies)), "none (no validation split): the first strategy trained"
    results = {**_run_facts(ctx, command), "strategies": strategies, **_stage_records(ctx, done),
               "best_strategy": best, "best_strategy_basis": basis, "evaluation_metric": ctx.cfg.evaluation.metric,
               "target": target, "curves": curves,
               "transfer_used_dnn": ("combine" in _initialised_from(done)) if "transfer" in done else None,
               "confusion_matrix": {"strategy": best,
                                    "matrix": strategies[best]["test_metrics"]["confusion_matrix"]},
               # every strategy's class per test image (ddcnn.predicted): a bootstrap over test images needs them
               "test_predictions": {name: pack_classes(score.argmax(-1).tolist())
                                    for name, score in scores["test"].items()}}
    if "local" in done:
        results["local"] = _local_record(done["local"], scored["test"][1], ctx.test.labels)
    return results


def _model_costs(ctx: Context, done: dict[str, StageResult], trained: dict) -> dict[str, tuple[int, int]]:
    """Parameters and forward FLOPs per image of every available strategy's models (all processes call it: a
    model the processes share is counted by all of them together; the others on rank 0)."""
    k, n, env = len(ctx.classes), ctx.n_local, ctx.env

    def local_cost(ensemble: LocalEnsemble) -> tuple[int, int]:
        """Parameters and forward FLOPs per image of the local CNNs, summed over the processes' shards (all
        processes call it)."""
        return _summed(env, count_parameters(ensemble), 0)[0], ctx.forward_flops(ensemble)

    def with_dnn(cost: tuple[int, int], dnn) -> tuple[int, int]:
        return cost[0] + count_parameters(dnn), cost[1] + ctx.forward_flops(dnn)

    ensemble_cost = local_cost(cast(LocalEnsemble, done["local"].model)) if "local" in done else (0, 0)
    costs = {}
    for name in available(done, ctx.cfg.decomposition.kind):
        strategy = STRATEGIES[name]
        if strategy.combiner is not None:
            combiner = strategy.combiner(trained, n, k)
            costs[name] = with_dnn(ensemble_cost, combiner) if "combine" in strategy.stages else ensemble_cost
            continue
        stage = strategy.stages[0]
        model, way = trained[stage], ctx.parallelism(stage)
        if way.shard(n) is not None:  # a CNN-DNN with its local CNNs sharded: every process counts its part
            costs[name] = with_dnn(local_cost(model.ensemble), model.combiner)
        elif env.is_main:
            plain = way.plain(model)  # e.g. a spatial-parallel CNN: the whole one
            costs[name] = count_parameters(plain), ctx.forward_flops(plain)
    return costs


def _critical(done: dict[str, StageResult]) -> dict[str, float]:
    """The local stage's critical path: its time if every local CNN had its own device."""
    return {"local": done["local"].extras["local_timing"]["critical_path_seconds"]} if "local" in done else {}


def _initialised_from(done: dict[str, StageResult]) -> tuple[str, ...]:
    return tuple(done["transfer"].extras["initialised_from"]) if "transfer" in done else ()


def _strategy_records(ctx: Context, done: dict[str, StageResult], scores: dict, costs: dict, splits: dict
                      ) -> tuple[dict, dict, dict]:
    """Each strategy's accuracies and metrics beyond accuracy, cost, time to the target and size; its learning
    curve; the target."""
    critical = _critical(done)
    stage_data = {stage: (result.summary, result.history, critical.get(stage)) for stage, result in done.items()}
    target, target_source = target_accuracy(ctx.cfg.evaluation, done["global"].history if "global" in done else None)
    strategies, curves = {}, {}
    for name in scores["test"]:
        cost, curves[name] = strategy_costs(name, stage_data, _initialised_from(done))
        val = accuracy(scores["val"][name], ctx.val.labels) if "val" in scores else None
        strategies[name] = {"val_accuracy": val, "test_accuracy": accuracy(scores["test"][name], ctx.test.labels),
                            "train_seconds": cost["seconds"],  # every stage it depends on (train/time_to_target.py)
                            "parameters": costs[name][0], "flops_per_image": costs[name][1], "cost": cost,
                            "time_to_target": time_to_target(curves[name], target),
                            # how often it gives each class on the test set: the report warns of a collapse
                            "test_predicted": torch.bincount(scores["test"][name].argmax(-1),
                                                             minlength=len(ctx.classes)).tolist(),
                            **strategy_metrics(name, {s: scores[s][name] for s in scores}, splits, ctx.classes)}
    return strategies, curves, {"val_accuracy": target, "source": target_source}


def _run_facts(ctx: Context, command: str) -> dict:
    """What the run was: its data, decomposition, models, machine, versions and command."""
    shapes, d = ctx.models.shapes, ctx.decomposition
    width = {"decomposition": {"kind": "width", "parts": ctx.n_local, "input": ctx.cfg.decomposition.input,
                               "cross_scale": ctx.cfg.decomposition.cross_scale}} if ctx.models.width_kind else {}
    return {  # a spatial run's results.json keeps its keys
        "dataset": ctx.cfg.data.name, "name": ctx.cfg.name, "image_size": list(shapes.image_size),
        "grid": list(d.grid), "overlap": list(d.overlap), "subimage_size": list(d.subimage_size),
        "num_classes": len(ctx.classes), "classes": ctx.classes, "backbone": ctx.cfg.model.backbone,
        "global_width": ctx.cfg.model.width, "local_width": ctx.models.local_width, "n_local": ctx.n_local,
        "device": ctx.runtime.device.type, "device_name": device_name(ctx.runtime.device),
        "torch_version": torch.__version__, "ddcnn_version": ddcnn.__version__, "python": platform.python_version(),
        "command": command, "seed": ctx.cfg.seed, "processes": ctx.env.world,
        "data_sizes": {"train": len(ctx.train), "val": len(ctx.val), "test": len(ctx.test)}, **width,
        # the frame of volume-folder volumes (data/volumes.py), for the orientation labels of the 3D figures
        "orientation": ctx.cfg.data.orientation.upper() if ctx.cfg.data.name == "volume-folder" else None,
    }


def _stage_records(ctx: Context, done: dict[str, StageResult]) -> dict:
    """Every stage's seconds and end record, with how it used the processes (``parallelism``, ``processes``)."""
    critical = _critical(done)
    ways = {stage: ctx.parallelism(stage).record() for stage in done}
    return {
        "parallel": {stage: ways[stage]["parallelism"] for stage in ("coherent", "transfer", "global_transfer")
                     if stage in done},
        "stage_seconds": {stage: result.seconds for stage, result in done.items()},
        "stages": {stage: {**result.summary, **ways[stage],
                           **({"critical_path_seconds": critical[stage]} if stage in critical else {})}
                   for stage, result in done.items()},
    }


def _local_record(local: StageResult, logits: torch.Tensor | None, labels: torch.Tensor) -> dict:
    """Each local CNN's test accuracy (from its logits ``(M, N, K)``) and validation accuracy at the kept epoch,
    and the local stage's timing."""
    history = local.history or [{}]
    kept = local.summary.get("kept_epoch") or len(history)
    assert logits is not None  # computed for the rules of the local stage
    return {"test_accuracy": (logits.argmax(-1) == labels[:, None]).float().mean(0).tolist(),
            "val_accuracy": history[min(kept, len(history)) - 1].get("val_accuracy_per_subdomain"),
            **local.extras["local_timing"]}


def _summed(env: DistEnv, parameters: int, flops: int) -> tuple[int, int]:
    """Parameters and FLOPs of this process's shard, summed over the processes."""
    parts = env.all_gather((parameters, flops))
    return sum(p for p, _ in parts), sum(f for _, f in parts)

