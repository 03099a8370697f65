"""Readers for the dataset file formats ddcnn knows, all returning an :class:`ImageDataset`.

* IDX (MNIST, Fashion-MNIST): :func:`read_idx`, :func:`load_idx_dataset`.
* CIFAR-10 binary version (``cifar-10-batches-bin``): :func:`load_cifar10`.
* A folder of photos, one sub-folder per class (TF-Flowers ``flower_photos``): :func:`load_image_folder`.
* A folder of 3D volumes, one sub-folder per class (MosMedData ``CT-0`` ...): :mod:`ddcnn.data.volume_folder`.

Nothing here unpickles: the pickled CIFAR "python version" is refused and ``.npy`` files are read with
``allow_pickle=False``. Every problem with a file is raised as :class:`~ddcnn.errors.DataError` (or
:class:`~ddcnn.errors.DataNotFoundError`) with the file's path in the message.

The folder listing and the class map are shared with :mod:`ddcnn.data.volume_folder`.
"""

from __future__ import annotations

import gzip
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddcnn.errors import ConfigError, DataError, DataNotFoundError, ShapeError, did_you_mean
from ddcnn.files import plain_name

MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_PIXEL_LIMIT = 89_478_485  # Pillow's default Image.MAX_IMAGE_PIXELS, when a program has set it to None
_ROWS = 256  # rows converted at a time from 16 to 8 bits


@dataclass
class ImageDataset:
    """Images and integer labels held in memory.

    ``images`` is (M, C, H, W) or (M, C, D, H, W): uint8 where the source is 8-bit photos (to save memory; see
    :func:`ddcnn.data.loading.to_float`), float32 for volumes and generated data. ``labels`` is (M,) int64 in
    ``[0, len(classes))``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    # Where each item came from (what a run's splits.json lists): ``origin`` (M,) int64, its index in the source
    # (the file or folder it was read from); ``names``: the source's item names (files of a folder) or None.
    origin: torch.Tensor | None = None
    names: list[str] | None = None

    def __post_init__(self):
        if self.images.dim() not in (4, 5):
            raise ShapeError(f"images must be (M, C, H, W) or (M, C, D, H, W), got shape {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ShapeError(f"labels must be ({self.images.shape[0]},) to match the images, "
                             f"got shape {tuple(self.labels.shape)}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, ...]:
        """The spatial size, (H, W) or (D, H, W)."""
        return tuple(self.images.shape[2:])

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    def __len__(self) -> int:
        return int(self.images.shape[0])


# ---------------------------------------------------------------------------------------------------- IDX ----
_IDX_DTYPES: dict[int, np.dtype] = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
                                    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic (whatever its name says)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError as e:
        raise DataNotFoundError(f"{path} does not exist; check the dataset directory.") from e
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path} is a truncated or corrupt gzip file ({e}); delete it and download it again.") from e
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e}); check the file and its permissions.") from e


def read_idx(path) -> np.ndarray:
    """Read an IDX file (raw or gzipped) into a native-endian array with the shape stored in the file.

    Header: two zero bytes, a dtype code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64, all big-endian), the number of dimensions, then one big-endian uint32 per dimension.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES or data[3] == 0:
        raise DataError(f"{path} is not an IDX file (bad magic number {data[:4].hex() or 'empty'}); "
                        "download the dataset's IDX files again.")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated inside its IDX header; download it again.")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(f"{path} has {len(data)} bytes but its IDX header {dims} needs {expected}; "
                        "the file is truncated or corrupt, download it again.")
    # astype copies into a writable, native-endian array (torch.from_numpy wants writable memory).
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        hint = did_you_mean(str(split), ["train", "test"])
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}{hint}.")
    return split


