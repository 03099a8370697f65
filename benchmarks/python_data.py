"""What each way of reading a Dataset given from Python costs (``ddcnn.fit``, :mod:`ddcnn.data.python`): the pass
that reads and checks it, the bytes held, and the global CNN's seconds per epoch, for

* memory: the images held as one tensor, batches sliced from it (the CLI's own path);
* memory + transform: held, a torchvision v2 random crop and flip per image every epoch in the workers;
* stream + transform: nothing held, the Dataset read again (PIL image -> v2.ToImage/ToDtype) every epoch.

    python benchmarks/python_data.py [--images 6000] [--epochs 2] [--workers 2] [--width 16]

The Dataset mimics torchvision's FashionMNIST: 28x28 grey PIL images made by ``to_tensor`` on every read. Prints
a table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

import ddcnn
from ddcnn.data.generated import make_generated


class PILDataset(torch.utils.data.Dataset):
    """(PIL image -> transform, label), as torchvision's dataset classes give them."""

    def __init__(self, n: int, seed: int):
        data = make_generated(n, [28, 28], 10, 1, seed=seed, noise=0.3)
        self.pixels = (data.images[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        self.labels = data.labels.tolist()
        self.to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.to_tensor(Image.fromarray(np.asarray(self.pixels[i]), mode="L")), self.labels[i]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--width", type=int, default=16)
    args = parser.parse_args(argv)
    train, test = PILDataset(args.images, 0), PILDataset(max(args.images // 6, 2), 1)
    augment = v2.Compose([v2.RandomCrop(28, padding=2), v2.RandomHorizontalFlip()])
    overrides = {"device": "cpu", "model.width": args.width, "stages.global.epochs": args.epochs,
                 "data.workers": args.workers, **{f"stages.{s}.enabled": False for s in
                                                  ("local", "combine", "coherent", "transfer")}}
    print(f"{args.images:,} training images 28x28, global CNN width {args.width}, {args.epochs} epochs, "
          f"{args.workers} workers, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"| {'path':<20} | read + check (s) | held (MiB) | seconds per epoch |")
    print(f"|{'-' * 22}|-----------------:|-----------:|------------------:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, load, transform in (("memory", "memory", None), ("memory + transform", "memory", augment),
                                      ("stream + transform", "stream", augment)):
            out = Path(tmp) / name.replace(" ", "")
            ddcnn.fit(train, test, transform=transform, load=load, out=out, verbose=False, overrides=overrides)
            results = json.loads((out / "results.json").read_text())
            source = results["data_source"]
            per_epoch = results["stage_seconds"]["global"] / args.epochs
            print(f"| {name:<20} | {source['seconds']:16.2f} | {source['bytes'] / 2**20:10.1f} | {per_epoch:17.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
