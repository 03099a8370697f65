"""Kill-and-resume check, K times: does a run killed with SIGKILL and continued with --resume end exactly like an
uninterrupted run? Not a speed benchmark; prints ``N/K identical`` and where every run was killed.

    python benchmarks/kill_resume.py --runs 10 [--seed 0] [--kills 2]

Each run starts ``python -m ddcnn run`` on the small all-stage config below (one thread),
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
import ctypes
import ctypes.util
import json
import math
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

# Small but real: generated 16x16 images, all five stages, a few epochs each (about 5-8 s per run on one core,
# two to three of them training). The noise keeps accuracies away from 100% so that they tell runs apart.
CONFIG = {
    "name": "kill-resume",
    "device": "cpu",
    "seed": 3,
    "data": {"name": "generated", "image_size": [16, 16], "num_classes": 3, "generated_train": 480,
             "generated_test": 96, "val_fraction": 0.2, "noise": 1.5},
    "decomposition": {"grid": [2, 2]},
    "model": {"width": 4, "depth": [1, 1]},
    "combiner": {"hidden": [16]},
    "stages": {
        "global": {"epochs": 4, "batch_size": 32, "lr": 0.01},
        "local": {"epochs": 4, "batch_size": 32, "lr": 0.01},
        "combine": {"epochs": 4, "batch_size": 32, "lr": 0.01},
        "coherent": {"epochs": 3, "batch_size": 32, "lr": 0.01},
        "transfer": {"epochs": 3, "batch_size": 32, "lr": 0.01},
    },
}
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
MARKER = "ddcnn-run.json"
# A kill point (CHECKPOINT, u), 0 < u <= 1: kill at the n-th checkpoint temporary file the process creates, with
# n = ceil(u * the number of checkpoint files the rest of the run writes), so the kills spread over every stage.
CHECKPOINT = "checkpoint"


def write_config(path: Path) -> Path:
    path.write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    return path


def command(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ddcnn", "run", str(config), "--out", str(out), "--quiet", *extra]


@dataclass
class Attempt:
    """One process: how it was started, where it was meant to be killed, what happened."""

    mode: str  # "fresh", "--resume" or "--force" (a killed run that had no marker yet)
    planned: float | tuple[str, int] | None  # seconds, (CHECKPOINT, n) or None (run to the end)
    killed_at: float | None = None  # seconds after the start, None if it finished first
    mid_write: bool = False  # a checkpoint temporary file was still there after the kill
    returncode: int | None = None
    stderr: str = ""
    progress: str = ""  # the epochs the checkpoints held right after the kill
    seconds: float = 0.0  # how long the process ran


    def describe(self) -> str:
        if self.planned is None:
            return f"{self.mode}: ran to the end (exit {self.returncode})"
        if self.killed_at is None:
            what = f"at {self.planned:.2f} s" if isinstance(self.planned, float) else \
                f"at checkpoint write #{self.planned[1]}"
            return f"{self.mode}: kill {what} planned, but it finished first (exit {self.returncode})"
        what = f"at {self.killed_at:.2f} s" if isinstance(self.planned, float) else \
            f"at checkpoint write #{self.planned[1]} ({self.killed_at:.2f} s{', mid-write' if self.mid_write else ''})"
        return f"{self.mode}: killed {what}; checkpoints then: {self.progress}"


def _temporary_files(checkpoints: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(checkpoints) if e.name.endswith(".tmp")]
    except FileNotFoundError:
        return []


def _epochs_done(out: Path) -> dict[str, int]:
    done = {}
    for manifest in (out / "checkpoints").glob("*.json"):
        try:
            done[manifest.stem] = int(json.loads(manifest.read_text())["state"]["epoch"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return done


def checkpoint_writes(out: Path) -> int:
    """How many checkpoint files the rest of the run in ``out`` writes: per epoch the weights, the optimizer state
    (not after a stage's last epoch) and the manifest."""
    done = _epochs_done(out) if (out / MARKER).is_file() else {}
    return sum(2 if epoch == s["epochs"] else 3 for stage, s in CONFIG["stages"].items()
               for epoch in range(done.get(stage, 0) + 1, s["epochs"] + 1))


def progress(out: Path) -> str:
    """Where a run stands: 'no marker', or the epoch of every stage's checkpoint, e.g. 'global 4, local 1'."""
    if not (out / MARKER).is_file():
        return "none (no run marker yet)"
    epochs = []
    for manifest in sorted((out / "checkpoints").glob("*.json"), key=lambda p: _STAGES.index(p.stem)):
        try:
            epochs.append(f"{manifest.stem} {json.loads(manifest.read_text())['state']['epoch']}")
        except (OSError, ValueError, KeyError):
            epochs.append(f"{manifest.stem} ?")
    done = (out / "results.json").is_file()
    return (", ".join(epochs) or "none yet") + (" (results written)" if done else "")


_STAGES = ["global", "local", "combine", "coherent", "transfer"]


class TmpWatch:
    """New ``*.tmp`` files in a run's ``checkpoints/``: reported by inotify the moment they are created (Linux),
    else found by polling. A checkpoint file is a temporary file for well under a millisecond."""

    IN_CREATE = 0x100

    def __init__(self, folder: Path):
        self.folder, self.fd, self.seen = folder, None, set()
        try:
            self.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            self.libc.inotify_init1  # noqa: B018 - AttributeError where there is no inotify
        except (OSError, AttributeError):
            self.libc = None

    def _watch(self) -> bool:
        if self.fd is None and self.libc is not None and self.folder.is_dir():
            fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if fd >= 0 and self.libc.inotify_add_watch(fd, bytes(self.folder), self.IN_CREATE) >= 0:
                self.fd = fd
            elif fd >= 0:
                os.close(fd)
                self.libc = None
        return self.fd is not None

    def count(self, wait: float) -> int:
        """The number of temporary files seen so far, after waiting up to ``wait`` seconds for a new one."""
        if not self._watch():
            self.seen.update(_temporary_files(self.folder))
            time.sleep(min(wait, 0.0002 if self.folder.is_dir() else 0.005))
            return len(self.seen)
        if select.select([self.fd], [], [], wait)[0]:
            data, offset = os.read(self.fd, 65536), 0
            while offset < len(data):
                _, _, _, length = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16:offset + 16 + length].rstrip(b"\0").decode()
                offset += 16 + length
                if name.endswith(".tmp"):
                    self.seen.add(name)
        return len(self.seen)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)


