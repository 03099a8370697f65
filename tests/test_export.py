"""ddcnn.export and `ddcnn export`: every strategy to .pt2 and .onnx, checked on the run's test images; nothing
written when an argument is wrong or the file disagrees; predict on an exported file; pickled archives refused."""

import importlib.util
import io
import json
import pickle
import shutil
import zipfile

import numpy as np
import pytest
import torch

from conftest import tiny_dict
from ddcnn import export
from ddcnn.cli import main
from ddcnn.config import from_dict
from ddcnn.data.datasets import load_datasets
from ddcnn.data.loading import to_float
from ddcnn.errors import CheckpointError, ConfigError, ExportError
from ddcnn.export import ExportedModel, export_run, meta_path
from ddcnn.strategies import strategy_names

# ONNX is the optional extra ddcnn[export]: without it the ONNX parts are skipped, the .pt2 ones still run.
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
FORMATS = ["pt2", "onnx"] if HAS_ONNX else ["pt2"]


def _test_set(dims):
    _, test = load_datasets(from_dict(tiny_dict(dims)).data)
    return to_float(test.images), test.labels


@pytest.fixture(scope="module")
def runs(tmp_path_factory, finished_run):
    """A finished tiny run per case: its folder, results and test set. The 2D grouped one is the session's
    complete run; the others (made when a test first asks) train the stages their strategies need, one epoch."""
    from ddcnn.train.protocol import Experiment

    made = {(2, "grouped"): (*finished_run, _test_set(2))}

    def get(dims: int, backend: str):
        if (dims, backend) not in made:
            data = tiny_dict(dims)
            data["model"]["backend"] = backend
            data["stages"] = {s: {"epochs": 1, "batch_size": 32, "enabled": s != "coherent"} for s in data["stages"]}
            out = tmp_path_factory.mktemp("export") / f"run{dims}d-{backend}"
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                results = Experiment(from_dict(data), out, verbose=False).run()
            finally:
                torch.set_num_threads(before)
            made[dims, backend] = (out, results, _test_set(dims))
        return made[dims, backend]

    return get


# Strategies differ in their combiner and in where their local CNNs come from (the local stage, a CNN-DNN, or none
# for the global CNN); backends differ only in those local CNNs. So every strategy goes to both formats on the 2D
# grouped run, in both layouts; the other backends and 3D export one of each kind (ONNX export takes seconds).
EVERY = [(name, fmt, ("grouped", "separate")[(i + j) % 2]) for i, name in enumerate(strategy_names())
         for j, fmt in enumerate(("pt2", "onnx"))]
CASES = [(2, "grouped", EVERY),
         (2, "vmap", [("transfer", "onnx", "separate"), ("cnn_dnn", "pt2", "grouped")]),
         (2, "loop", [("transfer", "pt2", "grouped"), ("majority_vote", "onnx", "separate")]),
         (3, "vmap", [("global", "pt2", None), ("transfer", "onnx", "grouped"), ("mean_probability", "pt2",
                                                                                 "separate")])]


@pytest.mark.parametrize("dims,backend,exports", CASES, ids=["2d-grouped", "2d-vmap", "2d-loop", "3d-vmap"])
def test_every_strategy_exports_and_reaches_the_runs_test_accuracy(runs, tmp_path, one_thread, dims, backend,
                                                                   exports):
    run_dir, results, (images, labels) = runs(dims, backend)
    for name, fmt, layout in exports:
        if fmt not in FORMATS:
            continue
        done = export_run(run_dir, name, fmt, tmp_path / f"{name}.{fmt}", layout)
        assert done.agree == done.checked == len(images) and done.max_abs_diff <= export.TOLERANCE
        model = ExportedModel(done.path, trust_code=True)  # loaded back from what was written, the JSON beside it
        probabilities = model(images)
        assert probabilities.shape == (len(images), 3)
        assert torch.allclose(probabilities.sum(-1), torch.ones(len(images)), atol=1e-5)
        accuracy = (probabilities.argmax(-1) == labels).float().mean().item()
        assert accuracy == pytest.approx(results["strategies"][name]["test_accuracy"], abs=1e-9), (name, fmt)
        assert model(images[:1]).shape == (1, 3)  # the batch size is dynamic
        meta = json.loads(meta_path(done.path).read_text())
        assert (meta["strategy"], meta["format"], meta["layout"]) == (name, fmt, None if name == "global" else layout)
        assert meta["image_size"] == list(images.shape[2:]) and meta["in_channels"] == 1
        assert meta["classes"] == ["pattern0", "pattern1", "pattern2"]
        assert meta["test_accuracy"] == results["strategies"][name]["test_accuracy"]
        assert meta["output"] == ("vote shares" if name == "majority_vote" else "probabilities")
        assert meta["ddcnn_version"] and meta["torch_version"] == torch.__version__


