#!/usr/bin/env python
"""Time to accuracy on Fashion-MNIST: the global CNN against CNN-DNN + transfer, medians over seeds.

For each seed the script runs, with ddcnn's own protocol code on one device:

* ``global``: the global CNN, its test accuracy after every epoch against its cumulative training time;
* ``cnn_dnn + transfer``: the local stage, then the combine stage (the CNN-DNN's test accuracy after every combine
  epoch, at time local + combine so far), then the transfer stage (after every epoch, at time local + combine +
  transfer so far).

Training time is the wall time of the training steps (the protocol's ``seconds``; evaluation excluded). The test
set is used as the per-epoch evaluation set here, which is fine for a benchmark and never done by ``ddcnn run``.
The table gives, per strategy, the time at which the test accuracy first reaches each threshold (``-`` if never),
the final accuracy, and the medians over seeds; the last line checks the goal: CNN-DNN + transfer reaches the global
CNN's final accuracy (within 0.3 points) in at most half the global CNN's time.

    python benchmarks/time_to_accuracy.py --seeds 0 1 2                 # GPU: the shipped 2x2 config
    python benchmarks/time_to_accuracy.py --preset cpu                  # make bench: a short CPU budget
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ddcnn.config import from_dict, load_config, to_dict
from ddcnn.train.protocol import Experiment
from ddcnn.train.stages import TRAINERS

ROOT = Path(__file__).resolve().parent.parent
PRESETS = {
    # About 2 minutes a seed on 2 CPU cores.
    "cpu": ["model.width=16", "data.limit_train=20000", "stages.global.epochs=3", "stages.local.epochs=3",
            "stages.combine.epochs=5", "stages.transfer.epochs=2"],
    "gpu": [],
}


def curves(cfg, seed: int, device: str, workdir: Path) -> dict:
    """Per strategy: a list of (cumulative train seconds, test accuracy) after each epoch."""
    base = [f"seed={seed}", f"device={device}", "stages.coherent.enabled=false"]
    out = {}
    for name, stages in (("global", ["global"]), ("cnn_dnn_transfer", ["local", "combine", "transfer"])):
        overrides = base + [f"stages.{s}.enabled={str(s in stages).lower()}" for s in
                            ("global", "local", "combine", "transfer")]
        run_cfg = from_dict(to_dict(cfg), overrides)
        ctx = Experiment(run_cfg, workdir / f"{name}-{seed}", force=True, verbose=False).setup()
        ctx.val = ctx.test  # evaluate on the test set after every epoch (benchmark only)
        done = {}
        for stage in stages:
            done[stage] = TRAINERS[stage](ctx, done)
        points, offset = [], 0.0
        for stage in stages:
            history, seconds = done[stage].history, done[stage].seconds
            # A stage's time beyond its epochs (the combine stage's pass of the frozen local CNNs over the
            # training set) comes before its first epoch's score.
            start = offset + seconds - history[-1]["seconds"]
            if stage != "local":  # the local stage alone has no single decision to score
                points += [(start + r["seconds"], r["val_accuracy"]) for r in history]
            offset += seconds
        out[name] = points
    return out


def first_time(points, threshold):
    return next((t for t, acc in points if acc >= threshold), None)


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "fashion_mnist_2x2.yaml"))
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="cpu: a short budget for make bench")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--thresholds", type=float, nargs="+", default=None,
                   help="test accuracies to time (default 0.90 0.92 0.93; the cpu preset: 0.85 0.87 0.88)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="save the curves and the table")
    args = p.parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or ("gpu" if device.startswith("cuda") else "cpu")
    cfg = load_config(args.config, PRESETS[preset] + args.overrides)
    if args.thresholds is None:  # the short CPU budget ends near 88 %
        args.thresholds = [0.85, 0.87, 0.88] if preset == "cpu" else [0.90, 0.92, 0.93]
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# time to accuracy: {Path(args.config).name}, preset {preset}, device {name}, torch {torch.__version__}")
    print(f"# command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:] if argv is None else argv)}")
    start = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            runs.append(curves(cfg, seed, device, Path(tmp)))
            print(f"# seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
    header = ["strategy", "seed"] + [f"t({100 * t:g}%) s" for t in args.thresholds] + ["final acc %", "total s"]
    rows = []
    for strategy in ("global", "cnn_dnn_transfer"):
        per_seed = []
        for seed, run in zip(args.seeds, runs):
            pts = run[strategy]
            times = [first_time(pts, t) for t in args.thresholds]
            per_seed.append((times, pts[-1][1], pts[-1][0]))
            rows.append([strategy, str(seed)] + [fmt(t, ".1f") for t in times] +
                        [f"{100 * pts[-1][1]:.2f}", f"{pts[-1][0]:.1f}"])
        med_times = []
        for i in range(len(args.thresholds)):
            values = [s[0][i] for s in per_seed]
            med_times.append(statistics.median(values) if all(v is not None for v in values) else None)
        rows.append([f"**{strategy}**", "median"] + [fmt(t, ".1f") for t in med_times] +
                    [f"{100 * statistics.median(s[1] for s in per_seed):.2f}",
                     f"{statistics.median(s[2] for s in per_seed):.1f}"])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    global_final = statistics.median(r["global"][-1][1] for r in runs)
    global_time = statistics.median(r["global"][-1][0] for r in runs)
    reach = [first_time(r["cnn_dnn_transfer"], global_final - 0.003) for r in runs]
    reach_med = statistics.median(reach) if all(t is not None for t in reach) else None
    verdict = "met" if reach_med is not None and reach_med <= global_time / 2 else "not met"
    print(f"\nglobal CNN final accuracy (median) {100 * global_final:.2f} % after {global_time:.1f} s; CNN-DNN + "
          f"transfer reaches {100 * (global_final - 0.003):.2f} % after {fmt(reach_med, '.1f')} s (median): goal "
          f"(<= {global_time / 2:.1f} s) {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps({"seeds": args.seeds, "curves": runs, "header": header,
                                               "rows": rows, "device": name}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
