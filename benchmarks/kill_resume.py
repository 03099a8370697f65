"""Kill-and-resume check, K times: does a run killed with SIGKILL and continued with --resume end exactly like an
uninterrupted run? Not a speed benchmark; prints ``N/K identical`` and where every run was killed.

    python benchmarks/kill_resume.py --runs 10 [--seed 0] [--kills 2]

Each run starts ``python -m ddcnn run`` on the small all-stage config of tests/test_kill_resume.py (one thread),
kills it with SIGKILL at a random time between 0.5 s and the uninterrupted run's duration (a run that ends before
its kill point, because the machine got faster, is done again with a new draw bounded by its own duration),
continues it with ``--resume`` (``--force`` if it died before the run directory's marker existed) and kills that
process while a checkpoint is being written (at a random one of the checkpoint files the rest of the run writes);
further kills (``--kills 3`` ...) alternate the two kinds. The last process runs to the end. "Identical" means the same
``strategies.*.test_accuracy`` and ``local.test_accuracy`` in results.json, the same SHA-256 of every stage's final
weights, the same epochs and the same checkpoint files as the uninterrupted run.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _harness():
    path = Path(__file__).resolve().parent.parent / "tests" / "test_kill_resume.py"
    spec = importlib.util.spec_from_file_location("kill_resume_harness", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--kills", type=int, default=2, help="kills per run (at least 1)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the kill points (default: random)")
    parser.add_argument("--dir", help="keep the run directories here (default: a temporary folder)")
    args = parser.parse_args(argv)
    h = _harness()
    seed = args.seed if args.seed is not None else time.time_ns() % 10**6
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        config = h.write_config(root / "config.yaml")
        seconds = h.reference_run(config, root / "reference")
        reference = h.outcome(root / "reference")
        print(f"seed {seed}; uninterrupted run: {seconds:.2f} s; kill times drawn from [0.5, {seconds:.2f}] s")
        identical, kills, mid_write, restarts = 0, 0, 0, 0
        for run in range(1, args.runs + 1):
            out = root / f"run{run}"
            for _ in range(5):
                points = [round(rng.uniform(0.5, seconds), 2) if k % 2 == 0 else (h.CHECKPOINT, rng.random())
                          for k in range(max(1, args.kills))]
                attempts = h.run_with_kills(config, out, points)
                if attempts[0].killed_at is not None or not isinstance(points[0], float):
                    break
                # The machine was faster than during the reference run: the first kill point came after the end.
                # Draw again from [0.5, this run's duration] so that every counted run was killed at least once.
                print(f"run {run:2d}: finished in {attempts[0].seconds:.2f} s, before the kill at {points[0]:.2f} s; "
                      f"drawing again from [0.5, {attempts[0].seconds:.2f}] s")
                seconds = min(seconds, attempts[0].seconds)
                shutil.rmtree(out)
            diff = h.differences(reference, h.outcome(out))
            identical += not diff
            kills += sum(a.killed_at is not None for a in attempts)
            mid_write += sum(a.mid_write for a in attempts)
            restarts += sum(a.mode == "--force" for a in attempts)
            verdict = "identical" if not diff else "DIFFERENT: " + "; ".join(diff)
            print(f"run {run:2d}: {verdict}")
            for attempt in attempts:
                print(f"    {attempt.describe()}")
        print(f"{identical}/{args.runs} identical ({kills} kills, {mid_write} of them with a checkpoint "
              f"temporary file left behind, {restarts} restarts with --force for lack of a marker)")
    return 0 if identical == args.runs else 1


if __name__ == "__main__":
    raise SystemExit(main())
