"""A finished run, loaded back from its directory: the config, the data facts and every trained model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from torch import nn

from ddcnn.config import from_dict
from ddcnn.data.loading import Normalizer
from ddcnn.errors import CheckpointError, ConfigError, did_you_mean
from ddcnn.models import CNNDNN, LocalEnsemble
from ddcnn.train.build import Models, Shapes
from ddcnn.train.model_parallel import CNNDNNState
from ddcnn.train.rundir import RunDir
from ddcnn.train.runtime import make_runtime
from ddcnn.train.strategies import STRATEGIES, predictors


class SavedRun:
    """Models of a run directory, ready to predict. ``strategies()`` maps each available strategy to a function
    ``normalised images -> (global scores (B, K), local logits (B, N, K) or None)``."""

    def __init__(self, path: str | Path, device: str | None = None):
        self.run_dir = RunDir(path)
        if not self.run_dir.is_run:
            raise CheckpointError(f"{str(path)!r} is not a ddcnn run directory (no ddcnn-run.json); give the --out "
                                  f"of a `ddcnn run`")
        try:
            raw = yaml.safe_load((self.run_dir.path / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            raise CheckpointError(f"{str(path)!r} has no readable config.yaml") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{str(self.run_dir.path / 'config.yaml')!r} does not hold a config (a mapping of "
                                  f"keys to values); restore the run's config.yaml or rerun the experiment")
        if device is not None:
            raw["device"] = device
        self.cfg = from_dict(raw)
        facts = self.run_dir.read_json("data.json")
        try:
            self.classes = list(facts["classes"])
            size = tuple(int(s) for s in facts["image_size"])
            self.shapes = Shapes(int(facts["in_channels"]), len(self.classes), size)
            self.normalizer = Normalizer.from_state(facts["normalizer"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{str(self.run_dir.path / 'data.json')!r} lacks the classes, in_channels, "
                                  f"image_size or normalizer of the run; rerun the experiment (or --resume "
                                  f"it)") from None
        self.runtime = make_runtime(self.cfg)
        self.models = Models(self.cfg, self.shapes)
        self.decomposition = self.models.decomposition
        self.trained: dict[str, nn.Module] = {}
        builders: dict[str, Callable[[], nn.Module]] = {
            "global": self.models.global_cnn, "local": self.models.ensemble, "combine": self.models.dnn,
            "coherent": lambda: self.models.cnn_dnn("coherent"), "transfer": lambda: self.models.cnn_dnn("transfer")}
        ckpt = self.run_dir.checkpoints
        for stage, build in builders.items():
            if not ckpt.has(stage) or not ckpt.state(stage).get("done"):
                continue
            weights, _, _ = ckpt.load(stage)
            model = build()
            try:  # the local CNNs in the stacked layout, whatever the backend and the number of processes
                if isinstance(model, LocalEnsemble):
                    model.load_stacked_state_dict(weights)
                elif isinstance(model, CNNDNN):
                    CNNDNNState(model).load_weights(weights)
                else:
                    model.load_state_dict(weights)
            except RuntimeError:
                raise CheckpointError(f"the {stage!r} checkpoint of {str(path)!r} does not fit the model its "
                                      f"config.yaml describes; was config.yaml edited after the run?") from None
            self.trained[stage] = model.to(self.runtime.device).eval()
        if not self.trained:
            raise CheckpointError(f"{str(path)!r} has no finished stage to evaluate; run (or --resume) it first")

    def strategies(self) -> dict:
        """Every strategy this run trained: name -> ``normalised images -> (scores (B, K), local logits or None)``."""
        return predictors(self.trained, self.decomposition, self.shapes.num_classes)

    def strategy(self, name: str | None):
        """The named strategy's function, or the best one of results.json (else the first available)."""
        available = self.strategies()
        if name is None:
            try:
                name = self.run_dir.read_json("results.json")["best_strategy"]
            except (CheckpointError, KeyError):
                name = next(iter(available))
        if name not in available:
            if name not in STRATEGIES:
                raise ConfigError(f"unknown strategy {name!r}{did_you_mean(str(name), STRATEGIES)}; this run has: "
                                  f"{', '.join(available)}")
            raise ConfigError(f"strategy {name!r} was not trained in this run; available: {', '.join(available)}")
        return name, available[name]

    def run_batches(self, fn, images: torch.Tensor, batch_size: int = 512):
        """``fn`` over float images ``(M, C, *size)`` in [0, 1]: returns (scores (M, K), local logits or None)."""
        return self.runtime.predict(fn, images, self.normalizer, batch_size)
