"""The protocol from Python, on your own ``torch.utils.data.Dataset``s: :func:`fit`, then :func:`evaluate`,
:func:`predict` and :func:`export` of the finished run.

``fit`` writes the same run directory as ``ddcnn run`` (config.yaml, checkpoints, metrics, results.json, the
report), so ``load_run``, ``resume=True`` and the report work as for a CLI run; data.json and results.json say the
data came from Python, with a fingerprint of every dataset. The datasets are read as :mod:`ddcnn.data.python`
describes (held in memory, or streamed through ``DataLoader`` workers).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ddcnn.config import Config, from_dict, load_config, to_dict
from ddcnn.data.loading import to_float
from ddcnn.data.python import PythonData, prepare, read_split
from ddcnn.data.samples import as_sample
from ddcnn.errors import CheckpointError, ConfigError, DataError
from ddcnn.export import CHECK_IMAGES, Exported, export_run
from ddcnn.finished.run import Run, load_run
from ddcnn.paths import user_path
from ddcnn.report import format_table
from ddcnn.train import dist
from ddcnn.train.admit import admit_run_dir
from ddcnn.train.evaluate import evaluate_run
from ddcnn.train.protocol import Experiment
from ddcnn.train.store.rundir import MARKER, RunDir
from ddcnn.train.store.schema import DATA_FACTS

COMMAND = "ddcnn.fit (Python)"


def fit(train, test, *, val=None, classes: Sequence[str] | None = None, transform=None,
        config: str | Path | Mapping | Config | None = None,
        overrides: Mapping[str, object] | Sequence[str] | None = None, out: str | Path | None = None,
        load: str = "auto", preprocessing: str | Mapping | None = None, resume: bool = False, force: bool = False,
        verbose: bool = True, trust_code: bool = False) -> Run | None:
    """Run the protocol (every enabled stage, the evaluation, the report) on map-style datasets of ``(image,
    label)`` pairs, into the run directory ``out`` (default ``runs/<config name>``); returns the finished run
    (:class:`~ddcnn.finished.run.Run`), or None on the ranks > 0 of a torchrun launch.

    - ``train``, ``test``, ``val``: images ``(C, H, W)`` or volumes ``(C, D, H, W)`` as tensors, numpy arrays or
      PIL images, uint8 (0-255) or floats, all of one size; labels integers ``0..K-1``. Without ``val`` the
      validation split is taken from ``train`` by ``data.val_fraction``.
    - ``classes``: one name per label (default: ``train.classes`` where the dataset has it, else ``0..K-1``).
    - ``transform``: applied to every training image, every epoch, per sample (random augmentation: torchvision
      v2, MONAI, torchio); it must keep the image's size and kind. ddcnn's batched augmentation
      (``data.augment``) stays available besides.
    - ``config``: a YAML file, a mapping or a :class:`~ddcnn.config.Config` (default: the defaults);
      ``overrides``: ``{"stages.*.epochs": 2}`` or ``["stages.*.epochs=2"]``, as ``--set`` gives them. The data
      section's reading options hold (``val_fraction``, ``split_seed``, ``limit_train``, ``limit_test``,
      ``workers``, ``augment``); its ``name`` becomes ``python``.
    - ``load``: ``auto``, ``memory`` or ``stream`` (:mod:`ddcnn.data.python`); ``preprocessing``: what you
      declare about how the Dataset prepares images (text or a JSON-able mapping), recorded in data.json and in
      the sidecar of an export.
    - ``resume``, ``force``: as ``--resume`` and ``--force``; a resumed run must be given the same datasets (their
      fingerprints are compared). ``trust_code``: as ``--trust-code`` for a config file inside a run directory.

    Every dataset is read and checked before anything is written: a bad sample (wrong shape, mixed sizes, label
    out of range, NaN) is one :class:`~ddcnn.errors.DDCNNError` naming it. Under torchrun every process calls
    ``fit`` with the same datasets.
    """
    cfg, trusted, source = _config(config, overrides, trust_code)
    if preprocessing is not None:
        try:
            preprocessing = json.loads(json.dumps(preprocessing))
        except (TypeError, ValueError):
            raise ConfigError(f"preprocessing = {preprocessing!r} must be text or a mapping of plain values "
                              f"(JSON)") from None
    out = user_path(out, "out") if out is not None else Path("runs") / cfg.name
    env = dist.env_from_environment()
    if not resume and env.is_main and not dist.is_restart():  # an --out taken is refused before the data are read
        admit_run_dir(RunDir(out), cfg, resume=False, force=force)
    python = prepare(train, test, val, data=cfg.data, seed=cfg.seed, classes=classes, transform=transform,
                     load=load, preprocessing=preprocessing)
    if resume:
        _check_same_data(out, python)
    if verbose and env.is_main:
        print(python.summary(), flush=True)
    results = Experiment(cfg, out, resume=resume, force=force, command=COMMAND, verbose=verbose, trusted=trusted,
                         source=source, python=python).run()
    if results is None:
        return None
    if verbose:  # what `ddcnn run` prints at the end
        print(format_table(results))
        print(f"report: {out / 'report.md'}")
    return load_run(out, trust_code=True)  # the models this call trained: its own code


def _config(config, overrides, trust_code: bool) -> tuple[Config, bool, str]:
    """The run's config with ``data.name = python``; whether an imported backbone may be imported, and the
    config's name for that refusal."""
    if overrides is None:
        expressions: list[str] = []
    elif isinstance(overrides, Mapping):
        expressions = [f"{key}={json.dumps(value)}" for key, value in overrides.items()]  # JSON is YAML
    elif isinstance(overrides, Sequence) and not isinstance(overrides, str):
        expressions = [str(e) for e in overrides]
    else:
        raise ConfigError(f"overrides = {overrides!r} must be a mapping {{'stages.*.epochs': 2}} or a list of "
                          f"'key=value' strings")
    expressions.append("data.name=python")
    trusted, source = True, "the config given to ddcnn.fit"
    if config is None or isinstance(config, Mapping):
        return from_dict(dict(config or {}), expressions), trusted, source
    if isinstance(config, Config):
        return from_dict(to_dict(config), expressions), trusted, source
    path = user_path(config, "config")
    # A config inside a run or study directory is data someone may have sent, as on the command line.
    if not trust_code and path.resolve().parent.joinpath(MARKER).exists():
        trusted, source = False, repr(str(path))
    return load_config(path, expressions), trusted, source


