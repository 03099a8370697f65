"""The paper's five stages, one function each: ``train_X(ctx, done) -> StageResult``.

``done`` holds the results of the stages that ran before (in :data:`ddcnn.config.STAGES` order); every stage
checkpoints each epoch through :func:`ddcnn.train.engine.loop.fit`, so a finished stage is loaded, not retrained, on
``--resume``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import cast

import torch

from ddcnn.finished.predictions import accuracy
from ddcnn.models import LocalEnsemble, local_loss
from ddcnn.models.cnn_dnn import transfer_parts
from ddcnn.models.combiners import Combiner
from ddcnn.models.width import recompose
from ddcnn.seeds import derive_seed
from ddcnn.strategies import STRATEGIES, scored_every_epoch
from ddcnn.train.context import Context, StageResult
from ddcnn.train.engine.batches import TensorBatches
from ddcnn.train.engine.loop import fit
from ddcnn.train.engine.timing import critical_path
from ddcnn.train.parallel.base import Parallelism
from ddcnn.train.store.schema import LOCAL_TIMING

Done = Mapping[str, StageResult]


def train_global(ctx: Context, done: Done) -> StageResult:
    """The global CNN on whole images (data-parallel over the processes, or spatial-parallel: each process a
    slab of every image, :mod:`ddcnn.train.parallel.spatial`)."""
    return _train(ctx, "global", ctx.parallelism("global"), ctx.prepare(ctx.models.global_cnn()))


def train_global_transfer(ctx: Context, done: Done) -> StageResult:
    """The global CNN initialised from the trained sub-networks of a width decomposition
    (:func:`ddcnn.models.width.recompose`), then trained as the global stage is."""
    model = ctx.models.global_cnn("global_transfer")
    stacked = full_ensemble(ctx, done["local"]).stacked_state_dict()
    recompose(model.net, {k: v.to(next(model.parameters()).device) for k, v in stacked.items()}, ctx.n_local,
              ctx.cfg.decomposition.cross_scale)
    return _train(ctx, "global_transfer", ctx.parallelism("global_transfer"), ctx.prepare(model))


def _train(ctx: Context, stage: str, way: Parallelism, model, extras: dict | None = None) -> StageResult:
    """Train ``model`` (this process's part of the stage's model, on the device) on the classifier loss, the way
    ``way`` uses the processes: it wraps the model, splits the batches, combines the statistics and saves."""
    wrapped = way.wrap(model, ctx.runtime.device)
    run = ctx.compiled(wrapped) if way.compiles else wrapped
    batches = way.split(ctx.batches(stage, **way.batch_options(wrapped)))
    spec = ctx.spec(stage, model, sync=way.sync(), saver=way.saver(model), clip=way.clip(model))
    trained, evaluated = way.trained(model, wrapped), way.evaluated(model, wrapped)
    result = fit(spec, trained, ctx.classifier_loss(stage, run), batches, lambda: ctx.val_metrics(evaluated))
    return StageResult.of(trained, result, stage, extras)


def train_local(ctx: Context, done: Done) -> StageResult:
    """The N local CNNs, each on its subimages, as one batched ensemble; process ``r`` trains a contiguous shard
    of them on every image, so each local CNN sees the same batches as in a single process."""
    way = ctx.local_shards()
    shard = way.shard()
    ensemble = ctx.prepare(ctx.models.ensemble(shard))
    run = ctx.compiled(ensemble)

    def split(x):  # the subimages of this rank's local CNNs, from whole images or the shard's region
        return ctx.decomposition.split(x, shard)

    weight = ctx.class_weights()

    def loss_fn(x, y):
        logits = run(split(x))
        loss, _ = local_loss(logits, y, weight)
        return loss, (logits.argmax(-1) == y[:, None]).sum(0)  # correct per local CNN, (N,)

    def evaluate():
        if len(ctx.val) == 0:
            return {"val_loss": None, "val_accuracy": None, "val_accuracy_per_subdomain": None}
        logits = ctx.predict(lambda x: ensemble(split(x)), ctx.val.images)
        per = (logits.argmax(-1) == ctx.val.labels[:, None]).float().mean(0)
        per_loss = local_loss(logits, ctx.val.labels)[1]
        # The rules' validation accuracy every epoch (their learning curves): on every shard's logits together.
        parts = ctx.env.all_gather((per, per_loss, logits))
        per, per_loss = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        record = {"val_loss": per_loss.mean().item(), "val_accuracy": per.mean().item(),
                  "val_accuracy_per_subdomain": per.tolist()}
        everyone = torch.cat([p[2] for p in parts], dim=1)  # (M, N, K): the shards in rank order
        # a monitored metric beyond accuracy: its mean over the local CNNs, as val_accuracy (on every process)
        per_cnn = [ctx.monitored(everyone[:, j]) for j in range(everyone.shape[1])]
        record.update({key: sum(m[key] or 0.0 for m in per_cnn) / len(per_cnn) for key in per_cnn[0]})
        if ctx.env.is_main:
            for name in scored_every_epoch(ctx.cfg.decomposition.kind):
                rule = STRATEGIES[name].combiner({}, ctx.n_local, len(ctx.classes))
                record[f"val_accuracy_{name}"] = accuracy(rule(everyone), ctx.val.labels)
        return record

    batches = way.split(ctx.batches("local", **way.batch_options(ensemble)))  # every image, this rank's region
    # The loss is the sum over local CNNs; the logged train_loss is their mean, comparable to val_loss.
    spec = ctx.spec("local", ensemble, clip=way.clip(ensemble), loss_scale=1 / ctx.n_local, saver=way.saver(ensemble),
                    sync=way.sync())
    result = fit(spec, ensemble, loss_fn, batches, evaluate)
    timing = ctx.run_dir.read_json("local_timing.json", LOCAL_TIMING, optional=True)
    if timing is None:
        ctx.echo(f"[   local] timing each of the {len(shard)} local CNNs alone for the critical-path estimate")
        timing = critical_path(ensemble, batches, split, ctx.cfg.stages.local, ctx.runtime, ctx.env,
                               result.seconds, result.steps)
        if ctx.env.is_main:
            ctx.run_dir.write_json("local_timing.json", timing)
    # Each process keeps its own shard: no process ever holds all N local CNNs unless a stage asks for them.
    return StageResult.of(ensemble, result, "local", {"local_timing": timing, "shard": shard})


def full_ensemble(ctx: Context, local: StageResult) -> LocalEnsemble:
    """All N trained local CNNs on every process (gathered from the shards; all processes call it together)."""
    if len(local.extras["shard"]) == ctx.n_local:
        return cast(LocalEnsemble, local.model)
    weights = ctx.local_shards().saver(local.model).weights()
    full = ctx.prepare(ctx.models.ensemble())
    full.load_stacked_state_dict(weights)
    return full


def frozen_local_logits(ctx: Context, local: StageResult, images: torch.Tensor) -> torch.Tensor:
    """The trained local CNNs' logits ``(M, N, K)`` of images ``(M, C, *size)`` in eval mode, on every process:
    each computes those of its own shard on its own subimages, then they are gathered (all processes call it)."""
    ensemble = cast(LocalEnsemble, local.model).eval()
    return ctx.predict(ctx.local_shards().on_images(ctx.decomposition, ensemble), images)


def train_combine(ctx: Context, done: Done) -> StageResult:
    """The DNN on the frozen local CNNs' logits, computed once (each process those of its own local CNNs);
    trained on rank 0 and broadcast to the others."""
    dnn = ctx.prepare(ctx.models.dnn("combine"))
    ckpt = ctx.run_dir.checkpoints
    if ckpt.has("combine") and ckpt.state("combine").get("done"):  # finished: fit only loads the DNN
        loaded = fit(ctx.spec("combine", extra_state={"feature_seconds": 0.0, "feature_flops": 0}), dnn, None, None,
                     None)
        return _combine_result(dnn, loaded, 0.0, 0)
    # The pass of the local CNNs over the data is part of the stage's cost (forward only).
    feature_flops = ctx.forward_flops(cast(LocalEnsemble, done["local"].model)) * (len(ctx.train) + len(ctx.val))
    ctx.echo(f"[ combine] the local CNNs' logits of {len(ctx.train):,} training and {len(ctx.val):,} validation "
             f"images, computed once")
    start = time.perf_counter()
    features = frozen_local_logits(ctx, done["local"], ctx.train.images)
    val_features = frozen_local_logits(ctx, done["local"], ctx.val.images) if len(ctx.val) else None
    feature_seconds = ctx.env.max(time.perf_counter() - start)
    if ctx.env.is_main:
        result = _train_dnn(ctx, dnn, features, val_features, feature_seconds, feature_flops)
    payload = ctx.env.broadcast(
        ({k: v.cpu() for k, v in result.model.state_dict().items()}, result.seconds, result.history, result.summary)
        if ctx.env.is_main else None)
    if ctx.env.is_main:
        return result
    dnn.load_state_dict(payload[0])
    return StageResult(dnn, payload[1], payload[2], {}, payload[3])


def _combine_result(dnn, result, feature_seconds: float, feature_flops: int) -> StageResult:
    """The features' cost is saved with the stage: a resumed run reports the first run's."""
    return StageResult.of(dnn, result, "combine", setup_seconds=result.extra.get("feature_seconds", feature_seconds),
                          setup_flops=result.extra.get("feature_flops", feature_flops))


def _train_dnn(ctx: Context, dnn, features: torch.Tensor, val_features: torch.Tensor | None,
               feature_seconds: float, feature_flops: int) -> StageResult:
    device = ctx.runtime.device
    features = features.to(device)
    val_features = val_features.to(device) if val_features is not None else None

    def evaluate():
        if val_features is None:
            return {"val_loss": None, "val_accuracy": None}
        with torch.no_grad():
            return ctx.val_scores(dnn(val_features).float().cpu())

    batches = TensorBatches(features, ctx.train.labels.to(device), ctx.cfg.stages.combine.batch_size, ctx.cfg.seed,
                            len(ctx.classes) if ctx.cfg.data.balance == "sampler" else 0)
    spec = ctx.spec("combine", dnn, extra_state={"feature_seconds": feature_seconds, "feature_flops": feature_flops})
    result = fit(spec, dnn, ctx.classifier_loss("combine", dnn), batches, evaluate)
    return _combine_result(dnn, result, feature_seconds, feature_flops)


def train_coherent(ctx: Context, done: Done) -> StageResult:
    """A CNN-DNN trained end to end from random initialisation (this process's shard of the local CNNs under
    model parallelism; the checkpoint holds the whole model either way)."""
    way = ctx.parallelism("coherent")
    ensemble = ctx.models.ensemble(way.shard(ctx.n_local))
    model = way.cnn_dnn(ctx.decomposition, ensemble, ctx.models.dnn("coherent"))
    return _train(ctx, "coherent", way, ctx.prepare(model))


def train_transfer(ctx: Context, done: Done) -> StageResult:
    """A CNN-DNN trained end to end, initialised from the trained local CNNs (and the DNN: ``init_dnn``)."""
    use_dnn = ctx.cfg.stages.transfer.init_dnn and "combine" in done
    way = ctx.parallelism("transfer")
    # A way that holds a shard of the local CNNs holds the local stage's own shard; the others all N.
    local = cast(LocalEnsemble, done["local"].model) if way.shard(ctx.n_local) is not None else \
        full_ensemble(ctx, done["local"])
    torch.manual_seed(derive_seed(ctx.cfg.seed, "transfer", 0))
    c = ctx.cfg.combiner
    trained_dnn = cast(Combiner, done["combine"].model) if use_dnn else None
    ensemble, combiner = transfer_parts(local, trained_dnn, ctx.n_local,
                                        hidden=c.hidden, activation=c.activation, dropout=c.dropout)
    model = ctx.prepare(way.cnn_dnn(ctx.decomposition, ensemble, combiner))
    return _train(ctx, "transfer", way, model, {"initialised_from": ("combine",) if use_dnn else ()})


# The trainer of each stage of :data:`ddcnn.config.STAGES` (the one list of stages, in the order they run).
TRAINERS: dict[str, Callable[[Context, Done], StageResult]] = {
    "global": train_global,
    "local": train_local,
    "combine": train_combine,
    "coherent": train_coherent,
    "transfer": train_transfer,
    "global_transfer": train_global_transfer,
}
