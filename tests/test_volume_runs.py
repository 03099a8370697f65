"""Runs on volumes end to end: phantoms stored in several orientations, an outside ONNX Runtime client following the
export sidecar, a DICOM series that trains and predicts, and class imbalance on the generator's 3D data."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddcnn.cli import main
from ddcnn.config import from_dict
from ddcnn.data.generated import make_generated
from ddcnn.train.evaluate import predict_files
from ddcnn.train.protocol import Experiment
from volume_phantoms import phantom, ras_affine, save_dicom_series, save_nifti, stored

pytest.importorskip("nibabel")
pytestmark = pytest.mark.slow
STAGES = {s: {"epochs": 1, "batch_size": 8} for s in ("global", "local", "combine", "coherent", "transfer")}
# The CNN-DNN of the paper's first strategy alone (its subdomain votes, the ONNX export): the other stages add
# minutes to the suite and nothing to what these tests show.
LOCAL_AND_COMBINE = {**STAGES, **{s: {"enabled": False} for s in ("global", "coherent", "transfer")}}


def volume_config(root: Path, **data) -> dict:
    return {"name": "volumes", "device": "cpu",
            "data": {"name": "volume-folder", "root": str(root), "image_size": [8, 12, 16], "spacing": [4, 2, 2],
                     "test_fraction": 0.25, "val_fraction": 0.25, **data},
            "decomposition": {"grid": [1, 1, 2]}, "model": {"width": 4, "depth": [1, 1]},
            "combiner": {"hidden": [8]}, "stages": LOCAL_AND_COMBINE}


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory):
    """A run on 16 phantoms as a CT user has them: uint16 with scale factors, voxel spacings that differ, half of
    them stored with the first axis reversed."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("phantoms")
    for i in range(16):
        lesion = i % 2 == 1
        spacing = (1.5, 1.5, 3.0) if i % 4 < 2 else (1.2, 1.7, 2.5)
        hu, affine = stored(phantom(lesion, seed=i), ras_affine(spacing), "flip_x" if i % 3 else "as_is")
        save_nifti(root / ("abnormal" if lesion else "normal") / f"study_{i}.nii.gz", hu, affine)
    out = root.parent / "run"
    augment = {"flip_axes": [0], "rotate_degrees": 5.0, "intensity_shift": 0.02}  # the 3D augmentation, on a run
    Experiment(from_dict(volume_config(root, augment=augment)), out, verbose=False).run()
    return out, root


def test_two_stored_orientations_of_one_phantom_give_identical_predictions(phantom_run, tmp_path):
    run_dir, _ = phantom_run
    hu = phantom(True, seed=99)
    files = [save_nifti(tmp_path / f"{how}.nii.gz", *stored(hu, ras_affine(), how)) for how in ("as_is", "flip_x",
                                                                                                 "zyx")]
    pred = predict_files(run_dir, [str(f) for f in files], strategy="cnn_dnn")
    assert pred is not None
    first = pred.rows[0]
    for row in pred.rows[1:]:
        assert row["probabilities"] == first["probabilities"] and row["subdomains"] == first["subdomains"]
    data = json.loads((run_dir / "data.json").read_text())
    assert data["volumes"]["orientation"] == "RAS" and data["volumes"]["spacing"] == [4.0, 2.0, 2.0]


