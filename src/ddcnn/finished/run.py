"""A finished run, loaded back from its directory in one process: the config, the data facts and every trained
model; :func:`load_run` for use from Python and :func:`predict_files` for ``ddcnn predict``. Nothing here trains:
the CNN-DNN checkpoints are read in their whole-model layout (:func:`ddcnn.models.cnn_dnn.load_whole_state`)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ddcnn.build import Models, Shapes, meta_model, stage_model, weight_shapes
from ddcnn.config import STAGES, Config, anchor_paths, from_dict
from ddcnn.data.datasets import load_splits
from ddcnn.data.loading import Normalizer
from ddcnn.data.volumes import volume_recipe
from ddcnn.decomposition import Decomposition
from ddcnn.errors import CheckpointError, ConfigError, DataNotFoundError, DDCNNError, did_you_mean
from ddcnn.finished.predictions import Predictions, prediction_rows, read_inputs, subdomain_votes
from ddcnn.models import CNNDNN, GlobalCNN, LocalEnsemble
from ddcnn.models.cnn_dnn import load_whole_state
from ddcnn.models.combiners import Combiner
from ddcnn.models.deployed import Deployed, Standardise, scores_to_probabilities, with_layout
from ddcnn.models.family import is_import_path
from ddcnn.models.settings import check_model_settings
from ddcnn.sizing import check_memory, stage_sizes
from ddcnn.strategies import STRATEGIES, gives_votes, predictors
from ddcnn.train.runtime import Runtime, make_runtime
from ddcnn.train.store.rundir import RunDir
from ddcnn.train.store.schema import DATA_FACTS, RESULTS, fix_for


class SavedRun:
    """Models of a run directory, ready to predict. ``strategies()`` maps each available strategy to a function
    ``normalised images -> (global scores (B, K), local logits (B, N, K) or None)``.

    One process holds every model; :class:`ddcnn.train.saved.ShardedRun` spreads the local CNNs over the processes
    of a torchrun launch."""

    def __init__(self, path: str | Path, device: str | None = None, trust_code: bool = False,
                 data_root: str | None = None):
        """``trust_code``: import a backbone that the run's config.yaml names by import path (refused otherwise,
        before anything is imported: a run directory is data). ``data_root``: where the data is now (relative to
        the current directory), for a run moved to another machine; else config.yaml's (a relative one, written by
        an earlier version, relative to the run directory, or to the current directory with a note)."""
        if Path(path).suffix in (".pt2", ".onnx") and Path(path).is_file():
            raise CheckpointError(f"{str(path)!r} is a file of `ddcnn export`, not a run directory; run it with "
                                  f"`ddcnn predict` or ddcnn.export.ExportedModel (a .pt2 program only with "
                                  f"--trust-code / trust_code=True; the .onnx file needs none)")
        self.run_dir = RunDir(path)
        if not self.run_dir.is_run:
            raise CheckpointError(f"{str(path)!r} is not a ddcnn run directory (no ddcnn-run.json); give the --out "
                                  f"of a `ddcnn run`")
        self.run_dir.read_marker()
        self.cfg = self._config(device, trust_code, data_root)
        self._read_facts()
        self.best = self.run_dir.read_json("results.json", RESULTS, optional=True)
        self.runtime = self._runtime()
        try:
            self.models = Models(self.cfg, self.shapes)
        except DDCNNError as err:
            raise CheckpointError(f"{str(self.run_dir.path / 'config.yaml')!r} does not fit the run's data.json "
                                  f"({err}); {fix_for('config.yaml')}") from None
        self.decomposition = self.models.decomposition
        ckpt = self.run_dir.checkpoints
        done = [stage for stage in STAGES if ckpt.has(stage) and ckpt.state(stage)["done"]]
        self._admit(done)
        self.trained: dict[str, nn.Module] = {}
        for stage in done:
            weights, _, _ = ckpt.load(stage)
            ckpt.check_weights(stage, weights, weight_shapes(stage, meta_model(self.models, stage)))
            self.trained[stage] = self._load(stage, weights).to(self.runtime.device).eval()
        if not self.trained:
            raise CheckpointError(f"{str(path)!r} has no finished stage to evaluate; run (or --resume) it first")

    def _config(self, device: str | None, trust_code: bool, data_root: str | None) -> Config:
        raw = self.run_dir.read_config()  # checked: a valid config
        raw, sets, notes = anchor_paths(raw, self.run_dir.path / "config.yaml",
                                        [] if data_root is None else [f"data.root={json.dumps(data_root)}"])
        for note in notes if self.is_main else ():
            print(f"ddcnn: note: {note}", file=sys.stderr)
        # --device and --data-root are the user's own values: their errors are the user's
        cfg = from_dict(raw if device is None else {**raw, "device": device}, sets)
        config = str(self.run_dir.path / "config.yaml")
        try:
            check_model_settings(cfg.model, cfg.combiner, trust_code, repr(config))
        except ConfigError as err:
            if not trust_code and is_import_path(cfg.model.backbone):
                raise  # the refusal of untrusted code, as it is
            raise CheckpointError(f"{config!r} is not a valid config ({err}); {fix_for('config.yaml')}") from None
        return cfg

    def _read_facts(self) -> None:
        facts = self.run_dir.read_json("data.json", DATA_FACTS)
        self.classes = list(facts["classes"])
        self.shapes = Shapes(facts["in_channels"], len(self.classes), tuple(facts["image_size"]))
        if len(facts["normalizer"]["mean"]) != facts["in_channels"] or \
                len(facts["normalizer"]["std"]) != facts["in_channels"]:
            raise CheckpointError(f"{str(self.run_dir.path / 'data.json')!r} is corrupt (its normalizer does not have "
                                  f"one mean and std per channel); {fix_for('data.json')}")
        self.normalizer = Normalizer.from_state(facts["normalizer"])

    def _runtime(self) -> Runtime:
        return make_runtime(self.cfg)

    def _admit(self, done: list[str]) -> None:
        """The checks before the finished stages ``done`` are loaded: one process holds every model, for
        evaluation, in the memory free on the device."""
        check_memory(self.cfg, self.models, self.runtime.device, stage_sizes(self.cfg, self.models, done),
                     training=False)

    def _load(self, stage: str, weights: dict) -> nn.Module:
        """``stage``'s whole model with ``weights`` (checked; the local CNNs stacked, whatever the backend)."""
        model = stage_model(self.models, stage)
        if isinstance(model, LocalEnsemble):
            model.load_stacked_state_dict(weights)
        elif isinstance(model, CNNDNN):
            load_whole_state(model, weights)
        else:
            model.load_state_dict(weights)
        return model

    def datasets(self):
        """``(train, val, test)`` as config.yaml's data section reads and splits them, checked against data.json:
        data of other classes, channels or image size would measure another test set than the run's. Data that is
        not there any more is one error naming the run's config.yaml and how to point the run at the data."""
        try:
            train, val, test, _ = load_splits(self.cfg.data)
        except DataNotFoundError as err:
            raise DataNotFoundError(f"{err} (data.root from {str(self.run_dir.path / 'config.yaml')!r}: where the "
                                    f"data is now, give --data-root DIR)") from None
        facts = {"classes": self.classes, "channels": self.shapes.in_channels,
                 "image size": list(self.shapes.image_size)}
        found = {"classes": list(test.classes), "channels": test.in_channels, "image size": list(test.image_size)}
        for what in facts:
            if facts[what] != found[what] or (what == "classes" and list(train.classes) != found[what]):
                raise CheckpointError(
                    f"the data {str(self.run_dir.path / 'config.yaml')!r} names has {what} {found[what]} but the "
                    f"run's data.json records {facts[what]}: the models would be measured on another test set; "
                    f"point data.root at the run's own data, or restore config.yaml and data.json")
        return train, val, test

    def strategies(self) -> dict:
        """Every strategy this run trained: name -> ``normalised images -> (scores (B, K), local logits or None)``."""
        return predictors(self.trained, self.decomposition, self.shapes.num_classes, self.cfg.decomposition.kind)

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

    def model(self, name: str, layout: str | None = None) -> Deployed:
        """Strategy ``name`` as one module, float images ``(B, C, *image_size)`` in [0, 1] -> ``(B, K)`` class
        probabilities (vote shares for a voting strategy), see :class:`Deployed`; ``layout`` of the local CNNs as
        :func:`with_layout` (``None``: the run's own ensemble)."""
        self.strategy(name)  # an unknown or untrained strategy is one error naming the available ones
        standardise = Standardise(self.normalizer.mean, self.normalizer.std, self.decomposition.dims)
        standardise.to(self.runtime.device)
        strategy, model = STRATEGIES[name], self.trained.get(name)
        if isinstance(model, GlobalCNN):
            return Deployed(standardise, model).eval()
        ensemble: nn.Module
        combiner: nn.Module
        if isinstance(model, CNNDNN):
            ensemble, combiner = model.ensemble, model.combiner
        else:
            assert strategy.combiner is not None  # a strategy is a whole-image model, a CNN-DNN or a combination
            ensemble = self.trained["local"]
            combiner = strategy.combiner(self.trained, self.decomposition.n_subdomains, self.shapes.num_classes)
        assert isinstance(ensemble, LocalEnsemble) and isinstance(combiner, Combiner)  # one process: all of them
        return Deployed.combined(standardise, self.decomposition, with_layout(ensemble, layout), combiner).eval()

    @property
    def is_main(self) -> bool:
        """Whether this process speaks for the run (one process: always)."""
        return True

    def run_batches(self, fn, images: torch.Tensor, batch_size: int = 512):
        """``fn`` over float images ``(M, C, *size)`` in [0, 1]: returns (scores (M, K), local logits or None)."""
        return self.runtime.predict(fn, images, self.normalizer, batch_size)


