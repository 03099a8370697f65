"""Received files stay data: a .pt2 is a program (loaded only with --trust-code), trust is decided before any
import, no write follows a symbolic link, memory stays bounded for hostile files, and every refusal is one line."""

import hashlib
import io
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from conftest import tiny_dict
from ddcnn import export
from ddcnn.cli import main
from ddcnn.config import dump_config, from_dict
from ddcnn.errors import CheckpointError, ConfigError, DataError, LinkError
from ddcnn.files import open_append, own_folder
from ddcnn.train.store.checkpoint import CheckpointDir
from ddcnn.train.store.rundir import RunDir

SRC = str(Path(__file__).resolve().parents[1] / "src")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddcnn: error: "), err
    return err[0]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


# ------------------------------------------------------------------------------------------ a .pt2 is code --
class Tiny(nn.Module):
    """(B, 1, 4, 4) images -> (B, 3) probabilities."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 3)

    def forward(self, images):
        return self.lin(images.flatten(1)).softmax(-1)


@pytest.fixture(scope="module")
def pt2_bytes():
    torch.manual_seed(0)
    return export.serialise(Tiny().eval(), "pt2", torch.rand(2, 1, 4, 4))


def _with_payload(data: bytes, marker: Path) -> bytes:
    """The archive with every symbolic size's ``expr_str`` made to create ``marker`` when torch evaluates it."""
    source, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            body = source.read(info)
            if info.filename.endswith("models/model.json"):
                text, n = re.subn(r'"expr_str": "(Symbol\([^"]*\))"',
                                  lambda m: f'"expr_str": "(__import__(\'pathlib\').Path(\'{marker}\').touch(), '
                                            f'{m.group(1)})[1]"', body.decode())
                assert n > 0
                body = text.encode()
            target.writestr(info, body)
    return out.getvalue()


def _exported(folder: Path, data: bytes, **meta) -> Path:
    path = folder / "m.pt2"
    path.write_bytes(data)
    sidecar = {"format": "pt2", "strategy": "global", "layout": None, "classes": ["a", "b", "c"],
               "image_size": [4, 4], "in_channels": 1, "output": "probabilities", "dataset": "generated",
               "window": [0.0, 1.0], **meta}
    export.meta_path(path).write_text(json.dumps(sidecar))
    return path


def _image(folder: Path, size=(4, 4)) -> Path:
    path = folder / "x.npy"
    np.save(path, np.random.default_rng(0).random(size).astype(np.float32))
    return path


def test_a_pt2_with_a_payload_is_refused_without_trust_code_and_the_payload_never_runs(pt2_bytes, tmp_path,
                                                                                        capsys):
    marker = tmp_path / "payload-ran"
    path = _exported(tmp_path, _with_payload(pt2_bytes, marker))
    assert main(["predict", str(path), str(_image(tmp_path))]) == 2
    line = one_error_line(capsys)
    assert str(path) in line and "--trust-code" in line and "ONNX" in line and "code" in line
    with pytest.raises(ConfigError, match="torch.export program"):
        export.ExportedModel(path)
    from ddcnn import load_run

    with pytest.raises(CheckpointError, match="file of `ddcnn export`"):
        load_run(path)
    assert not marker.exists()


