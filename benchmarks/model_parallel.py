#!/usr/bin/env python
"""End-to-end (coherent / transfer) training steps of a CNN-DNN: model- vs data-parallel, against the global CNN.

For each case (large inputs: generated 3D volumes 64^3 with grid 2x2x2, 2D images 256^2 with grid 4x4) and each
way of training, the script starts the processes (``torchrun`` for P > 1), trains a few steps of one global batch
on random data and prints, per setting, the median step time and each process's peak memory:

* ``global``: the global CNN on one process;
* ``single``: the whole CNN-DNN on one process;
* ``model``: P processes, each with its shard of the local CNNs and the whole DNN (ddcnn's default under torchrun),
  and of every image only the region of its subdomains;
* ``data``: P processes, each with the whole CNN-DNN, the batch split among them (DistributedDataParallel).

Peak memory on a GPU is ``torch.cuda.max_memory_allocated``; on the CPU it is the peak resident set of the process
minus its resident set before the model was built (what training added: weights, optimizer state, activations,
the batch). Threads are split so that every setting uses the same cores (``--threads`` in all).

    python benchmarks/model_parallel.py                       # CPU: 2 threads, P = 2
    python benchmarks/model_parallel.py --device cuda --procs 2 --batch 32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CASES = {
    "3d-64": {"size": (64, 64, 64), "grid": (2, 2, 2), "channels": 1, "width": 16, "depth": (1, 1, 1)},
    "2d-256": {"size": (256, 256), "grid": (4, 4), "channels": 3, "width": 32, "depth": (1, 1, 1)},
}
SETTINGS = ("global", "single", "model", "data")


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(case: str, setting: str, batch: int, steps: int, device_name: str) -> dict:
    """One process's part: build, train ``steps`` steps (the first two untimed), measure."""
    import torch.distributed as dist

    from ddcnn import CNNDNN, DNN, Decomposition, GlobalCNN, LocalEnsemble, local_width
    from ddcnn.shards import shard_range
    from ddcnn.train.dist import env_from_environment, init
    from ddcnn.train.parallel.model import ShardedCNNDNN

    c = CASES[case]
    env = env_from_environment()
    device = torch.device(f"cuda:{env.local_rank}" if device_name == "cuda" else "cpu")
    init(env, device.type)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = _rss_bytes()
    dims, classes = len(c["size"]), 10
    d = Decomposition(c["size"], c["grid"])
    n = d.n_subdomains
    if setting == "global":
        model = GlobalCNN(c["channels"], classes, "vgg", c["width"], c["depth"], dims)
    else:
        shard = shard_range(n, env.rank, env.world) if setting == "model" else range(n)
        ensemble = LocalEnsemble(len(shard), c["channels"], classes, "vgg", local_width(c["width"], n), c["depth"],
                                 dims, seed=0, indices=list(shard))
        dnn = DNN(n, classes)
        model = ShardedCNNDNN(d, ensemble, dnn, env) if setting == "model" else CNNDNN(d, ensemble, dnn)
    model.to(device)
    run = model
    if setting == "data" and env.enabled:
        from torch.nn.parallel import DistributedDataParallel

        run = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, c["channels"], *c["size"], generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    if setting == "data" and env.enabled:  # each process its part of the global batch
        part = shard_range(batch, env.rank, env.world)
        x, y = x[part.start:part.stop], y[part.start:part.stop]
    if setting == "model":  # each process the pixels of its subdomains' region, as ddcnn run's batches give it
        start, stop = d.region(model.shard)
        x = x[(slice(None), slice(None), *[slice(a, b) for a, b in zip(start, stop)])].contiguous()
    x, y = x.to(device), y.to(device)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss = F.cross_entropy(run(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    held = sum(p.numel() for p in model.parameters())
    out = {"rank": env.rank, "step_seconds": statistics.median(times[2:]), "peak_bytes": peak, "parameters": held}
    if env.enabled:
        dist.destroy_process_group()
    return out


def launch(case: str, setting: str, procs: int, threads: int, batch: int, steps: int, device: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        outs = Path(tmp)
        args = [__file__, "--worker", case, setting, "--batch", str(batch), "--steps", str(steps),
                "--device", device, "--results", str(outs)]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // procs))}
        cmd = [sys.executable, *args] if procs == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", *args]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        return [json.loads(p.read_text()) for p in sorted(outs.glob("rank*.json"))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", nargs=2, metavar=("CASE", "SETTING"), help=argparse.SUPPRESS)
    p.add_argument("--results", help=argparse.SUPPRESS)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="threads in all, split among the processes")
    p.add_argument("--batch", type=int, default=8, help="the global batch (data-parallel: split among processes)")
    p.add_argument("--steps", type=int, default=6, help="steps per setting; the first two are not timed")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.worker:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        out = worker(*args.worker, args.batch, args.steps, args.device)
        Path(args.results, f"rank{out['rank']}.json").write_text(json.dumps(out))
        return 0
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads in all"
    print(f"# CNN-DNN training step, model- vs data-parallel: {name}, torch {torch.__version__}, batch {args.batch}")
    print(f"# command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:] if argv is None else argv)}")
    print("| case | setting | processes | parameters held per process | peak memory per process (MiB) | "
          "step s (median) |")
    print("|---|---|---:|---:|---:|---:|")
    for case in args.cases:
        for setting in SETTINGS:
            procs = 1 if setting in ("global", "single") else args.procs
            ranks = launch(case, setting, procs, args.threads, args.batch, args.steps, args.device)
            held = "/".join(f"{r['parameters']:,}" for r in ranks)
            peak = "/".join(f"{r['peak_bytes'] / 2**20:,.0f}" for r in ranks)
            step = max(r["step_seconds"] for r in ranks)
            print(f"| {case} | {setting} | {procs} | {held} | {peak} | {step:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
