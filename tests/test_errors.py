"""Every error a user can cause: its ddcnn type (and the matching built-in), a message that names the value and
the fix, and through the command line exit status 2 with exactly one line ``ddcnn: error: ...``.

Cases already covered elsewhere (test_config, test_cli, test_protocol, test_checkpoint, test_data_readers, ...) are
not repeated here; docs/errors.md maps every case to the test that covers it. The command-line cases run in one
workspace (``build_workspace``) holding a config, damaged datasets and damaged copies of a finished run.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import tiny_dict
from ddcnn.cli import main
from ddcnn.config import STAGES, from_dict
from ddcnn.decomposition import Decomposition
from ddcnn.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DataNotFoundError,
    DDCNNError,
    ShapeError,
    TrainingError,
)
from ddcnn.models import CNNDNN, DNN, GlobalCNN, LocalEnsemble, MeanProbability, build_combiner

BUILTIN = {ConfigError: ValueError, ShapeError: ValueError, DataError: ValueError,
           DataNotFoundError: FileNotFoundError, CheckpointError: ValueError, TrainingError: RuntimeError}
PREFIX = "ddcnn: error: "


@pytest.mark.parametrize("cls", list(BUILTIN), ids=lambda c: c.__name__)
def test_every_error_is_a_ddcnn_error_and_the_matching_builtin(cls):
    assert issubclass(cls, DDCNNError) and issubclass(cls, BUILTIN[cls])


# ------------------------------------------------------------------------------------------------ workspace --
def _idx(code_dims: tuple, payload: bytes) -> bytes:
    code, dims = code_dims
    return bytes([0, 0, code, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + payload


def _mnist(root: Path, n: int = 40, size: int = 12, labels_n: int | None = None, label_max: int = 9,
           magic: bool = True, cut_gzip: bool = False) -> None:
    """IDX files (gzip) for both splits, damaged as asked."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "t10k"):
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8).tobytes()
        labels = rng.integers(0, label_max + 1, labels_n or n, dtype=np.uint8)
        labels[:2] = label_max, 0
        image_bytes = _idx((8, (n, size, size)), images)
        if not magic:
            image_bytes = b"\x12\x34" + image_bytes[2:]
        packed = gzip.compress(image_bytes)
        if cut_gzip:
            packed = packed[: len(packed) // 2]
        (root / f"{split}-images-idx3-ubyte.gz").write_bytes(packed)
        (root / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx((8, (len(labels),)),
                                                                               labels.tobytes())))