def _find_idx_file(root: Path, prefix: str, kind: str, ndim: int) -> Path | None:
    """``<prefix>-<kind>-idx<ndim>-ubyte`` (or ``.idx`` dotted, optionally ``.gz``) in ``root`` or ``root/raw``."""
    for folder in (root, root / "raw"):
        for sep in ("-", "."):
            for ext in ("", ".gz"):
                path = folder / f"{prefix}-{kind}{sep}idx{ndim}-ubyte{ext}"
                if path.is_file():
                    return path
    return None


def find_idx_files(root, split: str) -> tuple[Path, Path] | None:
    """(images, labels) paths of an IDX split under ``root`` (or ``root/raw``), or None if either is missing."""
    prefix = "train" if _check_split(split) == "train" else "t10k"
    images = _find_idx_file(Path(root), prefix, "images", 3)
    labels = _find_idx_file(Path(root), prefix, "labels", 1)
    return (images, labels) if images and labels else None


def load_idx_dataset(root, split: str = "train", classes: list[str] | None = None,
                     num_classes: int | None = None) -> ImageDataset:
    """Load an MNIST-style split: images (M, 1, H, W) uint8, labels (M,) int64.

    ``root`` holds ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]`` and the ``t10k-`` pair (the
    ``train-images.idx3-ubyte`` spelling and a ``raw/`` sub-folder, as torchvision lays out, also work).
    ``classes`` names the classes (default ``MNIST_CLASSES``-style digits, ``num_classes`` of them, 10 by default).
    """
    root = Path(root)
    prefix = "train" if _check_split(split) == "train" else "t10k"
    found = find_idx_files(root, split)
    if found is None:
        raise DataNotFoundError(f"no {prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz] pair in "
                                f"{root} (or {root / 'raw'}); run `ddcnn data fetch` or copy the IDX files there.")
    images_path, labels_path = found
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_path} holds a {images.ndim}-D {images.dtype} array; an image file must be "
                        "3-D (count, height, width) uint8, check that the right file is there.")
    if labels.ndim != 1:
        raise DataError(f"{labels_path} holds a {labels.ndim}-D array; a label file must be 1-D, "
                        "check that the right file is there.")
    if len(labels) != len(images):
        raise DataError(f"{labels_path} has {len(labels)} labels but {images_path} has {len(images)} images; "
                        "the two files come from different downloads, fetch both again.")
    if classes is None:
        classes = [str(i) for i in range(num_classes or 10)]
    elif num_classes is not None and num_classes != len(classes):
        raise ConfigError(f"num_classes={num_classes} but {len(classes)} class names were given; give one of them.")
    labels = labels.astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(f"{labels_path} has labels in [{labels.min()}, {labels.max()}] but only {len(classes)} "
                        "classes are expected; check the file or pass num_classes.")
    return ImageDataset(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels), list(classes))


# ------------------------------------------------------------------------------------------------ CIFAR-10 ----
_CIFAR_RECORD = 1 + 3 * 32 * 32


def _cifar_folder(root: Path) -> Path:
    for folder in (root, root / "cifar-10-batches-bin"):
        if (folder / "test_batch.bin").is_file() or (folder / "data_batch_1.bin").is_file():
            return folder
    for folder in (root, root / "cifar-10-batches-py"):
        if (folder / "data_batch_1").is_file() or (folder / "test_batch").is_file():
            raise DataError(f"{folder} holds the pickled CIFAR-10 'python version', which ddcnn does not read "
                            "(unpickling runs code); download the binary version cifar-10-binary.tar.gz instead.")
    raise DataNotFoundError(f"no CIFAR-10 binary batches (data_batch_1.bin ... test_batch.bin) in {root} or "
                            f"{root / 'cifar-10-batches-bin'}; run `ddcnn data fetch cifar10`.")


