#!/usr/bin/env python
"""CPU inference throughput of a deployed CNN-DNN: eager PyTorch, the exported .pt2 and ONNX Runtime.

The model is what ``ddcnn export`` writes for the CNN-DNN strategies (:class:`ddcnn.models.deployed.Deployed`:
normalisation, decomposition, N local CNNs, the DNN combiner, softmax), with random weights of the shipped
Fashion-MNIST configs' sizes (VGG-style, depth 2-2-2, global width 32, local width ``round(32 / sqrt(N))``, the
DNN's default hidden layers), on 28x28 one-channel images. For each grid and layout (``grouped``: the local CNNs as
one network of grouped convolutions; ``separate``: N ordinary CNNs side by side) it times:

* ``eager``: the module in PyTorch, eval mode, ``torch.no_grad``;
* ``pt2``: the file ``torch.export`` wrote, loaded back with ``torch.export.load`` and run as a module;
* ``onnxruntime``: the ONNX file (torch's dynamo exporter) in ONNX Runtime's CPU provider (skipped without
  ``ddcnn[export]``).

Images per second is the batch over the fastest of ``--repeats`` timed batches after ``--warmup`` untimed ones;
the three take turns batch by batch, so that other work on a shared machine slows them alike. Every backend runs
on ``--threads`` threads (torch and ONNX Runtime alike; set OMP_NUM_THREADS to match).

    OMP_NUM_THREADS=1 python benchmarks/export_throughput.py --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from ddcnn import DNN, Decomposition, LocalEnsemble, local_width  # noqa: E402
from ddcnn.export import ExportedModel, serialise  # noqa: E402
from ddcnn.models.deployed import LAYOUTS, Deployed, Standardise, with_layout  # noqa: E402

COLUMNS = ("eager", "pt2", "onnxruntime")


def build(grid, size, channels: int, classes: int, width: int, depth) -> tuple[Decomposition, LocalEnsemble, DNN]:
    torch.manual_seed(0)
    d = Decomposition(size, grid)
    ensemble = LocalEnsemble(d.n_subdomains, channels, classes, "vgg", local_width(width, d.n_subdomains), depth,
                             len(size), seed=0).eval()
    return d, ensemble, DNN(d.n_subdomains, classes).eval()


def fastest(fns: dict, images: torch.Tensor, warmup: int, repeats: int) -> dict:
    """Images per second of each callable in ``fns``: the batch over its fastest of ``repeats`` timed calls, after
    ``warmup`` untimed ones. The callables take turns, so that a busy spell of a shared machine hits all alike."""
    times: dict = {name: [] for name in fns}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn(images)
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn(images)
                times[name].append(time.perf_counter() - start)
    return {name: len(images) / min(t) for name, t in times.items()}


def measure(grid, layout: str, args, folder: Path) -> dict:
    size, channels = tuple(args.image_size), 1
    d, ensemble, dnn = build(grid, size, channels, args.classes, args.width, tuple(args.depth))
    model = Deployed.combined(Standardise([0.286], [0.353], len(size)), d, with_layout(ensemble, layout), dnn).eval()
    images = torch.rand(args.batch, channels, *size)
    meta = {"in_channels": channels, "image_size": list(size), "classes": [str(k) for k in range(args.classes)]}
    row: dict = {"grid": "x".join(map(str, grid)), "layout": layout, "onnxruntime": None}
    fns = {"eager": model}
    onnx = all(importlib.util.find_spec(m) for m in ("onnxscript", "onnxruntime"))
    for fmt, column in (("pt2", "pt2"), ("onnx", "onnxruntime"))[: 2 if onnx else 1]:
        path = folder / f"{row['grid']}-{layout}.{fmt}"
        path.write_bytes(serialise(model, fmt, images[:2]))
        # a file this benchmark has just written: trusted
        fns[column] = ExportedModel(path, {**meta, "format": fmt}, threads=args.threads, trust_code=True)
        with torch.no_grad():
            torch.testing.assert_close(fns[column](images), model(images), rtol=1e-4, atol=1e-5)  # the same model
    return {**row, **fastest(fns, images, args.warmup, args.repeats)}


def markdown(rows: list[dict]) -> str:
    lines = ["| grid | layout | eager img/s | pt2 img/s | ONNX Runtime img/s |", "|---|---|---:|---:|---:|"]
    for r in rows:
        cells = [f"{r[c]:,.0f}" if r[c] is not None else "n/a" for c in COLUMNS]
        lines.append(f"| {r['grid']} | {r['layout']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grids", nargs="+", default=["2x2", "4x4"], help="grids, e.g. 2x2 4x4")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    p.add_argument("--image-size", type=int, nargs="+", default=[28, 28])
    p.add_argument("--width", type=int, default=32, help="global width; local CNNs get round(width / sqrt(N))")
    p.add_argument("--depth", type=int, nargs="+", default=[2, 2, 2])
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for grid in args.grids:
            for layout in args.layouts:
                rows.append(measure(tuple(int(v) for v in grid.split("x")), layout, args, Path(tmp)))
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, images "
          f"{'x'.join(map(str, args.image_size))}")
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
