"""`ddcnn study` end to end on tiny generated-data studies: runs, a failed run, --aggregate over a partial study,
--print-commands, --resume after a simulated kill, and the bad inputs."""

import datetime
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_dict
from ddcnn.cli import main
from ddcnn.config import load_config, parse_set
from ddcnn.study.spec import Cell


def write_study(folder: Path, file="s.yaml", **changes) -> Path:
    base = tiny_dict(2)
    base["stages"] = {stage: {"epochs": 1, "batch_size": 32} for stage in base["stages"]}
    study = {"name": "tiny_study", "base": base, "axes": {"decomposition.grid": [[2, 2], [16, 16]]}, "seeds": [0, 1]}
    study.update(changes)
    path = folder / file
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the runs are tiny: one thread each
    return tmp_path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddcnn: error: "), err
    return err[0]


# Three runs, one failing, then a resume: seconds on 2 cores, so with the heavy cases.
@pytest.mark.heavy
def test_a_study_reports_a_failed_run_aggregates_a_partial_study_and_resumes(workspace, capsys):
    study, out = write_study(workspace), workspace / "out"
    # A [16, 16] grid cuts the 16x16 images into 1-pixel subimages: that cell's runs fail, the others go on.
    assert main(["study", str(study), "--out", str(out), "--jobs", "2"]) == 1
    printed = capsys.readouterr().out
    assert "FAILED (exit 2): ddcnn: error: grid [16, 16]" in printed and "2 run(s) failed" in printed
    assert "ddcnn: error: grid [16, 16]" in (out / "logs/grid-16x16/seed-1.log").read_text()
    data = json.loads((out / "study.json").read_text())
    ok, bad = data["cells"]
    assert ok["seeds"]["finished"] == [0, 1] and bad["seeds"]["failed"] == [0, 1]
    assert ok["claims"]["cnn_dnn - mean_probability"]["n"] == 2
    assert bad["claims"]["transfer - global"]["verdict"] == "not measured"
    assert [p["epoch"] for p in ok["curves"]["transfer"]] == [1]
    # the time claim per seed: a ratio where both reached the target, else counted as not reached
    for key in ("seconds", "critical_path_seconds"):
        claim = ok["time_claims"]["transfer / global"]
        assert claim[key]["n"] + len(claim["not_reached"]) == 2
    # a fixed budget, and the global CNN (1 epoch, at its cap) trained fewer CNN epochs than the transfer CNN-DNN
    assert ok["regime"] == "fixed budget" and ok["stop_reasons"]["global"] == {"cap": 2}
    assert any("transfer" in w and "more CNN epochs" in w for w in ok["warnings"])
    report = (out / "study.md").read_text()
    assert "## Time to target" in report and "a fixed budget" in report and "**warning**" in report
    for name in ("study.md", "plots/accuracy.png", "plots/accuracy_vs_time.png", "plots/learning_curves.png"):
        assert (out / name).is_file()
    assert "| decomposition.grid=2x2 | CNN-DNN − mean probability |" in (out / "study.md").read_text()

    # Without --resume an existing study is refused, and nothing changes.
    before = snapshot(out)
    assert main(["study", str(study), "--out", str(out)]) == 2
    assert "use --resume" in one_error_line(capsys)
    assert snapshot(out) == before

    # A run killed before its results: --aggregate collects what exists, leaving the runs alone.
    kept = out / "runs/grid-2x2/seed-0/results.json"
    kept_bytes, kept_mtime = kept.read_bytes(), kept.stat().st_mtime_ns
    (out / "runs/grid-2x2/seed-1/results.json").unlink()
    runs_before = snapshot(out / "runs")
    assert main(["study", str(study), "--out", str(out), "--aggregate"]) == 0
    assert "1 of 4 runs finished, 2 failed, 1 interrupted" in capsys.readouterr().out
    ok = json.loads((out / "study.json").read_text())["cells"][0]
    assert ok["seeds"]["interrupted"] == [1] and ok["claims"]["transfer - coherent"]["n"] == 1
    assert ok["claims"]["transfer - coherent"]["verdict"] == "inconclusive"
    assert snapshot(out / "runs") == runs_before

    # --print-commands lists the runs still to do: the interrupted one resumes, the failed ones start again.
    assert main(["study", str(study), "--out", str(out), "--print-commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and not any("grid-2x2/seed-0" in line for line in lines)
    assert any("grid-2x2/seed-1" in line and line.endswith("--resume") for line in lines)

    # --resume runs only what is not finished; the finished run is not touched.
    assert main(["study", str(study), "--out", str(out), "--resume"]) == 1
    assert "3 of 4 runs to do" in capsys.readouterr().out
    assert kept.read_bytes() == kept_bytes and kept.stat().st_mtime_ns == kept_mtime
    assert "--resume" in (out / "logs/grid-2x2/seed-1.log").read_text().splitlines()[0]
    assert json.loads((out / "study.json").read_text())["cells"][0]["seeds"]["finished"] == [0, 1]


def test_print_commands_gives_one_run_per_cell_and_seed_that_ddcnn_run_accepts(workspace, capsys):
    study = write_study(workspace, axes={"model.backbone": ["vgg", "resnet"], "decomposition.overlap": [0, 1]},
                        seeds=[3, 5])
    assert main(["study", str(study), "--out", "out", "--print-commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 8 and len(set(lines)) == 8
    seen = set()
    for line in lines:
        args = shlex.split(line)
        assert args[:2] == ["ddcnn", "run"] and "--out" in args
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        cfg = load_config(args[2], sets)
        seen.add((cfg.model.backbone, cfg.decomposition.overlap, cfg.seed))
        assert args[args.index("--out") + 1].endswith(f"seed-{cfg.seed}")
    assert seen == {(b, o, s) for b in ("vgg", "resnet") for o in (0, 1) for s in (3, 5)}
    assert sorted(p.name for p in (workspace / "out").iterdir()) == ["base.yaml", "command.txt", "study-spec.json",
                                                                     "study.yaml"]


@pytest.mark.parametrize("value", ["vgg", "yes", "1.0", "a b", "", 3, 0.5, [2, 2], None, True, {"CT-1": "x"}])
def test_axis_values_survive_the_set_syntax(value):
    (override,) = Cell("c", {"k": value}).overrides()
    assert parse_set(override)[1] == value


BAD_STUDIES = {
    "unknown-axis-key": ({"axes": {"model.backbon": ["vgg"]}}, "unknown config key 'model.backbon' (did you mean "
                                                                "'backbone'?)"),
    "empty-axis": ({"axes": {"model.backbone": []}}, "axis 'model.backbone' has no values"),
    "axis-not-a-list": ({"axes": {"model.backbone": "vgg"}}, "axis 'model.backbone' must be a list of values"),
    "bad-axis-value": ({"axes": {"model.backbone": ["vgg", "resnt"]}}, "axis 'model.backbone' = resnt: "
                                                                       "model.backbone = 'resnt' is not valid"),
    "duplicate-axis-value": ({"axes": {"model.width": [4, 4]}}, "lists the value 4 twice"),
    "duplicate-seeds": ({"seeds": [0, 1, 0]}, "seed 0 is listed twice"),
    "no-seeds": ({"seeds": []}, "seeds must be a non-empty list"),
    "seed-as-axis": ({"axes": {"seed": [0, 1]}}, "'seed' cannot be set or be an axis"),
    "unknown-study-key": ({"seed": [0]}, "unknown key 'seed' (did you mean 'seeds'?)"),
    "unknown-set-key": ({"set": {"stages.local.epocs": 1}}, "set: unknown config key 'stages.local.epocs'"),
    "missing-base": ({"base": "nowhere.yaml"}, "base config"),
    "name-dot-dot": ({"name": ".."}, "name = '..' must be letters"),
    "seed-too-large": ({"seeds": [0, 2**64]}, "seeds must be a non-empty list of whole numbers from 0 to 2**63 - 1"),
    "date-in-set": ({"set": {"data.root": datetime.date(2024, 1, 1)}}, "set.data.root = datetime.date(2024, 1, 1) "
                                                                        "is a date"),
    "date-in-axis": ({"axes": {"name": [datetime.date(2024, 1, 1)]}}, "axes.name[0] = datetime.date(2024, 1, 1)"),
}


@pytest.mark.parametrize("case", sorted(BAD_STUDIES))
def test_bad_studies_are_one_error_that_names_the_value(workspace, capsys, case):
    changes, message = BAD_STUDIES[case]
    study = write_study(workspace, **changes)
    assert main(["study", str(study), "--out", "out"]) == 2
    assert message in one_error_line(capsys)
    assert not (workspace / "out").exists()


def test_a_study_directory_of_another_study_or_of_other_files_is_refused(workspace, capsys):
    assert main(["study", str(write_study(workspace)), "--out", "out", "--print-commands"]) == 0
    capsys.readouterr()
    before = snapshot(workspace / "out")
    other = write_study(workspace, "other.yaml", seeds=[1, 2])  # seed 0 dropped: not an extension
    for extra in ([], ["--resume"], ["--aggregate"], ["--print-commands"]):
        assert main(["study", str(other), "--out", "out", *extra]) == 2
        assert "holds the study 'tiny_study'" in one_error_line(capsys)
    assert snapshot(workspace / "out") == before
    (workspace / "mine").mkdir()
    (workspace / "mine/notes.txt").write_text("x")
    assert main(["study", str(other), "--out", "mine"]) == 2
    assert "not a ddcnn study" in one_error_line(capsys)
    assert main(["study", str(other), "--out", "new", "--aggregate"]) == 2
    assert "holds no study yet" in one_error_line(capsys)
    assert main(["study", str(other), "--jobs", "0"]) == 2
    assert "--jobs 0 must be at least 1" in one_error_line(capsys)


def test_parallel_runs_split_the_threads_and_take_one_gpu_each(monkeypatch):
    import os

    from ddcnn.study.runner import _environment

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cores = len(os.sched_getaffinity(0))
    env = _environment(slot=3, jobs=2, devices=["0", "1", "2"])
    assert env["OMP_NUM_THREADS"] == str(max(1, cores // 2)) and env["CUDA_VISIBLE_DEVICES"] == "0"
    assert _environment(slot=1, jobs=2, devices=["4", "6"])["CUDA_VISIBLE_DEVICES"] == "6"
    assert "CUDA_VISIBLE_DEVICES" not in _environment(slot=0, jobs=1, devices=[""])  # no GPU: the run's default
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice is kept
    assert _environment(slot=0, jobs=2, devices=[""])["OMP_NUM_THREADS"] == "3"


@pytest.mark.heavy  # five small runs; test_a_study_extends_only_by_more_seeds_and_axis_values runs in make test
def test_resume_with_more_seeds_and_axis_values_runs_only_the_new_runs(workspace, capsys):
    quick = {f"stages.{stage}.enabled": False for stage in ("global", "coherent", "transfer")}  # fewer stages
    first = write_study(workspace, axes={"decomposition.grid": [[2, 2]]}, seeds=[0], set=quick)
    assert main(["study", str(first), "--out", "out"]) == 0
    before = snapshot(workspace / "out/runs")
    extended = write_study(workspace, "more.yaml", axes={"decomposition.grid": [[2, 2], [1, 2]]}, seeds=[0, 1],
                           set=quick)
    assert main(["study", str(extended), "--out", "out"]) == 2  # a started study still needs --resume
    assert "use --resume" in one_error_line(capsys)
    assert main(["study", str(extended), "--out", "out", "--resume", "--jobs", "2"]) == 0
    assert "3 of 4 runs to do" in capsys.readouterr().out
    after = snapshot(workspace / "out/runs")
    assert {k: v for k, v in after.items() if k in before} == before  # the finished run, byte for byte
    data = json.loads((workspace / "out/study.json").read_text())
    assert [cell["seeds"]["finished"] for cell in data["cells"]] == [[0, 1], [0, 1]]
    assert json.loads((workspace / "out/study-spec.json").read_text())["spec"]["seeds"] == [0, 1]
    changed = write_study(workspace, "changed.yaml", axes={"decomposition.grid": [[2, 2], [1, 2]]}, seeds=[0, 1],
                          set={**quick, "model.width": 8})
    assert main(["study", str(changed), "--out", "out", "--resume"]) == 2  # any other change is refused
    assert "holds the study 'tiny_study'" in one_error_line(capsys)


def test_the_study_records_the_command_that_made_it(workspace, capsys):
    study = write_study(workspace)
    assert main(["study", str(study), "--out", "out", "--print-commands"]) == 0
    assert main(["study", str(study), "--out", "out", "--aggregate"]) == 0
    data = json.loads((workspace / "out/study.json").read_text())
    assert data["command"] == f"ddcnn study {study} --out out --print-commands"
    assert data["last_command"] == f"ddcnn study {study} --out out --aggregate"
    report = (workspace / "out/study.md").read_text()
    assert f"Command: `ddcnn study {study} --out out --print-commands` (last run: `ddcnn study {study} --out out " \
           f"--aggregate`)" in report


def test_study_plots_clip_intervals_to_0_100_and_count_whole_epochs(tmp_path):
    from ddcnn.study.report import _accuracy_bounds, curves_figure, plot_curves

    assert _accuracy_bounds({"mean": 0.6, "ci_low": -0.46 + 0.0, "ci_high": 1.3}) == pytest.approx((60, 0, 100))
    assert _accuracy_bounds({"mean": 0.6, "ci_low": None, "ci_high": None}) == pytest.approx((60, 60, 60))
    curve = [{"epoch": e, "mean": 0.5, "ci_low": -0.2, "ci_high": 1.2, "n": 2} for e in (1, 2)]
    data = {"cells": [{"label": "a=1", "values": {"a": 1}, "curves": {"transfer": curve, "coherent": curve}}]}
    plot_curves(data, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    (ax,) = curves_figure(data).axes
    ticks = ax.get_xticks()
    assert list(ticks[(ticks >= 1) & (ticks <= 2)]) == [1.0, 2.0]  # no 1.25, 1.5, ...
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert (band.min(), band.max()) == pytest.approx((0, 100))  # the band, clipped


# --------------------------------------------------------------------------- study files and study directories --
def test_a_study_file_is_read_with_the_bounded_yaml_loader(workspace, capsys):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    (workspace / "bomb.yaml").write_text(bomb)
    assert main(["study", "bomb.yaml", "--out", "out", "--print-commands"]) == 2
    assert "expands through YAML aliases" in one_error_line(capsys)
    assert not (workspace / "out").exists()


def test_a_study_of_too_many_runs_is_refused_before_its_cells_are_built(workspace, capsys):
    axes = {f"stages.{stage}.{key}": [round(0.01 * (i + 1), 2) for i in range(12)]
            for stage in ("global", "local", "combine") for key in ("lr", "weight_decay", "label_smoothing")}
    study = write_study(workspace, axes=axes)  # 12**9 cells x 2 seeds
    assert main(["study", str(study), "--out", "out", "--print-commands"]) == 2
    assert f"make {12**9 * 2:,} runs, more than 10,000" in one_error_line(capsys)
    assert not (workspace / "out").exists()


def test_an_out_of_an_unknown_user_is_one_error(workspace, capsys):
    assert main(["study", str(write_study(workspace)), "--out", "~nosuchuser_ddcnn/x", "--print-commands"]) == 2
    assert "no user 'nosuchuser_ddcnn'" in one_error_line(capsys)
    assert not list(workspace.glob("~*"))


def test_the_study_checksums_cover_its_base_and_a_damaged_spec_is_one_error(workspace, capsys):
    study = write_study(workspace)
    assert main(["study", str(study), "--out", "out", "--print-commands"]) == 0
    capsys.readouterr()
    recorded = json.loads((workspace / "out/study-spec.json").read_text())
    assert set(recorded["files"]) == {"study.yaml", "base.yaml"}
    base = workspace / "out/base.yaml"
    base.write_text(base.read_text().replace("width: 4", "width: 5"))
    before = snapshot(workspace / "out")
    for extra in (["--resume"], ["--aggregate"], ["--print-commands"]):
        assert main(["study", str(study), "--out", "out", *extra]) == 2
        assert "base.yaml was changed since the study wrote it" in one_error_line(capsys)
    assert snapshot(workspace / "out") == before
    spec = workspace / "out/study-spec.json"
    spec.write_text(json.dumps({**recorded, "sha256": 12}))
    assert main(["study", str(study), "--out", "out", "--aggregate"]) == 2
    assert "study-spec.json is damaged" in one_error_line(capsys)


def test_aggregate_refuses_a_file_where_the_runs_belong_and_a_damaged_results_entry(workspace, capsys):
    study = write_study(workspace, axes={})
    args = ["study", str(study), "--out", "out"]
    assert main([*args, "--print-commands"]) == 0 and main([*args, "--aggregate"]) == 0
    capsys.readouterr()
    (workspace / "out/runs").write_text("not a folder")  # where the runs belong
    before = snapshot(workspace / "out")
    assert main([*args, "--aggregate"]) == 2
    assert "'runs' is a file" in one_error_line(capsys)
    assert snapshot(workspace / "out") == before
    (workspace / "out/runs").unlink()
    results = workspace / "out/runs/base/seed-0/results.json"
    results.parent.mkdir(parents=True)
    results.write_text(json.dumps({"strategies": {"global": {"test_accuracy": "high"}}, "best_strategy": "global"}))
    before = snapshot(workspace / "out")
    assert main([*args, "--aggregate"]) == 2
    line = one_error_line(capsys)
    assert "runs/base/seed-0/results.json" in line and "test_accuracy" in line
    assert snapshot(workspace / "out") == before


NET = """
import pathlib
from torch import nn
pathlib.Path("imported").write_text("yes")


def tiny(in_channels, num_classes, width):
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))
"""


def test_a_received_study_directory_imports_nothing_without_trust_code(workspace, monkeypatch, capsys):
    (workspace / "study_net.py").write_text(NET)
    monkeypatch.syspath_prepend(str(workspace))
    base = tiny_dict(2)
    base["model"] = {"backbone": "study_net.tiny", "backend": "vmap", "width": 4}
    study = write_study(workspace, base=base, axes={})
    assert main(["study", str(study), "--out", "out", "--print-commands"]) == 0  # the user's own study file
    lines = capsys.readouterr().out.splitlines()
    assert all(line.endswith("--trust-code") for line in lines)  # its runs may import what it names
    (workspace / "imported").unlink()
    sys.modules.pop("study_net", None)
    before = snapshot(workspace / "out")
    for args in (["study", "out/study.yaml", "--out", "out", "--print-commands"],
                 ["run", "out/base.yaml", "--out", "out/runs/base/seed-0"], ["show", "out/base.yaml"]):
        assert main(args) == 2, args
        line = one_error_line(capsys)
        assert "'study_net.tiny'" in line and "--trust-code" in line, line
        assert not (workspace / "imported").exists() and "study_net" not in sys.modules
    assert snapshot(workspace / "out") == before


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_the_runs_of_a_killed_study_die_with_it(workspace):
    """kill -9 of `ddcnn study` (no handler runs) still ends its `ddcnn run` children."""
    base = tiny_dict(2)
    base["stages"] = {stage: {"epochs": 10000, "batch_size": 32} for stage in base["stages"]}
    study = write_study(workspace, base=base, axes={}, seeds=[0])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    parent = subprocess.Popen([sys.executable, "-m", "ddcnn", "study", str(study), "--out", "out"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        children: list[int] = []
        while not children and time.monotonic() < deadline:
            time.sleep(0.2)
            children = _children(parent.pid)
        assert children, "the study started no run"
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 15
        while any(_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(c) for c in children), "a run of the killed study goes on"
    finally:
        parent.kill()
        for child in _children(parent.pid):
            os.kill(child, signal.SIGKILL)


def test_a_base_yaml_with_its_keys_in_another_order_is_the_same_base(workspace, capsys):
    study = write_study(workspace, axes={})
    assert main(["study", str(study), "--out", "out", "--print-commands"]) == 0
    base = workspace / "out/base.yaml"
    data = yaml.safe_load(base.read_text())
    base.write_text(yaml.safe_dump(data, sort_keys=True))  # the same config, keys sorted
    spec = workspace / "out/study-spec.json"
    recorded = json.loads(spec.read_text())
    recorded["files"]["base.yaml"] = hashlib.sha256(base.read_text().encode()).hexdigest()
    spec.write_text(json.dumps(recorded))
    assert main(["study", str(study), "--out", "out", "--print-commands"]) == 0
    base.write_text(yaml.safe_dump({**data, "seed": 7}, sort_keys=True))  # another config: refused
    assert main(["study", str(study), "--out", "out", "--print-commands"]) == 2
    assert "base.yaml was changed" in one_error_line(capsys)


def test_a_study_extends_only_by_more_seeds_and_axis_values(workspace):
    from ddcnn.study.runner import extends
    from ddcnn.study.spec import load_study

    first = load_study(write_study(workspace, axes={"decomposition.grid": [[2, 2]]}, seeds=[0]))
    def spec(file, **changes):
        return load_study(write_study(workspace, file, **changes))

    assert extends(first.spec, spec("more.yaml", axes={"decomposition.grid": [[2, 2], [1, 2]]}, seeds=[0, 1]))
    assert not extends(first.spec, spec("fewer.yaml", axes={"decomposition.grid": [[1, 2]]}, seeds=[0]))
    assert not extends(first.spec, spec("set.yaml", axes={"decomposition.grid": [[2, 2]]}, seeds=[0],
                                        set={"model.width": 8}))
    assert not extends(None, first)
