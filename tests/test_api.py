"""ddcnn.fit on Datasets given from Python: the README's example as written, data no reader produces (3D volumes),
both reading paths, the refusals, and evaluate / predict / export / the CLI on such a run."""

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import ddcnn
from ddcnn.data.generated import make_generated
from ddcnn.errors import CheckpointError, DDCNNError

ROOT = Path(__file__).resolve().parents[1]
TINY = {"device": "cpu", "model.width": 4, "model.depth": [1, 1], "combiner.hidden": [16],
        "stages.*.epochs": 1, "stages.*.batch_size": 32, "data.workers": 0}


class Generated(torch.utils.data.Dataset):
    """ddcnn's generated images as a plain map-style Dataset; ``bad`` replaces samples: {index: (image, label)}."""

    def __init__(self, n, seed, size=(16, 16), bad=None):
        data = make_generated(n, list(size), 3, 1, seed=seed, noise=0.5)
        self.images, self.labels, self.bad = data.images, data.labels, bad or {}

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.bad.get(i, (self.images[i], int(self.labels[i])))


def flip(image):  # a random per-sample augmentation drawn from torch's global generator
    return image.flip(-1) if torch.rand(()) < 0.5 else image


# ------------------------------------------------------------------------------------------ the README example --
def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = {3: 2051, 1: 2049}[array.ndim]
    path.write_bytes(struct.pack(">ii", magic, array.shape[0]) + b"".join(struct.pack(">i", d) for d in array.shape[1:])
                     + array.astype(np.uint8).tobytes())


