"""ddcnn.finished: load_run, a finished run's models per strategy, its data facts, config and results; code it
names is imported only with trust_code=True; no training code is loaded."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

import ddcnn
from conftest import tiny_dict
from ddcnn.config import from_dict
from ddcnn.data.datasets import load_datasets
from ddcnn.data.loading import to_float
from ddcnn.errors import ConfigError, DDCNNError
from ddcnn.strategies import strategy_names


def test_load_run_gives_every_strategy_at_the_runs_test_accuracy(finished_run, one_thread):
    out, results = finished_run
    run = ddcnn.load_run(out, device="cpu")
    facts = json.loads((out / "data.json").read_text())
    assert run.classes == facts["classes"] and run.in_channels == facts["in_channels"]
    assert list(run.image_size) == facts["image_size"] and run.normalizer.state_dict() == facts["normalizer"]
    assert run.results == results and run.best_strategy == results["best_strategy"]
    assert run.config.decomposition.grid == [2, 2] and run.decomposition.n_subdomains == 4
    assert set(run.models) == set(strategy_names())
    assert set(run.stages) == {"global", "local", "combine", "coherent", "transfer"}
    _, test = load_datasets(from_dict(tiny_dict(2)).data)
    images = to_float(test.images)  # in [0, 1], not normalised: the models normalise
    for name, model in run.models.items():
        with torch.no_grad():
            probabilities = model(images)
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(len(images)))
        accuracy = (probabilities.argmax(-1) == test.labels).float().mean().item()
        assert accuracy == pytest.approx(results["strategies"][name]["test_accuracy"], abs=1e-9), name


def test_load_run_imports_a_named_backbone_only_when_trusted(finished_run, tmp_path, monkeypatch):
    out, _ = finished_run
    copy = tmp_path / "received"
    shutil.copytree(out, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["model"].update(backbone="planted_module:net", depth=None, backend="vmap")
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "planted_module.py").write_text("raise SystemExit('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"names the backbone 'planted_module:net'.*--trust-code.*trust_code=True"):
        ddcnn.load_run(copy)
    # trusted: the code is imported (here it stops the import, which is one error naming it)
    with pytest.raises(DDCNNError, match="importing 'planted_module' failed with SystemExit: imported"):
        ddcnn.load_run(copy, trust_code=True)


@pytest.mark.parametrize("module", ["ddcnn.export", "ddcnn.finished.run"])
def test_the_finished_run_library_loads_no_training_code(module):
    """``ddcnn export``, ``load_run`` and one-process ``ddcnn predict`` reach the run directory's store and the
    runtime, never the loop, the parallel wrappers, admission or the stages (a fresh interpreter: what it loads)."""
    import subprocess
    import sys

    code = f"import sys, {module}; print(' '.join(m for m in sys.modules if m.startswith('ddcnn.train')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(done.stdout.split())
    assert "ddcnn.train.store.rundir" in loaded  # the check sees what is loaded
    groups = ("engine", "parallel", "admit", "budget", "context", "stages", "protocol", "scoring", "evaluate", "saved")
    training = {m for m in loaded if m.split(".")[2:3] and m.split(".")[2] in groups}
    assert training == set()


def test_one_process_sizes_the_runs_models_before_it_loads_them(finished_run, tmp_path, monkeypatch, capsys):
    """load_run, ``ddcnn predict`` and ``ddcnn export`` hold every model of the run in one process: models that do
    not fit into the memory free on the device are refused with the figure and the fix before any checkpoint is
    read, and nothing is written."""
    import os

    import ddcnn.sizing
    from ddcnn.cli import main
    from ddcnn.train.store.checkpoint import CheckpointDir

    out, _ = finished_run
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    loaded = []
    real_load = CheckpointDir.load
    monkeypatch.setattr(CheckpointDir, "load", lambda self, stage: loaded.append(stage) or real_load(self, stage))
    monkeypatch.setattr(ddcnn.sizing, "free_memory", lambda device: 1000)
    with pytest.raises(ConfigError, match=r"the 'global' stage needs about .* but only .* are free; lower"):
        ddcnn.load_run(out, device="cpu")
    image = tmp_path / "image.npy"
    np.save(image, np.zeros((1, 16, 16), dtype=np.float32))
    for args in (["predict", str(out), str(image)], ["export", str(out), "--out", str(tmp_path / "e.pt2")]):
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and "needs about" in err[0] and "but only" in err[0], err
    assert loaded == [] and not os.path.exists(tmp_path / "e.pt2")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    monkeypatch.setattr(ddcnn.sizing, "free_memory", lambda device: 2**40)
    assert set(ddcnn.load_run(out, device="cpu").stages) == set(loaded)  # the same run fits: every stage loads
