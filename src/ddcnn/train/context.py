"""What every stage needs, built once in one place: the config, the data splits, the models' builder, the device,
the run directory, this process's rank and the metrics log."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ddcnn.build import Models
from ddcnn.config import STAGES, Config
from ddcnn.data.augment import make_augment
from ddcnn.data.balance import class_weights
from ddcnn.data.loading import Normalizer, make_batches
from ddcnn.data.python import PythonData
from ddcnn.data.readers import ImageDataset
from ddcnn.data.splits import split_record
from ddcnn.data.volumes import volume_recipe
from ddcnn.finished.predictions import accuracy
from ddcnn.metrics import metric_value
from ddcnn.models import LocalEnsemble, forward_flops
from ddcnn.models.combiners import Combiner
from ddcnn.train import dist
from ddcnn.train.admit import admit
from ddcnn.train.dist import DistEnv
from ddcnn.train.engine.loop import FitResult, StageSpec
from ddcnn.train.parallel.base import Parallelism
from ddcnn.train.parallel.choose import choose
from ddcnn.train.parallel.local import LocalShards
from ddcnn.train.runtime import M, Runtime, device_name
from ddcnn.train.store.metrics import MetricsLog
from ddcnn.train.store.rundir import RunDir

# Training FLOPs of one image: the forward pass, and the backward pass at about twice its cost.
TRAIN_FLOPS_FACTOR = 3


@dataclass
class StageResult:
    """What a stage leaves for the later stages and the test evaluation."""

    model: nn.Module
    seconds: float  # the stage's training time (the combine stage's includes its pass over the training set)
    history: list[dict]  # one record per epoch, as in metrics.jsonl
    extras: dict = field(default_factory=dict)  # "local_timing" (local), "initialised_from" (transfer)
    summary: dict = field(default_factory=dict)  # the end-of-stage record (FitResult.summary)

    @classmethod
    def of(cls, model: nn.Module, fit: FitResult, stage: str, extras: dict | None = None, setup_seconds: float = 0.0,
           setup_flops: int = 0) -> StageResult:
        summary = fit.summary(stage, setup_seconds, setup_flops)
        return cls(model, summary["seconds"], fit.history, extras or {}, summary)


@dataclass
class Context:
    """One run's fixed facts. Built by :func:`build_context`; the stages only read it."""

    cfg: Config
    env: DistEnv
    runtime: Runtime
    run_dir: RunDir
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    classes: list[str]
    normalizer: Normalizer
    models: Models
    log: Callable[[dict], None]
    verbose: bool
    ways: dict[str, Parallelism]  # how each stage uses the processes, chosen once (parallel.choose.choose)
    python: PythonData | None = None  # the datasets given from Python (ddcnn.fit), else None: read by the config

    @property
    def decomposition(self):
        return self.models.decomposition

    @property
    def n_local(self) -> int:
        return self.models.n_local

    # --------------------------------------------------------------------------------- what the stages share
    def spec(self, stage: str, model: nn.Module | None = None, **options) -> StageSpec:
        """The :class:`StageSpec` of ``stage`` from the config; ``options`` set the rest (clip, sync, saver...).
        With ``model`` (all processes call it), the epochs' FLOPs are counted: 3x its forward pass per image."""
        flops = TRAIN_FLOPS_FACTOR * self.forward_flops(model) if model is not None else 0
        network = "the DNN" if stage == "combine" else f"backbone {self.cfg.model.backbone!r}"
        return StageSpec(stage, self.cfg.stages.get(stage), self.run_dir.checkpoints, self.runtime, self.cfg.seed,
                         self.log, verbose=self.verbose, flops_per_image=flops, echo=self.echo, network=network,
                         **options)

    def echo(self, line: str) -> None:
        """One line of the training log: printed by rank 0 of a verbose run, where the epoch lines go."""
        if self.verbose and isinstance(self.log, MetricsLog):
            self.log.print(line)

    def batches(self, stage: str, parts: int = 1, shard: range | None = None, slab: range | None = None):
        """Training batches of ``stage``; ``parts``: the processes each batch will be split among. With ``shard``
        (a process's subdomains) and no augmentation, the images are cut to the shard's region before they reach
        the device, so a process never holds the other subdomains' pixels there; with ``slab`` (rows of dim 2,
        spatial parallelism) to those rows. (A random crop or flip moves pixels across subdomains: with
        augmentation the batches keep whole images.)"""
        augment = make_augment(self.cfg.data.augment)
        batch_size = self.cfg.stages.get(stage).batch_size
        # BatchNorm cannot train on one image (one value per channel): a last batch that would leave some part
        # with fewer than two images is left out.
        remainder = len(self.train) % batch_size
        drop_last = 0 < remainder < 2 * parts
        if self.python is not None and self.python.feed is not None:  # read (and transformed) per sample
            return self.python.feed(self.train, batch_size, self.runtime.device, True, drop_last, augment,
                                    self.normalizer, self.cfg.seed)
        train = self.train
        if shard is not None and augment.identity and len(shard) < self.n_local:
            start, stop = self.decomposition.region(shard)
            box = (slice(None), slice(None), *[slice(a, b) for a, b in zip(start, stop)])
            train = ImageDataset(self.train.images[box].contiguous(), self.train.labels, self.train.classes)
        if slab is not None and augment.identity:
            rows = self.train.images[:, :, slab.start:slab.stop].contiguous()
            train = ImageDataset(rows, self.train.labels, self.train.classes)
        return make_batches(
            train, batch_size, self.runtime.device, shuffle=True, drop_last=drop_last,
            augment=augment, normalizer=self.normalizer,
            seed=self.cfg.seed, workers=self.cfg.data.workers,
            limit_bytes=int(self.cfg.data.device_resident_limit_gb * 2**30),
            balanced=self.cfg.data.balance == "sampler",
        )

    def predict(self, fn, images: torch.Tensor):
        """``fn`` on normalised images in eval batches: ``(M, C, *size) -> (M, ...)`` float32 on the CPU."""
        return self.runtime.predict(fn, images, self.normalizer, self.cfg.eval_batch_size)

    def forward_flops(self, model: nn.Module) -> int:
        """Forward FLOPs of one image through ``model`` (a stage's model: a global CNN, a CNN-DNN, this process's
        shard of the local CNNs, a DNN on local logits), summed over the processes' shards (all call it)."""
        shapes, d, n = self.models.shapes, self.decomposition, self.n_local
        if isinstance(model, LocalEnsemble):
            own = forward_flops(model, (model.n_local, shapes.in_channels, *d.subimage_size))
            return sum(self.env.all_gather(own))
        if getattr(model, "spans_processes", False):  # this process's part of a CNN-DNN: its shard, and the DNN
            ensemble, combiner = cast(nn.Module, model.ensemble), cast(nn.Module, model.combiner)
            return self.forward_flops(ensemble) + forward_flops(combiner, (n, shapes.num_classes))
        if isinstance(model, Combiner):
            return forward_flops(model, (n, shapes.num_classes))
        return forward_flops(model, (shapes.in_channels, *shapes.image_size))

    def val_scores(self, logits: torch.Tensor) -> dict:
        return {"val_loss": F.cross_entropy(logits, self.val.labels).item(),
                "val_accuracy": accuracy(logits, self.val.labels), **self.monitored(logits)}

    def monitored(self, logits: torch.Tensor) -> dict:
        """The validation metrics that some stage's ``monitor`` names beyond loss and accuracy, of logits
        ``(M, K)``: ``{"val_macro_f1": ...}`` (:mod:`ddcnn.metrics`)."""
        wanted = {self.cfg.stages.get(s).monitor for s in STAGES} - {"val_accuracy", "val_loss"}
        return {key: metric_value(logits, self.val.labels, key.removeprefix("val_"), len(self.classes))
                for key in sorted(wanted)}

    def val_metrics(self, fn) -> dict:
        """Validation loss and accuracy of ``fn`` (images -> logits); None when there is no validation split."""
        if len(self.val) == 0:
            return {"val_loss": None, "val_accuracy": None}
        return self.val_scores(self.predict(fn, self.val.images))

    def prepare(self, model: M) -> M:
        """``model`` on the device, in the memory layout of the run."""
        return self.runtime.prepare(model, self.models.dims)

    def compiled(self, model: nn.Module):
        return torch.compile(model) if self.cfg.compile else model

    def classifier_loss(self, stage: str, forward):
        """Cross-entropy (with the stage's label smoothing) of ``forward(x)``, and the number it got right."""
        smoothing, weight = self.cfg.stages.get(stage).label_smoothing, self.class_weights()

        def loss_fn(x, y):
            out = forward(x)
            loss = F.cross_entropy(out.float(), y, weight=weight, label_smoothing=smoothing)
            return loss, (out.argmax(-1) == y).sum()

        return loss_fn

    def class_weights(self) -> torch.Tensor | None:
        """``(K,)`` on the device with ``data.balance: weights`` (data/balance.py), else None."""
        if self.cfg.data.balance != "weights":
            return None
        return class_weights(self.train.labels, len(self.classes)).to(self.runtime.device)

    def parallelism(self, stage: str) -> Parallelism:
        """How ``stage`` uses the processes (:func:`ddcnn.train.parallel.choose.choose`, chosen when the context
        was built)."""
        return self.ways[stage]

    def local_shards(self) -> LocalShards:
        """The local stage's way: this process's shard of the local CNNs, for the stages that use them."""
        return cast(LocalShards, self.ways["local"])