def run_once(config: Path, out: Path, mode: str, planned=None, timeout: float = 300.0) -> Attempt:
    """Start one ``ddcnn run`` process and SIGKILL it at ``planned``: seconds after the start, (CHECKPOINT, u), or
    None to let it finish."""
    extra = {"fresh": (), "--resume": ("--resume",), "--force": ("--force",)}[mode]
    if isinstance(planned, tuple):  # (CHECKPOINT, u) -> (CHECKPOINT, n)
        planned = (CHECKPOINT, max(1, math.ceil(planned[1] * checkpoint_writes(out))))
    attempt = Attempt(mode, planned)
    watch = TmpWatch(out / "checkpoints")
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command(config, out, *extra), env=ENV, stdout=subprocess.DEVNULL, stderr=err)
        try:
            while proc.poll() is None:
                elapsed = time.perf_counter() - start
                if elapsed > timeout:
                    proc.kill()
                    raise TimeoutError(f"ddcnn run took more than {timeout} s")
                if planned is None:
                    time.sleep(0.05)
                    continue
                due = watch.count(0.02) >= planned[1] if isinstance(planned, tuple) else elapsed >= planned
                if due:
                    os.kill(proc.pid, signal.SIGKILL)
                    attempt.killed_at = time.perf_counter() - start
                    proc.wait()
                    attempt.mid_write = bool(_temporary_files(out / "checkpoints"))
                    break
                if not isinstance(planned, tuple):
                    time.sleep(min(0.01, planned - elapsed))
        finally:
            watch.close()
            attempt.returncode = proc.wait()
            attempt.seconds = time.perf_counter() - start
        if attempt.killed_at is not None and attempt.returncode != -signal.SIGKILL:
            attempt.killed_at = None  # it exited on its own between our look and the signal
        if attempt.killed_at is not None:
            attempt.progress = progress(out)
        err.seek(0)
        attempt.stderr = err.read()
    return attempt