def test_the_default_is_the_best_strategy_in_the_run_folder(runs, tmp_path, one_thread, capsys):
    shared, results, _ = runs(2, "grouped")
    run_dir = shutil.copytree(shared, tmp_path / "run")  # the session's run stays as it was
    best = results["best_strategy"]
    assert main(["export", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert "64 of 64 predicted classes agree" in printed and f"({best}" in printed
    assert (run_dir / "export" / f"{best}.pt2").is_file() and (run_dir / "export" / f"{best}.pt2.json").is_file()
    assert not [p for p in (run_dir / "export").iterdir() if p.name.startswith(".")]  # no temporary file left


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_disagreeing_export_leaves_every_file_as_it_was(runs, tmp_path, one_thread, monkeypatch, capsys):
    run_dir = shutil.copytree(runs(2, "grouped")[0], tmp_path / "run")
    out = tmp_path / "model.pt2"
    out.write_bytes(b"an earlier export")
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # no difference, not even 0, is within it
    before = _snapshot(tmp_path), _snapshot(run_dir)
    with pytest.raises(ExportError, match="disagrees with the run on 64 test images"):
        export_run(run_dir, "mean_probability", "pt2", out)
    with pytest.raises(ExportError):
        export_run(run_dir, "global", "pt2", tmp_path / "new" / "folders" / "g.pt2")
    assert main(["export", str(run_dir), "--strategy", "global"]) == 2  # into RUN/export/, made for it
    assert capsys.readouterr().err.startswith("ddcnn: error: the exported global model disagrees")
    assert (_snapshot(tmp_path), _snapshot(run_dir)) == before
    assert not (run_dir / "export").exists() and not (tmp_path / "new").exists()
    monkeypatch.undo()

    def unloadable(*args, **kwargs):  # the written file does not load back
        raise CheckpointError("the exported file cannot be loaded")

    monkeypatch.setattr(export, "ExportedModel", unloadable)
    with pytest.raises(CheckpointError):
        export_run(run_dir, "global", "pt2", tmp_path / "other" / "folders" / "g.pt2")
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("args,message", [
    (["--strategy", "voting"], "unknown strategy 'voting'"),
    (["--out", "model.onnx"], "must end in .pt2 for --format pt2"),
    (["--out", "."], "must end in .pt2"),
])
def test_bad_arguments_are_refused_before_anything_is_written(runs, tmp_path, monkeypatch, capsys, args, message):
    run_dir, _, _ = runs(2, "grouped")
    monkeypatch.chdir(tmp_path)
    before = _snapshot(run_dir)
    assert main(["export", str(run_dir), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddcnn: error: ") and message in err and err.count("\n") == 1
    assert _snapshot(run_dir) == before and not list(tmp_path.iterdir())


def test_onnx_without_its_packages_is_one_error_naming_the_extra(runs, tmp_path, monkeypatch):
    run_dir, _, _ = runs(2, "grouped")
    real = export.importlib.util.find_spec
    monkeypatch.setattr(export.importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else real(name))
    with pytest.raises(ConfigError, match=r"--format onnx needs onnxruntime \(not installed here\).*ddcnn\[export\]"):
        export_run(run_dir, "cnn_dnn", "onnx", tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_predict_takes_an_exported_file(runs, tmp_path, one_thread, capsys, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    run_dir, _, (images, _) = runs(2, "grouped")
    done = export_run(run_dir, "majority_vote", fmt, tmp_path / f"vote.{fmt}")
    files = []
    for i in range(3):
        files.append(tmp_path / f"x{i}.npy")
        np.save(files[-1], images[i, 0].numpy())
    assert main(["predict", str(run_dir), *map(str, files), "--strategy", "majority_vote"]) == 0
    from_run = [line.split(" (")[0] for line in capsys.readouterr().out.splitlines()[1:] if line.startswith("/")]
    trust = ["--trust-code"] if fmt == "pt2" else []  # a .pt2 is a program: loaded only when trusted
    assert main(["predict", str(done.path), *map(str, files), *trust]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"strategy: majority_vote (exported: vote.{fmt})"
    assert [line.split(" (")[0] for line in lines[1:]] == from_run and all("vote share" in x for x in lines[1:])
    assert main(["predict", str(done.path), *map(str, files), "--format", "json", *trust]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["file"], r["strategy"]) for r in rows] == [(str(f), "majority_vote") for f in files]
    assert all(sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-5) for r in rows)
    assert main(["predict", str(done.path), str(files[0]), "--strategy", "global"]) == 2
    assert "--strategy applies to a run directory" in capsys.readouterr().err


def _archive(tmp_path, members: dict) -> object:
    path = tmp_path / "crafted.pt2"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    (tmp_path / "crafted.pt2.json").write_text(json.dumps({
        "format": "pt2", "strategy": "global", "layout": None, "classes": ["a", "b"], "image_size": [4, 4],
        "in_channels": 1, "output": "probabilities", "dataset": "generated", "window": [0.0, 1.0]}))
    return path


class _Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled')",))


def test_a_pt2_archive_that_would_be_unpickled_is_refused(runs, tmp_path):
    config = "archive/data/weights/model_weights_config.json"
    pickled_weight = {"config": {"w": {"path_name": "weight_0", "use_pickle": True}}}
    with pytest.raises(CheckpointError, match="holds pickled objects"):
        ExportedModel(_archive(tmp_path, {config: json.dumps(pickled_weight)}), trust_code=True)
    sample = io.BytesIO()
    sample.write(pickle.dumps(_Boom()))
    clean = {"config": {"w": {"path_name": "weight_0", "use_pickle": False}}}
    with pytest.raises(CheckpointError, match="holds pickled objects"):
        ExportedModel(_archive(tmp_path, {config: json.dumps(clean),
                                          "archive/data/sample_inputs/model.pt": sample.getvalue()}),
                      trust_code=True)
    with pytest.raises(CheckpointError, match="holds pickled objects"):
        ExportedModel(_archive(tmp_path, {"archive/data/weights/model.pt": b"legacy"}), trust_code=True)
    (tmp_path / "crafted.pt2").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a .pt2 archive"):
        ExportedModel(tmp_path / "crafted.pt2", trust_code=True)
    # what ddcnn export writes passes
    run_dir, _, _ = runs(2, "grouped")
    export.check_pt2(export_run(run_dir, "global", "pt2", tmp_path / "g.pt2").path)
