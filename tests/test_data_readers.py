"""Readers, on small files written here; expected values come from the bytes written, not from the readers."""

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddcnn.data.readers import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    load_cifar10,
    load_idx_dataset,
    load_image_folder,
    read_idx,
)
from ddcnn.data.volume_folder import load_volume_folder
from ddcnn.errors import ConfigError, DataError, DataNotFoundError

FASHION = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(code: int, dims, payload: bytes) -> bytes:
    return bytes([0, 0, code, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + payload


def write(path: Path, data: bytes, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------------------ IDX --
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_ubyte_round_trip(tmp_path, gz):
    payload = bytes(range(2 * 3 * 4))
    path = write(tmp_path / ("x.gz" if gz else "x"), idx_bytes(0x08, (2, 3, 4), payload), gz)
    arr = read_idx(path)
    assert arr.shape == (2, 3, 4) and arr.dtype == np.uint8
    assert arr[1, 2, 3] == 23 and arr[0, 1, 0] == 4
    assert arr.flags.writeable


def test_read_idx_big_endian_types(tmp_path):
    ints = write(tmp_path / "i", idx_bytes(0x0B, (3,), struct.pack(">hhh", -2, 300, 7)))
    assert read_idx(ints).tolist() == [-2, 300, 7]
    floats = write(tmp_path / "f", idx_bytes(0x0D, (2,), struct.pack(">ff", 1.5, -0.25)))
    assert read_idx(floats).tolist() == [1.5, -0.25]
    doubles = write(tmp_path / "d", idx_bytes(0x0E, (1, 1), struct.pack(">d", 3.0)))
    assert read_idx(doubles).tolist() == [[3.0]]


@pytest.mark.parametrize("data", [b"\x01\x00\x08\x01\x00\x00\x00\x01\x05",   # first byte not 0
                                  b"\x00\x00\x07\x01\x00\x00\x00\x01\x05",   # unknown dtype code
                                  b"\x00\x00", b""])
def test_read_idx_bad_magic(tmp_path, data):
    path = write(tmp_path / "bad-idx", data)
    with pytest.raises(DataError, match="bad-idx"):
        read_idx(path)


@pytest.mark.parametrize("extra", [-1, 1])
def test_read_idx_size_mismatch(tmp_path, extra):
    payload = bytes(2 * 2 * 2 + extra)
    path = write(tmp_path / "sized", idx_bytes(0x08, (2, 2, 2), payload))
    with pytest.raises(DataError, match="sized.*download it again"):
        read_idx(path)


def test_read_idx_truncated_gzip(tmp_path):
    good = gzip.compress(idx_bytes(0x08, (100,), bytes(range(100))))
    path = write(tmp_path / "cut.gz", good[: len(good) // 2])
    with pytest.raises(DataError, match=r"cut\.gz.*download it again"):
        read_idx(path)


def write_idx_split(folder: Path, prefix: str, images: np.ndarray, labels, gz=True, sep="-"):
    ext = ".gz" if gz else ""
    write(folder / f"{prefix}-images{sep}idx3-ubyte{ext}", idx_bytes(8, images.shape, images.tobytes()), gz)
    write(folder / f"{prefix}-labels{sep}idx1-ubyte{ext}", idx_bytes(8, (len(labels),), bytes(labels)), gz)


@pytest.mark.parametrize("sub,gz,sep", [("", True, "-"), ("raw", False, "-"), ("", False, ".")])
def test_load_idx_dataset_layouts(tmp_path, sub, gz, sep):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    write_idx_split(tmp_path / sub, "t10k", images, [9, 0, 4], gz, sep)
    ds = load_idx_dataset(tmp_path, "test", classes=FASHION_MNIST_CLASSES)
    assert ds.images.shape == (3, 1, 4, 5) and ds.images.dtype == torch.uint8
    assert ds.images[2, 0, 3, 4].item() == 59
    assert ds.labels.tolist() == [9, 0, 4] and ds.labels.dtype == torch.int64
    assert ds.classes[9] == "Ankle boot" and ds.num_classes == 10 and ds.image_size == (4, 5) and len(ds) == 3


def test_load_idx_dataset_count_mismatch(tmp_path):
    write_idx_split(tmp_path, "train", np.zeros((3, 2, 2), np.uint8), [1, 2])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz has 2 labels"):
        load_idx_dataset(tmp_path, "train")


def test_load_idx_dataset_label_out_of_range(tmp_path):
    write_idx_split(tmp_path, "train", np.zeros((2, 2, 2), np.uint8), [1, 10])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        load_idx_dataset(tmp_path, "train")
    assert load_idx_dataset(tmp_path, "train", num_classes=11).num_classes == 11


def test_load_idx_dataset_missing_and_bad_split(tmp_path):
    with pytest.raises(DataNotFoundError, match=str(tmp_path)):
        load_idx_dataset(tmp_path, "train")
    with pytest.raises(ConfigError, match="did you mean 'test'"):
        load_idx_dataset(tmp_path, "tset")


@pytest.mark.skipif(not FASHION.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    train = load_idx_dataset(FASHION, "train", classes=FASHION_MNIST_CLASSES)
    test = load_idx_dataset(FASHION, "test", classes=FASHION_MNIST_CLASSES)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    for ds in (train, test):
        assert ds.labels.min().item() == 0 and ds.labels.max().item() == 9


# ------------------------------------------------------------------------------------------------- CIFAR-10 --
def cifar_records(labels, start):
    """Records whose pixel bytes are (start + record * 7 + position) % 256, so every byte is predictable."""
    out = bytearray()
    for r, label in enumerate(labels):
        out.append(label)
        out += bytes((start + r * 7 + i) % 256 for i in range(3072))
    return bytes(out)


def write_cifar(folder: Path, meta: str | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        (folder / f"data_batch_{i}.bin").write_bytes(cifar_records([i, 0], start=i))
    (folder / "test_batch.bin").write_bytes(cifar_records([3, 9, 5], start=100))
    if meta is not None:
        (folder / "batches.meta.txt").write_text(meta)


def test_load_cifar10_values(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-bin")
    train = load_cifar10(tmp_path, "train")            # the parent folder
    assert train.images.shape == (10, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [1, 0, 2, 0, 3, 0, 4, 0, 5, 0]
    # Record 1 of data_batch_3 (row 5): green plane starts at byte 1024, pixel (2, 5) at 2*32+5 of a plane.
    assert train.images[5, 1, 2, 5].item() == (3 + 7 + 1024 + 69) % 256
    test = load_cifar10(tmp_path / "cifar-10-batches-bin", "test")   # the folder itself
    assert test.labels.tolist() == [3, 9, 5] and test.images[2, 2, 31, 31].item() == (100 + 14 + 3071) % 256
    assert test.classes == CIFAR10_CLASSES


def test_load_cifar10_meta_names(tmp_path):
    names = [f"c{i}" for i in range(10)]
    write_cifar(tmp_path, meta="\n".join(names) + "\n\n")
    assert load_cifar10(tmp_path, "test").classes == names


def test_load_cifar10_bad_size(tmp_path):
    write_cifar(tmp_path)
    with open(tmp_path / "data_batch_4.bin", "ab") as f:
        f.write(b"\x00" * 10)
    with pytest.raises(DataError, match="data_batch_4.bin has"):
        load_cifar10(tmp_path, "train")


def test_load_cifar10_python_version_refused(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"x")
    with pytest.raises(DataError, match="cifar-10-batches-py.*pickled.*binary version"):
        load_cifar10(tmp_path, "train")


def test_load_cifar10_missing(tmp_path):
    with pytest.raises(DataNotFoundError, match=str(tmp_path)):
        load_cifar10(tmp_path, "train")
    (tmp_path / "test_batch.bin").write_bytes(cifar_records([1], 0))
    with pytest.raises(DataNotFoundError, match="data_batch_1.bin is missing"):
        load_cifar10(tmp_path, "train")


# --------------------------------------------------------------------------------------------- image folder --
def test_load_image_folder_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    pixels = {}
    for cls, count in (("tulips", 2), ("daisy", 1)):
        (tmp_path / cls).mkdir()
        for k in range(count):
            arr = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
            Image.fromarray(arr, "RGB").save(tmp_path / cls / f"{k}.png")
            pixels[(cls, k)] = arr
    (tmp_path / "LICENSE.txt").write_text("CC-BY")
    (tmp_path / "daisy" / "notes.txt").write_text("not an image")
    ds = load_image_folder(tmp_path, size=(6, 5))
    assert ds.classes == ["daisy", "tulips"] and ds.labels.tolist() == [0, 1, 1]
    assert ds.images.shape == (3, 3, 6, 5) and ds.images.dtype == torch.uint8
    assert np.array_equal(ds.images[0].permute(1, 2, 0).numpy(), pixels[("daisy", 0)])
    assert np.array_equal(ds.images[2].permute(1, 2, 0).numpy(), pixels[("tulips", 1)])


def test_load_image_folder_center_crop_and_grey(tmp_path):
    arr = np.zeros((10, 30, 3), np.uint8)
    arr[:, :10, 0] = 255     # red left third
    arr[:, 10:20, 1] = 200   # green middle third
    arr[:, 20:, 2] = 255     # blue right third
    (tmp_path / "a").mkdir()
    Image.fromarray(arr, "RGB").save(tmp_path / "a" / "wide.bmp")
    ds = load_image_folder(tmp_path, size=(10, 10))
    assert (ds.images[0, 1] == 200).all() and (ds.images[0, 0] == 0).all() and (ds.images[0, 2] == 0).all()
    grey = load_image_folder(tmp_path, size=(10, 10), channels=1)
    assert grey.images.shape == (1, 1, 10, 10)
    # PIL's L = (299 R + 587 G + 114 B) / 1000 of the pure green middle.
    assert (grey.images.int() - round(200 * 0.587)).abs().max() <= 1
    assert load_image_folder(tmp_path, size=(5, 7), channels=1).images.shape == (1, 1, 5, 7)


def test_load_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_image_folder(tmp_path, size=(4, 4))
    (tmp_path / "empty" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        load_image_folder(tmp_path, size=(4, 4))
    with pytest.raises(ConfigError):
        load_image_folder(tmp_path, size=(4, 4), channels=2)
    with pytest.raises(DataNotFoundError):
        load_image_folder(tmp_path / "nowhere", size=(4, 4))


# -------------------------------------------------------------------------------------------- volume folder --
def test_load_volume_folder_npy(tmp_path):
    vols = {}
    for folder in ("CT-10", "CT-2", "CT-0"):
        (tmp_path / folder).mkdir()
        vol = np.linspace(-1200, 600, 2 * 3 * 4).reshape(2, 3, 4) + int(folder[3:])
        np.save(tmp_path / folder / "study_1.npy", vol)
        vols[folder] = vol
    ds = load_volume_folder(tmp_path, size=(2, 3, 4), window=(-1000.0, 400.0))
    assert ds.classes == ["CT-0", "CT-2", "CT-10"] and ds.labels.tolist() == [0, 1, 2]
    assert ds.images.shape == (3, 1, 2, 3, 4) and ds.images.dtype == torch.float32
    expected = (np.clip(vols["CT-10"], -1000, 400) + 1000) / 1400
    np.testing.assert_allclose(ds.images[2, 0].numpy(), expected, atol=1e-6)
    assert ds.images[2, 0, 0, 0, 0] == 0 and ds.images[2, 0, 1, 2, 3] == 1


def test_load_volume_folder_resample_and_class_map(tmp_path):
    for folder, value in (("CT-0", -1000.0), ("CT-1", -300.0), ("CT-3", 400.0)):
        (tmp_path / folder).mkdir()
        np.save(tmp_path / folder / "v.npy", np.full((5, 7, 9), value, np.float32))
    ds = load_volume_folder(tmp_path, size=(4, 4, 4), class_map={"CT-0": "normal", "CT-1": "ill", "CT-3": "ill"})
    assert ds.classes == ["normal", "ill"] and ds.labels.tolist() == [0, 1, 1]
    assert ds.images.shape == (3, 1, 4, 4, 4)
    np.testing.assert_allclose(ds.images[:, 0, 0, 0, 0].numpy(), [0.0, 0.5, 1.0], atol=1e-6)
    with pytest.raises(ConfigError, match="did you mean 'CT-3'"):
        load_volume_folder(tmp_path, size=(4, 4, 4), class_map={"CT-4": "ill"})


@pytest.mark.parametrize("bad,match", [(np.zeros((2, 2)), "2-D"), (np.array([{}], dtype=object), "plain numeric")])
def test_load_volume_folder_bad_npy(tmp_path, bad, match):
    (tmp_path / "c").mkdir()
    np.save(tmp_path / "c" / "bad.npy", bad, allow_pickle=True)
    with pytest.raises(DataError, match=f"bad.npy.*{match}"):
        load_volume_folder(tmp_path, size=(2, 2, 2))


def test_load_volume_folder_npz_named_npy(tmp_path):
    (tmp_path / "c").mkdir()
    with open(tmp_path / "c" / "zipped.npy", "wb") as f:
        np.savez(f, a=np.zeros((2, 2, 2)))
    with pytest.raises(DataError, match="zipped.npy is an .npz archive"):
        load_volume_folder(tmp_path, size=(2, 2, 2))


def test_load_volume_folder_nifti(tmp_path):
    nibabel = pytest.importorskip("nibabel")
    (tmp_path / "CT-1").mkdir()
    xyz = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5) * 10 - 1000  # (X, Y, Z)
    nibabel.save(nibabel.Nifti1Image(xyz, np.eye(4)), str(tmp_path / "CT-1" / "s.nii.gz"))
    ds = load_volume_folder(tmp_path, size=(5, 4, 3), window=(-1000.0, 400.0))
    expected = (xyz.transpose(2, 1, 0) + 1000) / 1400
    np.testing.assert_allclose(ds.images[0, 0].numpy(), expected, atol=1e-6)
    (tmp_path / "CT-1" / "t.nii").write_bytes(b"garbage")
    with pytest.raises(DataError, match="t.nii"):
        load_volume_folder(tmp_path, size=(5, 4, 3))


def test_load_volume_folder_without_nibabel(tmp_path, monkeypatch):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "s.nii.gz").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "nibabel", None)     # makes `import nibabel` fail
    with pytest.raises(DataError, match=r"s\.nii\.gz.*pip install nibabel"):
        load_volume_folder(tmp_path, size=(2, 2, 2))


def test_load_volume_folder_bad_window(tmp_path):
    with pytest.raises(ConfigError, match="window"):
        load_volume_folder(tmp_path, size=(2, 2, 2), window=(400, -1000))


def test_limit_train_samples_every_class_of_a_folder_dataset(tmp_path):
    """Folders load class by class: the first N images would be one or two classes only."""
    from ddcnn.config import DataConfig
    from ddcnn.data.datasets import load_datasets

    for c in range(5):
        (tmp_path / f"class{c}").mkdir()
        for i in range(20):
            np.save(tmp_path / f"class{c}" / f"{i}.npy", np.full((4, 4, 4), c, dtype=np.float32))
    cfg = DataConfig(name="volume-folder", root=str(tmp_path), image_size=[4, 4, 4], window=[0.0, 4.0],
                     test_fraction=0.25, limit_train=25, limit_test=10)
    train, test = load_datasets(cfg)
    assert torch.bincount(train.labels, minlength=5).tolist() == [5] * 5
    assert torch.bincount(test.labels, minlength=5).tolist() == [2] * 5
    assert torch.equal(train.images[:, 0, 0, 0, 0] * 4, train.labels.float())  # images stay with their labels


def test_prediction_inputs_of_other_integer_types_and_16_bit_photos_keep_the_pixel_scale(tmp_path):
    from ddcnn.data.loading import to_float
    from ddcnn.data.readers import read_image_file

    pixels = np.random.default_rng(0).integers(0, 256, (6, 7), dtype=np.uint8)
    np.save(tmp_path / "u8.npy", pixels)
    np.save(tmp_path / "i64.npy", pixels.astype(np.int64))
    np.save(tmp_path / "u16.npy", pixels.astype(np.uint16) * 257)
    Image.fromarray(pixels).save(tmp_path / "u8.png")
    Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / "u16.png")  # a 16-bit grey PNG
    want = to_float(read_image_file(tmp_path / "u8.npy"))
    for name in ("i64.npy", "u16.npy", "u8.png", "u16.png"):
        torch.testing.assert_close(to_float(read_image_file(tmp_path / name)).reshape(want.shape), want, msg=name)
    np.save(tmp_path / "wide.npy", pixels.astype(np.int64) + 100)
    with pytest.raises(DataError, match=f"holds integers from {int(pixels.min()) + 100} to {int(pixels.max()) + 100}"):
        read_image_file(tmp_path / "wide.npy")
