"""``ddcnn evaluate`` and ``ddcnn predict``: using a finished run's models."""

from __future__ import annotations

from pathlib import Path

import torch

from ddcnn.data.datasets import load_datasets
from ddcnn.data.loading import to_float
from ddcnn.data.readers import read_image_file, read_volume_file
from ddcnn.errors import DataError
from ddcnn.train.context import accuracy
from ddcnn.train.dist import DistEnv
from ddcnn.train.runtime import device_name
from ddcnn.train.saved import SavedRun


def evaluate_run(run_dir, device: str | None = None, env: DistEnv | None = None,
                 trust_code: bool = False) -> dict | None:
    """Test accuracy of every saved strategy, recomputed from the checkpoints; written to ``evaluation.json``.

    Under torchrun (``env``) each process holds its shard of the local CNNs and all compute together; rank 0
    writes the file and returns the results, the others None. ``trust_code``: see :class:`SavedRun`.
    """
    run = SavedRun(run_dir, device, env, trust_code)
    _, test = load_datasets(run.cfg.data)
    images, labels = to_float(test.images), test.labels
    previous = run.best or {}  # the evaluation stands on its own without results.json
    strategies = {}
    for name, fn in run.strategies().items():
        scores, _ = run.run_batches(fn, images)
        old = previous.get("strategies", {}).get(name, {})
        strategies[name] = {"test_accuracy": accuracy(scores, labels), "train_seconds": old.get("train_seconds"),
                            "parameters": old.get("parameters"), "flops_per_image": old.get("flops_per_image")}
    results = {"dataset": run.cfg.data.name, "grid": list(run.decomposition.grid),
               "overlap": list(run.decomposition.overlap), "device_name": device_name(run.runtime.device),
               "torch_version": torch.__version__,
               "strategies": strategies}
    if not run.env.is_main:
        return None
    run.run_dir.write_json("evaluation.json", results)
    return results


def _read_input(path: Path, run: SavedRun) -> torch.Tensor:
    """One file as a float image ``(C, *image_size)`` in [0, 1], prepared as the run's training data was."""
    data = run.cfg.data
    size, channels = run.shapes.image_size, run.shapes.in_channels
    if len(size) == 3:
        if data.name == "volume-folder":
            return read_volume_file(path, size, data.window)
        x = read_volume_file(path, None, None)
    else:
        resize = data.name == "image-folder"  # the other datasets were not resized in training either
        # A photo is converted to the run's grey or RGB (an RGB or RGBA file of a grey picture is fine).
        x = read_image_file(path, size if resize else None, channels)
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


def predict_files(run_dir, files, strategy: str | None = None, device: str | None = None,
                  env: DistEnv | None = None, trust_code: bool = False) -> list[str]:
    """One line per file: the global class from the chosen strategy, then each subdomain's vote and probability
    (under torchrun, ``env``: computed by all processes together, the lines on rank 0, none elsewhere)."""
    run = SavedRun(run_dir, device, env, trust_code)
    name, fn = run.strategy(strategy)
    images = torch.stack([_read_input(Path(f), run) for f in files])
    scores, local = run.run_batches(fn, images)
    if not run.env.is_main:
        return []
    lines = [f"strategy: {name}"]
    for i, f in enumerate(files):
        k = int(scores[i].argmax())
        lines.append(f"{f}: {run.classes[k]} (class {k})")
        if local is not None:
            probs = local[i].softmax(-1)
            votes = probs.argmax(-1)
            for j in range(len(votes)):
                c = int(votes[j])
                loc = run.decomposition.locations[j].tolist()
                lines.append(f"  subdomain {j} {loc}: {run.classes[c]} (p={probs[j, c]:.3f})")
    return lines
