"""The study directory and its runs: plan them from what is on disk, print them, or run them J at a time.

```
DIR/
  study.yaml          the study file as given
  study-spec.json     its resolved spec and SHA-256, and the SHA-256 of study.yaml and base.yaml: a different
                      study pointed at DIR (other than more seeds or axis values), or an edited file, is refused
  command.txt         the command that made the study (study.md gives it, and the last one when they differ)
  base.yaml           the base config with the study's `set` applied; every run is `ddcnn run DIR/base.yaml ...`
  runs/<cell>/seed-<s>/   ordinary run directories (resumable and inspectable on their own); with budgets:
  runs/<cell>/<budget>/seed-<s>/   one per budget (ddcnn.study.budgets), e.g. runs/grid-2x2/global-24/seed-0
  logs/<cell>/[<budget>/]seed-<s>.log   each run's output, with the command first and its exit status last
  stages/             the finished stages the runs share, each trained once (ddcnn.train.stagestore)
  study.json, study.md, plots/   the aggregate (ddcnn.study.aggregate, ddcnn.study.report)
```
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

from ddcnn.errors import ConfigError
from ddcnn.files import load_yaml, open_append, own_folder, refuse_linked_folders
from ddcnn.models.backbones import BACKBONES
from ddcnn.study.budgets import Point, extends_budgets
from ddcnn.study.sharing import producers
from ddcnn.study.spec import Cell, Study

SPEC_FILE = "study-spec.json"
COMMAND_FILE = "command.txt"  # the command that made the study, for its report
EXIT_PREFIX = "[study] exit status "
INTERRUPTED = (0, 130, -2, -9, -15)  # stopped by Ctrl-C or a signal: not a failure of the run itself
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class Run:
    """One cell at one seed (and one budget: ``point``); ``state`` is finished, failed, interrupted (started, no
    results) or new; ``overrides``: its --set values (the cell's, the budget's, the seed)."""

    cell: Cell
    seed: int
    out: Path
    log: Path
    state: str
    point: Point | None = None
    overrides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return "/".join([self.cell.id, *([self.point.id] if self.point else []), f"seed-{self.seed}"])

    def args(self, base: Path, trusted: bool = False, store: Path | None = None) -> list[str]:
        """The arguments after ``ddcnn``: a fresh run, ``--resume`` of a started one, ``--force`` of a leftover;
        ``--trust-code`` when the study itself is trusted (base.yaml's checksum is checked before any run);
        ``--stage-store`` the study's folder of shared stages."""
        extra = []
        if (self.out / "ddcnn-run.json").is_file():
            extra = ["--resume"]
        elif self.out.is_dir() and any(self.out.iterdir()):  # killed before the run wrote its marker
            extra = ["--force"]
        overrides = self.overrides or (*self.cell.overrides(), f"seed={self.seed}")
        sets = [a for override in overrides for a in ("--set", override)]
        return ["run", str(base), *sets, "--out", str(self.out),
                *(["--stage-store", str(store)] if store is not None else []), "--quiet", *extra,
                *(["--trust-code"] if trusted else [])]


def finished(out: Path) -> bool:
    """Whether ``out`` holds a run's results: results.json that parses and lists strategies."""
    try:
        results = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(results, dict) and isinstance(results.get("strategies"), dict) and bool(results["strategies"])


def exit_status(log: Path) -> int | None:
    """The exit status the log's last line records (None: no log, or the run was killed with the study)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    if lines and lines[-1].startswith(EXIT_PREFIX):
        try:
            return int(lines[-1][len(EXIT_PREFIX):].split()[0])
        except (ValueError, IndexError):
            return None
    return None


def last_error(log: Path) -> str:
    """The line of the log that says why the run failed (its `ddcnn: error:` line, else its last output)."""
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    lines = [ln for ln in lines if not ln.startswith(EXIT_PREFIX)]
    errors = [ln for ln in lines if ln.startswith("ddcnn: error:") or "Error" in ln]
    return (errors or lines or ["no output"])[-1].strip()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _die_with(parent: int) -> None:
    """In the child, before ``ddcnn run`` starts: the kernel sends it SIGTERM when the study process (``parent``)
    dies, even by SIGKILL (Linux ``prctl(PR_SET_PDEATHSIG)``), so that no run goes on unattended. (The signal
    follows the thread that started the child: the pool's thread waits for it, so it lives as long.)"""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the study died between the fork and the prctl
        os._exit(1)


class StudyDir:
    def __init__(self, study: Study, path: str | Path | None, trusted: bool = False):
        """``trusted``: the study's runs may import the backbone its base names (see :mod:`ddcnn.models.settings`)."""
        named = {(study.base.get("model") or {}).get("backbone", "vgg"), *study.axes.get("model.backbone", [])}
        # --trust-code reaches the runs only where a run imports code: a study of built-in backbones needs none.
        self.study, self.trusted = study, trusted and bool(named - set(BACKBONES))
        self.path = Path(path) if path is not None else Path("runs") / study.name
        self.base = self.path / "base.yaml"
        self.store = self.path / "stages"

    def files(self) -> dict[str, str]:
        """The files the runs read (besides the study's own runs): name -> their text."""
        return {"study.yaml": self.study.text, "base.yaml": yaml.safe_dump(self.study.base, sort_keys=False)}

    def check(self) -> None:
        """Refuse a directory that holds another study or other files, or whose files were changed; accept this
        study's own or a new one."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise ConfigError(f"study directory {str(path)!r} is a file; choose another --out")
        refuse_linked_folders(path, ("runs", "logs", "plots", "stages"))  # the study writes into them: no link
        for name in ("runs", "logs", "plots", "stages"):
            if (path / name).exists() and not (path / name).is_dir():
                raise ConfigError(f"study directory {str(path)!r}: {name!r} is a file where the study's folder "
                                  f"belongs; move it away, or choose another --out")
        spec = path / SPEC_FILE
        if spec.is_file():
            try:
                recorded = json.loads(spec.read_text())
                sha = recorded["sha256"]
                files = recorded.get("files", {})
                if not (isinstance(sha, str) and isinstance(files, dict) and all(
                        isinstance(v, str) for v in files.values())):
                    raise TypeError(sha)
            except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
                raise ConfigError(f"study directory {str(path)!r}: {SPEC_FILE} is damaged; restore it or choose "
                                  f"another --out") from None
            if sha != self.study.sha256 and not extends(recorded.get("spec"), self.study):
                raise ConfigError(
                    f"study directory {str(path)!r} holds the study {recorded.get('name')!r} (spec "
                    f"{sha[:12]}), not {str(self.study.path)!r} (spec {self.study.sha256[:12]}): its base, set, axes "
                    f"or seeds differ (beyond more seeds or more axis values, which extend it); choose another "
                    f"--out, or give the study file it was made from ({str(path / 'study.yaml')!r})")
            self._check_files(files)
        elif path.is_dir() and any(path.iterdir()):
            raise ConfigError(f"study directory {str(path)!r} already holds files that are not a ddcnn study; "
                              f"choose another --out")

    def _check_files(self, recorded: dict[str, str]) -> None:
        """Each file of :meth:`files` must be as this study writes it and as study-spec.json recorded it (a study
        directory of an older ddcnn records none: the files are still compared with the study)."""
        for name in self.files():
            target = self.path / name
            try:
                now = _sha256(target.read_text())
            except (OSError, UnicodeDecodeError):
                raise ConfigError(f"study directory {str(self.path)!r}: {name} cannot be read; restore it (the "
                                  f"study writes it once, from the study file) or choose another --out") from None
            # base.yaml is also compared, as data, with the study's base: key order is not a change
            if now != recorded.get(name, now) or (name == "base.yaml" and not self._same_base(target)):
                raise ConfigError(f"study directory {str(self.path)!r}: {name} was changed since the study wrote "
                                  f"it (its SHA-256 differs from {SPEC_FILE}); restore it, or start the study in "
                                  f"another --out")

    def _same_base(self, target: Path) -> bool:
        try:
            return load_yaml(target.read_text(), repr(str(target)), ConfigError) == self.study.base
        except (ConfigError, yaml.YAMLError):
            return False

    def create(self, command: str | None = None) -> None:
        """Write the study's record (once): the spec, the study file, the base config the runs start from and the
        ``command`` that made the study (a later --resume or --aggregate does not replace it). An extended study
        (more seeds or axis values) gets its new study file and spec; its base.yaml is the same."""
        from ddcnn.files import atomic_write_text

        self.check()
        spec = self.path / SPEC_FILE
        files = self.files()
        if spec.is_file():
            if json.loads(spec.read_text())["sha256"] == self.study.sha256:
                return
            atomic_write_text(self.path / "study.yaml", self.study.text)
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            for name, text in files.items():
                atomic_write_text(self.path / name, text)
            if command:
                atomic_write_text(self.path / COMMAND_FILE, command + "\n")
        # The spec last: its presence says the directory is complete.
        atomic_write_text(self.path / SPEC_FILE, json.dumps({
            "name": self.study.name, "sha256": self.study.sha256, "spec": self.study.spec,
            "files": {name: _sha256(text) for name, text in files.items()}}, indent=2) + "\n")

    def first_command(self) -> str | None:
        """The command that made the study, as :meth:`create` recorded it (None for a study made before it did)."""
        try:
            return (self.path / COMMAND_FILE).read_text().strip() or None
        except (OSError, UnicodeDecodeError):
            return None

    def plan(self) -> list[Run]:
        runs = []
        # Seed by seed, so that a study stopped early has the same seeds in every cell (paired claims need them).
        for seed, cell, point in ((s, c, p) for s in self.study.seeds for c in self.study.cells()
                                  for p in self.study.points()):
            folder = Path(cell.id, *([point.id] if point else []))
            out = self.path / "runs" / folder / f"seed-{seed}"
            log = self.path / "logs" / folder / f"seed-{seed}.log"
            if finished(out):
                state = "finished"
            elif (exit_status(log) or 0) not in INTERRUPTED:
                state = "failed"
            elif out.exists() or log.exists():
                state = "interrupted"
            else:
                state = "new"
            runs.append(Run(cell, seed, out, log, state, point,
                            tuple(self.study.run_overrides(cell, point, seed))))
        return runs

    def started(self) -> bool:
        return (self.path / "runs").is_dir() and any((self.path / "runs").iterdir())


def extends(recorded, study: Study) -> bool:
    """Whether ``study`` is the recorded spec with more seeds or more values on its axes, and nothing else changed:
    then every finished run keeps its folder and its config, and only the new runs are to do."""
    if not isinstance(recorded, dict):
        return False
    old_axes, old_seeds = recorded.get("axes"), recorded.get("seeds")
    if recorded.get("name") != study.name or recorded.get("base") != study.base or not isinstance(old_axes, dict) \
            or list(old_axes) != list(study.axes) or not isinstance(old_seeds, list) \
            or recorded.get("split_seed") != study.split_seed or not extends_budgets(recorded.get("budgets"),
                                                                                     study.budgets):
        return False
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in old_seeds) or \
            not set(old_seeds) <= set(study.seeds):
        return False
    if any(not isinstance(values, list) or any(v not in study.axes[key] for v in values)
           for key, values in old_axes.items()):
        return False
    old = Study(study.name, study.path, study.base, old_axes, old_seeds, "")
    try:  # the finished cells keep their folders
        return {(c.id, json.dumps(c.values, sort_keys=True)) for c in old.cells()} <= \
            {(c.id, json.dumps(c.values, sort_keys=True)) for c in study.cells()}
    except (ConfigError, TypeError, ValueError, AttributeError):  # a tampered spec: not this study's extension
        return False


def commands(study_dir: StudyDir, runs: list[Run]) -> list[str]:
    """One ``ddcnn run ...`` line per run that is not finished (for a SLURM array, GNU parallel, ...)."""
    return ["ddcnn " + " ".join(shlex.quote(a) for a in run.args(study_dir.base, study_dir.trusted,
                                                                 study_dir.store))
            for run in runs if run.state != "finished"]


def _devices() -> list[str]:
    """The GPUs to deal out one per run ('' when there is none to choose: the run's own default)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()] or [""]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())] or [""]
    except Exception:  # noqa: BLE001 - no CUDA runtime: CPU runs
        return [""]


def _environment(slot: int, jobs: int, devices: list[str]) -> dict[str, str]:
    env = dict(os.environ)
    # The runs import this ddcnn, also from a source tree that is not installed.
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    if "OMP_NUM_THREADS" not in env:  # J runs share the cores instead of each taking all of them
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = str(max(1, cores // jobs))
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = threads
    if devices != [""]:
        env["CUDA_VISIBLE_DEVICES"] = devices[slot % len(devices)]
    return env


def execute(study_dir: StudyDir, runs: list[Run], jobs: int, echo=print) -> list[Run]:
    """Run every run that is not finished, ``jobs`` at a time; return the runs that failed. A failed run keeps its log
    and does not stop the others; a finished run is never touched. A run that shares a stage with an earlier one
    (:func:`ddcnn.study.sharing.producers`) starts only once that one has ended, so that it reuses the stage instead
    of training it a second time at the same moment; meanwhile the next run that is ready takes the free slot."""
    todo = [run for run in runs if run.state != "finished"]
    deps = producers(study_dir.study, runs)
    ended = {run.name for run in runs if run.state == "finished"}
    pending = list(todo)
    devices = _devices()
    slots = list(range(jobs))
    lock = threading.Lock()
    failed: list[Run] = []
    done = [0]
    stop = threading.Event()
    active: set[subprocess.Popen] = set()

    def one(run: Run) -> None:
        if stop.is_set():
            return
        with lock:
            slot = slots.pop(0)
        try:
            own_folder(run.log.parent, study_dir.path)  # logs/ and logs/CELL: never a link out of the study
            own_folder(run.out.parent, study_dir.path)
            args = run.args(study_dir.base, study_dir.trusted, study_dir.store)
            start = time.monotonic()
            with open_append(run.log, "w") as log:
                log.write("ddcnn " + " ".join(shlex.quote(a) for a in args) + "\n")
                log.flush()
                with lock:
                    if stop.is_set():
                        return
                    process = subprocess.Popen([sys.executable, "-m", "ddcnn", *args], stdout=log,
                                               stderr=subprocess.STDOUT, env=_environment(slot, jobs, devices),
                                               preexec_fn=functools.partial(_die_with, os.getpid())
                                               if sys.platform == "linux" else None)
                    active.add(process)
                status = process.wait()
                with lock:
                    active.discard(process)
                seconds = time.monotonic() - start
                log.write(f"{EXIT_PREFIX}{status} after {seconds:.1f} s\n")
            ok = status == 0 and finished(run.out)
            with lock:
                done[0] += 1
                if not ok and status not in INTERRUPTED:
                    failed.append(run)
                if ok:
                    what = f"done in {seconds:.0f} s"
                elif status in INTERRUPTED:
                    what = "stopped; continue with --resume"
                else:
                    what = f"FAILED (exit {status}): {last_error(run.log)}; log: {run.log}"
                echo(f"[{done[0]}/{len(todo)}] {run.name}: {what}")
        finally:
            with lock:
                slots.append(slot)

    echo(f"study {study_dir.study.name}: {len(todo)} of {len(runs)} runs to do, {jobs} at a time, in "
         f"{study_dir.path}")
    ready = threading.Condition(lock)

    def next_run() -> Run | None:
        """The first pending run whose producers have ended (None: nothing left, or the study is stopping)."""
        with ready:
            while not stop.is_set() and pending:
                run = next((r for r in pending if deps[r.name] <= ended), None)
                if run is not None:
                    pending.remove(run)
                    return run
                ready.wait()
            return None

    def worker() -> None:
        while (run := next_run()) is not None:
            try:
                one(run)
            finally:
                with ready:
                    ended.add(run.name)
                    ready.notify_all()

    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        for future in [pool.submit(worker) for _ in range(jobs)]:
            future.result()
    except BaseException:  # Ctrl-C or SIGTERM: start no other run and stop those in flight (they resume later)
        with lock:
            stop.set()
            ready.notify_all()
            for process in active:
                process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return failed