def test_a_trusted_pt2_predicts(pt2_bytes, tmp_path, capsys):
    path = _exported(tmp_path, pt2_bytes)
    assert main(["predict", str(path), str(_image(tmp_path)), "--trust-code", "--format", "json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert set(row["probabilities"]) == {"a", "b", "c"}


@pytest.mark.parametrize("meta,image,message", [
    ({"classes": []}, (4, 4), "classes is [] but must be a list of two or more distinct names"),
    ({"classes": ["a", "b"]}, (4, 4), "names 2 classes but m.pt2 gives [3] values per image"),
    ({"image_size": [5, 5]}, (5, 5), "says the model takes images [1, 5, 5], but m.pt2 does not"),
    ({"classes": ["a\nx.npy: forged", "\x1b[31mb", "c"]}, (4, 4), "classes[0] is"),
], ids=["no-classes", "fewer-classes", "wrong-image-size", "control-characters"])
def test_a_sidecar_that_does_not_match_its_model_is_one_error(pt2_bytes, tmp_path, capsys, meta, image, message):
    path = _exported(tmp_path, pt2_bytes, **meta)
    assert main(["predict", str(path), str(_image(tmp_path, image)), "--trust-code"]) == 2
    line = one_error_line(capsys)
    assert message in line and "\x1b" not in line, line


def test_the_sanity_check_of_a_trusted_pt2_looks_into_sub_folders_and_for_compiled_code(pt2_bytes, tmp_path):
    for name, body in (("archive/data/weights/sub/model_weights_config.json",
                        json.dumps({"config": {"w": {"path_name": "weight_0", "use_pickle": True}}})),
                       ("archive/aotinductor/model/model.wrapper.so", "\x7fELF")):
        source, out = zipfile.ZipFile(io.BytesIO(pt2_bytes)), io.BytesIO()
        with zipfile.ZipFile(out, "w") as target:
            for info in source.infolist():
                target.writestr(info, source.read(info))
            target.writestr(name, body)
        with pytest.raises(CheckpointError, match="holds pickled objects"):
            export.ExportedModel(_exported(tmp_path, out.getvalue()), trust_code=True)


def test_the_logs_of_a_failed_load_are_not_printed(pt2_bytes, tmp_path, capsys, monkeypatch):
    path = _exported(tmp_path, pt2_bytes)

    def failing_load(*args, **kwargs):
        logging.getLogger("torch._export.serde").error("Traceback (most recent call last): ...")
        raise RuntimeError("cannot deserialise")

    monkeypatch.setattr(torch.export, "load", failing_load)
    handler = logging.StreamHandler(sys.stderr)  # as a program that shows torch's logs on the terminal has
    logging.getLogger("torch._export").addHandler(handler)
    try:
        assert main(["predict", str(path), str(_image(tmp_path)), "--trust-code"]) == 2
    finally:
        logging.getLogger("torch._export").removeHandler(handler)
    assert "can load (RuntimeError)" in one_error_line(capsys)  # the one line, no logged traceback before it


# --------------------------------------------------------------------------- trust before any import --
NET = """
import pathlib
from torch import nn
pathlib.Path("imported").write_text("yes")


def tiny(in_channels, num_classes, width):
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))
"""


def test_a_config_inside_the_run_directory_is_untrusted_marker_or_not(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recv_net.py").write_text(NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tiny_dict(2)
    data["model"] = {"backbone": "recv_net.tiny", "backend": "vmap", "width": 4}
    received = tmp_path / "received"
    received.mkdir()
    (received / "config.yaml").write_text(dump_config(from_dict(data)))  # no ddcnn-run.json beside it
    before = snapshot(received)
    for args, message in ((["--out", "received", "--resume"], "holds no ddcnn run"),
                          (["--out", "received"], "'recv_net.tiny', an import path"),
                          (["--out", "received", "--resume", "--trust-code"], "holds no ddcnn run")):
        assert main(["run", "received/config.yaml", *args]) == 2, args
        assert message in one_error_line(capsys), args
        assert not (tmp_path / "imported").exists() and "recv_net" not in sys.modules
    # a marked run: a forbidden change is refused before the trusted config's backbone is imported
    (received / "ddcnn-run.json").write_text(json.dumps({"format": 1}))
    before = snapshot(received)
    assert main(["run", "received/config.yaml", "--out", "received", "--resume", "--trust-code",
                 "--set", "seed=5"]) == 2
    assert "seed was 0" in one_error_line(capsys)
    assert not (tmp_path / "imported").exists() and "recv_net" not in sys.modules
    assert snapshot(received) == before


# ------------------------------------------------------------------------------ no write follows a link --
@pytest.fixture
def outside(tmp_path):
    """A folder outside every run, with one file that must stay byte-identical."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "victim").write_bytes(b"precious")
    return folder


@pytest.fixture
def run_copy(finished_run, tmp_path):
    return Path(shutil.copytree(finished_run[0], tmp_path / "run", symlinks=True))


def test_the_report_replaces_links_and_refuses_a_linked_plots_folder(run_copy, finished_run, outside):
    from ddcnn.report import write_report

    results, metrics = finished_run[1], RunDir(run_copy).metrics()
    for name in ("report.md", "plots/learning_curves.png"):
        (run_copy / name).unlink()
        (run_copy / name).symlink_to(outside / "victim")
    write_report(run_copy, results, metrics)
    assert (outside / "victim").read_bytes() == b"precious"
    assert not (run_copy / "report.md").is_symlink() and "## Results" in (run_copy / "report.md").read_text()
    assert (run_copy / "plots/learning_curves.png").read_bytes().startswith(b"\x89PNG")
    shutil.rmtree(run_copy / "plots")
    (run_copy / "plots").symlink_to(outside)
    with pytest.raises(LinkError, match="plots' is a symbolic link"):
        write_report(run_copy, results, metrics)
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]


def test_a_resume_of_a_run_with_a_linked_folder_is_refused_before_anything_is_written(run_copy, outside, capsys):
    shutil.rmtree(run_copy / "plots")
    (run_copy / "plots").symlink_to(outside)
    before = snapshot(run_copy)
    assert main(["run", str(run_copy / "config.yaml"), "--out", str(run_copy), "--resume"]) == 2
    assert "plots' is a symbolic link" in one_error_line(capsys)
    assert snapshot(run_copy) == before and sorted(p.name for p in outside.iterdir()) == ["victim"]


def test_appended_files_and_checkpoints_refuse_links(tmp_path, outside):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run.path / "metrics.jsonl").symlink_to(outside / "victim")
    with pytest.raises(LinkError, match="metrics.jsonl' is a symbolic link"):
        run.append_metrics({"epoch": 1})
    (tmp_path / "study.log").symlink_to(outside / "victim")
    with pytest.raises(LinkError):
        open_append(tmp_path / "study.log", "w")
    (run.path / "checkpoints").symlink_to(outside)
    with pytest.raises(LinkError, match="checkpoints' is a symbolic link"):
        CheckpointDir(run.path / "checkpoints").save("global", "e1", {"w": torch.zeros(2)}, {"epoch": 1})
    assert (outside / "victim").read_bytes() == b"precious" and sorted(p.name for p in outside.iterdir()) == ["victim"]


def test_tensorboard_refuses_a_linked_folder(tmp_path, outside):
    pytest.importorskip("tensorboard")
    from ddcnn.train.store.metrics import MetricsLog

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run.path / "tensorboard").symlink_to(outside)
    log = MetricsLog(run, verbose=False)
    with pytest.raises(LinkError, match="tensorboard' is a symbolic link"):
        log({"stage": "local", "epoch": 1, "train_loss": 0.5})
    log.close()
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]


def test_export_refuses_a_linked_export_folder(run_copy, outside):
    (run_copy / "export").symlink_to(outside)
    with pytest.raises(LinkError, match="export' is a symbolic link"):
        export.export_run(run_copy, "global", "pt2")
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]


def test_a_run_root_that_the_user_made_a_link_still_works(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    run = RunDir(tmp_path / "link")
    run.append_metrics({"epoch": 1})
    run.write_json("results.json", {"x": 1})
    assert own_folder(run.path / "plots", run.path).is_dir()
    assert sorted(p.name for p in real.iterdir()) == ["metrics.jsonl", "plots", "results.json"]


def test_the_study_report_replaces_links_and_refuses_a_linked_plots_folder(tmp_path, outside):
    from ddcnn.study.aggregate import RunData, aggregate
    from ddcnn.study.report import write_report

    runs = [RunData("c", seed, {"strategies": {name: {"test_accuracy": 0.8 + seed / 100 + i / 50, "val_accuracy": 0.8}
                                               for i, name in enumerate(("global", "transfer"))}, "stages": {}})
            for seed in (0, 1)]
    data = {"name": "s", "spec_sha256": "0" * 64, "command": "ddcnn study s.yaml", "last_command": None,
            "seeds": [0, 1], **aggregate([{"id": "c", "label": "c", "values": {}}], runs,
                                         {"c": {0: "finished", 1: "finished"}})}
    folder = tmp_path / "study"
    (folder / "plots").mkdir(parents=True)
    for name in ("study.md", "plots/accuracy.png"):
        (folder / name).symlink_to(outside / "victim")
    write_report(data, folder)
    assert (outside / "victim").read_bytes() == b"precious" and not (folder / "study.md").is_symlink()
    shutil.rmtree(folder / "plots")
    (folder / "plots").symlink_to(outside)
    with pytest.raises(LinkError, match="plots' is a symbolic link"):
        write_report(data, folder)
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]


def _study(folder: Path, capsys) -> Path:
    base = tiny_dict(2)
    study = folder / "s.yaml"
    study.write_text(yaml.safe_dump({"name": "s", "base": base, "axes": {}, "seeds": [0, 1]}))
    assert main(["study", str(study), "--out", str(folder / "out"), "--print-commands"]) == 0
    capsys.readouterr()
    return study


def test_a_study_with_a_linked_logs_folder_is_refused(tmp_path, outside, capsys):
    study = _study(tmp_path, capsys)
    (tmp_path / "out/logs").symlink_to(outside)
    assert main(["study", str(study), "--out", str(tmp_path / "out"), "--resume"]) == 2
    assert "logs' is a symbolic link" in one_error_line(capsys)
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]


# --------------------------------------------------------------------------- one line for tampered files --
def test_a_tampered_study_spec_and_results_file_are_one_error_each(tmp_path, capsys):
    study = _study(tmp_path, capsys)
    spec = tmp_path / "out/study-spec.json"
    recorded = json.loads(spec.read_text())
    recorded["spec"]["seeds"] = [[0], [1]]
    recorded["sha256"] = "0" * 64
    spec.write_text(json.dumps(recorded))
    assert main(["study", str(study), "--out", str(tmp_path / "out"), "--aggregate"]) == 2
    assert "holds the study 's'" in one_error_line(capsys)
    shutil.rmtree(tmp_path / "out")
    study = _study(tmp_path, capsys)
    results = tmp_path / "out/runs/base/seed-0/results.json"
    results.parent.mkdir(parents=True)
    results.write_text(json.dumps({"strategies": {"global": {"test_accuracy": 0.5}}, "best_strategy": "global",
                                   "stages": {"global": "done"}}))
    assert main(["study", str(study), "--out", str(tmp_path / "out"), "--aggregate"]) == 2
    line = one_error_line(capsys)
    assert "results.json' is corrupt (stages.global is a string but must be an object)" in line, line


# ------------------------------------------------------------------------------- consistency of the data --
def test_evaluate_refuses_data_of_other_classes_than_data_json(run_copy, capsys):
    facts = json.loads((run_copy / "data.json").read_text())
    (run_copy / "data.json").write_text(json.dumps({**facts, "classes": ["x", "y", "z"]}))
    before = snapshot(run_copy)
    assert main(["evaluate", str(run_copy)]) == 2
    line = one_error_line(capsys)
    assert "['pattern0', 'pattern1', 'pattern2']" in line and "['x', 'y', 'z']" in line
    assert snapshot(run_copy) == before
    (run_copy / "data.json").write_text(json.dumps({**facts, "classes": ["a\n\x1b]0;b", "y", "z"]}))
    assert main(["evaluate", str(run_copy)]) == 2
    assert "data.json' is corrupt (classes[0] is" in one_error_line(capsys)


def test_non_finite_pixels_and_control_characters_are_refused_in_every_reader(tmp_path):
    from PIL import Image

    from ddcnn.data.readers import load_image_folder
    from ddcnn.finished.predictions import read_input

    tiff = tmp_path / "nan.tif"
    Image.fromarray(np.full((4, 4), np.nan, dtype=np.float32), "F").save(tiff)
    with pytest.raises(DataError, match="NaN or infinite"):
        read_input(tiff, (4, 4), 1, "image-folder", None)
    for name in ("cat", "dog\x1b[2J"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4), np.uint8), "L").save(tmp_path / "photos" / name / "a.png")
    with pytest.raises(DataError, match="holds control characters"):
        load_image_folder(tmp_path / "photos", (4, 4), 1)


# ------------------------------------------------------------------------------------------ bounded memory --
PEAK = """
import resource, sys
from pathlib import Path
from ddcnn.data.readers import read_image_file
from ddcnn.export import ExportedModel

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024

for call in sys.argv[1:]:  # in the order of their peaks: each one's growth is measured from the peak before it
    before = peak()
    try:
        eval(call)
        outcome = "ok"
    except Exception as err:
        outcome = type(err).__name__ + " " + str(err)[:300].replace("\\n", " ")
    print(outcome, "|", peak() - before)
"""


def _png16(path: Path, width: int, height: int) -> Path:
    """A valid 16-bit grey PNG of zeros (a few hundred kilobytes for 10000 x 10000), made without compressing every
    row: after a full flush deflate starts afresh, so the block of 100 zero rows repeats byte for byte."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    assert height % 100 == 0
    rows = bytes((1 + 2 * width) * 100)  # each row: filter byte 0, then the pixels
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = deflate.compress(rows) + deflate.flush(zlib.Z_FULL_FLUSH)
    assert deflate.compress(rows) + deflate.flush(zlib.Z_FULL_FLUSH) == block
    checksum = 1
    for _ in range(height // 100):
        checksum = zlib.adler32(rows, checksum)
    idat = b"\x78\xda" + block * (height // 100) + deflate.flush() + struct.pack(">I", checksum)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _inflating_pt2(tmp_path: Path, pt2_bytes: bytes) -> Path:
    """The archive with its weights' config (read by the checks, then by torch) inflating to 100 MiB."""
    path = tmp_path / "bomb.pt2"
    source = zipfile.ZipFile(io.BytesIO(pt2_bytes))
    with zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            if not info.filename.endswith("model_weights_config.json"):
                target.writestr(info, source.read(info))
                continue
            inflating = zipfile.ZipInfo(info.filename, info.date_time)
            inflating.compress_type = zipfile.ZIP_DEFLATED
            with target.open(inflating, "w", force_zip64=True) as member:
                member.write(b"{")
                for _ in range(100):
                    member.write(b" " * 2**20)
                member.write(b"}")
    export.meta_path(path).write_text(export.meta_path(_exported(tmp_path, pt2_bytes)).read_text())
    return path


def test_hostile_files_are_refused_or_read_within_bounded_memory(pt2_bytes, tmp_path):
    """In a fresh process, each file's growth of the peak memory (ru_maxrss): a 10000 x 10000 16-bit PNG (200 MB of
    pixels, 1.6 GB as float64, a few hundred KB of file) and a .pt2 whose JSON member inflates to 100 MiB are
    refused before they inflate; a 5000 x 5000 16-bit PNG (50 MB of pixels) is read without a float64 copy."""
    bomb = _png16(tmp_path / "bomb.png", 10_000, 10_000)
    pt2 = _inflating_pt2(tmp_path, pt2_bytes)
    big = _png16(tmp_path / "big.png", 5000, 5000)
    calls = [f"read_image_file({str(bomb)!r}, (28, 28), 1)", f"ExportedModel(Path({str(pt2)!r}), trust_code=True)",
             f"read_image_file({str(big)!r}, (28, 28), 1)"]
    done = subprocess.run([sys.executable, "-c", PEAK, *calls], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    (bomb_outcome, bomb_mib), (pt2_outcome, pt2_mib), (big_outcome, big_mib) = [
        (outcome.strip(), int(mib)) for outcome, mib in (line.rsplit("|", 1) for line in done.stdout.splitlines())]
    assert bomb_outcome.startswith("DataError") and "more than the 89,478,485 accepted" in bomb_outcome, bomb_outcome
    assert pt2_outcome.startswith("CheckpointError") and "inflates to" in pt2_outcome, pt2_outcome
    assert big_outcome == "ok", big_outcome
    assert bomb_mib < 32 and pt2_mib < 32 and big_mib < 128, done.stdout
