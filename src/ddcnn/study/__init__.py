"""``ddcnn study``: a base config swept over axes of config values and seeds, each cell × seed an ordinary run
directory, aggregated into means, confidence intervals and the paper's claims as paired differences.

- :mod:`ddcnn.study.spec`: the study file, checked against the config schema.
- :mod:`ddcnn.study.runner`: the study directory, its runs, their commands; running them J at a time.
- :mod:`ddcnn.study.stats`: mean, sample std, Student-t intervals (pure functions).
- :mod:`ddcnn.study.aggregate`, :mod:`ddcnn.study.report`: study.json, study.md, plots, the summary.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from pathlib import Path

from ddcnn.study.aggregate import RunData, aggregate, read_run
from ddcnn.study.frontier_report import frontier_markdown, frontier_summary
from ddcnn.study.runner import StudyDir, commands, execute
from ddcnn.study.spec import Study, load_study
from ddcnn.study.stats import summarize, t_quantile, verdict

TIMING_FILE = "timing.json"  # the timing pass's seconds (ddcnn.study.timing)
FRONTIER_METHOD = ("per point the mean test accuracy over seeds with its 95% Student-t interval (scipy.stats); "
                   "differences unpaired (Welch) unless both strategies start from the same local CNNs (then "
                   "paired by seed); beside each, a percentile bootstrap over seeds and test images (2,000 "
                   "replicates)")

__all__ = ["Study", "StudyDir", "RunData", "aggregate", "collect", "commands", "execute", "load_study", "read_run",
           "summarize", "t_quantile", "verdict"]


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (a scheduler's or `kill`'s stop) ends the study as Ctrl-C does: its runs in flight are stopped too,
    instead of going on as orphans while a resumed study starts them again."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def collect(study_dir: StudyDir, command: str | None = None) -> dict:
    """Aggregate whatever runs of the study exist; write study.json, study.md and plots/; return the data."""
    from ddcnn.files import atomic_write_text
    from ddcnn.study.report import write_report

    plan = study_dir.plan()
    if study_dir.study.budgets:
        data = frontier_data(study_dir, plan, command)
        atomic_write_text(study_dir.path / "study.json", json.dumps(data, indent=2) + "\n")
        atomic_write_text(study_dir.path / "study.md", frontier_markdown(data, study_dir.path))
        return data
    status: dict[str, dict[int, str]] = {}
    runs = []
    for run in plan:
        status.setdefault(run.cell.id, {})[run.seed] = run.state
        if run.state == "finished":
            runs.append(read_run(run.cell.id, run.seed, run.out))
    cells = [{"id": c.id, "label": c.label, "values": c.values} for c in study_dir.study.cells()]
    first = study_dir.first_command() or command
    data = {"name": study_dir.study.name, "spec_sha256": study_dir.study.sha256, "command": first,
            "last_command": command if command != first else None, "seeds": study_dir.study.seeds,
            **aggregate(cells, runs, status)}
    atomic_write_text(study_dir.path / "study.json", json.dumps(data, indent=2) + "\n")
    write_report(data, study_dir.path)
    return data


def _summary(study_dir: StudyDir, data: dict) -> str:
    from ddcnn.study.report import summary_text

    return frontier_summary(data) if study_dir.study.budgets else summary_text(data)


def _test_labels(study: Study) -> list[int] | None:
    """The test set's classes, for the bootstrap over test images (None when the data cannot be read here)."""
    from ddcnn.config import from_dict
    from ddcnn.data.datasets import load_datasets
    from ddcnn.errors import DDCNNError

    try:
        return load_datasets(from_dict(study.base, []).data)[1].labels.tolist()
    except (DDCNNError, OSError):
        return None


