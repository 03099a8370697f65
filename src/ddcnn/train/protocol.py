"""The paper's protocol as stages: global, local, combine, coherent, transfer; then one test evaluation.

Each stage trains with :func:`ddcnn.train.loop.fit`, which checkpoints every epoch, so a killed run continues with
``--resume`` where it stopped, and finished stages are loaded, not retrained.
"""

from __future__ import annotations

import copy
import json
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn

import ddcnn
from ddcnn.config import STAGES, Config
from ddcnn.data.loading import Augment, Normalizer, make_batches, split_dataset, to_float
from ddcnn.data.readers import ImageDataset
from ddcnn.data.select import load_datasets
from ddcnn.errors import ConfigError
from ddcnn.models import (
    CNNDNN,
    LocalEnsemble,
    MajorityVote,
    MeanProbability,
    count_parameters,
    forward_flops,
    local_loss,
    transfer_cnn_dnn,
)
from ddcnn.train import distributed
from ddcnn.train.build import Models, Shapes, device_name, make_runtime
from ddcnn.train.distributed import DataParallelSync, DistEnv, EnsembleSaver, ShardSync, shard_range
from ddcnn.train.loop import epoch_seed, fit, make_optimizer
from ddcnn.train.rundir import RunDir

STRATEGIES = ("global", "cnn_dnn", "mean_probability", "majority_vote", "coherent", "transfer")