def build_context(cfg: Config, run_dir: RunDir, runtime: Runtime, env: DistEnv, resume: bool, force: bool,
                  verbose: bool = True, print_line: Callable[[str], None] | None = None, trusted: bool = True,
                  source: str = "the config", python: PythonData | None = None) -> Context:
    """Read the data (``python``: the datasets given from Python, checked already), build the models' builder,
    join the process group and prepare the run directory (rank 0 writes ``data.json``); every check that can
    refuse the run comes before the first file is written. An imported backbone is imported only when ``trusted``
    (``source``: where the config came from, for the error)."""
    admitted = admit(cfg, run_dir, runtime.device, env, resume, force, trusted, source, python)
    cfg, train, val, test, classes = admitted.cfg, admitted.train, admitted.val, admitted.test, admitted.classes
    models, shapes = admitted.models, admitted.models.shapes
    normalizer = Normalizer.fit(train.images) if python is None else python.normalizer
    dist.init(env, runtime.device.type)
    if env.is_main:
        run_dir.prepare(cfg, resume, force, launch=dist.launch_id(), events=admitted.events)
        run_dir.write_json("data.json", {
            "classes": classes, "in_channels": shapes.in_channels, "image_size": list(shapes.image_size),
            "normalizer": normalizer.state_dict(), "train": len(train), "val": len(val), "test": len(test),
            **({"volumes": recipe.to_json()} if (recipe := volume_recipe(cfg.data)) is not None else {}),
            **({"python": python.facts} if python is not None else {}),
        })
        run_dir.write_json("splits.json", split_record(cfg.data.name, train, val, test, admitted.given))
    env.barrier()  # the other ranks read the run directory that rank 0 prepared
    log = MetricsLog(run_dir, verbose, print_line) if env.is_main else _no_log
    ways = {stage: choose(cfg, stage, env, shapes.image_size, models.n_local) for stage in STAGES}
    ctx = Context(cfg, env, runtime, run_dir, train, val, test, classes, normalizer, models, log,
                  verbose and env.is_main, ways, python)
    for line in header(ctx):
        ctx.echo(line)
    return ctx


def header(ctx: Context) -> list[str]:
    """The lines a run starts with: where it writes, the data's sizes, the decomposition, the device."""
    d, shapes = ctx.decomposition, ctx.models.shapes
    precision = "bf16 autocast" if ctx.runtime.amp_dtype is not None else "fp32"
    processes = f", {ctx.env.world} processes" if ctx.env.world > 1 else ""
    return [f"run directory {ctx.run_dir.path.resolve()}",
            f"data {ctx.cfg.data.name}: {len(ctx.train):,} train, {len(ctx.val):,} val, {len(ctx.test):,} test images "
            f"{list(shapes.image_size)} x {shapes.in_channels} channel(s), {len(ctx.classes)} classes",
            f"grid {list(d.grid)}: {d.n_subdomains} subimages of {list(d.subimage_size)}, backbone "
            f"{ctx.cfg.model.backbone}",
            f"device {device_name(ctx.runtime.device)} ({ctx.runtime.device}, {precision}){processes}"]


def _no_log(record: dict) -> None:
    """Ranks > 0 log nothing: rank 0 writes the metrics."""
