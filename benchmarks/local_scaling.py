#!/usr/bin/env python
"""Local-stage throughput with 1 and several processes (torchrun), and what the epoch-end gather costs.

Runs ``ddcnn run`` with only the local stage enabled, once per setting, and reads the run's ``metrics.jsonl``:
``seconds`` is the training time of the slowest process (the processes need no communication during an epoch),
``gather_seconds`` the epoch-end gather of every process's local CNNs and optimizer state (the checkpoint that
rank 0 then writes is not counted). Prints a table: processes, threads per process, local-stage seconds, images
per second (every local CNN sees every training image once per epoch), speed-up over one process, gather seconds
per epoch.

    python benchmarks/local_scaling.py                         # CPU: 1 process x 2 threads, 1 x 1, 2 x 1
    python benchmarks/local_scaling.py --device cuda --procs 1 2 4 --threads 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def run(cfg_path: Path, out: Path, procs: int, threads: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
    base = ["-m", "ddcnn", "run", str(cfg_path), "--out", str(out), "--quiet", "--force"]
    cmd = [sys.executable, *base] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", *base]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "epoch" in r]  # the epochs, without the end-of-stage record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=1, help="threads per process (OMP_NUM_THREADS)")
    p.add_argument("--grid", type=int, nargs="+", default=[4, 4])
    p.add_argument("--train", type=int, default=4000, help="generated training images")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--width", type=int, default=32)
    args = p.parse_args(argv)
    size = [32, 32] if len(args.grid) == 2 else [16, 32, 32]
    cfg = {"name": "local_scaling", "device": args.device,
           "data": {"name": "generated", "image_size": size, "generated_train": args.train, "generated_test": 200,
                    "val_fraction": 0.0},
           "decomposition": {"grid": args.grid}, "model": {"width": args.width, "depth": [1, 1, 1]},
           "stages": {"global": {"enabled": False}, "combine": {"enabled": False}, "coherent": {"enabled": False},
                      "transfer": {"enabled": False}, "local": {"epochs": args.epochs, "batch_size": 128}}}
    settings = [(1, os.cpu_count() or 1)] if args.device == "cpu" else []
    settings += [(n, args.threads) for n in args.procs]
    import torch

    print(f"# local stage scaling: generated {'x'.join(map(str, size))} images, grid {'x'.join(map(str, args.grid))}, "
          f"width {args.width}, {args.train} images x {args.epochs} epochs, device {args.device}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPU cores")
    print(f"# command: python benchmarks/local_scaling.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print("| processes | threads each | local stage s | img/s | speed-up vs 1 process | gather s/epoch |")
    print("|---:|---:|---:|---:|---:|---:|")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        for procs, threads in settings:
            records = run(path, Path(tmp) / f"run{procs}x{threads}", procs, threads)
            seconds = records[-1]["seconds"]
            if procs == 1 and threads == args.threads:
                base = seconds
            speed = f"{base / seconds:.2f}x" if base else "-"
            gather = statistics.median(r["gather_seconds"] for r in records)
            print(f"| {procs} | {threads} | {seconds:.2f} | {args.train * args.epochs / seconds:,.0f} | {speed} | "
                  f"{gather:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
