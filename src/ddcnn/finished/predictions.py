"""Predictions of a finished run or an exported file: input files read as the run's data was, one row per file,
and the formats ``ddcnn predict`` prints."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ddcnn.checks import choice
from ddcnn.data.datasets import PYTHON_DATA
from ddcnn.data.loading import to_float
from ddcnn.data.readers import read_image_file
from ddcnn.data.volume_folder import read_volume_file
from ddcnn.data.volumes import VolumeRecipe
from ddcnn.errors import DataError
from ddcnn.strategies import gives_votes

FORMATS = ("text", "json", "csv")
VOTE_SHARES = ("each class's share of the N local CNNs' votes (votes / N: 4 of 4 is 1.000, 2 of 4 is 0.500), plus "
               "a tie-break below 1e-6 that orders classes with as many votes; the argmax is the vote's decision")


def output(strategy: str) -> str:
    """What a strategy's per-class numbers are, in predict's JSON and CSV and the export's sidecar alike."""
    return "vote shares" if gives_votes(strategy) else "probabilities"


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of ``(M, K)`` scores whose largest class is the label ``(M,)``."""
    return (logits.argmax(-1) == labels).float().mean().item()


def read_input(path: Path, size: tuple[int, ...], channels: int, dataset: str, recipe: VolumeRecipe | None,
               notes: list[str] | None = None) -> torch.Tensor:
    """One file as a float image ``(C, *size)``, prepared as the training data of ``dataset`` (a data config's
    name; ``recipe``: how its volumes were prepared, :func:`ddcnn.data.volumes.volume_recipe`) was. A picture of
    other channels or another size is converted and fitted as image-folder data is, and a volume's orientation
    and spacing are changed as its recipe says, each with a line in ``notes``."""
    if dataset == "python":  # preprocessing of the user's own: no file reader knows it
        raise DataError(PYTHON_DATA.replace("ddcnn.evaluate(run, test)", "ddcnn.predict(run, images)"))
    if len(size) == 3:
        if dataset == "volume-folder" and recipe is not None:
            return read_volume_file(path, recipe, notes)
        x = read_volume_file(path)
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


def read_inputs(files, size: tuple[int, ...], channels: int, dataset: str, recipe: VolumeRecipe | None,
                notes: list[str]) -> torch.Tensor:
    """The files as one batch ``(M, C, *size)`` (see :func:`read_input`)."""
    return torch.stack([read_input(Path(f), size, channels, dataset, recipe, notes) for f in files])


@dataclass
class Predictions:
    """What ``ddcnn predict`` found: per file its class and the probability of every class, and per subdomain its
    vote (``rows``, one dict per file); ``notes`` say how inputs were converted to what the models take."""

    strategy: str
    classes: list[str]
    rows: list[dict]
    notes: list[str] = field(default_factory=list)
    origin: str | None = None  # where the strategy came from when not a run directory, e.g. "exported: m.onnx"


def prediction_rows(files, strategy: str, classes: list[str], decisions: torch.Tensor,
                    probabilities: torch.Tensor) -> list[dict]:
    """One row per file: its class (``decisions`` ``(M, K)``: the largest wins) and every class's probability
    (``probabilities`` ``(M, K)``, rounded to 6 digits)."""
    rows = []
    for f, decision, row in zip(files, decisions, probabilities.tolist()):
        k = int(decision.argmax())
        rows.append({"file": str(f), "strategy": strategy, "class": classes[k], "class_index": k,
                     "output": output(strategy),
                     "probabilities": {c: round(float(p), 6) for c, p in zip(classes, row)}})
    return rows


def subdomain_votes(local: torch.Tensor, classes: list[str], locations) -> list[dict]:
    """Each subdomain's vote of one image from its local logits ``(N, K)``: class and probability; ``locations``:
    the subdomains' start corners."""
    sub = local.softmax(-1)
    votes = sub.argmax(-1).tolist()
    return [{"subdomain": j, "location": locations[j].tolist(), "class": classes[c], "class_index": c,
             "probability": round(float(sub[j, c]), 6)} for j, c in enumerate(votes)]


def format_predictions(pred: Predictions, fmt: str = "text") -> str:
    """``text``: one line per file (class and its probability) and one per subdomain vote; ``json``: a list of
    one object per file (``file``, ``strategy``, ``class``, ``class_index``, ``output``, ``probabilities`` by class
    name, ``subdomains``); ``csv``: a header row, then one row per file with a ``p(<class>)`` column per class
    (``share(<class>)`` for a voting strategy, whose numbers are vote shares, :func:`output`)."""
    choice("--format", fmt, FORMATS)
    if fmt == "json":
        return json.dumps(pred.rows, indent=1)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        column = "share" if gives_votes(pred.strategy) else "p"
        writer.writerow(["file", "strategy", "class", "class_index", *(f"{column}({c})" for c in pred.classes)])
        for row in pred.rows:
            writer.writerow([row["file"], row["strategy"], row["class"], row["class_index"],
                             *(f"{row['probabilities'][c]:.6f}" for c in pred.classes)])
        return out.getvalue().rstrip("\n")
    what = "vote share" if gives_votes(pred.strategy) else "p"
    lines = [f"strategy: {pred.strategy}" + (f" ({pred.origin})" if pred.origin else "")]
    for row in pred.rows:
        lines.append(f"{row['file']}: {row['class']} (class {row['class_index']}, "
                     f"{what}={row['probabilities'][row['class']]:.3f})")
        for sub in row.get("subdomains", []):
            lines.append(f"  subdomain {sub['subdomain']} {sub['location']}: {sub['class']} "
                         f"(p={sub['probability']:.3f})")
    return "\n".join(lines)