class TensorBatches:
    """Shuffled batches of in-memory tensors (the combine stage's local logits); order from (seed, epoch)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
        self.x, self.y, self.batch_size, self.seed, self.epoch = x, y, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(epoch_seed(self.seed, "batches", self.epoch))
        order = torch.randperm(len(self.y), generator=g).to(self.x.device)
        for i in range(len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x[index], self.y[index]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


def confusion(predicted: torch.Tensor, labels: torch.Tensor, k: int) -> list[list[int]]:
    return torch.bincount(labels * k + predicted, minlength=k * k).view(k, k).tolist()


class Experiment:
    """One run of the protocol into a run directory."""

    def __init__(self, cfg: Config, out, resume: bool = False, force: bool = False, command: str = "",
                 verbose: bool = True, log=None, env: DistEnv | None = None):
        self.env = env or distributed.env_from_environment()
        self.cfg, self.run_dir, self.command = cfg, RunDir(out), command
        self.verbose = verbose and self.env.is_main  # only rank 0 prints
        self.print = log or (lambda line: print(line, flush=True))  # flushed: one line per epoch in a log file
        self.runtime = make_runtime(cfg, self.env)
        # A worker that torchrun restarted continues from the checkpoints of its own launch.
        self.resume = resume or (distributed.is_restart() and self.run_dir.launched_by(distributed.launch_id()))
        self.force = force
        self.trained: dict[str, nn.Module] = {}
        self.seconds: dict[str, float] = {}
        self.histories: dict[str, list] = {}
        for stage in ("combine", "transfer"):
            if cfg.stages.get(stage).enabled and not cfg.stages.local.enabled:
                raise ConfigError(f"stage {stage!r} needs the trained local CNNs: enable stages.local or disable "
                                  f"stages.{stage}")

    # ------------------------------------------------------------------------------------------- set-up
    def setup(self) -> None:
        cfg = self.cfg
        train_full, self.test = load_datasets(cfg.data)
        self.train, self.val = split_dataset(train_full, cfg.data.val_fraction, cfg.data.split_seed)
        self.classes = list(train_full.classes)
        self.normalizer = Normalizer.fit(self.train.images)
        self.shapes = Shapes(self.train.in_channels, len(self.classes), self.train.image_size)
        self.models = Models(cfg, self.shapes)
        self.decomposition = self.models.decomposition
        if self.env.enabled and self.cfg.stages.local.enabled and self.env.world > self.n_local:
            raise ConfigError(
                f"{self.env.world} processes but only {self.n_local} local CNNs (grid "
                f"{list(self.decomposition.grid)}): every process trains at least one local CNN; start at most "
                f"{self.n_local} processes (--nproc-per-node) or use a finer grid"
            )
        distributed.init(self.env, self.runtime.device.type)
        if self.env.is_main:
            self.run_dir.prepare(cfg, self.resume, self.force, launch=distributed.launch_id())
            self.run_dir.write_json("data.json", {
                "classes": self.classes, "in_channels": self.shapes.in_channels,
                "image_size": list(self.shapes.image_size), "normalizer": self.normalizer.state_dict(),
                "train": len(self.train), "val": len(self.val), "test": len(self.test),
            })
        self.env.barrier()  # the other ranks read the run directory that rank 0 prepared

    def batches(self, ds: ImageDataset, stage: str, parts: int = 1):
        """Training batches of ``stage``; ``parts``: the processes each batch will be split among."""
        a = self.cfg.data.augment
        batch_size = self.cfg.stages.get(stage).batch_size
        # BatchNorm cannot train on one image (one value per channel): a last batch that would leave some part
        # with fewer than two images is left out.
        remainder = len(ds) % batch_size
        return make_batches(
            ds, batch_size, self.runtime.device, shuffle=True, drop_last=0 < remainder < 2 * parts,
            augment=Augment(a.crop_padding, a.hflip), normalizer=self.normalizer,
            seed=self.cfg.seed, workers=self.cfg.data.workers,
            limit_bytes=int(self.cfg.data.device_resident_limit_gb * 2**30),
        )

    def predict(self, fn, images: torch.Tensor) -> torch.Tensor:
        """``fn`` on normalised images in eval batches: ``(M, C, *size) -> (M, ...)`` float32 on the CPU."""
        return self.runtime.predict(fn, images, self.normalizer, self.cfg.eval_batch_size)

    def _val_scores(self, logits: torch.Tensor) -> dict:
        return {"val_loss": F.cross_entropy(logits, self.val.labels).item(),
                "val_accuracy": accuracy(logits, self.val.labels)}

    def _val_metrics(self, fn) -> dict:
        if len(self.val) == 0:
            return {"val_loss": None, "val_accuracy": None}
        return self._val_scores(self.predict(fn, self.val.images))

    def _log(self, record: dict) -> None:
        self.run_dir.append_metrics(record)
        writer = self._tensorboard()
        if writer is not None:
            for key, value in record.items():
                if isinstance(value, float):
                    writer.add_scalar(f"{record['stage']}/{key}", value, record["epoch"])
            writer.flush()
        if self.verbose:
            val = record.get("val_accuracy")
            val = f"{100 * val:6.2f}%" if val is not None else "   n/a"
            self.print(f"[{record['stage']:>8}] epoch {record['epoch']:3d}  loss {record['train_loss']:.4f}  "
                       f"train {100 * record['train_accuracy']:6.2f}%  val {val}  {record['seconds']:7.1f}s")

    def _tensorboard(self):
        """A SummaryWriter into ``tensorboard/`` when the tensorboard package is installed, else None."""
        if not hasattr(self, "_writer"):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                self._writer = None
            else:
                self._writer = SummaryWriter(str(self.run_dir.path / "tensorboard"))
        return self._writer

    def _prepare(self, model: nn.Module) -> nn.Module:
        return self.runtime.prepare(model, self.models.dims)

    def _compiled(self, model: nn.Module):
        return torch.compile(model) if self.cfg.compile else model

    def _fit(self, stage: str, model: nn.Module, loss_fn, batches, evaluate, clip=None, loss_scale=1.0,
             saver=None, sync=None, extra_state=None) -> dict:
        if clip is None:  # one gradient norm over the whole model (the local stage clips per local CNN)
            def clip(max_norm):
                nn.utils.clip_grad_norm_(model.parameters(), max_norm)

        state = fit(stage, model, loss_fn, batches, evaluate, self.cfg.stages.get(stage), self.run_dir.checkpoints,
                    self.runtime, self.cfg.seed, self._log, clip=clip, verbose=self.verbose, loss_scale=loss_scale,
                    saver=saver, sync=sync, extra_state=extra_state)
        self.seconds[stage] = state["seconds"]
        self.histories[stage] = state["history"]
        self.trained[stage] = model
        return state

    def _data_parallel(self, stage: str, model: nn.Module):
        """``(module to run, batches, sync)``: DistributedDataParallel over the ranks, or the model itself."""
        batches = self.batches(self.train, stage, parts=self.env.world)
        if not self.env.enabled:
            return self._compiled(model), batches, None
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.runtime.device.index] if self.runtime.device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=device_ids)
        return self._compiled(ddp), batches.shard(self.env.rank, self.env.world), DataParallelSync(self.env)

    def _classifier_loss(self, stage: str, forward):
        smoothing = self.cfg.stages.get(stage).label_smoothing

        def loss_fn(x, y):
            out = forward(x)
            return F.cross_entropy(out.float(), y, label_smoothing=smoothing), (out.argmax(-1) == y).sum()

        return loss_fn

    # ------------------------------------------------------------------------------------------- stages
    def stage_global(self) -> None:
        model = self._prepare(self.models.global_cnn())
        run, batches, sync = self._data_parallel("global", model)
        self._fit("global", model, self._classifier_loss("global", run), batches, lambda: self._val_metrics(model),
                  sync=sync)

    def stage_local(self) -> None:
        # This rank's contiguous shard of the local CNNs (all of them in a single process).
        shard = shard_range(self.n_local, self.env.rank, self.env.world)
        ensemble = self._prepare(self.models.ensemble(shard))
        run = self._compiled(ensemble)

        def split(x):  # the subimages of this rank's local CNNs
            return self.decomposition.split(x)[:, shard.start:shard.stop]

        def loss_fn(x, y):
            logits = run(split(x))
            loss, _ = local_loss(logits, y)
            return loss, (logits.argmax(-1) == y[:, None]).sum(0)  # correct per local CNN, (N,)

        def evaluate():
            if len(self.val) == 0:
                return {"val_loss": None, "val_accuracy": None, "val_accuracy_per_subdomain": None}
            logits = self.predict(lambda x: ensemble(split(x)), self.val.images)
            per = (logits.argmax(-1) == self.val.labels[:, None]).float().mean(0)
            per_loss = local_loss(logits, self.val.labels)[1]
            per, per_loss = (torch.cat(parts) for parts in zip(*self.env.all_gather((per, per_loss))))
            return {"val_loss": per_loss.mean().item(), "val_accuracy": per.mean().item(),
                    "val_accuracy_per_subdomain": per.tolist()}

        # Every local CNN sees every image in the same order on any rank: no sharding of the batches.
        batches = self.batches(self.train, "local")
        saver = EnsembleSaver(ensemble, self.env, shard, self.n_local)
        # The loss is the sum over local CNNs; the logged train_loss is their mean, comparable to val_loss.
        state = self._fit("local", ensemble, loss_fn, batches, evaluate, clip=ensemble.clip_grad_norm_,
                          loss_scale=1 / self.n_local, saver=saver, sync=ShardSync(self.env))
        if self.env.enabled:  # every rank now takes all N local CNNs (combine, transfer, the report)
            full = self._prepare(self.models.ensemble())
            full.load_stacked_state_dict(saver.weights())
            self.trained["local"] = full
        timing_file = self.run_dir.path / "local_timing.json"
        if timing_file.is_file():
            self.local_timing = json.loads(timing_file.read_text())
        else:
            self.local_timing = self._critical_path(ensemble, batches, state)
            if self.env.is_main:
                self.run_dir.write_json("local_timing.json", self.local_timing)

    def _critical_path(self, ensemble: LocalEnsemble, batches, state: dict, steps: int = 6) -> dict:
        """Time each local CNN trained alone for a few steps; the slowest, scaled to the stage's steps, is the
        critical path if every local CNN had its own device."""
        cfg = self.cfg.stages.local
        split, per_step = self.decomposition.split, []
        data = []
        batches.set_epoch(1)
        for x, y in batches:
            data.append((split(x), y))
            if len(data) == steps:
                break
        cuda = self.runtime.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.runtime.device.index or 0] if cuda else []):
            for i in range(ensemble.n_local):
                single = copy.deepcopy(ensemble.local_model(i)).train()
                optimizer = make_optimizer(single.parameters(), cfg)
                times = []
                for sub, y in data:
                    self.runtime.synchronize()
                    start = time.perf_counter()
                    with self.runtime.autocast():
                        loss = F.cross_entropy(single(sub[:, ensemble.indices[i]]).float(), y)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    self.runtime.synchronize()
                    times.append(time.perf_counter() - start)
                per_step.append(sorted(times[1:] or times)[len(times[1:] or times) // 2])  # median after warm-up
        total_steps = cfg.epochs * len(batches)
        slowest = self.env.max(max(per_step))  # each rank timed its own local CNNs
        return {
            "measured_seconds": state["seconds"],
            "critical_path_seconds": slowest * total_steps,
            "processes": self.env.world,
            "critical_path_note": (f"estimated: the slowest local CNN trained alone ({len(data)} timed steps each, "
                                   f"median after one warm-up step) times the stage's {total_steps} steps, i.e. "
                                   f"the local stage's time if each local CNN had its own device"
                                   + (f"; measured with {self.env.world} processes" if self.env.enabled else "")),
        }

    def _frozen_local_logits(self, images: torch.Tensor) -> torch.Tensor:
        ensemble = self.trained["local"].eval()
        return self.predict(lambda x: ensemble(self.decomposition.split(x)), images)

    def stage_combine(self) -> None:
        """The DNN on the frozen local CNNs' probabilities: trained once (on rank 0) and broadcast."""
        if self.env.enabled:
            if self.env.is_main:
                self._train_combiner()
            payload = self.env.broadcast(
                ({k: v.cpu() for k, v in self.trained["combine"].state_dict().items()}, self.seconds["combine"],
                 self.histories["combine"]) if self.env.is_main else None)
            if not self.env.is_main:
                dnn = self._prepare(self.models.dnn("combine"))
                dnn.load_state_dict(payload[0])
                self.trained["combine"], self.seconds["combine"], self.histories["combine"] = dnn, *payload[1:]
            return
        self._train_combiner()

    def _train_combiner(self) -> None:
        dnn = self._prepare(self.models.dnn("combine"))
        ckpt = self.run_dir.checkpoints
        if ckpt.has("combine") and ckpt.state("combine").get("done"):  # finished: fit only loads the DNN
            state = self._fit("combine", dnn, None, None, None)
            self.seconds["combine"] += state.get("feature_seconds", 0.0)
            return
        start = time.perf_counter()
        device = self.runtime.device
        features = self._frozen_local_logits(self.train.images).to(device)
        val_features = self._frozen_local_logits(self.val.images).to(device) if len(self.val) else None
        feature_seconds = time.perf_counter() - start

        def evaluate():
            if val_features is None:
                return {"val_loss": None, "val_accuracy": None}
            with torch.no_grad():
                return self._val_scores(dnn(val_features).float().cpu())

        batches = TensorBatches(features, self.train.labels.to(device), self.cfg.stages.combine.batch_size,
                                self.cfg.seed)
        # The features' time is saved with the stage: a resumed run reports the first run's time.
        state = self._fit("combine", dnn, self._classifier_loss("combine", dnn), batches, evaluate,
                          extra_state={"feature_seconds": feature_seconds})
        self.seconds["combine"] += state.get("feature_seconds", feature_seconds)

    def _cnn_dnn_stage(self, stage: str, model: CNNDNN) -> None:
        model = self._prepare(model)
        run, batches, sync = self._data_parallel(stage, model)
        self._fit(stage, model, self._classifier_loss(stage, run), batches, lambda: self._val_metrics(model),
                  sync=sync)

    def stage_coherent(self) -> None:
        self._cnn_dnn_stage("coherent", self.models.cnn_dnn("coherent"))

    def stage_transfer(self) -> None:
        use_dnn = self.cfg.stages.transfer.init_dnn and "combine" in self.trained
        torch.manual_seed(epoch_seed(self.cfg.seed, "transfer", 0))
        model = transfer_cnn_dnn(self.decomposition, self.trained["local"],
                                 self.trained["combine"] if use_dnn else None, **self._dnn_options())
        self.transfer_used_dnn = use_dnn
        self._cnn_dnn_stage("transfer", model)

    def _dnn_options(self) -> dict:
        c = self.cfg.combiner
        return {"hidden": c.hidden, "activation": c.activation, "dropout": c.dropout}

    # ------------------------------------------------------------------------------------------- evaluation
    def evaluate_test(self) -> dict:
        """Every strategy that was trained, on the test set: accuracy, train time, parameters, FLOPs."""
        labels, k = self.test.labels, len(self.classes)
        shape = (self.shapes.in_channels, *self.shapes.image_size)
        strategies, predictions = {}, {}
        local_result = None

        def add(name, logits, seconds, model_parts, flops):
            predictions[name] = logits.argmax(-1)
            strategies[name] = {"test_accuracy": accuracy(logits, labels), "train_seconds": seconds,
                                "parameters": sum(count_parameters(m) for m in model_parts),
                                "flops_per_image": flops}

        if "global" in self.trained:
            g = self.trained["global"].eval()
            add("global", self.predict(g, self.test.images), self.seconds["global"], [g], forward_flops(g, shape))
        if "local" in self.trained:
            ensemble = self.trained["local"].eval()
            local = self._frozen_local_logits(self.test.images)
            sub_shape = (self.n_local, self.shapes.in_channels, *self.decomposition.subimage_size)
            ensemble_flops = forward_flops(ensemble, sub_shape)
            s_local = self.seconds["local"]
            add("mean_probability", MeanProbability(self.n_local, k)(local), s_local, [ensemble], ensemble_flops)
            add("majority_vote", MajorityVote(self.n_local, k)(local), s_local, [ensemble], ensemble_flops)
            if "combine" in self.trained:
                dnn = self.trained["combine"].eval()
                with torch.no_grad():
                    logits = dnn(local.to(self.runtime.device)).float().cpu()
                add("cnn_dnn", logits, s_local + self.seconds["combine"], [ensemble, dnn],
                    ensemble_flops + forward_flops(dnn, (self.n_local, k)))
            per = (local.argmax(-1) == labels[:, None]).float().mean(0)
            history = self.histories.get("local") or [{}]
            local_result = {"test_accuracy": per.tolist(),
                            "val_accuracy": history[-1].get("val_accuracy_per_subdomain"),
                            **self.local_timing}
        for stage in ("coherent", "transfer"):
            if stage in self.trained:
                m = self.trained[stage].eval()
                seconds = self.seconds[stage]
                if stage == "transfer":
                    seconds += self.seconds["local"] + (self.seconds["combine"] if self.transfer_used_dnn else 0)
                add(stage, self.predict(m, self.test.images), seconds, [m], forward_flops(m, shape))
        ordered = {name: strategies[name] for name in STRATEGIES if name in strategies}
        best = max(ordered, key=lambda name: ordered[name]["test_accuracy"])
        results = {
            "dataset": self.cfg.data.name, "name": self.cfg.name, "image_size": list(self.shapes.image_size),
            "grid": list(self.decomposition.grid), "overlap": list(self.decomposition.overlap),
            "subimage_size": list(self.decomposition.subimage_size), "num_classes": k, "classes": self.classes,
            "backbone": self.cfg.model.backbone, "global_width": self.cfg.model.width,
            "local_width": self.models.local_width, "n_local": self.n_local,
            "device": self.runtime.device.type, "device_name": device_name(self.runtime.device),
            "torch_version": torch.__version__, "ddcnn_version": ddcnn.__version__, "python": platform.python_version(),
            "command": self.command, "seed": self.cfg.seed,
            "data_sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "strategies": ordered, "stage_seconds": dict(self.seconds), "best_strategy": best,
            "transfer_used_dnn": getattr(self, "transfer_used_dnn", None),
            "confusion_matrix": {"strategy": best, "matrix": confusion(predictions[best], labels, k)},
        }
        if local_result is not None:
            results["local"] = local_result
        return results

    @property
    def n_local(self) -> int:
        return self.models.n_local

    # ------------------------------------------------------------------------------------------- all of it
    def run(self) -> dict | None:
        """All enabled stages, then the test evaluation and the report; returns the results (None on ranks > 0)."""
        try:
            self.setup()
            for stage in STAGES:
                if self.cfg.stages.get(stage).enabled:
                    getattr(self, f"stage_{stage}")()
            if not self.env.is_main:
                return None
            return self._finish()
        finally:
            if self.env.enabled:
                distributed.shutdown()

    def _finish(self) -> dict:
        self.run_dir.rewrite_metrics([r for s in STAGES for r in self.histories.get(s, [])])
        results = self.evaluate_test()
        self.run_dir.write_json("results.json", results)
        from ddcnn.report import write_report

        write_report(self.run_dir.path, results, self.run_dir.metrics(), self.decomposition,
                     sample_image=to_float(self.test.images[0]))
        return results
