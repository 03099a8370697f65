"""A run killed with SIGKILL at any point and continued with ``--resume`` ends exactly where an uninterrupted run
ends: the same test accuracies in results.json and, stronger, bit-identical final weights (the SHA-256 of every
stage's weights file, taken from the checkpoint manifests).

The harness is ``benchmarks/kill_resume.py``, which runs the same check K times. Every run is a real process,
``python -m ddcnn run CFG --out DIR --quiet`` with one thread, killed either at a random time or as soon as a
checkpoint's temporary file appears (i.e. while a checkpoint is being written, best effort: the write may finish
before the signal lands). A process killed before the run directory's marker ``ddcnn-run.json`` exists has no run
to resume (``--resume`` says "holds no ddcnn run"), so the harness restarts it with ``--force`` instead.
"""

from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _load_harness():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kill_resume.py"
    spec = importlib.util.spec_from_file_location("ddcnn_bench_kill_resume", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


_h = _load_harness()
CHECKPOINT, ENV, command, next_mode, outcome = _h.CHECKPOINT, _h.ENV, _h.command, _h.next_mode, _h.outcome
differences, run_once, run_with_kills, write_config = _h.differences, _h.run_once, _h.run_with_kills, _h.write_config


# ----------------------------------------------------------------------------------------------------- tests --
@pytest.mark.slow
@pytest.mark.heavy  # two kills and resumes of a whole run: make test-heavy
def test_a_run_killed_twice_resumes_to_identical_results(tmp_path):
    """Kill 1 while a checkpoint is being written (a random one of the run's), kill 2 at a random time
    between 0.5 s and the uninterrupted run's duration; then resume to the end. The uninterrupted run goes
    alongside the first process, so the test takes about two runs' time. DDCNN_KILL_SEED fixes the draws."""
    seed = int(os.environ.get("DDCNN_KILL_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    config = write_config(tmp_path / "config.yaml")
    start = time.perf_counter()
    reference = subprocess.Popen(command(config, tmp_path / "reference"), env=ENV, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    out = tmp_path / "killed"
    attempts = [run_once(config, out, "fresh", (CHECKPOINT, rng.random()))]
    _, reference_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, reference_err
    seconds = time.perf_counter() - start
    if attempts[0].killed_at is not None:
        attempts += run_with_kills(config, out, [round(rng.uniform(0.5, seconds), 2)], next_mode(out))
    log = f"seed {seed}, uninterrupted run {seconds:.1f} s\n" + "\n".join(a.describe() for a in attempts)
    print(log)  # shown with -s or -rP
    assert attempts[-1].returncode == 0, log + "\n" + attempts[-1].stderr
    assert attempts[0].killed_at is not None, "the kill at a checkpoint write did not happen:\n" + log
    assert not differences(outcome(tmp_path / "reference"), outcome(out)), log
    assert not list(out.glob(".*.tmp")), log


def test_resume_removes_what_a_kill_left_behind(tmp_path, tiny_config):
    """Temporary files of an interrupted write, and a previous version's files when the kill came between the new
    manifest and their deletion, are removed by --resume; the files the manifests name stay."""
    import torch

    from ddcnn.train.admit import admit_run_dir
    from ddcnn.train.store.rundir import RunDir

    cfg = tiny_config()
    run = RunDir(tmp_path / "run")
    run.prepare(cfg, resume=False, force=False)
    state = {"epoch": 1, "seconds": 0.5, "done": False, "step": 5,  # the state ddcnn.train.engine.loop.fit saves
             "history": [{"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5, "lr": 1e-3, "seconds": 0.5}]}
    run.checkpoints.save("global", "e1", {"w": torch.ones(2)}, state, optimizer=None)
    kept = sorted(p.name for p in run.checkpoints.root.iterdir())
    (run.checkpoints.root / "global-e0.weights.safetensors").write_bytes(b"old version")
    (run.checkpoints.root / ".global-e2.weights.safetensors.ab12cd34.tmp").write_bytes(b"half")
    (run.path / ".metrics.jsonl.ab12cd34.tmp").write_text("half")
    (run.path / "notes.txt").write_text("mine")
    run.prepare(cfg, resume=True, force=False, events=admit_run_dir(run, cfg, True, False))
    assert sorted(p.name for p in run.checkpoints.root.iterdir()) == kept
    assert not list(run.path.glob(".*.tmp")) and (run.path / "notes.txt").is_file()
    run.checkpoints.load("global")


def test_a_directory_killed_before_its_marker_is_restarted_with_force(tmp_path, tiny_config):
    """What the harness relies on: a directory that a run was killed in before the marker was written holds no run
    to resume; --force starts one there, removing the half-written files."""
    from ddcnn.errors import CheckpointError
    from ddcnn.train.admit import admit_run_dir
    from ddcnn.train.store.rundir import RunDir

    out = tmp_path / "early"
    out.mkdir()
    (out / "config.yaml").write_text("name: half-written\n")
    (out / ".ddcnn-run.json.x1y2z3ab.tmp").write_text("{")
    with pytest.raises(CheckpointError, match="holds no ddcnn run.*--force instead of --resume"):
        admit_run_dir(RunDir(out), tiny_config(), True, False)
    admit_run_dir(RunDir(out), tiny_config(), False, True)
    RunDir(out).prepare(tiny_config(), resume=False, force=True)
    assert RunDir(out).is_run and not list(out.glob(".*.tmp"))