def _volumes(root: Path, bad: np.ndarray | None = None) -> None:
    rng = np.random.default_rng(0)
    for c in ("CT-0", "CT-1"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            np.save(root / c / f"v{i}.npy", rng.uniform(-1000, 400, (8, 8, 8)).astype(np.float32))
    if bad is not None:
        np.save(root / "CT-1" / "bad.npy", bad)


def _photos(root: Path, empty: bool = False, broken: bool = False) -> None:
    rng = np.random.default_rng(0)
    for c in ("daisy", "tulips"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    if empty:
        (root / "roses").mkdir()
    if broken:
        (root / "tulips" / "broken.png").write_bytes(b"\x89PNG this is not a picture")


def _copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    for name in ("evaluation.json",):
        (dest / name).unlink(missing_ok=True)
    return dest


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def build_workspace(root: Path, finished: Path) -> Path:
    """Everything the command-line cases need, under ``root`` (the cases run with ``root`` as the working dir)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "c.yaml").write_text(yaml.safe_dump(tiny_dict(2)))
    (root / "notyaml.yaml").write_text("model: {width: 3\nseed: 1\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01\x9c")
    (root / "somefile").write_text("not a directory")
    (root / "other").mkdir()
    (root / "other" / "thesis.tex").write_text("keep me")
    _mnist(root / "mnist_cut", cut_gzip=True)
    _mnist(root / "mnist_magic", magic=False)
    _mnist(root / "mnist_count", labels_n=30)
    _mnist(root / "mnist_range", label_max=12)
    _photos(root / "photos_empty", empty=True)
    _photos(root / "photos_broken", broken=True)
    _volumes(root / "vol_nan", np.where(np.arange(512).reshape(8, 8, 8) == 7, np.nan, 0.0).astype(np.float32))
    _volumes(root / "vol_inf", np.where(np.arange(512).reshape(8, 8, 8) == 7, np.inf, 0.0).astype(np.float32))
    _volumes(root / "vol_flat", np.zeros((8, 8), np.float32))
    _volumes(root / "vol_ok")
    cifar = root / "cifar"
    cifar.mkdir()
    record = bytes(1 + 3 * 32 * 32)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        (cifar / name).write_bytes(record * 2 + (b"\x00" * 10 if name == "data_batch_3.bin" else b""))
    (root / "cifar_py" / "cifar-10-batches-py").mkdir(parents=True)
    (root / "cifar_py" / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"pickled")
    shutil.copytree(cifar, root / "cifar_missing" / "cifar-10-batches-bin")
    (root / "cifar_missing" / "cifar-10-batches-bin" / "data_batch_3.bin").unlink()
    np.save(root / "rgb.npy", np.zeros((3, 16, 16), np.float32))
    np.save(root / "nan.npy", np.full((1, 16, 16), np.nan, np.float32))
    np.save(root / "ok.npy", np.zeros((1, 16, 16), np.float32))
    _copy_run(finished, root / "run")
    _flip_byte(_copy_run(finished, root / "run_corrupt") / "checkpoints" / "local-e2.weights.safetensors")
    weights = _copy_run(finished, root / "run_trunc") / "checkpoints" / "global-e2.weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (_copy_run(finished, root / "run_manifest") / "checkpoints" / "global.json").write_text("{not json")
    for manifest in (_copy_run(finished, root / "run_nothing") / "checkpoints").glob("*.json"):
        manifest.unlink()
    (_copy_run(finished, root / "run_partial") / "checkpoints" / "coherent.json").unlink()
    (_copy_run(finished, root / "run_facts") / "data.json").write_text("{}")
    (_copy_run(finished, root / "run_config") / "config.yaml").write_text("- 1\n")
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, finished_run):
    return build_workspace(tmp_path_factory.mktemp("workspace"), finished_run[0])


# ------------------------------------------------------------------------------------------ the CLI cases --
@dataclass
class Case:
    id: str
    args: list[str]
    error: type
    fragments: list[str]  # each must appear in the message: the value, and the fix


def _run(*sets: str, out: str = "out/x") -> list[str]:
    args = ["run", "c.yaml", "--out", out]
    for s in sets:
        args += ["--set", s]
    return args


MNIST = ("data.name=mnist", "data.image_size=null")
ONLY_GLOBAL_NAN = ("stages.*.enabled=false", "stages.global.enabled=true", "stages.global.epochs=3",
                   "stages.global.optimizer=sgd", "stages.global.lr=0.01", "stages.global.schedule=step",
                   "stages.global.step_every=1", "stages.global.step_gamma=1e32")

CLI_CASES = [
    # 1. the config file
    Case("config-not-yaml", ["run", "notyaml.yaml"], ConfigError, ["'notyaml.yaml'", "not valid YAML (line 2)",
                                                                    "fix its syntax"]),
    Case("config-not-a-mapping", ["run", "list.yaml"], ConfigError, ["'list.yaml'", "mapping", "not a list"]),
    Case("config-not-text", ["run", "binary.yaml"], ConfigError, ["'binary.yaml'", "not a text file", "YAML file"]),
    # 2. keys, types, ranges
    Case("unknown-key", _run("stages.local.epocs=3"), ConfigError, ["'stages.local.epocs'", "did you mean 'epochs'"]),
    Case("wrong-type", _run("model.width=wide"), ConfigError, ["model.width = 'wide'", "whole number"]),
    Case("zero-epochs", _run("stages.local.epochs=0"), ConfigError, ["stages.local.epochs = 0", "must be positive"]),
    Case("negative-batch-size", _run("stages.global.batch_size=-8"), ConfigError,
         ["stages.global.batch_size = -8", "must be positive"]),
    Case("zero-learning-rate", _run("stages.combine.lr=0"), ConfigError, ["stages.combine.lr = 0.0", "positive"]),
    Case("negative-seed", _run("seed=-1"), ConfigError, ["seed = -1", "must not be negative"]),
    Case("label-smoothing-1", _run("stages.global.label_smoothing=1.5"), ConfigError,
         ["stages.global.label_smoothing = 1.5", "below 1"]),
    Case("dropout-1", _run("combiner.dropout=1.5"), ConfigError, ["combiner.dropout = 1.5", "[0, 1)"]),
    Case("bad-monitor", _run("stages.local.monitor=val_acuracy"), ConfigError,
         ["stages.local.monitor", "'val_acuracy'", "val_accuracy"]),
    Case("negative-min-delta", _run("stages.local.min_delta=-0.1"), ConfigError,
         ["stages.local.min_delta = -0.1", "must not be negative"]),
    Case("patience-without-validation", _run("stages.global.patience=3", "data.val_fraction=0"), ConfigError,
         ["stages.global.patience", "data.val_fraction = 0", "set data.val_fraction"]),
    Case("target-above-1", _run("evaluation.target_accuracy=91"), ConfigError,
         ["evaluation.target_accuracy = 91", "(0, 1]"]),
    Case("channels-2", _run("data.channels=2"), ConfigError, ["data.channels = 2", "1 (grey) or 3 (RGB)"]),
    Case("num-classes-1", _run("data.num_classes=1"), ConfigError, ["data.num_classes = 1", "at least 2"]),
    Case("device-typo", _run("device=cuda:x"), ConfigError, ["device = 'cuda:x'", "cuda:N", "cuda:0"]),
    Case("image-size-entries", _run("data.image_size=[16]"), ConfigError, ["data.image_size = [16]", "[H, W]"]),
    # 3. grid
    Case("grid-negative", _run("decomposition.grid=[-1, 2]"), ConfigError,
         ["decomposition.grid = [-1, 2]", "positive", "e.g. [2, 2]"]),
    Case("grid-zero", _run("decomposition.grid=[2, 0]"), ConfigError, ["decomposition.grid = [2, 0]", "positive"]),
    Case("grid-length", _run("decomposition.grid=[2, 2, 2]"), ConfigError,
         ["grid [2, 2, 2]", "3 entries", "2 dimensions", "one entry per image axis"]),
    Case("grid-finer-than-pixels", _run("decomposition.grid=[17, 1]"), ConfigError,
         ["grid [17, 1]", "only 16 pixels", "at most 16"]),
    # 4. overlap
    Case("overlap-negative", _run("decomposition.overlap=-1"), ConfigError,
         ["decomposition.overlap = -1", "must not be negative"]),
    Case("overlap-not-smaller", _run("decomposition.overlap=16"), ConfigError,
         ["overlap 16", "subimage length 16", "at most 14"]),
    Case("overlap-length", _run("decomposition.overlap=[1, 1, 1]"), ConfigError,
         ["overlap [1, 1, 1]", "one entry per image axis"]),
    # 6. config against the data
    Case("image-folder-size-entries", _run("data.name=image-folder", "data.root=photos_broken",
                                           "data.image_size=[8, 8, 8]"), ConfigError,
         ["data.image_size = [8, 8, 8]", "image-folder needs 2", "[H, W]"]),
    Case("volume-folder-size-entries", _run("data.name=volume-folder", "data.root=vol_nan",
                                            "data.image_size=[8, 8]"), ConfigError,
         ["data.image_size = [8, 8]", "volume-folder needs 3", "[D, H, W]"]),
    # 7. names
    Case("unknown-backbone", _run("model.backbone=resnt"), ConfigError,
         ["'resnt'", "did you mean 'resnet'", "vgg, resnet"]),
    Case("unknown-dataset", _run("data.name=cifar"), ConfigError,
         ["'cifar'", "did you mean 'cifar10'", "image-folder, volume-folder, generated"]),
    Case("unknown-stage", _run("stages.locl.epochs=1"), ConfigError,
         ["'stages.locl'", "did you mean 'local'", ", ".join(STAGES)]),
    Case("unknown-optimizer", _run("stages.local.optimizer=adamw2"), ConfigError,
         ["'adamw2'", "sgd, adam, adamw"]),
    Case("unknown-activation", _run("combiner.activation=relu6"), ConfigError,
         ["'relu6'", "did you mean 'relu'", "relu, gelu, tanh, silu"]),
    # 8. dataset files
    Case("data-root-missing", _run("data.name=image-folder", "data.root=nowhere"), DataNotFoundError,
         ["nowhere", "not a directory", "one sub-folder per class"]),
    Case("data-root-unset", _run("data.name=image-folder"), ConfigError,
         ["data.root", "'image-folder'", "folder of class sub-folders"]),
    Case("truncated-gzip", _run(*MNIST, "data.root=mnist_cut"), DataError,
         ["mnist_cut/train-images-idx3-ubyte.gz", "truncated or corrupt gzip", "download it again"]),
    Case("idx-bad-magic", _run(*MNIST, "data.root=mnist_magic"), DataError,
         ["mnist_magic/train-images-idx3-ubyte.gz", "bad magic number 1234", "download"]),
    Case("label-count", _run(*MNIST, "data.root=mnist_count"), DataError,
         ["has 30 labels", "has 40 images", "fetch both again"]),
    Case("labels-out-of-range", _run(*MNIST, "data.root=mnist_range"), DataError,
         ["mnist_range/train-labels-idx1-ubyte.gz", "[0, 12]", "10 classes"]),
    Case("empty-class-folder", _run("data.name=image-folder", "data.root=photos_empty"), DataError,
         ["photos_empty/roses", "has no images", "add some or remove the folder"]),
    Case("unreadable-image", _run("data.name=image-folder", "data.root=photos_broken"), DataError,
         ["photos_broken/tulips/broken.png", "cannot be read as an image", "delete or replace"]),
    Case("volume-wrong-dims", _run("data.name=volume-folder", "data.root=vol_flat", "data.image_size=[8, 8, 8]",
                                   "decomposition.grid=[2, 2, 2]"), DataError,
         ["vol_flat/CT-1/bad.npy", "2-D", "must be 3-D"]),
    Case("one-class", _run("data.name=volume-folder", "data.root=vol_ok", "data.image_size=[8, 8, 8]",
                           "decomposition.grid=[2, 2, 2]", "data.class_map={CT-0: a, CT-1: a}"), DataError,
         ["has 1 class (a)", "at least 2", "data.class_map"]),
    Case("cifar-partial-record", _run("data.name=cifar10", "data.root=cifar", "data.image_size=null"), DataError,
         ["cifar/data_batch_3.bin has 6156 bytes", "3073-byte records", "download it again"]),
    Case("cifar-python-version", _run("data.name=cifar10", "data.root=cifar_py", "data.image_size=null"), DataError,
         ["cifar_py/cifar-10-batches-py", "pickled", "binary version"]),
    Case("cifar-missing-batch", _run("data.name=cifar10", "data.root=cifar_missing", "data.image_size=null"),
         DataNotFoundError, ["cifar_missing/cifar-10-batches-bin/data_batch_3.bin is missing", "download"]),
    # 12. the output directory
    Case("out-holds-other-files", _run(out="other"), ConfigError, ["'other'", "not a ddcnn run", "--force"]),
    Case("out-is-a-file", _run(out="somefile"), ConfigError, ["'somefile' is a file", "another --out"]),
    Case("out-not-writable", _run(out="somefile/run"), ConfigError,
         ["'somefile/run'", "not writable", "another --out"]),
    # 10. --resume
    Case("resume-other-files", _run(out="other") + ["--resume"], CheckpointError,
         ["'other' holds no ddcnn run", "--force"]),
    Case("resume-changed-backbone", _run("model.backbone=resnet", out="run") + ["--resume"], CheckpointError,
         ["model.backbone was 'vgg'", "'resnet' now", "the run's own config"]),
    Case("resume-changed-width", _run("model.width=8", out="run") + ["--resume"], CheckpointError,
         ["model.width was 4", "8 now", "the run's own config"]),
    Case("resume-changed-grid", _run("decomposition.grid=[4, 4]", out="run") + ["--resume"], CheckpointError,
         ["decomposition.grid was [2, 2]", "[4, 4] now"]),
    Case("resume-and-force", _run(out="run") + ["--resume", "--force"], ConfigError,
         ["--resume continues", "--force starts it over", "give one of them"]),
    # 11. damaged checkpoints
    Case("resume-truncated-checkpoint", _run(out="run_trunc") + ["--resume"], CheckpointError,
         ["run_trunc/checkpoints/global-e2.weights.safetensors", "truncated or corrupted",
          "delete 'run_trunc/checkpoints/global.json'"]),
    Case("evaluate-corrupt-checkpoint", ["evaluate", "run_corrupt"], CheckpointError,
         ["run_corrupt/checkpoints/local-e2.weights.safetensors", "SHA-256",
          "delete 'run_corrupt/checkpoints/local.json'"]),
    Case("evaluate-corrupt-manifest", ["evaluate", "run_manifest"], CheckpointError,
         ["run_manifest/checkpoints/global.json", "corrupt", "delete it"]),
    Case("evaluate-damaged-data-json", ["evaluate", "run_facts"], CheckpointError,
         ["run_facts/data.json", "lacks the key 'classes'", "--resume the run"]),
    Case("evaluate-damaged-config", ["evaluate", "run_config", "--device", "cpu"], CheckpointError,
         ["run_config/config.yaml", "restore"]),
    # 13. NaN / Inf
    Case("volume-nan", _run("data.name=volume-folder", "data.root=vol_nan", "data.image_size=[8, 8, 8]",
                            "decomposition.grid=[2, 2, 2]"), DataError,
         ["vol_nan/CT-1/bad.npy", "NaN or infinite", "fix or remove the file"]),
    Case("volume-inf", _run("data.name=volume-folder", "data.root=vol_inf", "data.image_size=[8, 8, 8]",
                            "decomposition.grid=[2, 2, 2]"), DataError,
         ["vol_inf/CT-1/bad.npy", "NaN or infinite", "fix or remove the file"]),
    Case("nan-loss", _run(*ONLY_GLOBAL_NAN, out="out/nan") + ["--force"], TrainingError,
         ["stage 'global', epoch 2", "checkpoint of epoch 1 is kept", "--resume --set stages.global.lr="]),
    # 14. predict
    Case("predict-wrong-channels", ["predict", "run", "rgb.npy"], DataError,
         ["rgb.npy has 3 channel(s)", "take 1", "grey images"]),
    Case("predict-nan", ["predict", "run", "nan.npy"], DataError, ["nan.npy", "NaN or infinite", "finite"]),
    Case("predict-missing-file", ["predict", "run", "missing.png"], DataNotFoundError,
         ["missing.png does not exist", "path of an image file"]),
    Case("predict-a-folder", ["predict", "run", "cifar"], DataError, ["cifar is a folder", "cifar/*.png"]),
    Case("predict-nothing-trained", ["predict", "run_nothing", "ok.npy"], CheckpointError,
         ["'run_nothing' has no finished stage", "run (or --resume) it first"]),
    Case("predict-strategy-not-trained", ["predict", "run_partial", "ok.npy", "--strategy", "coherent"], ConfigError,
         ["'coherent' was not trained", "available: global, cnn_dnn"]),
    Case("predict-unknown-strategy", ["predict", "run_partial", "ok.npy", "--strategy", "majority"], ConfigError,
         ["unknown strategy 'majority'", "did you mean 'majority_vote'", "this run has: global"]),
    # 15. CUDA on a machine without it (torch.cuda.is_available is patched to False for these cases)
    Case("cuda-missing-run", _run("device=cuda"), ConfigError, ["device = 'cuda'", "no CUDA device", "device=cpu"]),
    Case("cuda-missing-evaluate", ["evaluate", "run", "--device", "cuda"], ConfigError,
         ["device = 'cuda'", "no CUDA device", "device=cpu"]),
    Case("device-unknown", ["predict", "run", "ok.npy", "--device", "gpu"], ConfigError,
         ["device = 'gpu'", "auto, cpu, cuda or cuda:N"]),
]


def cli_error(capsys, args: list[str], error: type) -> str:
    """Run ``ddcnn ARGS``: exit status 2, one line on stderr; with --debug the same message raised as ``error``."""
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(PREFIX), err
    with pytest.raises(DDCNNError) as info:
        main(["--debug", *args])
    assert type(info.value) is error and isinstance(info.value, BUILTIN[error])
    assert str(info.value) == err[0][len(PREFIX):]
    return err[0]


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.id)
def test_cli_user_errors(case, workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = cli_error(capsys, case.args, case.error)
    for fragment in case.fragments:
        assert fragment in line, (fragment, line)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o500 directory anyway; out-not-writable covers it")
def test_an_output_directory_without_write_permission(workspace, tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    monkeypatch.chdir(workspace)
    try:
        line = cli_error(capsys, _run(out=str(locked / "run")), ConfigError)
    finally:
        locked.chmod(0o700)
    assert "not writable" in line and "another --out" in line


def test_nan_in_a_generated_training_set(tiny_config, monkeypatch, tmp_path, capsys):
    """The check after loading catches NaN/Inf whatever made them (here: a generator that produces one)."""
    import ddcnn.data.datasets as datasets

    real = datasets.make_generated

    def with_nan(*args, **kwargs):
        ds = real(*args, **kwargs)
        ds.images[3, 0, 5, 5] = float("nan")
        return ds

    monkeypatch.setattr(datasets, "make_generated", with_nan)
    with pytest.raises(DataError, match="training set of generated holds NaN or infinite pixel values; clean"):
        datasets.load_datasets(tiny_config().data)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_dict(2)))
    monkeypatch.chdir(tmp_path)
    assert "NaN or infinite" in cli_error(capsys, _run(), DataError)


# --------------------------------------------------------------------------------------- random arguments --
HUGE = 2**40
INTS = st.sampled_from([-7, -1, 0, 1, 2, 3, 4, 8, 16, HUGE])
SMALL_INTS = st.sampled_from([-7, -1, 0, 1, 2, 3, 4])  # for sizes of models: a valid huge width is not an error


def weird(ints=INTS):
    return st.one_of(ints, st.floats(allow_nan=True, allow_infinity=True), st.none(), st.booleans(),
                     st.text(max_size=3), st.lists(ints, max_size=4), st.tuples(st.floats(), st.floats()),
                     st.just({"a": 1}), st.just(object()))


WEIRD = weird()
FUZZ = settings(max_examples=int(os.environ.get("DDCNN_FUZZ_EXAMPLES", 120)), deadline=None,
                suppress_health_check=list(HealthCheck))  # DDCNN_FUZZ_EXAMPLES=5000 for a longer search


def maybe(valid, wrong=WEIRD):
    """Mostly valid values (so that deeper checks are reached), sometimes anything at all."""
    return st.one_of(valid, valid, valid, wrong)


def small(valid):
    return maybe(valid, weird(SMALL_INTS))


def only_ddcnn_errors(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except DDCNNError:
        return None  # anything else (TypeError, RuntimeError, IndexError, ...) fails the test


@FUZZ
@given(st.data())
def test_random_decompositions_and_splits_raise_only_ddcnn_errors(data):
    size = data.draw(maybe(st.lists(st.sampled_from([1, 2, 3, 4, 8, 16]), min_size=2, max_size=3)
                           | st.lists(INTS, min_size=1, max_size=4)))
    dims = len(size) if isinstance(size, list) else 2
    grid = data.draw(maybe(st.lists(st.sampled_from([1, 2, 3, 4, 0, -1, HUGE]), min_size=dims, max_size=dims)))
    overlap = data.draw(maybe(st.sampled_from([0, 1, 2, 7, 15, 16, -1, HUGE])
                              | st.lists(st.integers(-1, 16), min_size=dims, max_size=dims)))
    whole = [g for g in grid if type(g) is int] if isinstance(grid, list | tuple) else []
    if len(whole) >= 2 and math.prod(abs(g) for g in whole) > 4096:
        return  # a valid request for millions of subdomains is not an error, just slow
    decomposition = only_ddcnn_errors(Decomposition, size, grid, overlap)
    if decomposition is None or math.prod(decomposition.image_size) > 4096:
        return
    shape = data.draw(st.lists(st.integers(0, 16), max_size=5) | st.just([2, 1, *decomposition.image_size]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.int64, torch.bool, torch.float16]))
    x = torch.zeros(shape, dtype=dtype) if math.prod(shape) <= 10**5 else torch.zeros(1)
    only_ddcnn_errors(decomposition.split, data.draw(st.one_of(st.just(x), WEIRD)))


@FUZZ
@given(st.data())
def test_random_ensembles_and_global_cnns_raise_only_ddcnn_errors(data):
    n = data.draw(small(st.integers(1, 4)))
    c = data.draw(small(st.integers(1, 3)))
    k = data.draw(small(st.integers(1, 4)))
    backbone = data.draw(maybe(st.sampled_from(["vgg", "resnet"])))
    width = data.draw(small(st.integers(1, 4)))
    depth = data.draw(small(st.none() | st.lists(st.integers(-1, 2), max_size=3)))
    dims = data.draw(maybe(st.sampled_from([2, 3])))
    backend = data.draw(maybe(st.sampled_from(["grouped", "loop", "vmap"])))
    seed = data.draw(maybe(st.none() | st.integers(0, 2**63)))
    indices = data.draw(maybe(st.none() | st.lists(st.integers(-1, 8), max_size=4)))
    ensemble = only_ddcnn_errors(LocalEnsemble, n, c, k, backbone, width, depth, dims, backend, seed, indices)
    only_ddcnn_errors(GlobalCNN, c, k, backbone, width, depth, dims)
    if ensemble is not None and data.draw(st.booleans()):
        x = torch.zeros(data.draw(st.lists(st.integers(1, 6), max_size=6)))
        only_ddcnn_errors(ensemble.eval(), x)  # eval: BatchNorm in training refuses one value per channel


@FUZZ
@given(st.data())
def test_random_combiners_and_cnn_dnns_raise_only_ddcnn_errors(data):
    name = data.draw(maybe(st.sampled_from(["dnn", "mean_probability", "majority_vote", "weighted_mean"])))
    n = data.draw(small(st.integers(1, 4)))
    k = data.draw(small(st.integers(1, 4)))
    hidden = data.draw(small(st.none() | st.lists(st.integers(-1, 8), max_size=2)))
    activation = data.draw(maybe(st.sampled_from(["relu", "gelu", "tanh", "silu"])))
    dropout = data.draw(maybe(st.floats(0, 0.9)))
    only_ddcnn_errors(build_combiner, name, n, k)
    only_ddcnn_errors(build_combiner, "dnn", n, k, hidden=hidden, activation=activation, dropout=dropout)
    only_ddcnn_errors(DNN, n, k, hidden, activation, dropout)
    decomposition = data.draw(maybe(st.sampled_from([Decomposition((8, 8), (2, 2)), Decomposition((8, 8), (1, 2)),
                                                     Decomposition((4, 4, 4), (2, 2, 2))])))
    ensemble = data.draw(maybe(st.just(_ENSEMBLE)))
    combiner = data.draw(maybe(st.sampled_from([MeanProbability(4, 3), DNN(4, 3, [4]), MeanProbability(2, 3)])))
    only_ddcnn_errors(CNNDNN, decomposition, ensemble, combiner)


_ENSEMBLE = LocalEnsemble(4, 1, 3, width=2, depth=[1, 1], seed=0)
CONFIG_KEYS = ["seed", "device", "precision", "eval_batch_size", "data.name", "data.image_size", "data.channels",
               "data.val_fraction", "data.window", "data.class_map", "decomposition.grid", "decomposition.overlap",
               "model.backbone", "model.width", "model.depth", "model.local_width", "combiner.hidden",
               "combiner.dropout", "stages.local.epochs", "stages.*.lr", "stages.global.schedule",
               "stages.combine.grad_clip", "stages.transfer.label_smoothing", "stages.coherent.enabled",
               "stages.local.patience", "stages.global.keep", "stages.*.min_delta", "evaluation.target_accuracy",
               "no.such.key", "stages.nothing.epochs"]


CONFIG_VALUES = st.one_of(INTS, st.floats(allow_nan=True, allow_infinity=True), st.none(), st.booleans(),
                          st.text(max_size=3), st.lists(INTS, max_size=4), st.just({"a": 1}),
                          st.sampled_from(["[2, 2]", "1e-3", "cuda:0", "[1, 2", "{a: 1}"]))


def _set_plain(data: dict, key: str, value) -> dict:
    """``data`` with ``value`` at the dotted ``key`` (``stages.*`` meaning every stage), as YAML would give it."""
    for path in ([["stages", s, *key.split(".")[2:]] for s in STAGES] if key.startswith("stages.*.")
                 else [key.split(".")]):
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part), dict | None) else {}
        node[path[-1]] = value
    return data


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(CONFIG_KEYS), CONFIG_VALUES), min_size=1, max_size=3))
def test_random_config_values_raise_only_config_errors(pairs):
    for key, value in pairs:
        only_ddcnn_errors(from_dict, _set_plain(tiny_dict(2), key, value))  # a YAML file's values
        only_ddcnn_errors(from_dict, tiny_dict(2), [f"{key}={value}"])  # the same typed after --set
    data = tiny_dict(2)
    for key, value in pairs:
        _set_plain(data, key, value)
    only_ddcnn_errors(from_dict, data)
