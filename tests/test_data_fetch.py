"""Finding and fetching datasets; the network is never used (the download function is replaced)."""

import importlib
from pathlib import Path

import pytest

from ddcnn.data.fetch import fetch, find_dataset
from ddcnn.errors import DataError, DataNotFoundError

# `ddcnn.data.fetch` as an attribute is the function (re-exported by the package); the module is here:
fetch_module = importlib.import_module("ddcnn.data.fetch")

IDX = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
       "t10k-labels-idx1-ubyte.gz"]
CIFAR = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No system folder, an empty home and working directory, and a download that fails as offline."""
    monkeypatch.setattr(fetch_module, "SYSTEM_ROOT", tmp_path / "system")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")

    def offline(name, target):
        raise OSError("network is unreachable")

    monkeypatch.setattr(fetch_module, "_download", offline)


def touch(folder: Path, names) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


def test_unknown_name():
    with pytest.raises(DataError, match="did you mean 'fashion-mnist'.*cifar10"):
        fetch("fashion_mnist")
    with pytest.raises(DataError):
        find_dataset("imagenet")


def test_finds_given_dir_and_its_raw_and_torchvision_layouts(tmp_path):
    assert find_dataset("mnist", tmp_path / "d") is None
    touch(tmp_path / "d" / "MNIST" / "raw", IDX)
    assert find_dataset("mnist", tmp_path / "d") == tmp_path / "d" / "MNIST" / "raw"
    touch(tmp_path / "e" / "raw", IDX)
    assert fetch("mnist", tmp_path / "e") == tmp_path / "e" / "raw"
    touch(tmp_path / "f", IDX[:3])                                 # one file short: not a dataset
    assert find_dataset("mnist", tmp_path / "f") is None


def test_finds_system_cache_and_cwd_places(tmp_path):
    touch(tmp_path / "work" / "data" / "fashion-mnist", IDX)
    assert find_dataset("fashion-mnist") == Path.cwd() / "data" / "fashion-mnist"
    touch(tmp_path / "home" / ".cache" / "ddcnn" / "fashion-mnist", IDX)
    assert find_dataset("fashion-mnist") == tmp_path / "home" / ".cache" / "ddcnn" / "fashion-mnist"
    touch(tmp_path / "system" / "fashion-mnist", IDX)
    assert find_dataset("fashion-mnist") == tmp_path / "system" / "fashion-mnist"
    touch(tmp_path / "mine", IDX)
    assert find_dataset("fashion-mnist", tmp_path / "mine") == tmp_path / "mine"   # an explicit dir wins


def test_finds_cifar10(tmp_path):
    touch(tmp_path / "c" / "cifar-10-batches-bin", CIFAR)
    assert fetch("cifar10", tmp_path / "c") == tmp_path / "c" / "cifar-10-batches-bin"
    assert find_dataset("cifar10", tmp_path / "c" / "cifar-10-batches-bin") == tmp_path / "c" / "cifar-10-batches-bin"


def test_offline_message_says_where_it_looked_and_what_to_do(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        fetch("fashion-mnist")
    message = str(info.value)
    assert str(tmp_path / "system" / "fashion-mnist") in message and "network is unreachable" in message
    assert "apt-get install dataset-fashion-mnist" in message and "t10k-labels-idx1-ubyte.gz" in message
    with pytest.raises(DataNotFoundError, match=r"cifar-10-binary\.tar\.gz.*" + str(tmp_path / "x")):
        fetch("cifar10", tmp_path / "x")


def test_download_path_used_when_nothing_is_local(tmp_path, monkeypatch):
    calls = []

    def fake_download(name, target):
        calls.append((name, target))
        touch(target / "FashionMNIST" / "raw", IDX)                # as torchvision lays the files out

    monkeypatch.setattr(fetch_module, "_download", fake_download)
    found = fetch("fashion-mnist")
    cache = tmp_path / "home" / ".cache" / "ddcnn" / "fashion-mnist"
    assert calls == [("fashion-mnist", cache)] and found == cache / "FashionMNIST" / "raw"
    assert fetch("fashion-mnist") == found and len(calls) == 1     # found locally the second time


def test_incomplete_download(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_module, "_download", lambda name, target: touch(target, IDX[:1]))
    with pytest.raises(DataNotFoundError, match="not complete"):
        fetch("mnist", tmp_path / "m")