def _fake_fashion_mnist(root: Path, train=240, test=80) -> None:
    """Small Fashion-MNIST files where torchvision looks for them (it downloads nothing when they exist)."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n, seed in (("train", train, 0), ("t10k", test, 1)):
        data = make_generated(n, [28, 28], 10, 1, seed=seed, noise=0.3)
        images = (data.images[:, 0].clamp(0, 1) * 255).round().numpy()
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", data.labels.numpy())


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Train on your own Dataset, from Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_example_runs_and_load_run_reads_back_its_accuracies(tmp_path, monkeypatch, one_thread):
    pytest.importorskip("torchvision")
    _fake_fashion_mnist(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    code = readme_example()
    assert "ddcnn.fit(" in code and "v2." in code
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    results = json.loads((tmp_path / "runs/fm_python/results.json").read_text())
    assert results["data_source"]["source"] == "python" and results["data_source"]["fingerprints"]["train"]
    run = ddcnn.load_run("runs/fm_python")
    test = scope["test"]
    labels = torch.tensor([test[i][1] for i in range(len(test))])
    for name, model_results in results["strategies"].items():
        probabilities = ddcnn.predict(run, test, strategy=name)
        accuracy = (probabilities.argmax(-1) == labels).float().mean().item()
        assert accuracy == pytest.approx(model_results["test_accuracy"], abs=1e-9), name
    evaluation = ddcnn.evaluate(run, test)
    assert evaluation["same_data"] == {"test": True}
    assert {n: s["test_accuracy"] for n, s in evaluation["strategies"].items()} == \
        {n: s["test_accuracy"] for n, s in results["strategies"].items()}


# -------------------------------------------------------------------------------- data no reader produces ----
class Volumes(torch.utils.data.Dataset):
    """Random 3D volumes (1, 8, 8, 8) as numpy arrays; the class is which half of the depth is brighter."""

    def __init__(self, n, seed):
        g = np.random.default_rng(seed)
        self.labels = g.integers(0, 2, n)
        self.volumes = g.normal(0, 1, (n, 1, 8, 8, 8)).astype(np.float32)
        for v, label in zip(self.volumes, self.labels):
            v[:, 4 * label:4 * label + 4] += 1.5

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.volumes[i], self.labels[i]


def _volume_transform():
    try:
        import torchio

        return torchio.RandomFlip(axes=(2,))  # width only: the class lives along the depth
    except ImportError:
        return lambda v: v.flip(-1) if torch.rand(()) < 0.5 else v


@pytest.mark.slow
def test_3d_volumes_from_a_plain_dataset_stream_and_train(tmp_path, one_thread):
    out = tmp_path / "volumes"
    run = ddcnn.fit(Volumes(96, 0), Volumes(32, 1), classes=["low", "high"], transform=_volume_transform(),
                    load="stream", out=out, verbose=False,
                    overrides={**TINY, "decomposition.grid": [2, 1, 2], "data.workers": 1})
    facts = json.loads((out / "data.json").read_text())["python"]
    assert facts["load"] == "stream" and facts["bytes"] == 0 and facts["dtype"] == "float32"
    assert run.image_size == (8, 8, 8) and run.classes == ["low", "high"]
    assert "Data given from Python (ddcnn.fit), streamed from the Datasets" in (out / "report.md").read_text()
    assert set(run.results["strategies"]) == {"global", "cnn_dnn", "mean_probability", "majority_vote", "coherent",
                                              "transfer"}


@pytest.mark.slow
@pytest.mark.heavy  # two runs: make test-heavy (make test keeps under five minutes on 2 cores)
def test_memory_and_stream_paths_train_the_same_models(tmp_path, one_thread):
    """A per-sample transform's draws depend only on (seed, epoch, sample): held in memory or streamed, with or
    without workers, the run is the same."""
    outcomes = []
    for load, workers in (("memory", 0), ("stream", 1)):
        out = tmp_path / load
        ddcnn.fit(Generated(96, 0), Generated(32, 1), transform=flip, load=load, out=out, verbose=False,
                  overrides={**TINY, "data.workers": workers, "stages.combine.enabled": False,
                             "stages.coherent.enabled": False, "stages.transfer.enabled": False})
        manifests = {p.stem: json.loads(p.read_text())["files"]["weights"]["sha256"]
                     for p in (out / "checkpoints").glob("*.json")}
        results = json.loads((out / "results.json").read_text())
        outcomes.append((manifests, {n: s["test_accuracy"] for n, s in results["strategies"].items()},
                         results["data_source"]["fingerprints"]))
    assert outcomes[0] == outcomes[1]


def test_a_dataset_that_draws_at_random_is_streamed(tmp_path, one_thread):
    class Noisy(Generated):
        def __getitem__(self, i):
            image, label = super().__getitem__(i)
            return image + 0.01 * torch.randn(image.shape), label

    run = ddcnn.fit(Noisy(64, 0), Generated(32, 1), out=tmp_path / "r", verbose=False,
                    overrides={**TINY, "stages.local.enabled": False, "stages.combine.enabled": False,
                               "stages.coherent.enabled": False, "stages.transfer.enabled": False})
    assert run.results["data_source"]["load"] == "stream"
    assert "draws at random" in run.results["data_source"]["why"]


# -------------------------------------------------------------------------------------------- refusals ----
BAD = {
    "2D": ({5: (torch.zeros(16, 16), 0)}, r"train\[5\] is an image of shape \[16, 16\].*add the channel axis"),
    "label": ({7: (torch.zeros(1, 16, 16), 3)}, r"train\[7\] has label 3, outside 0\.\.2 \(3 classes\)"),
    "NaN": ({9: (torch.full((1, 16, 16), float("nan")), 0)}, r"train\[9\] holds NaN or infinite values"),
    "size": ({300: (torch.zeros(1, 16, 18), 0)}, r"train\[300\] is \[1, 16, 18\] but train\[0\] is \[1, 16, 16\]"),
    "kind": ({11: (torch.zeros(1, 16, 16, dtype=torch.uint8), 0)}, r"train\[11\] is a uint8 image but train\[0\] is "
                                                                   r"float"),
    "pair": ({2: torch.zeros(1, 16, 16)}, r"train\[2\] is a Tensor; a dataset for ddcnn gives \(image, label\)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("load", ["memory", "stream"])
def test_a_bad_sample_is_one_error_naming_it_and_nothing_is_written(tmp_path, case, load):
    bad, message = BAD[case]
    out = tmp_path / "run"
    with pytest.raises(DDCNNError, match=message) as caught:
        ddcnn.fit(Generated(320, 0, bad=bad), Generated(32, 1), classes=["a", "b", "c"], load=load, out=out,
                  verbose=False, overrides={**TINY, "data.workers": 1})
    assert "\n" not in str(caught.value)
    assert not out.exists()


def test_a_transform_that_changes_the_size_is_refused_before_training(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DDCNNError, match=r"the transform turned train\[0\] from \[1, 16, 16\] into "
                                         r"\[1, 12, 12\]") as caught:
        ddcnn.fit(Generated(64, 0), Generated(32, 1), transform=lambda x: x[:, 2:14, 2:14], out=out, verbose=False,
                  overrides=TINY)
    assert "\n" not in str(caught.value)
    assert not out.exists()


def test_an_iterable_dataset_is_refused(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield torch.zeros(1, 16, 16), 0

    with pytest.raises(DDCNNError, match="not a map-style dataset"):
        ddcnn.fit(Stream(), Generated(32, 1), out=tmp_path / "run", verbose=False, overrides=TINY)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------ a finished run from Python ----
@pytest.fixture(scope="module")
def python_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("python") / "run"
    ddcnn.fit(Generated(96, 0), Generated(32, 1), transform=flip, out=out, verbose=False,
              preprocessing={"scale": "[0, 1]", "by": "make_generated"}, overrides=TINY)
    return out


def test_the_cli_says_in_one_line_that_the_run_needs_its_data_from_python(python_run, capsys):
    from ddcnn.cli import main

    for args in (["evaluate", str(python_run)], ["predict", str(python_run), "x.png"],
                 ["run", str(python_run / "config.yaml"), "--resume", "--out", str(python_run)]):
        before = {p: p.read_bytes() for p in python_run.rglob("*") if p.is_file()}
        assert main(args) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "came from Python" in lines[0], lines
        assert {p: p.read_bytes() for p in python_run.rglob("*") if p.is_file()} == before


def test_evaluate_from_python_gives_the_runs_accuracies_and_knows_other_data(python_run):
    results = json.loads((python_run / "results.json").read_text())
    same = ddcnn.evaluate(python_run, Generated(32, 1))
    assert same["same_data"] == {"test": True}
    assert {n: s["test_accuracy"] for n, s in same["strategies"].items()} == \
        {n: s["test_accuracy"] for n, s in results["strategies"].items()}
    other = ddcnn.evaluate(python_run, Generated(32, 5))
    assert other["same_data"] == {"test": False}


def test_export_sidecar_says_the_preprocessing_is_the_users_own(python_run, tmp_path):
    from ddcnn.api import export

    exported = export(python_run, "global", out=tmp_path / "global.pt2", images=Generated(32, 1))
    meta = json.loads(exported.meta_path.read_text())
    assert meta["dataset"] == "python" and meta["check"]["on"] == "the images given"
    assert meta["preprocessing"]["declared"] == {"scale": "[0, 1]", "by": "make_generated"}
    assert "user's own" in meta["preprocessing"]["by"]


def test_an_out_that_holds_a_run_is_refused_before_the_data_are_read(python_run):
    class Unread(Generated):
        def __getitem__(self, i):
            raise AssertionError("read")

    with pytest.raises(DDCNNError, match="already holds a ddcnn run; use --resume"):
        ddcnn.fit(Unread(8, 0), Unread(8, 1), out=python_run, verbose=False, overrides=TINY)


def test_resume_with_other_data_is_refused_and_leaves_the_run_as_it_was(python_run):
    before = {p: p.read_bytes() for p in python_run.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="the train dataset differs from the one the run was trained with"):
        ddcnn.fit(Generated(96, 7), Generated(32, 1), transform=flip, out=python_run, resume=True, verbose=False,
                  overrides=TINY)
    assert {p: p.read_bytes() for p in python_run.rglob("*") if p.is_file()} == before