def reference_run(config: Path, out: Path) -> float:
    """An uninterrupted run; returns its duration in seconds."""
    start = time.perf_counter()
    attempt = run_once(config, out, "fresh")
    assert attempt.returncode == 0, attempt.stderr
    return time.perf_counter() - start


def next_mode(out: Path) -> str:
    """How to continue after a kill: ``--resume``, or ``--force`` when the process died before writing the run
    directory's marker (then there is no run to resume, perhaps only some files)."""
    return "--resume" if (out / MARKER).is_file() else "--force"


def run_with_kills(config: Path, out: Path, kill_points: list, mode: str = "fresh") -> list[Attempt]:
    """Run, killing the process at each of ``kill_points`` in turn and continuing after every kill, then let the
    last process finish. A process that finishes before its kill point ends the run (later points are dropped)."""
    attempts: list[Attempt] = []
    for planned in [*kill_points, None]:
        if attempts and attempts[-1].killed_at is None:
            break
        attempt = run_once(config, out, mode, planned)
        attempts.append(attempt)
        if attempt.killed_at is None and attempt.returncode != 0:
            raise AssertionError(f"ddcnn run ({attempt.mode}) failed with exit {attempt.returncode}:\n"
                                 f"{attempt.stderr}")
        mode = next_mode(out)
    return attempts


def outcome(out: Path) -> dict:
    """What must not depend on kills: test accuracies, the final weights' SHA-256, the checkpoint files."""
    results = json.loads((out / "results.json").read_text())
    manifests = {p.stem: json.loads(p.read_text()) for p in sorted((out / "checkpoints").glob("*.json"))}
    return {
        "test_accuracy": {name: s["test_accuracy"] for name, s in results["strategies"].items()},
        "local_test_accuracy": results["local"]["test_accuracy"],
        "weights_sha256": {stage: m["files"]["weights"]["sha256"] for stage, m in manifests.items()},
        "epochs": {stage: m["state"]["epoch"] for stage, m in manifests.items()},
        "checkpoint_files": sorted(p.name for p in (out / "checkpoints").iterdir()),
        "metrics_lines": len((out / "metrics.jsonl").read_text().splitlines()),
    }


def differences(reference: dict, other: dict) -> list[str]:
    return [f"{key}: {reference[key]} != {other[key]}" for key in reference if reference[key] != other[key]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--kills", type=int, default=2, help="kills per run (at least 1)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the kill points (default: random)")
    parser.add_argument("--dir", help="keep the run directories here (default: a temporary folder)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else time.time_ns() % 10**6
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        config = write_config(root / "config.yaml")
        seconds = reference_run(config, root / "reference")
        reference = outcome(root / "reference")
        print(f"seed {seed}; uninterrupted run: {seconds:.2f} s; kill times drawn from [0.5, {seconds:.2f}] s")
        identical, kills, mid_write, restarts = 0, 0, 0, 0
        for run in range(1, args.runs + 1):
            out = root / f"run{run}"
            for _ in range(5):
                points = [round(rng.uniform(0.5, seconds), 2) if k % 2 == 0 else (CHECKPOINT, rng.random())
                          for k in range(max(1, args.kills))]
                attempts = run_with_kills(config, out, points)
                if attempts[0].killed_at is not None or not isinstance(points[0], float):
                    break
                # The machine was faster than during the reference run: the first kill point came after the end.
                # Draw again from [0.5, this run's duration] so that every counted run was killed at least once.
                print(f"run {run:2d}: finished in {attempts[0].seconds:.2f} s, before the kill at {points[0]:.2f} s; "
                      f"drawing again from [0.5, {attempts[0].seconds:.2f}] s")
                seconds = min(seconds, attempts[0].seconds)
                shutil.rmtree(out)
            diff = differences(reference, outcome(out))
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