def _check_same_data(out: Path, python: PythonData) -> None:
    """A resumed run is given the datasets it was trained on: every fingerprint as data.json records it."""
    run_dir = RunDir(out)
    facts = run_dir.read_json("data.json", DATA_FACTS, optional=True) if run_dir.is_run else None
    if facts is None:
        return  # nothing recorded yet: the run directory's own checks say what is wrong
    saved = (facts.get("python") or {}).get("fingerprints") or {}
    if not saved:
        raise CheckpointError(f"resume: {str(out)!r} holds a run on data read by the config ({facts.get('train')} "
                              f"training images), not from Python; resume it with `ddcnn run ... --resume`")
    for name, fingerprint in python.facts["fingerprints"].items():
        if saved.get(name) != fingerprint:
            raise CheckpointError(f"resume: the {name} dataset differs from the one the run was trained with "
                                  f"(fingerprint {fingerprint[:19]}... now, {str(saved.get(name))[:19]}... in "
                                  f"data.json); resume with the run's own datasets, or start a new run")


def _run(run: Run | str | Path, device: str | None = None) -> Run:
    return run if isinstance(run, Run) else load_run(run, device, trust_code=True)


def _python_facts(run: Run) -> dict:
    return RunDir(run.path).read_json("data.json", DATA_FACTS).get("python") or {}


def evaluate(run: Run | str | Path, test, val=None, *, workers: int = 2, device: str | None = None) -> dict:
    """Validation (``val``, when given) and test accuracy of every strategy of ``run`` (a :class:`Run` or its
    folder) on datasets given again, through the protocol's scoring path; written to ``evaluation.json``, as
    ``ddcnn evaluate`` does. ``same_data`` says, per dataset, whether its fingerprint is the one the run recorded."""
    run = _run(run, device)
    facts = _python_facts(run)
    shape = (run.in_channels, *run.image_size)
    uint8 = facts.get("dtype") == "uint8"
    splits, fingerprints = {}, {}
    for name, dataset in (("val", val), ("test", test)):
        if dataset is not None:
            splits[name], fingerprints[name] = read_split(dataset, name, shape, uint8, len(run.classes),
                                                          run.config.seed, workers, run.classes)
    results = evaluate_run(run.path, device, trust_code=True, splits=splits)
    assert results is not None  # one process
    saved = facts.get("fingerprints") or {}
    results["same_data"] = {name: saved.get(name) == fingerprint for name, fingerprint in fingerprints.items()}
    return results


def predict(run: Run | str | Path, images, strategy: str | None = None, batch_size: int = 256) -> torch.Tensor:
    """Class probabilities ``(M, K)`` (vote shares for majority vote) of ``strategy`` (default the run's best) for
    ``images``: a tensor ``(M, C, *size)`` or a Dataset of ``(image, label)`` pairs, prepared as the training
    Dataset prepared its images."""
    run = _run(run)
    name = strategy or run.best_strategy
    if name not in run.models:
        raise ConfigError(f"strategy {name!r} was not trained in this run; available: {', '.join(run.models)}")
    images = _images(images)
    shape = (run.in_channels, *run.image_size)
    if tuple(images.shape[1:]) != shape:
        raise DataError(f"the run's models take images (M, {', '.join(map(str, shape))}), got {list(images.shape)}")
    model = run.models[name]
    device = next(model.parameters()).device
    with torch.no_grad():
        return torch.cat([model(to_float(images[i:i + batch_size]).float().to(device)).cpu()
                          for i in range(0, len(images), batch_size)])


def export(run: Run | str | Path, strategy: str | None = None, format: str = "pt2", out: str | Path | None = None,
           layout: str | None = None, images=None) -> Exported:
    """``ddcnn export`` from Python: one strategy as a .pt2 or .onnx file with its JSON sidecar, checked against
    the run on ``images`` (a tensor or Dataset as :func:`predict` takes; default: random images with the training
    data's statistics). The sidecar says the preprocessing is the user's own and what ``fit`` was told of it."""
    run = _run(run)
    return export_run(run.path, strategy, format, Path(out) if out is not None else None, layout, trust_code=True,
                      images=_images(images, CHECK_IMAGES) if images is not None else None)


def _images(images, limit: int | None = None) -> torch.Tensor:
    """A tensor ``(M, C, *size)`` as it is, or the images of a Dataset of ``(image, label)`` pairs (the first
    ``limit``) stacked."""
    if isinstance(images, torch.Tensor):
        return images
    count = len(images) if limit is None else min(len(images), limit)
    return torch.stack([as_sample(images[i], f"images[{i}]")[0] for i in range(count)])
