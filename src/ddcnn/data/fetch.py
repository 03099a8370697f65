"""``ddcnn data fetch NAME``: find a public dataset on this machine, or download it.

:func:`find_dataset` only looks; :func:`fetch` looks, then downloads into ``dir`` (or ``~/.cache/ddcnn/<name>``).
Places looked at, in order: ``dir`` (the user's explicit choice wins), the Debian package's folder
``/usr/share/datasets/<name>`` (package ``dataset-fashion-mnist``), ``~/.cache/ddcnn/<name>`` and
``./data/<name>``. In each place the files may lie directly, in ``raw/``, or as torchvision downloads them
(``FashionMNIST/raw/``, ``MNIST/raw/``); CIFAR-10 in ``cifar-10-batches-bin/`` or directly.

The returned folder is the one holding the files, ready for :func:`~ddcnn.data.readers.load_idx_dataset` or
:func:`~ddcnn.data.readers.load_cifar10`.
"""

from __future__ import annotations

from pathlib import Path

from ddcnn.data.readers import find_idx_files
from ddcnn.errors import DataError, DataNotFoundError, did_you_mean

DATASETS = ("fashion-mnist", "mnist", "cifar10")
SYSTEM_ROOT = Path("/usr/share/datasets")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
_TORCHVISION_FOLDER = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}
_IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}{did_you_mean(str(name), DATASETS)}; "
                        f"ddcnn can fetch {', '.join(DATASETS)}.")
    return name


def cache_root() -> Path:
    """``~/.cache/ddcnn``: where datasets are downloaded when no folder is given."""
    return Path.home() / ".cache" / "ddcnn"


def _places(name: str, dir=None) -> list[Path]:
    places = [Path(dir).expanduser()] if dir is not None else []
    if name in _TORCHVISION_FOLDER:
        places.append(SYSTEM_ROOT / name)
    places += [cache_root() / name, Path.cwd() / "data" / name]
    return places


def _holds(name: str, place: Path) -> Path | None:
    """The folder under ``place`` that holds dataset ``name`` completely, or None."""
    if name == "cifar10":
        for folder in (place, place / "cifar-10-batches-bin"):
            if all((folder / f).is_file() for f in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]):
                return folder
        return None
    for folder in (place, place / _TORCHVISION_FOLDER[name]):
        train, test = find_idx_files(folder, "train"), find_idx_files(folder, "test")
        if train and test:
            return train[0].parent
    return None


def find_dataset(name: str, dir=None, only_dir: bool = False) -> Path | None:
    """The local folder holding dataset ``name`` (see the module doc for where it looks), or None; never downloads.

    With ``only_dir`` only ``dir`` is searched: a folder the user named is never swapped for another copy.
    """
    _check_name(name)
    places = [Path(dir).expanduser()] if only_dir and dir is not None else _places(name, dir)
    for place in places:
        found = _holds(name, place)
        if found is not None:
            return found
    return None


def _download(name: str, target: Path) -> None:
    """Download ``name`` into ``target`` (network; tests replace this function)."""
    import torchvision

    if name == "cifar10":
        # torchvision's CIFAR10 class fetches the pickled python version; ddcnn reads only the binary one.
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(CIFAR10_URL, download_root=str(target), md5=CIFAR10_MD5, remove_finished=True)
        return
    cls = torchvision.datasets.FashionMNIST if name == "fashion-mnist" else torchvision.datasets.MNIST
    for train in (True, False):
        cls(root=str(target), train=train, download=True)


def _how_to_get(name: str, target: Path) -> str:
    if name == "cifar10":
        return (f"download {CIFAR10_URL} on a machine that is online and extract it into {target} "
                "(it makes cifar-10-batches-bin/)")
    how = f"copy the four IDX files ({', '.join(_IDX_FILES)}) into {target}"
    if name == "fashion-mnist":
        how = f"install them with `apt-get install dataset-fashion-mnist`, or {how}"
    return how


def fetch(name: str, dir=None) -> Path:
    """The folder holding dataset ``name``: found locally, or else downloaded into ``dir`` or the cache."""
    found = find_dataset(name, dir)
    if found is not None:
        return found
    target = Path(dir).expanduser() if dir is not None else cache_root() / name
    looked = ", ".join(str(p) for p in _places(name, dir))
    try:
        target.mkdir(parents=True, exist_ok=True)
        _download(name, target)
    except Exception as e:  # offline (URLError), refused, checksum mismatch, disk full... all end the same way
        raise DataNotFoundError(f"{name} is not in {looked} and downloading it failed ({type(e).__name__}: {e}); "
                                f"{_how_to_get(name, target)}.") from e
    found = _holds(name, target)
    if found is None:
        raise DataNotFoundError(f"{name} was downloaded into {target} but its files are not complete there; "
                                f"delete {target} and fetch again, or {_how_to_get(name, target)}.")
    return found