def frontier_data(study_dir: StudyDir, plan, command: str | None = None) -> dict:
    """study.json of a budget study: per cell the frontier and its claims (:mod:`ddcnn.study.frontier`), what
    sharing saved, the runs' states, and the timing pass's seconds when it ran (timing.json)."""
    from ddcnn.config import from_dict
    from ddcnn.study.aggregate import ENVIRONMENT_KEYS
    from ddcnn.study.frontier import MARGIN, frontier
    from ddcnn.study.sharing import sharing_summary

    study = study_dir.study
    finished = [(run, read_run(run.cell.id, run.seed, run.out)) for run in plan if run.state == "finished"]
    labels = _test_labels(study)
    margin = from_dict(study.base, []).evaluation.target_margin
    cells: list[dict] = []
    for cell in study.cells():
        mine = [data for run, data in finished if run.cell.id == cell.id]
        states: dict[str, int] = {}
        for run in plan:
            if run.cell.id == cell.id:
                states[run.state] = states.get(run.state, 0) + 1
        cells.append({"id": cell.id, "label": cell.label, "values": cell.values, "runs": states,
                      "seeds_finished": sorted({d.seed for d in mine}),
                      "frontier": frontier(mine, labels, margin)})
    environment: dict[str, object] = {}
    for _, data in finished:
        for key in ENVIRONMENT_KEYS:
            environment.setdefault(key, data.results.get(key))
    first = study_dir.first_command() or command
    timing = None
    if (study_dir.path / TIMING_FILE).is_file():
        from ddcnn.study.timing import point_seconds

        timing = json.loads((study_dir.path / TIMING_FILE).read_text())
        for entry in cells:  # every point's seconds from the pass run alone
            for pts in entry["frontier"]["points"].values():
                for point in pts:
                    point["timed"] = point_seconds(timing, entry["id"], point["epochs"])
    return {"name": study.name, "spec_sha256": study.sha256, "command": first, "seeds": study.seeds,
            "budgets": study.budgets, "method": FRONTIER_METHOD, "margin": MARGIN,
            "bootstrap": labels is not None, "environment": environment,
            "sharing": sharing_summary([data for _, data in finished]), "cells": cells, "timing": timing}


def run_study(path: str | Path, out: str | Path | None = None, jobs: int = 1, resume: bool = False,
              print_commands: bool = False, aggregate_only: bool = False, command: str | None = None,
              echo=print, trusted: bool = True, time_only: bool = False) -> int:
    """What ``ddcnn study`` does; returns the exit status (1 when a run failed, else 0). ``trusted``: the study's
    runs may import a backbone its base names by import path (the command line trusts a study file it is given,
    but not one inside a study or run directory, without --trust-code)."""
    from ddcnn.errors import ConfigError

    if jobs < 1:
        raise ConfigError(f"--jobs {jobs} must be at least 1, e.g. --jobs 2")
    study = load_study(path, trusted)
    study_dir = StudyDir(study, out, trusted)
    if time_only:
        study_dir.check()
        if not study.budgets or not (study_dir.path / "study-spec.json").is_file():
            raise ConfigError(f"--time: {str(study_dir.path)!r} holds no budget study yet; --time measures the stages "
                              f"of a study with budgets: after its sweep (ddcnn study {path} --out {study_dir.path})")
        from ddcnn.files import atomic_write_text
        from ddcnn.study.timing import time_study

        timing = time_study(study, echo=echo)
        atomic_write_text(study_dir.path / TIMING_FILE, json.dumps(timing, indent=2) + "\n")
        aggregate_only = True
    if aggregate_only:
        study_dir.check()
        if not (study_dir.path / "study-spec.json").is_file():
            raise ConfigError(f"--aggregate: {str(study_dir.path)!r} holds no study yet; run it first (ddcnn study "
                              f"{path} --out {study_dir.path})")
        echo(_summary(study_dir, collect(study_dir, command)))
        echo(f"report: {study_dir.path / 'study.md'}")
        return 0
    if print_commands:
        study_dir.create(command)  # the commands read DIR/base.yaml
        lines = commands(study_dir, study_dir.plan())
        for line in lines:
            echo(line)
        return 0
    if study_dir.started() and not resume:
        study_dir.check()
        raise ConfigError(f"study directory {str(study_dir.path)!r} already holds runs of this study; use --resume "
                          f"to run the ones not finished (finished runs are kept), or choose another --out")
    study_dir.create(command)
    with _terminate_as_interrupt():
        failed = execute(study_dir, study_dir.plan(), jobs, echo=echo)
    echo(_summary(study_dir, collect(study_dir, command)))
    echo(f"report: {study_dir.path / 'study.md'}")
    if failed:
        echo(f"{len(failed)} run(s) failed; their logs are under {study_dir.path / 'logs'}; fix the cause and "
             f"continue with --resume")
        return 1
    return 0
