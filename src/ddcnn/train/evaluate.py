"""``ddcnn evaluate``, ``ddcnn predict`` and ``ddcnn show``: using and describing runs and configs."""

from __future__ import annotations

from pathlib import Path

import torch

from ddcnn.config import Config
from ddcnn.data.loading import to_float
from ddcnn.data.readers import read_image_file, read_volume_file
from ddcnn.data.select import load_datasets
from ddcnn.errors import ConfigError, DataError
from ddcnn.models import count_parameters, forward_flops
from ddcnn.train.build import Models, Shapes, device_name
from ddcnn.train.protocol import STRATEGIES, accuracy
from ddcnn.train.saved import SavedRun


def evaluate_run(run_dir, device: str | None = None) -> dict:
    """Test accuracy of every saved strategy, recomputed from the checkpoints; written to ``evaluation.json``."""
    run = SavedRun(run_dir, device)
    _, test = load_datasets(run.cfg.data)
    images, labels = to_float(test.images), test.labels
    previous = {}
    try:
        previous = run.run_dir.read_json("results.json")
    except Exception:  # noqa: BLE001 - the evaluation stands on its own without results.json
        pass
    strategies = {}
    for name, fn in run.strategies().items():
        scores, _ = run.run_batches(fn, images)
        old = previous.get("strategies", {}).get(name, {})
        strategies[name] = {"test_accuracy": accuracy(scores, labels), "train_seconds": old.get("train_seconds"),
                            "parameters": old.get("parameters"), "flops_per_image": old.get("flops_per_image")}
    results = {"dataset": run.cfg.data.name, "grid": list(run.decomposition.grid),
               "overlap": list(run.decomposition.overlap), "device_name": device_name(run.runtime.device),
               "torch_version": torch.__version__,
               "strategies": {k: strategies[k] for k in STRATEGIES if k in strategies}}
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


def predict_files(run_dir, files, strategy: str | None = None, device: str | None = None) -> list[str]:
    """One line per file: the global class from the chosen strategy, then each subdomain's vote and probability."""
    run = SavedRun(run_dir, device)
    name, fn = run.strategy(strategy)
    images = torch.stack([_read_input(Path(f), run) for f in files])
    scores, local = run.run_batches(fn, images)
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


def describe(cfg: Config, png: Path | None = None) -> str:
    """Decomposition, subimage size, parameters and FLOPs of the global CNN, one local CNN, all local CNNs and
    the CNN-DNN; draws the grid over a sample image into ``png``."""
    train, _ = load_datasets(cfg.data)
    shapes = Shapes(train.in_channels, train.num_classes, train.image_size)
    models = Models(cfg, shapes)
    d = models.decomposition
    shape = (shapes.in_channels, *shapes.image_size)
    global_cnn, ensemble, cnn_dnn = models.global_cnn(), models.ensemble(), models.cnn_dnn()
    local = ensemble.local_model(0)
    rows = [
        ("global CNN", cfg.model.width, count_parameters(global_cnn), forward_flops(global_cnn, shape)),
        ("one local CNN", models.local_width, count_parameters(local),
         forward_flops(local, (shapes.in_channels, *d.subimage_size))),
        (f"{d.n_subdomains} local CNNs", models.local_width, count_parameters(ensemble),
         forward_flops(ensemble, (d.n_subdomains, shapes.in_channels, *d.subimage_size))),
        ("CNN-DNN", models.local_width, count_parameters(cnn_dnn), forward_flops(cnn_dnn, shape)),
    ]
    lines = [
        f"dataset        {cfg.data.name}: {len(train)} training images {list(shapes.image_size)} x "
        f"{shapes.in_channels} channel(s), {shapes.num_classes} classes",
        f"decomposition  grid {list(d.grid)}, overlap {list(d.overlap)} -> {d.n_subdomains} subimages of "
        f"{list(d.subimage_size)}",
        f"backbone       {cfg.model.backbone}, depth {list(ensemble.depth)}, global width {cfg.model.width}, "
        f"local width {models.local_width}",
        "",
        f"{'model':<16} {'width':>6} {'parameters':>12} {'MFLOPs/image':>13}",
    ]
    lines += [f"{n:<16} {w:>6} {p:>12,} {f / 1e6:>13.2f}" for n, w, p, f in rows]
    lines.append("")
    lines.append("subdomain locations (start..., stop...):")
    lines += [f"  {i:3d}: {loc}" for i, loc in enumerate(d.locations.tolist())]
    if png is not None:
        from ddcnn.report import plot_decomposition

        try:
            plot_decomposition(to_float(train.images[0]), d, Path(png))
        except OSError as err:
            raise ConfigError(f"cannot write {png}: {err.strerror}; pass --png with a writable path") from None
        lines.append(f"grid drawn over a sample image: {png}")
    return "\n".join(lines)
