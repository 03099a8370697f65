#!/usr/bin/env python
"""One training step of the global CNN data- and spatial-parallel, of the model-parallel CNN-DNN and of the local
stage, on P CPU processes (gloo): step time, bytes sent per step and peak memory per process.

For each case (a 3D volume 64^3 with grid 2x2x2, a 2D image 512^2 with grid 4x4; small widths, so that 4 processes
on a shared 2-core machine finish in minutes) and each setting the script starts the processes (``torchrun`` for
P > 1), trains a few steps on random data and prints one markdown row:

* ``global``: the global CNN on one process (the reference);
* ``global-data``: DistributedDataParallel, the batch split among the processes;
* ``global-spatial``: :class:`ddcnn.train.parallel.spatial.SpatialCNN`, every process the whole batch, a slab of every
  image;
* ``cnn-dnn-model``: :class:`ddcnn.train.parallel.model.ShardedCNNDNN` (the coherent and the transfer stage train
  this same model; they differ in the initialisation only);
* ``local``: each process its shard of the local CNNs on its subimages (no communication in a step).

Bytes sent per step by the busiest process: counted by the exchange code for ``global-spatial``
(:class:`ddcnn.train.parallel.halo.CommMeter`); the formulae of :mod:`ddcnn.train.traffic` (ring all-reduce and
all-gather) for the others. Peak memory: the peak resident set of each process (``resource.getrusage``'s ``ru_maxrss``)
minus its resident set before the model was built, the largest over the processes.

    python benchmarks/spatial_scaling.py                     # both cases, P = 2 and 4
    python benchmarks/spatial_scaling.py --cases 3d-64 --procs 2
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
from model_parallel import _rss_bytes  # this folder is on sys.path when the script runs

CASES = {
    "3d-64": {"size": (64, 64, 64), "grid": (2, 2, 2), "width": 4, "depth": (1, 1, 1), "batch": 2},
    "2d-512": {"size": (512, 512), "grid": (4, 4), "width": 8, "depth": (1, 1, 1), "batch": 4},
}
SETTINGS = ("global", "global-data", "global-spatial", "cnn-dnn-model", "local")
CLASSES = 10


def worker(case: str, setting: str, steps: int) -> dict:
    """One process's part: build, train ``steps`` steps (the first untimed), measure."""
    import torch.distributed as dist

    from ddcnn import DNN, Decomposition, GlobalCNN, LocalEnsemble, local_loss, local_width
    from ddcnn.shards import shard_range
    from ddcnn.train.dist import env_from_environment, init
    from ddcnn.train.parallel.base import FLOAT, ring
    from ddcnn.train.parallel.halo import CommMeter
    from ddcnn.train.parallel.model import ShardedCNNDNN
    from ddcnn.train.parallel.spatial import SpatialCNN

    c = CASES[case]
    env = env_from_environment()
    init(env, "cpu")
    before = _rss_bytes()
    d, batch, world = Decomposition(c["size"], c["grid"]), c["batch"], env.world
    n, meter = d.n_subdomains, CommMeter()
    shard = shard_range(n, env.rank, world)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, *c["size"], generator=g)
    y = torch.randint(0, CLASSES, (batch,), generator=g)
    if setting.startswith("global"):
        model = GlobalCNN(1, CLASSES, "vgg", c["width"], c["depth"], len(c["size"]))
        run = model
        sent = round(ring(world) * FLOAT * sum(p.numel() for p in model.parameters())) if world > 1 else 0
        if setting == "global-data" and world > 1:
            from torch.nn.parallel import DistributedDataParallel

            run = DistributedDataParallel(model)
            part = shard_range(batch, env.rank, world)
            x, y = x[part.start:part.stop], y[part.start:part.stop]
        if setting == "global-spatial":
            run = SpatialCNN(model, env, c["size"], meter)
            x = x[:, :, run.rows.start:run.rows.stop].contiguous()

        def loss_fn():
            return F.cross_entropy(run(x), y)
    else:
        ensemble = LocalEnsemble(len(shard), 1, CLASSES, "vgg", local_width(c["width"], n), c["depth"],
                                 len(c["size"]), seed=0, indices=list(shard))
        start, stop = d.region(shard)  # the pixels of this process's subdomains, as ddcnn run's batches give them
        x = x[(slice(None), slice(None), *[slice(a, b) for a, b in zip(start, stop)])].contiguous()
        if setting == "local":
            model, sent = ensemble, 0

            def loss_fn():
                return local_loss(ensemble(d.split(x, shard)), y)[0]
        else:
            model = ShardedCNNDNN(d, ensemble, DNN(n, CLASSES), env)
            sent = (world - 1) * FLOAT * batch * -(-n // world) * CLASSES

            def loss_fn():
                return F.cross_entropy(model(x), y)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    times, counted = [], []
    for _ in range(steps):
        meter.reset()
        env.barrier()
        start_time = time.perf_counter()
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start_time)
        counted.append(meter.total)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    out = {"rank": env.rank, "step_seconds": statistics.median(times[1:]), "peak_bytes": peak,
           "sent": counted[-1] if setting == "global-spatial" else sent}
    if env.enabled:
        dist.destroy_process_group()
    return out


