"""A run that travels: paths relative to the file that names them, a run moved and used from another directory."""

import json
import shutil

import numpy as np
import pytest
import yaml

from conftest import tiny_dict
from ddcnn.cli import main
from ddcnn.config import load_config
from ddcnn.errors import DataNotFoundError


def make_photos(root, classes=3, per_class=10, size=(20, 24)):
    """``root/class<c>/<i>.png``: RGB photos of another size than the runs take, one colour per class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        colour = np.eye(3)[c] * 200 + 30
        for i in range(per_class):
            img = np.clip(rng.normal(colour, 30, size=(*size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"class{c}" / f"{i}.png")
    return root


def photo_config(root: str) -> dict:
    data = tiny_dict(2)
    data["data"] = {"name": "image-folder", "root": root, "image_size": [16, 16], "channels": 3,
                    "test_fraction": 0.3, "val_fraction": 0.2}
    data["stages"] = {"global": {"epochs": 1, "batch_size": 8}, "coherent": {"enabled": False},
                      "local": {"epochs": 1, "batch_size": 8}, "combine": {"epochs": 1, "batch_size": 8},
                      "transfer": {"epochs": 1, "batch_size": 8}}
    return data


@pytest.fixture(scope="module")
def moved_run(tmp_path_factory):
    """A run trained from ``work/`` with ``data.root: ../data/photos`` in ``work/configs/c.yaml``, then moved."""
    base = tmp_path_factory.mktemp("travel")
    make_photos(base / "work" / "data" / "photos")
    (base / "work" / "configs").mkdir()
    (base / "work" / "configs" / "c.yaml").write_text(yaml.safe_dump(photo_config("../data/photos")))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base / "work")
        assert main(["run", "configs/c.yaml", "--out", "runs/photos", "--quiet"]) == 0
    moved = base / "elsewhere" / "photos"
    moved.parent.mkdir()
    shutil.move(base / "work" / "runs" / "photos", moved)
    return base, moved


def test_config_yaml_records_the_resolved_path_and_the_path_as_written(moved_run):
    base, moved = moved_run
    saved = yaml.safe_load((moved / "config.yaml").read_text())["data"]
    assert saved["root"] == str(base / "work" / "data" / "photos")
    assert saved["root_as_written"].startswith("../data/photos (in configs/c.yaml")
    assert not {"window", "num_classes", "generated_train", "class_map"} & set(saved)  # not read by image folders


def test_a_config_yaml_without_the_keys_its_dataset_ignores_resumes(moved_run):
    from ddcnn.train.store.rundir import RunDir

    _, moved = moved_run
    RunDir(moved).check_same_config(load_config(moved / "config.yaml"))  # no difference: nothing raised


def test_a_moved_run_is_evaluated_exported_and_shown_from_the_root_directory(moved_run, monkeypatch, capsys):
    _, moved = moved_run
    monkeypatch.chdir("/")
    assert main(["evaluate", str(moved)]) == 0
    assert (moved / "evaluation.json").is_file()
    assert main(["export", str(moved), "--strategy", "global", "--out", str(moved / "export" / "g.pt2")]) == 0
    assert main(["show", str(moved / "config.yaml")]) == 0
    assert "subimages" in capsys.readouterr().out


def test_a_set_path_is_relative_to_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text(yaml.safe_dump(photo_config("photos")))
    monkeypatch.chdir(tmp_path)
    assert load_config("sub/c.yaml").data.root == str(tmp_path / "sub" / "photos")
    cfg = load_config("sub/c.yaml", ["data.root=other"])
    assert cfg.data.root == str(tmp_path / "other")
    assert cfg.data.root_as_written == f"other (--set, from {tmp_path})"


def test_a_config_that_relied_on_the_current_directory_works_with_a_note(tmp_path, monkeypatch, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "c.yaml").write_text(yaml.safe_dump(photo_config("photos")))
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/c.yaml").data.root == str(tmp_path / "photos")
    note = capsys.readouterr().err
    assert "relative to that file" in note and "'../photos'" in note


def test_the_missing_data_error_names_the_file_and_the_resolved_path(tmp_path, monkeypatch):
    from ddcnn.data.datasets import load_datasets

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(photo_config("gone")))
    monkeypatch.chdir("/")
    with pytest.raises(DataNotFoundError) as err:
        load_datasets(load_config(tmp_path / "c.yaml").data)
    assert str(tmp_path / "gone") in str(err.value) and f"gone (in {tmp_path / 'c.yaml'})" in str(err.value)


def test_a_run_of_an_earlier_version_with_a_relative_root_still_works(moved_run, tmp_path, monkeypatch):
    """Earlier versions saved data.root as written, relative to the directory the run was started from."""
    base, moved = moved_run
    old = tmp_path / "old"
    shutil.copytree(moved, old)
    config = yaml.safe_load((old / "config.yaml").read_text())
    config["data"]["root"] = "data/photos"
    del config["data"]["root_as_written"]
    (old / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    monkeypatch.chdir(base / "work")
    assert main(["evaluate", str(old)]) == 0
    assert json.loads((old / "evaluation.json").read_text())["strategies"]["global"]["test_accuracy"] is not None


def test_results_json_has_the_metrics_beyond_accuracy_for_every_strategy(moved_run):
    _, moved = moved_run
    results = json.loads((moved / "results.json").read_text())
    for name, entry in results["strategies"].items():
        m = entry["test_metrics"]
        matrix = np.array(m["confusion_matrix"], dtype=float)
        assert m["accuracy"] == pytest.approx(entry["test_accuracy"])
        assert m["balanced_accuracy"] == pytest.approx(np.mean(np.diag(matrix) / matrix.sum(1)))
        assert 0 <= m["macro_f1"] <= 1 and set(m["per_class"]) == {"class0", "class1", "class2"}
        assert (m["roc_auc"] is None) == (name == "majority_vote")
    assert "balanced accuracy" in (moved / "report.md").read_text()


def test_a_run_on_an_image_folder_lists_its_split(moved_run):
    base, moved = moved_run
    splits = json.loads((moved / "splits.json").read_text())
    files = {s: splits[s]["files"] for s in ("train", "val", "test")}
    everything = sorted(p.relative_to(base / "work" / "data" / "photos").as_posix()
                        for p in (base / "work" / "data" / "photos").rglob("*.png"))
    assert sorted(files["train"] + files["val"] + files["test"]) == everything  # each file once
    assert [splits[s]["count"] for s in ("train", "val", "test")] == \
        [len(files[s]) for s in ("train", "val", "test")] and len(files["test"]) == 9  # 30 % of 30


def test_a_pre_split_folder_is_used_as_given(tmp_path, monkeypatch, capsys):
    root = tmp_path / "photos"
    for split, count in (("train", 6), ("val", 2), ("test", 3)):
        make_photos(root / split, per_class=count)
    config = photo_config("photos")
    config["stages"] = {**{s: {"enabled": False} for s in ("local", "combine", "transfer")},
                        "global": {"epochs": 1, "batch_size": 8}, "coherent": {"enabled": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir("/")
    assert main(["run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out.splitlines()  # the run's header: where, what data, which device
    assert printed[0] == f"run directory {tmp_path / 'run'}"
    assert printed[1].startswith("data image-folder: 18 train, 6 val, 9 test images [16, 16] x 3 channel(s), 3 ")
    assert printed[3].startswith("device ")
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    for split in ("train", "val", "test"):
        assert splits[split]["files"] == sorted((p.relative_to(root).as_posix() for p in (root / split).rglob("*.png")),
                                                key=lambda f: (f.split("/")[1], int(f.split("/")[2][:-4])))
    assert "given" in splits["split"]


def test_a_run_on_arrays_records_index_ranges_and_a_checksum(finished_run):
    import hashlib

    out, _ = finished_run
    splits = json.loads((out / "splits.json").read_text())
    covered = sorted(i for s in ("train", "val") for a, b in splits[s]["ranges"] for i in range(a, b))
    assert covered == list(range(160))  # the 160 generated training images, each in train or val once
    val = np.array([i for a, b in splits["val"]["ranges"] for i in range(a, b)], dtype="<i8")
    assert splits["val"]["sha256"] == hashlib.sha256(val.tobytes()).hexdigest() and len(val) == 32
    assert splits["test"]["ranges"] == [[0, 64]]


def test_an_onnx_client_from_the_readme_and_the_sidecar_matches_predict(moved_run, tmp_path, capsys):
    """The README's client (numpy, Pillow, ONNX Runtime) on pictures of another size than the run's images."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    base, moved = moved_run
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    client = re.search(r"<!-- onnx-client -->\n```python\n(.*?)```", readme, re.S).group(1)
    assert len(client.splitlines()) <= 16
    (tmp_path / "client.py").write_text(client)
    model = tmp_path / "m.onnx"
    assert main(["export", str(moved), "--strategy", "mean_probability", "--format", "onnx", "--out", str(model)]) == 0
    meta = json.loads((tmp_path / "m.onnx.json").read_text())
    assert meta["schema"] == 2 and meta["preprocessing"]["size"] == [16, 16] and "window" not in meta
    pictures = sorted((base / "work" / "data" / "photos").rglob("*.png"))[::7]  # 20x24 pixels, run on 16x16
    done = subprocess.run([sys.executable, str(tmp_path / "client.py"), str(model), *map(str, pictures)],
                          capture_output=True, text=True, check=True)
    capsys.readouterr()
    assert main(["predict", str(moved), *map(str, pictures), "--strategy", "mean_probability", "--format",
                 "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    lines = done.stdout.splitlines()
    assert len(lines) == len(rows) == len(pictures)
    for line, row in zip(lines, rows):
        path, label, *values = line.split(" ")
        assert (path, label) == (row["file"], row["class"])
        assert [float(v) for v in values] == pytest.approx(list(row["probabilities"].values()), abs=1e-5)


def test_a_run_on_another_machine_says_where_its_data_was_and_takes_data_root(moved_run, tmp_path, monkeypatch,
                                                                              capsys):
    base, moved = moved_run
    other = shutil.copytree(moved, tmp_path / "run")
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["data"]["root"] = "/nowhere/photos"  # the path of the machine it was trained on
    (other / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    monkeypatch.chdir(base / "work")
    assert main(["evaluate", str(other)]) == 2
    error = capsys.readouterr().err
    assert "/nowhere/photos" in error and str(other / "config.yaml") in error and "--data-root" in error
    assert main(["evaluate", str(other), "--data-root", "data/photos"]) == 0


def test_majority_vote_says_vote_shares_in_every_format_and_the_sidecar(moved_run, tmp_path, capsys):
    _, moved = moved_run
    picture = next(iter(sorted(moved.parent.parent.rglob("photos/class0/*.png"))))
    args = ["predict", str(moved), str(picture), "--strategy", "majority_vote"]
    assert main(args) == 0 and "vote share=" in capsys.readouterr().out
    assert main([*args, "--format", "json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    votes = [s["class"] for s in row["subdomains"]]
    assert row["output"] == "vote shares"
    assert row["probabilities"] == pytest.approx({c: votes.count(c) / len(votes) for c in row["probabilities"]},
                                                 abs=1e-6)  # votes / N, up to the tie-break
    assert main([*args, "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("share(class0),share(class1),share(class2)")
    assert main(["export", str(moved), "--strategy", "majority_vote", "--out", str(tmp_path / "v.pt2")]) == 0
    meta = json.loads((tmp_path / "v.pt2.json").read_text())
    assert meta["output"] == "vote shares" and "votes / N" in meta["output_meaning"]


def test_a_pre_split_folder_with_a_class_train_lacks_is_one_error(tmp_path, capsys):
    root = tmp_path / "photos"
    make_photos(root / "train", classes=2, per_class=4)
    make_photos(root / "test", classes=3, per_class=2)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(photo_config("photos")))
    assert main(["run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "class folder 'class2'" in error and str(root / "train") in error
    assert not (tmp_path / "run").exists()


def test_a_sidecar_of_a_newer_schema_is_one_error(moved_run, tmp_path, capsys):
    _, moved = moved_run
    model = tmp_path / "g.pt2"
    assert main(["export", str(moved), "--strategy", "global", "--out", str(model)]) == 0
    meta = json.loads((tmp_path / "g.pt2.json").read_text())
    (tmp_path / "g.pt2.json").write_text(json.dumps({**meta, "schema": 3}))
    picture = next(iter(sorted(moved.parent.parent.rglob("photos/class0/*.png"))))
    capsys.readouterr()
    assert main(["predict", str(model), str(picture), "--trust-code"]) == 2  # a .pt2 file is code: trusted here
    assert "schema" in capsys.readouterr().err
