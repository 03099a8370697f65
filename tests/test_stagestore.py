"""ddcnn.train.stagestore: a finished stage is trained once per identity; a run that reuses it ends bit-identical
to one that trains it; the store is checked, and a reused stage never touches the run it came from."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_dict
from ddcnn.cli import main
from ddcnn.config import from_dict
from ddcnn.errors import CheckpointError
from ddcnn.train.protocol import Experiment
from ddcnn.train.stagestore import stage_identity, stage_key

# The decomposed path only: local CNNs, the DNN, transfer (the global CNN and coherent add nothing to these tests).
DECOMPOSED = ["stages.global.enabled=false", "stages.coherent.enabled=false"]


def run(tmp_path, name, overrides=(), store=None):
    cfg = from_dict(tiny_dict(2), [*DECOMPOSED, *overrides])
    return Experiment(cfg, tmp_path / name, verbose=False, stage_store=store).run()


def weights(out, stage):
    manifest = json.loads((out / "checkpoints" / f"{stage}.json").read_text())
    from safetensors.torch import load_file

    return load_file(out / "checkpoints" / manifest["files"]["weights"]["file"])


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_that_reuses_a_stage_ends_bit_identical_to_one_that_trains_it(tmp_path, one_thread):
    store = tmp_path / "stages"
    run(tmp_path, "first", ["stages.transfer.epochs=1"], store)  # trains local, combine, transfer 1 and keeps them
    before = {p.name: p.read_bytes() for p in (tmp_path / "first" / "checkpoints").iterdir()}
    reused = run(tmp_path, "reused", ["stages.transfer.epochs=2"], store)  # local and combine from the store
    trained = run(tmp_path, "trained", ["stages.transfer.epochs=2"])  # everything trained here
    assert reused["stages"]["local"]["reused_from"] == str(tmp_path / "first")
    assert reused["stages"]["combine"]["reused_from"] == str(tmp_path / "first")
    assert "reused_from" not in reused["stages"]["transfer"] and "reused_from" not in trained["stages"]["local"]
    for stage in ("local", "combine", "transfer"):
        assert same_tensors(weights(tmp_path / "reused", stage), weights(tmp_path / "trained", stage)), stage
    for name, entry in trained["strategies"].items():
        assert reused["strategies"][name]["test_accuracy"] == entry["test_accuracy"], name
        assert reused["strategies"][name]["val_accuracy"] == entry["val_accuracy"], name
    assert reused["test_predictions"] == trained["test_predictions"]
    # the run it came from is untouched, and the reusing run holds its own files (a link or a copy)
    assert {p.name: p.read_bytes() for p in (tmp_path / "first" / "checkpoints").iterdir()} == before
    provenance = json.loads((tmp_path / "reused" / "checkpoints" / "reused.json").read_text())
    assert set(provenance) == {"local", "combine"} and provenance["local"]["run"] == str(tmp_path / "first")
    assert not any(p.is_symlink() for p in (tmp_path / "reused" / "checkpoints").iterdir())


def test_a_stage_whose_identity_differs_is_not_reused(tmp_path, one_thread):
    store = tmp_path / "stages"
    run(tmp_path, "a", [], store)
    results = run(tmp_path, "b", ["stages.local.lr=0.003"], store)  # the local CNNs differ, so do the stages after
    assert not any("reused_from" in s for s in results["stages"].values())
    cfg = from_dict(tiny_dict(2), DECOMPOSED)
    keys = {stage: stage_key(stage_identity(cfg, stage, "cpu", "1")) for stage in ("local", "combine", "transfer")}
    other = from_dict(tiny_dict(2), [*DECOMPOSED, "stages.local.lr=0.003"])
    # a change upstream changes every identity downstream; the global CNN does not depend on the grid
    assert all(stage_key(stage_identity(other, s, "cpu", "1")) != k for s, k in keys.items())
    grid = from_dict(tiny_dict(2), ["decomposition.grid=[4,4]"])
    assert stage_identity(grid, "global", "cpu", "1") == stage_identity(from_dict(tiny_dict(2)), "global", "cpu", "1")
    assert stage_identity(grid, "local", "cpu", "1") != stage_identity(from_dict(tiny_dict(2)), "local", "cpu", "1")


def test_a_damaged_store_entry_is_one_error_and_the_run_is_left_without_the_stage(tmp_path, one_thread):
    store = tmp_path / "stages"
    run(tmp_path, "a", [], store)
    (entry,) = store.glob("local-*")
    target = next(entry.glob("local-*.safetensors"))
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.unlink()  # the store's own copy (a hard link to run a's file must not be written through)
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        run(tmp_path, "b", [], store)
    assert not (tmp_path / "b" / "checkpoints" / "local.json").exists()
    assert weights(tmp_path / "a", "local")  # run a's own file is intact


def test_a_two_grid_study_trains_each_seeds_global_cnn_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base = tiny_dict(2)
    base["stages"] = {stage: {"epochs": 1, "batch_size": 32} for stage in base["stages"]}
    study = {"name": "s", "base": base, "axes": {"decomposition.grid": [[2, 2], [4, 4]]}, "seeds": [0, 1],
             "budgets": {"global": [1]}, "split_seed": "seed"}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    assert main(["study", "s.yaml", "--out", "out", "--jobs", "2"]) == 0
    out = tmp_path / "out"
    assert len(list((out / "stages").glob("global-*"))) == 2  # one global CNN per seed, not per grid and seed
    for seed in (0, 1):
        first = json.loads((out / f"runs/grid-2x2/global-1/seed-{seed}/results.json").read_text())
        second = json.loads((out / f"runs/grid-4x4/global-1/seed-{seed}/results.json").read_text())
        reused = [r for r in (first, second) if r["stages"]["global"].get("reused_from")]
        assert len(reused) == 1  # which grid trains it depends on the order: exactly one of them does
        assert first["strategies"]["global"]["test_accuracy"] == second["strategies"]["global"]["test_accuracy"]
        assert first["test_predictions"] == second["test_predictions"]
        config = yaml.safe_load((out / f"runs/grid-2x2/global-1/seed-{seed}/config.yaml").read_text())
        assert config["data"]["split_seed"] == seed and not config["stages"]["local"]["enabled"]
    data = json.loads((out / "study.json").read_text())
    assert data["sharing"]["reused"]["stages"] == 2 and data["sharing"]["trained"]["stages"] == 2


@pytest.mark.heavy  # three small runs in subprocesses
def test_an_extended_study_reuses_the_stages_its_finished_runs_trained(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base = tiny_dict(2)
    base["stages"] = {stage: {"epochs": 1, "batch_size": 32} for stage in base["stages"]}
    study = {"name": "s", "base": base, "seeds": [0], "budgets": {"local": [1], "transfer": [1]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    assert main(["study", "s.yaml", "--out", "out"]) == 0
    study["budgets"]["transfer"] = [1, 2]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    assert main(["study", "s.yaml", "--out", "out", "--resume"]) == 0
    assert "1 of 2 runs to do" in capsys.readouterr().out
    results = json.loads((tmp_path / "out/runs/base/local-1_transfer-2/seed-0/results.json").read_text())
    first = str(Path("out/runs/base/local-1_transfer-1/seed-0"))
    assert results["stages"]["local"]["reused_from"] == first == results["stages"]["combine"]["reused_from"]
    assert "reused_from" not in results["stages"]["transfer"]