def load_cifar10(root, split: str = "train") -> ImageDataset:
    """Load CIFAR-10 from its binary version: images (M, 3, 32, 32) uint8, labels (M,) int64.

    ``root`` is ``cifar-10-batches-bin`` or its parent. Each record is 1 label byte then 3072 pixel bytes (R, G
    then B planes of 32x32, i.e. CHW). Class names come from ``batches.meta.txt`` when it is there.
    """
    folder = _cifar_folder(Path(root))
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if _check_split(split) == "train" else ["test_batch.bin"]
    records = []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise DataNotFoundError(f"{path} is missing; download cifar-10-binary.tar.gz again and extract it.")
        size = path.stat().st_size
        if size == 0 or size % _CIFAR_RECORD:
            raise DataError(f"{path} has {size} bytes, not a whole number of {_CIFAR_RECORD}-byte records; "
                            "the file is truncated or corrupt, download it again.")
        records.append(np.fromfile(path, dtype=np.uint8).reshape(-1, _CIFAR_RECORD))
    data = np.concatenate(records)
    classes = CIFAR10_CLASSES
    meta = folder / "batches.meta.txt"
    if meta.is_file():
        classes = [line.strip() for line in meta.read_text(errors="replace").splitlines() if line.strip()]
        for name in classes:
            check_class_name(name, str(meta))
        if len(classes) != 10:
            raise DataError(f"{meta} names {len(classes)} classes instead of 10; restore the file or delete it.")
    labels = data[:, 0].astype(np.int64)
    if labels.max() >= len(classes):
        bad = next(folder / n for n, r in zip(names, records) if r[:, 0].max() >= len(classes))
        raise DataError(f"{bad} has a label {labels.max()} outside 0..9; the file is corrupt, download it again.")
    images = np.ascontiguousarray(data[:, 1:]).reshape(-1, 3, 32, 32)
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), classes)


# ------------------------------------------------------------------------------------------ class folders ----
def check_class_name(name: str, where: str) -> None:
    """A class name holding a control character (a newline, a terminal escape) is refused where the data is read:
    it would reach terminals, CSV and JSON consumers of the predictions (:func:`ddcnn.files.plain_name`)."""
    if not plain_name(name):
        raise DataError(f"{where} names the class {name!r}, which holds control characters (newlines, terminal "
                        f"escapes); rename it to plain text")


def natural_key(name: str):
    """Sort key that orders embedded numbers by value, so ``CT-2`` comes before ``CT-10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _has_ext(path: Path, extensions) -> bool:
    return path.name.lower().endswith(extensions)


def _class_files(root, extensions, what: str, class_map: dict[str, str] | None = None, items_of=None):
    """(classes, [(file, label), ...]) for a folder with one sub-folder per class.

    Files beside the class folders (``LICENSE.txt``) and hidden entries are ignored; inside a class folder only
    files with one of ``extensions`` count. Sub-folders and files are sorted naturally, so the result is
    deterministic. ``class_map`` maps folder names to class names (several folders may share one class, folders
    it does not name are skipped); classes then come in the order they first appear. ``items_of(folder)``, when
    given, lists a class folder's items instead (volumes in patient sub-folders, DICOM series folders).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataNotFoundError(f"{root} is not a directory; give the folder that holds one sub-folder per class.")
    folders = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: natural_key(p.name))
    if not folders:
        raise DataError(f"{root} has no class sub-folders; put the {what} of each class in its own sub-folder.")
    if class_map is not None:
        names = [p.name for p in folders]
        for key in class_map:
            if key not in names:
                raise ConfigError(f"class_map names folder {key!r}, which is not in {root}{did_you_mean(key, names)}.")
        folders = [p for p in folders if p.name in class_map]
    classes: list[str] = []
    items: list[tuple[Path, int]] = []
    for folder in folders:
        name = class_map[folder.name] if class_map is not None else folder.name
        check_class_name(name, f"the class folder {str(folder)!r}" if class_map is None else "class_map")
        if name not in classes:
            classes.append(name)
        files = items_of(folder) if items_of is not None else sorted(
            (p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and _has_ext(p, extensions)),
            key=lambda p: natural_key(p.name))
        if not files:
            raise DataError(f"class folder {folder} has no {what} ({', '.join(extensions)}); "
                            "add some or remove the folder.")
        items += [(f, classes.index(name)) for f in files]
    return classes, items