def predict(run: SavedRun, files, strategy: str | None = None) -> tuple[Predictions, torch.Tensor]:
    """The chosen strategy's class and probabilities for each file, and each subdomain's vote. Returns the
    predictions and the scores ``(M, K)`` (under torchrun every process calls it; rank 0's are the ones to show)."""
    name, fn = run.strategy(strategy)
    notes: list[str] = []
    images = read_inputs(files, run.shapes.image_size, run.shapes.in_channels, run.cfg.data.name,
                         volume_recipe(run.cfg.data), notes)
    scores, local = run.run_batches(fn, images)
    probs = scores_to_probabilities(scores.float(), shares=gives_votes(name))  # as an exported model gives
    rows = prediction_rows(files, name, run.classes, scores, probs)
    if local is not None:
        for row, sub in zip(rows, local):
            row["subdomains"] = subdomain_votes(sub, run.classes, run.decomposition.locations)
    return Predictions(name, list(run.classes), rows, notes), scores


def predict_files(run_dir, files, strategy: str | None = None, device: str | None = None,
                  trust_code: bool = False) -> Predictions:
    """``ddcnn predict`` in one process: the chosen strategy's class and probabilities for each file, and each
    subdomain's vote. ``trust_code``: see :class:`SavedRun`."""
    return predict(SavedRun(run_dir, device, trust_code), files, strategy)[0]


