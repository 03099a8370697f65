import collections
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import tiny_dict
from ddcnn.cli import main


def _write_config(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _write_idx_dataset(root, size, n=40):
    """MNIST-style IDX files (gzip) with n random images per split."""
    import gzip
    import struct

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "t10k"):
        images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        with gzip.open(root / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">BBBBIII", 0, 0, 8, 3, n, size, size) + images.tobytes())
        with gzip.open(root / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">BBBBI", 0, 0, 8, 1, n) + labels.tobytes())


def test_an_mnist_layout_runs_end_to_end(tmp_path, capsys):
    _write_idx_dataset(tmp_path / "mnist", size=12)
    data = tiny_dict(2)
    data["data"] = {"name": "mnist", "root": str(tmp_path / "mnist"), "val_fraction": 0.25}
    data["stages"] = {s: {"enabled": s == "local", "epochs": 1, "batch_size": 16} for s in
                      ("global", "local", "combine", "coherent", "transfer")}
    out = tmp_path / "run"
    assert main(["run", _write_config(tmp_path / "c.yaml", data), "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["image_size"] == [12, 12] and results["data_sizes"] == {"train": 30, "val": 10, "test": 40}
    # the same 8-bit image as a grey PNG and as a uint8 .npy gets the same prediction, votes and probabilities
    from ddcnn.data import load_idx_dataset

    pixels = load_idx_dataset(tmp_path / "mnist", "test").images[0, 0].numpy()
    Image.fromarray(pixels, mode="L").save(tmp_path / "digit.png")
    np.save(tmp_path / "digit.npy", pixels)
    capsys.readouterr()
    assert main(["predict", str(out), str(tmp_path / "digit.png"), str(tmp_path / "digit.npy")]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    png, npy = lines[: len(lines) // 2], lines[len(lines) // 2:]
    assert [line.split(":", 1)[1] for line in png] == [line.split(":", 1)[1] for line in npy]


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddcnn: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def test_run_prints_the_results_table_and_the_report_path(tmp_path, capsys):
    data = tiny_dict(2)
    cfg = _write_config(tmp_path / "c.yaml", data)
    out = tmp_path / "run"
    assert main(["run", cfg, "--out", str(out), "--quiet", "--set", "stages.*.epochs=1"]) == 0
    printed = capsys.readouterr().out
    for label in ("global CNN", "CNN-DNN", "mean probability", "majority vote", "coherent", "transfer"):
        assert label in printed
    assert f"report: {out / 'report.md'}" in printed
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["stages"]["local"]["epochs"] == 1  # the resolved config, overrides applied


def test_evaluate_reproduces_the_runs_test_accuracies(finished_run, capsys):
    out, results = finished_run
    assert main(["evaluate", str(out)]) == 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    for name, entry in results["strategies"].items():
        assert evaluation["strategies"][name]["test_accuracy"] == pytest.approx(entry["test_accuracy"], abs=1e-9)


def _sample_files(folder):
    """Two generated 16x16 images as .npy files, as the finished run was trained on."""
    from ddcnn.data import make_generated

    ds = make_generated(2, (16, 16), num_classes=3, seed=5)
    files = [folder / f"x{i}.npy" for i in range(2)]
    for f, image in zip(files, ds.images):
        np.save(f, image.numpy())
    return files


def test_predict_gives_the_class_and_every_subdomains_vote(finished_run, tmp_path, capsys):
    out, _ = finished_run
    files = _sample_files(tmp_path)
    assert main(["predict", str(out), *map(str, files), "--strategy", "cnn_dnn"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "strategy: cnn_dnn"
    assert sum(line.startswith("  subdomain") for line in lines) == 2 * 4
    assert main(["predict", str(out), str(files[0]), "--strategy", "global"]) == 0
    assert "subdomain" not in capsys.readouterr().out


def test_predict_refuses_files_of_the_wrong_kind(finished_run, tmp_path, capsys):
    out, _ = finished_run
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert main(["predict", str(out), str(text)]) == 2
    assert "cannot be read as an image" in _one_error_line(capsys)
    wrong = tmp_path / "big.npy"
    np.save(wrong, np.zeros((1, 20, 20), dtype=np.float32))
    assert main(["predict", str(out), str(wrong)]) == 2
    assert "[20, 20]" in _one_error_line(capsys)
    assert main(["predict", str(out), str(wrong), "--strategy", "voting"]) == 2
    assert "unknown strategy 'voting'; this run has: global" in _one_error_line(capsys)
    assert main(["predict", str(tmp_path), str(wrong)]) == 2
    assert "not a ddcnn run" in _one_error_line(capsys)


def test_image_folder_end_to_end_with_png_prediction(tmp_path, capsys):
    rng = np.random.default_rng(0)
    root = tmp_path / "flowers"
    for c, colour in enumerate([(200, 30, 30), (30, 200, 30)]):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(12):
            img = np.clip(rng.normal(colour, 20, size=(20, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"class{c}" / f"{i}.png")
    (root / "LICENSE.txt").write_text("ignored")
    data = tiny_dict(2)
    data["data"] = {"name": "image-folder", "root": str(root), "image_size": [16, 16], "channels": 3,
                    "test_fraction": 0.25, "val_fraction": 0.0}
    data["stages"] = {"global": {"enabled": False}, "coherent": {"enabled": False},
                      "local": {"epochs": 3, "batch_size": 8, "lr": 0.01}, "combine": {"epochs": 2, "batch_size": 8},
                      "transfer": {"epochs": 1, "batch_size": 8}}
    out = tmp_path / "run"
    assert main(["run", _write_config(tmp_path / "c.yaml", data), "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["classes"] == ["class0", "class1"]
    capsys.readouterr()
    # a photo of another size is fitted to the run's image size, as in training
    assert main(["predict", str(out), str(root / "class1" / "3.png")]) == 0
    assert "class1" in capsys.readouterr().out.splitlines()[1]


def test_show_describes_sizes_parameters_and_draws_the_grid(tmp_path, capsys):
    cfg = _write_config(tmp_path / "c.yaml", tiny_dict(2))
    png = tmp_path / "grid.png"
    assert main(["show", cfg, "--png", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "4 subimages of [8, 8]" in printed and "CNN-DNN" in printed and "one local CNN" in printed
    assert "MiB sent / MiB held per process" in printed and "global CNN, spatial-parallel" in printed
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["run", "missing.yaml"], "does not exist"),
        (["run", "{cfg}", "--set", "stages.local.epochs"], "key=value"),
        (["run", "{cfg}", "--set", "modle.width=3"], "did you mean 'model'"),
        (["run", "{cfg}", "--set", "decomposition.grid=[16, 16]", "--out", "{tmp}/r"], "coarser grid"),
        (["run", "{cfg}", "--set", "data.name=mnist", "--set", "data.root={tmp}/mnist", "--set",
          "data.image_size=[32, 32]", "--out", "{tmp}/r"], "set data.image_size to [12, 12]"),
        (["run", "{cfg}", "--set", "data.name=mnist", "--set", "data.root={tmp}/mnist", "--set", "data.channels=3",
          "--set", "data.image_size=null", "--out", "{tmp}/r"], "have 1 channels"),
        (["run", "{cfg}", "--set", "data.name=mnist", "--set", "data.root={tmp}/empty", "--out", "{tmp}/r"],
         "ddcnn data fetch mnist"),
        (["run", "{cfg}", "--resume", "--out", "{tmp}/none"], "no ddcnn run"),
        (["run", "{cfg}", "--set", "data.class_map={{a: b}}", "--out", "{tmp}/r"], "remove data.class_map"),
        (["evaluate", "{tmp}"], "not a ddcnn run"),
        (["data", "fetch", "imagenet"], "fashion-mnist"),
    ],
)
def test_user_errors_are_one_line_with_exit_status_2(tmp_path, capsys, args, fragment):
    cfg = _write_config(tmp_path / "c.yaml", tiny_dict(2))
    _write_idx_dataset(tmp_path / "mnist", size=12)
    (tmp_path / "empty").mkdir()
    args = [a.format(cfg=cfg, tmp=tmp_path) for a in args]
    assert main(args) == 2
    assert fragment in _one_error_line(capsys)


def test_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    from ddcnn.errors import ConfigError

    missing = str(tmp_path / "missing.yaml")
    for args in (["--debug", "run", missing], ["run", missing, "--debug"]):  # before or after the command
        with pytest.raises(ConfigError):
            main(args)
    monkeypatch.setenv("DDCNN_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(["run", missing])
    monkeypatch.setenv("DDCNN_DEBUG", "0")
    assert main(["run", missing]) == 2 and "missing.yaml" in _one_error_line(capsys)


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    cfg = _write_config(tmp_path / "c.yaml", tiny_dict(2))
    proc = subprocess.Popen([sys.executable, "-m", "ddcnn", "show", cfg, "--png", str(tmp_path / "d.png")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()
    proc.stdout.close()  # as `| head -1` does
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err, err


def test_predict_converts_a_colour_photo_to_the_runs_grey_channel(finished_run, tmp_path, capsys):
    out, _ = finished_run  # trained on one-channel 16x16 images
    grey = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(np.stack([grey] * 3 + [np.full_like(grey, 255)], axis=-1), "RGBA").save(tmp_path / "rgba.png")
    capsys.readouterr()
    assert main(["predict", str(out), str(tmp_path / "grey.png"), str(tmp_path / "rgba.png")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.endswith(")") and ".png:" in line]
    assert len(lines) == 2 and lines[0].split(": ", 1)[1] == lines[1].split(": ", 1)[1]  # the same class


def test_version_prints_the_version_and_exits_0(capsys):
    import ddcnn

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"ddcnn {ddcnn.__version__}"


def test_show_writes_no_file_unless_asked(tmp_path, monkeypatch, capsys):
    cfg = _write_config(tmp_path / "c.yaml", tiny_dict(2))
    monkeypatch.chdir(tmp_path)
    assert main(["show", cfg]) == 0
    assert "grid drawn" not in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_resume_without_out_continues_in_the_configs_own_run_directory(tmp_path, monkeypatch, capsys):
    data = tiny_dict(2)
    data["stages"] = {s: {"enabled": s == "local", "epochs": 1, "batch_size": 32} for s in
                      ("global", "local", "combine", "coherent", "transfer")}
    out = tmp_path / "elsewhere" / "x"
    assert main(["run", _write_config(tmp_path / "c.yaml", data), "--out", str(out), "--quiet"]) == 0
    before = (out / "results.json").read_text()
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["run", str(out / "config.yaml"), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "[   local] checkpoint of epoch 1/1: finished before, loaded" in printed
    assert f"report: {out / 'report.md'}" in printed
    assert not (tmp_path / "runs").exists()  # not runs/<name>
    assert json.loads((out / "results.json").read_text())["strategies"] == json.loads(before)["strategies"]
    # a config that is not inside a run directory still goes to runs/<name>
    from ddcnn.cli import default_out

    assert default_out(tmp_path / "c.yaml", "tiny2d") == Path("runs") / "tiny2d"
    assert default_out(out / "config.yaml", "tiny2d") == out


def test_the_recorded_command_names_torchrun_and_its_processes():
    from ddcnn.cli import command_line

    assert command_line(["run", "c.yaml"], {}) == "ddcnn run c.yaml"
    env = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "GROUP_WORLD_SIZE": "1", "TORCHELASTIC_RUN_ID": "x"}
    assert command_line(["run", "my config.yaml"], env) == \
        "torchrun --nproc-per-node=4 -m ddcnn run 'my config.yaml'"
    env = {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}
    assert command_line(["run", "c.yaml"], env) == "torchrun --nnodes=2 --nproc-per-node=4 -m ddcnn run c.yaml"


def _predict(out, files, *args, capsys):
    capsys.readouterr()
    assert main(["predict", str(out), *map(str, files), *args]) == 0
    return capsys.readouterr()


def test_predict_gives_probabilities_as_text_json_and_csv(finished_run, tmp_path, capsys):
    import csv
    import io

    out, results = finished_run
    files = _sample_files(tmp_path)
    rows = json.loads(_predict(out, files, "--format", "json", "--strategy", "cnn_dnn", capsys=capsys).out)
    classes = results["classes"]
    assert [r["file"] for r in rows] == [str(f) for f in files]
    for row in rows:
        probabilities = row["probabilities"]
        assert list(probabilities) == classes and sum(probabilities.values()) == pytest.approx(1, abs=1e-5)
        assert row["class"] == max(probabilities, key=probabilities.get) == classes[row["class_index"]]
        assert len(row["subdomains"]) == 4 and row["strategy"] == "cnn_dnn"
    table = list(csv.reader(io.StringIO(_predict(out, files, "--format", "csv", "--strategy", "cnn_dnn",
                                                 capsys=capsys).out)))
    assert table[0] == ["file", "strategy", "class", "class_index", *(f"p({c})" for c in classes)]
    for line, row in zip(table[1:], rows):
        assert line[:4] == [row["file"], "cnn_dnn", row["class"], str(row["class_index"])]
        assert [float(v) for v in line[4:]] == pytest.approx(list(row["probabilities"].values()), abs=1e-6)
    text = _predict(out, files, "--strategy", "cnn_dnn", capsys=capsys).out.splitlines()
    best = rows[0]["probabilities"][rows[0]["class"]]
    assert text[1] == f"{files[0]}: {rows[0]['class']} (class {rows[0]['class_index']}, p={best:.3f})"
    votes = json.loads(_predict(out, files, "--format", "json", "--strategy", "majority_vote", capsys=capsys).out)
    for row in votes:  # vote shares: a class chosen by more subdomains has the larger share
        shares, counts = row["probabilities"], collections.Counter(s["class"] for s in row["subdomains"])
        assert sum(shares.values()) == pytest.approx(1) and row["class"] == max(shares, key=shares.get)
        assert all(shares[a] > shares[b] for a in classes for b in classes if counts[a] > counts[b])
    assert main(["predict", str(out), str(files[0]), "--format", "xml"]) == 2
    assert "--format" in _one_error_line(capsys)


def test_predict_fits_pictures_of_another_size_and_colour_with_a_note(finished_run, tmp_path, capsys):
    out, _ = finished_run  # trained on one-channel 16x16 images (generated data, never resized in training)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / "same.png")
    Image.fromarray(rng.integers(0, 256, (40, 32, 3), dtype=np.uint8)).save(tmp_path / "large.png")
    captured = _predict(out, [tmp_path / "same.png", tmp_path / "large.png"], capsys=capsys)
    notes = captured.err.splitlines()
    assert len(notes) == 2 and all(n.startswith(f"ddcnn: note: {tmp_path / 'large.png'}: ") for n in notes)
    assert "colour image converted to grey" in notes[0] and "40x32 pixels fitted to 16x16" in notes[1]
    assert len([line for line in captured.out.splitlines() if ".png: " in line]) == 2