def test_an_outside_onnx_client_reproduces_predict_from_the_sidecar_alone(phantom_run, tmp_path):
    for module in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(module)
    from ddcnn.export import export_run

    run_dir, _ = phantom_run
    exported = export_run(run_dir, "cnn_dnn", "onnx", tmp_path / "model.onnx")
    meta = json.loads(exported.meta_path.read_text())
    assert meta["volumes"]["fit"] == "crop_or_pad" and meta["volumes"]["interpolation"].startswith("trilinear")
    # A raw scan as it comes: another spacing, the first axis reversed, uint16 with an intercept.
    hu, affine = stored(phantom(True, seed=42, shape=(22, 14, 9)), ras_affine((1.3, 1.9, 3.3)), "flip_x")
    scan = save_nifti(tmp_path / "raw_scan.nii.gz", hu, affine)
    client = Path(__file__).with_name("outside_client.py")
    done = subprocess.run([sys.executable, "-I", str(client), str(exported.path), str(scan)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    outside = json.loads(done.stdout)
    pred = predict_files(run_dir, [str(scan)], strategy="cnn_dnn")
    assert pred is not None
    ours = pred.rows[0]["probabilities"]
    assert max(abs(outside[c] - ours[c]) for c in ours) < 1e-4
    assert max(outside, key=outside.get) == pred.rows[0]["class"]


def test_a_dicom_series_trains_and_predicts(tmp_path, capsys):
    pytest.importorskip("pydicom")
    torch.set_num_threads(1)
    root = tmp_path / "dicom"
    for i in range(8):
        lesion = i % 2 == 1
        save_dicom_series(root / ("abnormal" if lesion else "normal") / f"patient-{i}" / "CT", phantom(lesion, seed=i))
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(volume_config(root, test_fraction=0.25, val_fraction=0.0,
                                               cache=str(tmp_path / "cache"))))
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert "0 of 8 read from the preprocessing cache" in capsys.readouterr().err
    # The second reading of the same series (here `ddcnn evaluate`) skips the preparation, with identical tensors:
    # every strategy scores exactly what the run scored.
    assert main(["evaluate", str(tmp_path / "run")]) == 0
    assert "8 of 8 read from the preprocessing cache" in capsys.readouterr().err
    run = json.loads((tmp_path / "run" / "results.json").read_text())["strategies"]
    again = json.loads((tmp_path / "run" / "evaluation.json").read_text())["strategies"]
    assert {n: e["test_accuracy"] for n, e in run.items()} == {n: e["test_accuracy"] for n, e in again.items()}
    series = save_dicom_series(tmp_path / "new" / "CT", phantom(True, seed=50))
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "run"), str(series), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["file"] == str(series) and rows[0]["class"] in ("abnormal", "normal")


def _imbalanced_generated_volumes(root: Path, minority: int = 20) -> None:
    """Two classes of the bundled generator's 3D data as .npy volumes, 6 of class 0 for each of class 1."""
    ds = make_generated(600, (8, 8, 8), num_classes=2, seed=0, noise=0.6)
    kept = {0: 0, 1: 0}
    for i, label in enumerate(ds.labels.tolist()):
        if kept[label] < (minority if label else 6 * minority):
            kept[label] += 1
            (root / f"pattern{label}").mkdir(parents=True, exist_ok=True)
            np.save(root / f"pattern{label}" / f"{i}.npy", ds.images[i, 0].numpy())


def _imbalanced_run(root: Path, out: Path, balance: str | None, stages=("local", "combine")) -> dict:
    cfg = volume_config(root, image_size=[8, 8, 8], spacing=None, intensity="stored", window=None,
                        test_fraction=0.3, val_fraction=0.2, balance=balance)
    cfg["decomposition"]["grid"] = [2, 1, 2]
    cfg["stages"] = {s: {"epochs": 6, "batch_size": 16, "lr": 0.01, "enabled": s in stages} for s in STAGES}
    return Experiment(from_dict(cfg), out, verbose=False).run()


def test_class_weights_stop_the_collapse_to_one_class_and_the_report_warns_when_it_happens(tmp_path):
    torch.set_num_threads(1)
    _imbalanced_generated_volumes(tmp_path / "data")
    plain = _imbalanced_run(tmp_path / "data", tmp_path / "plain", None)
    collapsed = [n for n, e in plain["strategies"].items() if max(e["test_predicted"]) >= 0.95 * sum(
        e["test_predicted"])]
    assert collapsed  # without balance, strategies say the larger class for (almost) every test volume
    report = (tmp_path / "plain" / "report.md").read_text()
    for name in collapsed:
        assert f"**Warning:** {name} predicts class 'pattern0' for" in report
    weighted = _imbalanced_run(tmp_path / "data", tmp_path / "weighted", "weights")
    for name, entry in weighted["strategies"].items():
        assert max(entry["test_predicted"]) < 0.95 * sum(entry["test_predicted"]), name
    assert "**Warning:**" not in (tmp_path / "weighted" / "report.md").read_text()


@pytest.mark.heavy
def test_a_balanced_sampler_stops_the_collapse_of_most_strategies(tmp_path):
    torch.set_num_threads(1)
    _imbalanced_generated_volumes(tmp_path / "data")
    plain = _imbalanced_run(tmp_path / "data", tmp_path / "plain", None, STAGES)
    sampled = _imbalanced_run(tmp_path / "data", tmp_path / "sampled", "sampler", STAGES)

    def count(results):
        return sum(max(e["test_predicted"]) >= 0.95 * sum(e["test_predicted"]) for e in results["strategies"].values())

    assert count(sampled) < count(plain)
