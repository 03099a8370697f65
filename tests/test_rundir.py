"""The run directory on its own: create, refuse (its admission, ddcnn.train.admit.admit_run_dir), force, resume, and
the files it reads back."""

import json

import pytest

from ddcnn.errors import CheckpointError, ConfigError
from ddcnn.train.admit import admit_run_dir
from ddcnn.train.store.rundir import MARKER, RunDir


def start(run, cfg, resume=False, force=False):
    """What a run does with its directory: admission, then the writes."""
    run.prepare(cfg, resume, force, events=admit_run_dir(run, cfg, resume, force))


def _snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_new_run_writes_its_config_and_marker(tmp_path, tiny_config):
    run = RunDir(tmp_path / "new" / "run")
    start(run, tiny_config(), resume=False, force=False)
    assert run.is_run and (run.path / "config.yaml").is_file()
    assert json.loads((run.path / MARKER).read_text())["launch"] is None


def test_an_existing_run_is_refused_without_resume_or_force_and_left_as_it_was(tmp_path, tiny_config):
    run = RunDir(tmp_path)
    start(run, tiny_config(), resume=False, force=False)
    run.write_json("results.json", {"strategies": {}})
    before = _snapshot(tmp_path)
    with pytest.raises(ConfigError, match="already holds a ddcnn run; use --resume"):
        start(run, tiny_config(), resume=False, force=False)
    assert _snapshot(tmp_path) == before


def test_force_replaces_only_the_files_a_run_writes(tmp_path, tiny_config):
    run = RunDir(tmp_path)
    start(run, tiny_config(), resume=False, force=False)
    run.write_json("results.json", {"strategies": {}})
    (tmp_path / "notes.txt").write_text("mine")
    start(run, tiny_config(), resume=False, force=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "results.json").exists() and run.is_run


def test_resume_refuses_a_changed_frozen_setting_and_keeps_the_config(tmp_path, tiny_config):
    run = RunDir(tmp_path)
    start(run, tiny_config(), resume=False, force=False)
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="model.width was 4 when the checkpoints were written but is 8"):
        start(run, tiny_config(overrides=["model.width=8"]), resume=True, force=False)
    assert _snapshot(tmp_path) == before
    start(run, tiny_config(overrides=["stages.local.epochs=5"]), resume=True, force=False)  # free to change


def test_resume_of_a_folder_without_a_run_says_how_to_start_it(tmp_path, tiny_config):
    with pytest.raises(CheckpointError, match="holds no ddcnn run.*start it without --resume"):
        start(RunDir(tmp_path / "nothing"), tiny_config(), resume=True, force=False)


def test_json_files_round_trip_and_a_corrupt_one_is_named(tmp_path):
    run = RunDir(tmp_path)
    run.write_json("data.json", {"classes": ["a", "b"]})
    assert run.read_json("data.json") == {"classes": ["a", "b"]}
    (tmp_path / "results.json").write_text('{"strategies": ')
    with pytest.raises(CheckpointError, match="results.json"):
        run.read_json("results.json")
    with pytest.raises(CheckpointError, match="evaluation.json"):
        run.read_json("evaluation.json")


def test_metrics_skip_a_line_cut_by_a_kill(tmp_path):
    run = RunDir(tmp_path)
    run.append_metrics({"stage": "global", "epoch": 1})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "glo')
    assert run.metrics() == [{"stage": "global", "epoch": 1}]
    run.rewrite_metrics([{"stage": "local", "epoch": 1}])
    assert run.metrics() == [{"stage": "local", "epoch": 1}]