@dataclass
class Run:
    """A finished run for use from Python (:func:`load_run`).

    ``models``: every trained strategy as one module, float images ``(B, C, *image_size)`` in [0, 1] (as the
    dataset readers give them) -> ``(B, K)`` class probabilities (vote shares for ``majority_vote``), normalisation
    and decomposition inside, in eval mode (see :class:`ddcnn.models.deployed.Deployed`). ``stages``: the trained
    model of every finished stage as the run saved it (they take normalised images). ``results``: results.json
    (None when the run did not get that far).
    """

    path: Path
    config: Config
    classes: list[str]
    image_size: tuple[int, ...]
    in_channels: int
    normalizer: Normalizer
    decomposition: Decomposition
    results: dict | None
    models: dict[str, Deployed]
    stages: dict[str, nn.Module]

    @property
    def best_strategy(self) -> str:
        """The strategy results.json names as the best, else the first trained one."""
        best = (self.results or {}).get("best_strategy")
        return best if best in self.models else next(iter(self.models))


def load_run(path: str | Path, device: str | None = None, *, trust_code: bool = False) -> Run:
    """The finished run in ``path`` (a ``ddcnn run --out`` folder): its models per strategy, the data facts of
    data.json, the config and results.json. Nothing is unpickled; a config that names its backbone by import
    path is refused unless ``trust_code=True``, as building its models imports and runs that code. ``device``:
    cpu, cuda, cuda:N (default: the run's)."""
    saved = SavedRun(path, device, trust_code=trust_code)
    return Run(path=saved.run_dir.path, config=saved.cfg, classes=list(saved.classes),
               image_size=tuple(saved.shapes.image_size), in_channels=saved.shapes.in_channels,
               normalizer=saved.normalizer, decomposition=saved.decomposition, results=saved.best,
               models={name: saved.model(name) for name in saved.strategies()}, stages=dict(saved.trained))