def _check_size(size, n: int, what: str) -> tuple[int, ...]:
    try:
        size = tuple(int(s) for s in size)
    except (TypeError, ValueError):
        size = ()
    if len(size) != n or min(size) < 1:
        raise ConfigError(f"{what} must be {n} positive integers, got {size!r}.")
    return size


def _check_pixels(im, path: Path) -> None:
    """Refuse a picture of more pixels than Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, about
    89 million; Pillow itself only warns up to twice that): a few hundred kilobytes of PNG can claim gigabytes."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS or _PIXEL_LIMIT
    if im.width * im.height > limit:
        raise DataError(f"{path} is {im.width}x{im.height} pixels, more than the {limit:,} accepted (Pillow's "
                        f"decompression-bomb limit); give a smaller image")


def _to_8_bits(wide: np.ndarray, sixteen: bool) -> np.ndarray:
    """16-bit (or 32-bit integer) grey values ``(H, W)`` to uint8: divided by 257 when 16-bit or above 255, rounded
    and clipped; a band of rows at a time in float32, so that no float64 copy of the whole picture is made."""
    scale = sixteen or wide.max(initial=0) > 255
    out = np.empty(wide.shape, dtype=np.uint8)
    for start in range(0, wide.shape[0], _ROWS):
        band = wide[start:start + _ROWS].astype(np.float32)
        if scale:
            band /= 257.0
        out[start:start + _ROWS] = np.clip(np.rint(band), 0, 255)
    return out


def _read_picture(path: Path, size: tuple[int, int] | None, channels: int | None, fix: str,
                  notes: list[str] | None = None) -> torch.Tensor:
    """One photo as ``(C, H, W)`` uint8: converted to grey (1) or RGB (3) when ``channels`` is given (else grey and
    RGB stay as stored), its shorter side scaled to ``size`` = (H, W) and centre-cropped (``ImageOps.fit``, bilinear)
    when ``size`` is given. ``fix`` ends the error message for an unreadable file; ``notes``, when given, receives
    one line for a colour image made grey (or the reverse) and one for a picture of another size fitted."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            _check_pixels(im, path)  # from the header, before the pixels are decoded
            colour = im.mode in ("RGB", "RGBA", "RGBX", "P", "CMYK", "YCbCr", "LAB", "HSV")
            if im.mode == "F" and not np.isfinite(np.asarray(im)).all():
                raise DataError(f"{path} contains NaN or infinite values; give a file with finite pixel values")
            if im.mode.startswith("I"):  # 16-bit (or 32-bit integer) grey: to 8 bits, not clipped at 255
                im = Image.fromarray(_to_8_bits(np.asarray(im), im.mode.startswith("I;16")), "L")
            if channels is not None:
                if notes is not None and colour != (channels == 3):
                    notes.append(f"{path}: {'a colour' if colour else 'a grey'} image converted to "
                                 f"{'RGB' if channels == 3 else 'grey'} ({channels} channel(s), as the models take)")
                im = im.convert("RGB" if channels == 3 else "L")
            elif im.mode not in ("L", "RGB"):
                im = im.convert("RGB" if im.mode in ("RGBA", "P", "CMYK", "YCbCr") else "L")
            if size is not None:
                if notes is not None and (im.height, im.width) != tuple(size):
                    notes.append(f"{path}: {im.height}x{im.width} pixels fitted to {size[0]}x{size[1]} (the shorter "
                                 f"side scaled, the rest cropped about the centre, as image-folder data is)")
                im = ImageOps.fit(im, (size[1], size[0]), method=Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except Exception as e:  # PIL raises many kinds (OSError, SyntaxError, ValueError...) for a bad file
        raise DataError(f"{path} cannot be read as an image ({e}); {fix}.") from e
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def load_image_folder(root, size=(224, 224), channels: int = 3) -> ImageDataset:
    """Load photos from ``root/<class>/<image>``: images (M, channels, H, W) uint8, labels (M,) int64.

    Each image is converted to RGB (``channels=3``) or grey (``channels=1``), its shorter side is scaled to fit
    ``size`` = (H, W) and the rest is cropped about the centre (PIL ``ImageOps.fit``, bilinear), so objects keep
    their aspect ratio. The whole folder is returned: split it with :func:`ddcnn.data.loading.split_dataset`.
    """
    h, w = _check_size(size, 2, "size")
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}.")
    classes, items = _class_files(root, IMAGE_EXTENSIONS, "images")
    images = torch.empty((len(items), channels, h, w), dtype=torch.uint8)
    for i, (path, _) in enumerate(items):
        images[i] = _read_picture(path, (h, w), channels, fix="delete or replace the file")
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    return ImageDataset(images, labels, classes, names=_names(root, items))


