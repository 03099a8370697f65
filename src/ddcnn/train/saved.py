"""A finished run, loaded back from its directory: the config, the data facts and every trained model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ddcnn.build import Models, Shapes, meta_model, stage_model, weight_shapes
from ddcnn.config import STAGES, from_dict
from ddcnn.data.loading import Normalizer
from ddcnn.errors import CheckpointError, ConfigError, DDCNNError, did_you_mean
from ddcnn.models import CNNDNN, LocalEnsemble
from ddcnn.models.family import is_import_path
from ddcnn.models.settings import check_model_settings
from ddcnn.shards import shard_range
from ddcnn.strategies import STRATEGIES, predictors
from ddcnn.train import dist
from ddcnn.train.admit import check_processes
from ddcnn.train.budget import check_budget
from ddcnn.train.dist import DistEnv, slice_state
from ddcnn.train.model_parallel import CNNDNNState, ShardedCNNDNN, ShardedLocalCNNs
from ddcnn.train.rundir import RunDir
from ddcnn.train.runfiles import DATA_FACTS, RESULTS, fix_for
from ddcnn.train.runtime import make_runtime

SHARDED = ("local", "coherent", "transfer")  # loaded as each process's shard of the local CNNs under torchrun


class SavedRun:
    """Models of a run directory, ready to predict. ``strategies()`` maps each available strategy to a function
    ``normalised images -> (global scores (B, K), local logits (B, N, K) or None)``."""

    def __init__(self, path: str | Path, device: str | None = None, env: DistEnv | None = None,
                 trust_code: bool = False):
        """``env``: under torchrun, each process loads only its shard of the local CNNs (and the whole DNN and
        global CNN); every function of :meth:`strategies` must then be called by all processes together.
        ``trust_code``: import a backbone that the run's config.yaml names by import path (refused otherwise,
        before anything is imported: a run directory is data)."""
        self.env = env or DistEnv()
        self.run_dir = RunDir(path)
        if not self.run_dir.is_run:
            raise CheckpointError(f"{str(path)!r} is not a ddcnn run directory (no ddcnn-run.json); give the --out "
                                  f"of a `ddcnn run`")
        self.run_dir.read_marker()
        raw = self.run_dir.read_config()  # checked: a valid config
        # --device is the user's own value: its errors are the user's
        self.cfg = from_dict(raw if device is None else {**raw, "device": device})
        config = str(self.run_dir.path / "config.yaml")
        try:
            check_model_settings(self.cfg.model, self.cfg.combiner, trust_code, repr(config))
        except ConfigError as err:
            if not trust_code and is_import_path(self.cfg.model.backbone):
                raise  # the refusal of untrusted code, as it is
            raise CheckpointError(f"{config!r} is not a valid config ({err}); {fix_for('config.yaml')}") from None
        facts = self.run_dir.read_json("data.json", DATA_FACTS)
        self.classes = list(facts["classes"])
        self.shapes = Shapes(facts["in_channels"], len(self.classes), tuple(facts["image_size"]))
        if len(facts["normalizer"]["mean"]) != facts["in_channels"] or \
                len(facts["normalizer"]["std"]) != facts["in_channels"]:
            raise CheckpointError(f"{str(self.run_dir.path / 'data.json')!r} is corrupt (its normalizer does not have "
                                  f"one mean and std per channel); {fix_for('data.json')}")
        self.normalizer = Normalizer.from_state(facts["normalizer"])
        self.best = self.run_dir.read_json("results.json", RESULTS, optional=True)
        self.runtime = make_runtime(self.cfg, self.env)
        try:
            self.models = Models(self.cfg, self.shapes)
        except DDCNNError as err:
            raise CheckpointError(f"{str(self.run_dir.path / 'config.yaml')!r} does not fit the run's data.json "
                                  f"({err}); {fix_for('config.yaml')}") from None
        self.decomposition = self.models.decomposition
        ckpt = self.run_dir.checkpoints
        done = [stage for stage in STAGES if ckpt.has(stage) and ckpt.state(stage)["done"]]
        check_processes(self.cfg, self.models, self.env, [stage for stage in done if stage in SHARDED])
        check_budget(self.cfg, self.models, self.runtime.device, training=False, stages=done, world=self.env.world)
        dist.init(self.env, self.runtime.device.type)
        self.trained: dict[str, nn.Module] = {}
        for stage in done:
            weights, _, _ = ckpt.load(stage)
            ckpt.check_weights(stage, weights, weight_shapes(stage, meta_model(self.models, stage)))
            self.trained[stage] = self._load(stage, weights).to(self.runtime.device).eval()
        if not self.trained:
            raise CheckpointError(f"{str(path)!r} has no finished stage to evaluate; run (or --resume) it first")

    def _load(self, stage: str, weights: dict) -> nn.Module:
        """``stage``'s model with ``weights`` (checked): the whole model, or under torchrun this process's part of
        the local CNNs and CNN-DNNs (both saved with the local CNNs stacked, whatever the backend and process count)."""
        sharded = self.env.enabled and stage in SHARDED
        if not sharded:
            model = stage_model(self.models, stage)
            if isinstance(model, LocalEnsemble):
                model.load_stacked_state_dict(weights)
            elif isinstance(model, CNNDNN):
                CNNDNNState(model).load_weights(weights)
            else:
                model.load_state_dict(weights)
            return model
        shard = shard_range(self.models.n_local, self.env.rank, self.env.world)
        ensemble = self.models.ensemble(shard)
        if stage == "local":
            ensemble.load_stacked_state_dict(slice_state(weights, self.models.n_local, shard))
            return ShardedLocalCNNs(self.decomposition, ensemble, self.env)
        model = ShardedCNNDNN(self.decomposition, ensemble, self.models.dnn(stage), self.env)
        CNNDNNState(model, self.env).load_weights(weights)
        return model

    def strategies(self) -> dict:
        """Every strategy this run trained: name -> ``normalised images -> (scores (B, K), local logits or None)``."""
        return predictors(self.trained, self.decomposition, self.shapes.num_classes)

    def strategy(self, name: str | None):
        """The named strategy's function, or the best one of results.json (else the first available)."""
        available = self.strategies()
        if name is None:
            best = (self.best or {}).get("best_strategy")
            name = best if best in available else next(iter(available))
        if name not in available:
            if name not in STRATEGIES:
                raise ConfigError(f"unknown strategy {name!r}{did_you_mean(str(name), STRATEGIES)}; this run has: "
                                  f"{', '.join(available)}")
            raise ConfigError(f"strategy {name!r} was not trained in this run; available: {', '.join(available)}")
        return name, available[name]

    def run_batches(self, fn, images: torch.Tensor, batch_size: int = 512):
        """``fn`` over float images ``(M, C, *size)`` in [0, 1]: returns (scores (M, K), local logits or None)."""
        return self.runtime.predict(fn, images, self.normalizer, batch_size)
