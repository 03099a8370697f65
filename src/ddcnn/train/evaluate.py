"""``ddcnn evaluate`` and ``ddcnn predict``: using a finished run's models."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ddcnn.checks import choice
from ddcnn.data.loading import to_float
from ddcnn.data.readers import read_image_file, read_volume_file
from ddcnn.errors import DataError
from ddcnn.models.deployed import scores_to_probabilities
from ddcnn.train.best import best_strategy, strategy_metrics
from ddcnn.train.context import accuracy
from ddcnn.train.dist import DistEnv
from ddcnn.train.runtime import device_name
from ddcnn.train.saved import SavedRun
from ddcnn.train.scoring import score_strategies


def evaluate_run(run_dir, device: str | None = None, env: DistEnv | None = None,
                 trust_code: bool = False, data_root: str | None = None) -> dict | None:
    """Validation and test accuracy of every saved strategy, recomputed from the checkpoints through the
    protocol's scoring path; written to ``evaluation.json``.

    Under torchrun (``env``) each process holds its shard of the local CNNs and all compute together; rank 0
    writes the file and returns the results, the others None. ``trust_code``, ``data_root``: see :class:`SavedRun`.
    """
    run = SavedRun(run_dir, device, env, trust_code, data_root)
    _, val, test = run.data()
    splits = {"val": val, "test": test} if len(val) else {"test": test}
    scores = {split: score_strategies(run.trained, run.decomposition, run.shapes.num_classes, run.run_batches,
                                      to_float(data.images), run.env)[0] for split, data in splits.items()}
    if not run.env.is_main:
        return None
    previous = run.best or {}  # the evaluation stands on its own without results.json
    strategies = {}
    for name in scores["test"]:
        old = previous.get("strategies", {}).get(name, {})
        strategies[name] = {
            "val_accuracy": accuracy(scores["val"][name], val.labels) if "val" in scores else None,
            "test_accuracy": accuracy(scores["test"][name], test.labels), "train_seconds": old.get("train_seconds"),
            "parameters": old.get("parameters"), "flops_per_image": old.get("flops_per_image"),
            **strategy_metrics(name, {s: scores[s][name] for s in scores}, splits, run.classes)}
    best, basis = best_strategy(strategies, run.cfg.evaluation.metric) if "val" in scores else (None, None)
    results = {"dataset": run.cfg.data.name, "grid": list(run.decomposition.grid), "best_strategy": best,
               "best_strategy_basis": basis,
               "overlap": list(run.decomposition.overlap), "device_name": device_name(run.runtime.device),
               "torch_version": torch.__version__,
               "strategies": strategies}
    run.run_dir.write_json("evaluation.json", results)
    return results


def read_input(path: Path, size: tuple[int, ...], channels: int, dataset: str, window,
               notes: list[str] | None = None) -> torch.Tensor:
    """One file as a float image ``(C, *size)`` in [0, 1], prepared as the training data of ``dataset`` (a data
    config's name; ``window``: its intensity window for volumes) was. A picture of other channels or another size
    is converted and fitted as image-folder data is, with a line in ``notes``."""
    if len(size) == 3:
        if dataset == "volume-folder":
            return read_volume_file(path, size, window)
        x = read_volume_file(path, None, None)
    else:
        x = read_image_file(path, size, channels, [] if notes is None else notes)
    x = to_float(x)
    if not torch.isfinite(x).all():
        raise DataError(f"{path} contains NaN or infinite values; give a file with finite pixel values")
    if x.dim() == len(size):
        x = x.unsqueeze(0)
    if x.shape[0] != channels:
        raise DataError(f"{path} has {x.shape[0]} channel(s) but the run's models take {channels}; give "
                        f"{'grey' if channels == 1 else 'RGB'} images")
    if tuple(x.shape[1:]) != tuple(size):
        raise DataError(f"{path} is {list(x.shape[1:])} but the run's models take {list(size)}; resize it first")
    return x


@dataclass
class Predictions:
    """What ``ddcnn predict`` found: per file its class and the probability of every class, and per subdomain its
    vote (``rows``, one dict per file); ``notes`` say how inputs were converted to what the models take."""

    strategy: str
    classes: list[str]
    rows: list[dict]
    notes: list[str] = field(default_factory=list)
    origin: str | None = None  # where the strategy came from when not a run directory, e.g. "exported: m.onnx"


def predict_files(run_dir, files, strategy: str | None = None, device: str | None = None,
                  env: DistEnv | None = None, trust_code: bool = False) -> Predictions | None:
    """The chosen strategy's class and probabilities for each file, and each subdomain's vote (under torchrun,
    ``env``: computed by all processes together, returned on rank 0, None elsewhere). ``trust_code``: see
    :class:`SavedRun`."""
    run = SavedRun(run_dir, device, env, trust_code)
    name, fn = run.strategy(strategy)
    notes: list[str] = []
    images = torch.stack([read_input(Path(f), run.shapes.image_size, run.shapes.in_channels, run.cfg.data.name,
                                     run.cfg.data.window, notes) for f in files])
    scores, local = run.run_batches(fn, images)
    if not run.env.is_main:
        return None
    probs = scores_to_probabilities(scores.float(), shares=name == "majority_vote")  # as an exported model gives
    rows = []
    for i, f in enumerate(files):
        k = int(scores[i].argmax())
        row = {"file": str(f), "strategy": name, "class": run.classes[k], "class_index": k, "output": output(name),
               "probabilities": {c: round(float(p), 6) for c, p in zip(run.classes, probs[i].tolist())}}
        if local is not None:
            sub = local[i].softmax(-1)
            votes = sub.argmax(-1).tolist()
            row["subdomains"] = [{"subdomain": j, "location": run.decomposition.locations[j].tolist(),
                                  "class": run.classes[c], "class_index": c, "probability": round(float(sub[j, c]), 6)}
                                 for j, c in enumerate(votes)]
        rows.append(row)
    return Predictions(name, list(run.classes), rows, notes)


FORMATS = ("text", "json", "csv")


def output(strategy: str) -> str:
    """What a strategy's per-class numbers are, in predict's JSON and the export's sidecar alike."""
    return "vote shares" if strategy == "majority_vote" else "probabilities"


VOTE_SHARES = ("each class's share of the N local CNNs' votes (votes / N: 4 of 4 is 1.000, 2 of 4 is 0.500), plus "
               "a tie-break below 1e-6 that orders classes with as many votes; the argmax is the vote's decision")


def format_predictions(pred: Predictions, fmt: str = "text") -> str:
    """``text``: one line per file (class and its probability) and one per subdomain vote; ``json``: a list of
    one object per file (``file``, ``strategy``, ``class``, ``class_index``, ``output``, ``probabilities`` by class
    name, ``subdomains``); ``csv``: a header row, then one row per file with a ``p(<class>)`` column per class
    (``share(<class>)`` for majority vote, whose numbers are vote shares, :func:`output`)."""
    choice("--format", fmt, FORMATS)
    if fmt == "json":
        return json.dumps(pred.rows, indent=1)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        column = "share" if pred.strategy == "majority_vote" else "p"
        writer.writerow(["file", "strategy", "class", "class_index", *(f"{column}({c})" for c in pred.classes)])
        for row in pred.rows:
            writer.writerow([row["file"], row["strategy"], row["class"], row["class_index"],
                             *(f"{row['probabilities'][c]:.6f}" for c in pred.classes)])
        return out.getvalue().rstrip("\n")
    what = "vote share" if pred.strategy == "majority_vote" else "p"
    lines = [f"strategy: {pred.strategy}" + (f" ({pred.origin})" if pred.origin else "")]
    for row in pred.rows:
        lines.append(f"{row['file']}: {row['class']} (class {row['class_index']}, "
                     f"{what}={row['probabilities'][row['class']]:.3f})")
        for sub in row.get("subdomains", []):
            lines.append(f"  subdomain {sub['subdomain']} {sub['location']}: {sub['class']} "
                         f"(p={sub['probability']:.3f})")
    return "\n".join(lines)