def _names(root, items) -> list[str]:
    """The files of ``items``, relative to ``root``, with forward slashes."""
    return [path.relative_to(Path(root)).as_posix() for path, _ in items]


# ----------------------------------------------------------------------------------------- single files ----
def _input_file(path, what: str, pattern: str) -> Path:
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; give the files in it instead, e.g. {path / pattern}")
    if not path.is_file():
        raise DataNotFoundError(f"{path} does not exist; give the path of {what}.")
    return path


def read_image_file(path, size=None, channels: int | None = None, notes: list[str] | None = None) -> torch.Tensor:
    """One image file as ``(C, H, W)`` for ``ddcnn predict``: uint8 pixels (photos; 16-bit ones brought to 8
    bits), or float32 from a ``.npy`` array (integers 0..255 become uint8 pixels, uint16 ones are scaled to [0, 1],
    floats are taken as they are).

    With ``channels`` the image is converted to grey (1) or RGB (3); with ``size`` it is fitted as
    :func:`load_image_folder` does; ``notes`` receives a line for each such change (not for ``.npy`` arrays,
    which are taken as they are). Without them it is returned as stored: grey images have one channel.
    """
    path = _input_file(path, "an image file", "*.png")
    if path.name.lower().endswith(".npy"):
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:  # ValueError for pickled/object arrays, OSError/EOFError for bad files
            raise DataError(f"{path} cannot be read as a .npy array ({e}).") from e
        if not isinstance(arr, np.ndarray) or arr.ndim not in (2, 3) or not np.issubdtype(arr.dtype, np.number):
            raise DataError(f"{path} must hold a numeric (H, W) or (C, H, W) array.")
        if np.iscomplexobj(arr):
            raise DataError(f"{path} holds complex numbers ({arr.dtype}); give real pixel values (e.g. the "
                            f"magnitude, numpy.abs).")
        if 0 in arr.shape:
            raise DataError(f"{path} holds an empty array of shape {arr.shape} (an axis of length 0); give an image.")
        if arr.dtype == np.uint16:  # 16-bit pixels: to [0, 1], the scale 8-bit pixels get
            return torch.from_numpy(arr.astype(np.float32) / 65535.0)
        if np.issubdtype(arr.dtype, np.integer):  # 8-bit pixels, whatever the integer type: to_float scales by 1/255
            low, high = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
            if low < 0 or high > 255:
                raise DataError(f"{path} holds integers from {low} to {high}; give 8-bit pixels (0 to 255), uint16 "
                                f"pixels, or floats in the scale of the run's training images ([0, 1] for photos)")
            return torch.from_numpy(arr.astype(np.uint8))
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))  # floats: taken as they are
    if size is not None:
        size = _check_size(size, 2, "size")
    return _read_picture(path, size, channels, fix="give a PNG, JPEG or similar file", notes=notes)
