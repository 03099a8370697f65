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
from ddcnn.study.runner import StudyDir, commands, execute
from ddcnn.study.spec import Study, load_study
from ddcnn.study.stats import summarize, t_quantile, verdict

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


def run_study(path: str | Path, out: str | Path | None = None, jobs: int = 1, resume: bool = False,
              print_commands: bool = False, aggregate_only: bool = False, command: str | None = None,
              echo=print, trusted: bool = True) -> int:
    """What ``ddcnn study`` does; returns the exit status (1 when a run failed, else 0). ``trusted``: the study's
    runs may import a backbone its base names by import path (the command line trusts a study file it is given,
    but not one inside a study or run directory, without --trust-code)."""
    from ddcnn.errors import ConfigError
    from ddcnn.study.report import summary_text

    if jobs < 1:
        raise ConfigError(f"--jobs {jobs} must be at least 1, e.g. --jobs 2")
    study = load_study(path, trusted)
    study_dir = StudyDir(study, out, trusted)
    if aggregate_only:
        study_dir.check()
        if not (study_dir.path / "study-spec.json").is_file():
            raise ConfigError(f"--aggregate: {str(study_dir.path)!r} holds no study yet; run it first (ddcnn study "
                              f"{path} --out {study_dir.path})")
        echo(summary_text(collect(study_dir, command)))
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
    echo(summary_text(collect(study_dir, command)))
    echo(f"report: {study_dir.path / 'study.md'}")
    if failed:
        echo(f"{len(failed)} run(s) failed; their logs are under {study_dir.path / 'logs'}; fix the cause and "
             f"continue with --resume")
        return 1
    return 0