def projection(case: str, worlds=(2, 4, 8, 64)) -> list[str]:
    """The formulae of :mod:`ddcnn.train.traffic` for the case's models (what ``ddcnn show`` prints)."""
    from ddcnn.build import Models, Shapes
    from ddcnn.config import from_dict
    from ddcnn.train.traffic import parallelisms

    c = CASES[case]
    stages = {s: {"batch_size": c["batch"]} for s in ("global", "local", "coherent", "transfer")}
    cfg = from_dict({"model": {"width": c["width"], "depth": list(c["depth"])}, "stages": stages,
                     "decomposition": {"grid": list(c["grid"])}})
    models = Models(cfg, Shapes(1, CLASSES, c["size"]))
    columns = {w: parallelisms(cfg, models, w) for w in worlds}
    lines = [f"| {case}: estimated KiB sent / MiB held per process | " + " | ".join(f"P = {w}" for w in worlds)
             + " |", "|---|" + "---:|" * len(worlds)]
    for i, (name, _, _) in enumerate(columns[worlds[0]]):
        cells = ["-" if columns[w][i][1] is None else
                 f"{columns[w][i][1] / 1024:,.1f} / {columns[w][i][2] / 2**20:,.0f}" for w in worlds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def launch(case: str, setting: str, procs: int, threads: int, steps: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        args = [__file__, "--worker", case, setting, "--steps", str(steps), "--results", tmp]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // procs)), "GLOO_SOCKET_IFNAME": "lo"}
        cmd = [sys.executable, *args] if procs == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", *args]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        return [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", nargs=2, metavar=("CASE", "SETTING"), help=argparse.SUPPRESS)
    p.add_argument("--results", help=argparse.SUPPRESS)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--procs", nargs="+", type=int, default=[2, 4])
    p.add_argument("--threads", type=int, default=2, help="threads in all, split among the processes")
    p.add_argument("--steps", type=int, default=3, help="steps per setting; the first is not timed")
    p.add_argument("--projection", action="store_true", help="print the estimates only (no processes)")
    args = p.parse_args(argv)
    if args.projection:
        for case in args.cases:
            print("\n".join(projection(case)))
        return 0
    if args.worker:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        out = worker(*args.worker, args.steps)
        Path(args.results, f"rank{out['rank']}.json").write_text(json.dumps(out))
        return 0
    print(f"# one training step on the CPU, gloo, {args.threads} threads in all, torch {torch.__version__}")
    print(f"# command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:] if argv is None else argv)}")
    print("| case | setting | processes | step s (median) | KiB sent per step (busiest process) | "
          "peak memory per process (MiB, largest) |")
    print("|---|---|---:|---:|---:|---:|")
    for case in args.cases:
        for setting in SETTINGS:
            for procs in [1] if setting == "global" else args.procs:
                ranks = launch(case, setting, procs, args.threads, args.steps)
                step = max(r["step_seconds"] for r in ranks)
                sent = max(r["sent"] for r in ranks) / 1024
                peak = max(r["peak_bytes"] for r in ranks) / 2**20
                print(f"| {case} | {setting} | {procs} | {step:.3f} | {sent:,.1f} | {peak:,.0f} |", flush=True)
    for case in args.cases:
        print()
        print("\n".join(projection(case)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
