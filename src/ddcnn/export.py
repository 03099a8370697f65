"""``ddcnn export``: a run's strategy as one deployable file, ``torch.export`` (.pt2) or ONNX, checked against the run.

The exported model is :class:`ddcnn.models.deployed.Deployed`: float images ``(B, C, *image_size)`` in [0, 1], as
the dataset readers give them, to ``(B, K)`` class probabilities (vote shares for majority vote); the normaliser
and the decomposition are inside, the batch size is dynamic. Beside ``FILE`` goes ``FILE.json``: the classes, the
input's size and channels, the preprocessing recipe from a file on disk (:mod:`ddcnn.data.recipe`, with its
schema version), the strategy, the layout, the run's test accuracy and the versions.

The file is written to a temporary name, loaded back and run on the run's test images: with
``torch.export.load`` (.pt2) or ONNX Runtime (.onnx). Only when its probabilities match the run's own model (eval
mode, float32) within :data:`TOLERANCE` and every prediction agrees does it take its place; otherwise nothing is
left behind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import re
import shutil
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import ddcnn
from ddcnn.checks import choice
from ddcnn.data.loading import to_float
from ddcnn.data.recipe import SCHEMA, input_recipe
from ddcnn.data.volumes import VolumeRecipe, volume_recipe
from ddcnn.errors import CheckpointError, ConfigError, DataError, ExportError
from ddcnn.files import (
    CLASS_NAMES,
    MEMBER_LIMIT,
    Check,
    Opt,
    atomic_write,
    atomic_write_text,
    read_json,
    read_member,
    refuse_linked_folders,
)
from ddcnn.finished.predictions import VOTE_SHARES, Predictions, output, prediction_rows, read_inputs
from ddcnn.finished.run import SavedRun
from ddcnn.models import BACKBONES
from ddcnn.models.deployed import LAYOUTS, Deployed, scores_to_probabilities
from ddcnn.strategies import STRATEGIES
from ddcnn.train.store.schema import DATA_FACTS

FORMATS = ("pt2", "onnx")
TOLERANCE = 1e-4  # largest absolute difference of a probability between the exported file and the run
CHECK_IMAGES = 256  # test images the exported file is checked on
ONNX_EXTRA = "pip install 'ddcnn[export]' (onnx, onnxscript, onnxruntime)"

_POSITIVE = Check(int, lambda v: v > 0, "a positive whole number")
META = {"format": Check(str, lambda v: v in FORMATS, "pt2 or onnx"), "strategy": str, "layout": Opt(str),
        "classes": CLASS_NAMES, "image_size": Check([_POSITIVE], lambda v: len(v) in (2, 3), "2 or 3 sizes"),
        "in_channels": _POSITIVE, "output": str, "dataset": str, "window?": Opt([float]), "volumes?": Opt(Any),
        "schema?": Check(int, lambda v: 1 <= v <= SCHEMA, f"a sidecar schema this ddcnn reads (1 to {SCHEMA}); "
                                                          f"a newer one needs a newer ddcnn")}


@dataclass
class Exported:
    """What ``ddcnn export`` wrote and how the written file compared with the run."""

    path: Path
    meta_path: Path
    strategy: str
    layout: str | None
    checked: int
    max_abs_diff: float
    agree: int
    checked_on: str = "the run's first test images"


def meta_path(path: Path) -> Path:
    """The JSON beside an exported file: ``model.pt2`` -> ``model.pt2.json``."""
    return path.with_name(path.name + ".json")


def _require_onnx() -> None:
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"--format onnx needs {', '.join(missing)} (not installed here); {ONNX_EXTRA}")


def _out_path(out: Path | None, run_dir: Path, strategy: str, fmt: str) -> Path:
    path = out if out is not None else run_dir / "export" / f"{strategy}.{fmt}"
    if out is None:  # the run's own export/ folder: a link there (a received run's) is refused, not written through
        refuse_linked_folders(run_dir, ["export"])
    if path.suffix != f".{fmt}":
        raise ConfigError(f"--out {str(path)!r} must end in .{fmt} for --format {fmt}, e.g. {path.stem}.{fmt}")
    for target in (path, meta_path(path)):
        if target.is_dir():
            raise ConfigError(f"--out {str(path)!r}: {str(target)!r} is a folder; give a file name")
    return path


def export_run(run_dir: Path, strategy: str | None = None, fmt: str = "pt2", out: Path | None = None,
               layout: str | None = None, trust_code: bool = False, images: torch.Tensor | None = None,
               data_root: str | None = None) -> Exported:
    """Export ``strategy`` of the run in ``run_dir`` (default its best) to ``out`` (default
    ``RUN/export/STRATEGY.FMT``) with the local CNNs in ``layout`` (default ``grouped`` for the built-in backbones,
    ``separate`` for foreign ones), checked against the run before it is kept. Every argument is checked before
    anything is written. ``images``: float images ``(M, C, *image_size)`` to check the file on (default: the run's
    first test images; for a run on data given from Python, which no reader can read back, random images with the
    training data's per-channel mean and std)."""
    choice("--format", fmt, FORMATS)
    if layout is not None:
        choice("--layout", layout, LAYOUTS)
    if fmt == "onnx":
        _require_onnx()
    run = SavedRun(run_dir, "cpu", trust_code=trust_code, data_root=data_root)
    name, predictor = run.strategy(strategy)
    path = _out_path(out, Path(run_dir), name, fmt)
    if STRATEGIES[name].whole_image:
        layout = None  # one whole-image CNN: no local CNNs to lay out
    elif layout is None:
        layout = "grouped" if run.cfg.model.backbone in BACKBONES else "separate"
    model = run.model(name, layout)
    shares = model.shares
    images, checked_on = _check_images(run, images)
    with torch.no_grad():  # the run's own model: its predictor, float32, eval mode
        scores, _ = predictor(run.normalizer(images))
        reference = scores_to_probabilities(scores.float(), shares)
    data = serialise(model, fmt, torch.rand(2, *images.shape[1:]))  # 2, not 1: a batch of 1 fixes the size
    test = ((run.best or {}).get("strategies") or {}).get(name, {}).get("test_accuracy")
    meta = {"format": fmt, "strategy": name, "layout": layout, "classes": run.classes,
            "image_size": list(run.shapes.image_size), "in_channels": run.shapes.in_channels,
            "input": "float32 images (B, C, *image_size) with values in [0, 1]" if run.cfg.data.name != "python" else
            "float32 images (B, C, *image_size) as the Dataset gave them (uint8 ones divided by 255)",
            "output": output(name), "test_accuracy": test, "dataset": run.cfg.data.name,
            "volumes": recipe.to_json() if (recipe := volume_recipe(run.cfg.data)) is not None else None,
            "ddcnn_version": ddcnn.__version__, "torch_version": torch.__version__}
    window = [float(v) for v in run.cfg.data.window] \
        if run.cfg.data.name == "volume-folder" and run.cfg.data.window is not None else None
    # the recipe from a file on disk; for data given from Python, what its user declared of their own preprocessing
    meta.update(schema=SCHEMA, preprocessing=_preprocessing(run).get("preprocessing") or input_recipe(
        run.cfg.data.name, meta["image_size"], meta["in_channels"], window))
    if window is not None:  # only volumes are windowed
        meta["window"] = window
    if shares:
        meta["output_meaning"] = VOTE_SHARES
    outcome: dict = {}

    def check(tmp: Path) -> None:
        got = ExportedModel(tmp, meta, trust_code=True)(images)  # a file this process has just made
        diff = float((got - reference).abs().max()) if len(images) else 0.0
        agree = int((got.argmax(-1) == reference.argmax(-1)).sum())
        outcome.update(max_abs_diff=diff, agree=agree)
        if not diff <= TOLERANCE or agree != len(images):
            raise ExportError(f"the exported {name} model disagrees with the run on {len(images)} test images "
                              f"(largest absolute difference {diff:.3g}, tolerance {TOLERANCE:g}; {agree} of "
                              f"{len(images)} predictions agree); nothing was written. Try the other --layout, "
                              f"or rerun with --debug and report it")

    created = next((p for p in reversed([path.parent, *path.parent.parents]) if not p.exists()), None)
    try:
        atomic_write(path, data, check, under=run_dir if out is None else None)
    except BaseException:  # a disagreeing file, one that does not load back, an interrupt
        if created is not None:  # the folders this export made for the file go with it
            shutil.rmtree(created, ignore_errors=True)
        raise
    meta["check"] = {"images": len(images), "on": checked_on, **outcome}
    atomic_write_text(meta_path(path), json.dumps(meta, indent=2), under=run_dir if out is None else None)
    return Exported(path, meta_path(path), name, layout, len(images), outcome["max_abs_diff"], outcome["agree"],
                    checked_on)


def _check_images(run: SavedRun, given: torch.Tensor | None) -> tuple[torch.Tensor, str]:
    """At most :data:`CHECK_IMAGES` float images to check the exported file on, and what they are."""
    shape = (run.shapes.in_channels, *run.shapes.image_size)
    if given is not None:
        if given.dim() != len(shape) + 1 or tuple(given.shape[1:]) != shape:
            raise DataError(f"images to check the export on must be (M, {', '.join(map(str, shape))}), got "
                            f"{list(given.shape)}")
        return to_float(given[:CHECK_IMAGES]).float().contiguous(), "the images given"
    if run.cfg.data.name != "python":
        _, _, test = run.datasets()
        return to_float(test.images[:CHECK_IMAGES]).float().contiguous(), "the run's first test images"
    g = torch.Generator().manual_seed(0)
    view = (1, -1) + (1,) * len(run.shapes.image_size)
    mean, std = (torch.tensor(v).view(view) for v in (run.normalizer.mean, run.normalizer.std))
    return (torch.randn((CHECK_IMAGES, *shape), generator=g) * std + mean).contiguous(), \
        "random images with the training data's per-channel mean and std (the run's data came from Python)"


def _preprocessing(run: SavedRun) -> dict:
    """For a run on data given from Python: that preprocessing is the user's own, and what they declared of it."""
    if run.cfg.data.name != "python":
        return {}
    facts = run.run_dir.read_json("data.json", DATA_FACTS).get("python") or {}
    return {"preprocessing": {"by": "the user's own: the images came from a Python Dataset, prepared by its code",
                              "declared": facts.get("preprocessing"),
                              "training_transform": facts.get("transform")}}


@contextlib.contextmanager
def _quiet():
    """The exporters and loaders print progress, warn about their own internals and log the tracebacks of errors
    that ddcnn reports itself as one line: none of it is the user's concern."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def serialise(model: Deployed, fmt: str, example: torch.Tensor) -> bytes:
    """``model`` as the bytes of a .pt2 or .onnx file with a dynamic batch size (``example``: two images)."""
    batch = torch.export.Dim("batch", min=1)
    with _quiet(), torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes={"images": {0: batch}})
        if fmt == "pt2":
            buffer = io.BytesIO()
            torch.export.save(program, buffer)
            return buffer.getvalue()
        onnx_program = torch.onnx.export(program, (example,), dynamo=True, input_names=["images"],
                                         output_names=["probabilities"], external_data=False)
        assert onnx_program is not None  # None only when the exporter is told to write a file itself
        return onnx_program.model_proto.SerializeToString()


# ------------------------------------------------------------------------------------------ running a file --
# Members at any depth: a second program under models/sub/ keeps its payload in sub-folders too.
_PT2_PAYLOAD_CONFIG = re.compile(r"(.*/)?data/(weights|constants)/(.*/)?[^/]*_config\.json")
_PT2_PICKLES = re.compile(r"(.*/)?data/(weights|constants)/(.*/)?[^/]*\.pt")  # the legacy layout: pickled dicts
_PT2_SAMPLE_INPUTS = re.compile(r"(.*/)?data/sample_inputs/(.*/)?[^/]*\.pt")
_PT2_NATIVE = re.compile(r"(.*/)?aotinductor/.*|.*\.(so|dll|dylib|cpp)")  # compiled code a loader would open
ARCHIVE_LIMIT = 4 * 2**30  # all members of a .pt2 together, as torch reads them (far above any ddcnn model)
ONNX_LIMIT = 2**31 - 1  # protobuf's own limit of one ONNX file without external data


def _untrusted_program(path: Path) -> ConfigError:
    return ConfigError(f"{str(path)!r} is a torch.export program (.pt2): loading it makes torch evaluate the "
                       f"expressions and run the code the archive carries, so it is not loaded from a file this "
                       f"command did not make; nothing of it was loaded. Use the ONNX file instead (`ddcnn export "
                       f"--format onnx`: ONNX Runtime interprets it without running Python), or pass --trust-code "
                       f"(trust_code=True in Python) if you trust whoever made {path.name}")


def _member_sizes(archive: zipfile.ZipFile) -> None:
    """Every member's size as its header claims it (torch allocates what the header says, and the streams are cut
    at it): a text member above :data:`MEMBER_LIMIT`, a compressed member above it (torch.export.save stores
    tensors uncompressed: a large compressed member is an inflation bomb) or more than :data:`ARCHIVE_LIMIT` in
    all is refused before anything is inflated."""
    total = 0
    for info in archive.infolist():
        total += info.file_size
        big = info.file_size > MEMBER_LIMIT
        if big and (info.compress_type != zipfile.ZIP_STORED or info.filename.endswith((".json", ".txt", ".py"))):
            raise ValueError(f"member {info.filename!r} inflates to {info.file_size:,} bytes, more than the "
                             f"{MEMBER_LIMIT:,} accepted")
        if total > ARCHIVE_LIMIT:
            raise ValueError(f"its members inflate to more than the {ARCHIVE_LIMIT:,} bytes accepted")


def check_pt2(path: Path) -> None:
    """A sanity check of a .pt2 archive before ``torch.export.load`` (not a security boundary: a .pt2 is a program,
    loaded only when trusted): members of bounded size (:func:`_member_sizes`), no compiled code (AOTInductor
    libraries), and none that torch would fully unpickle -- pickled weights or constants, custom objects, or sample
    inputs that the restricted ``weights_only`` loader refuses (torch then retries without the restriction), at any
    depth of the archive. The files ``ddcnn export`` writes hold raw tensors only."""
    try:
        with zipfile.ZipFile(path) as archive:
            _member_sizes(archive)
            names = archive.namelist()
            configs = [n for n in names if _PT2_PAYLOAD_CONFIG.fullmatch(n)]
            entries = [e for n in configs for e in json.loads(read_member(archive, n)).get("config", {}).values()]
            pickled = [n for n in names if _PT2_PICKLES.fullmatch(n) or _PT2_NATIVE.fullmatch(n)] + [
                e for e in entries if not isinstance(e, dict) or e.get("use_pickle", True)
                or not str(e.get("path_name", "")).startswith(("weight_", "tensor_"))]
            for name in (n for n in names if _PT2_SAMPLE_INPUTS.fullmatch(n)):
                try:
                    torch.load(io.BytesIO(read_member(archive, name)), weights_only=True)
                except Exception:  # noqa: BLE001 - whatever the restricted loader refuses
                    pickled.append(name)
    except (zipfile.BadZipFile, OSError, ValueError, AttributeError, RecursionError) as err:
        raise CheckpointError(f"{str(path)!r} is not a .pt2 archive torch.export wrote ({err}); export it again "
                              f"with `ddcnn export`") from None
    if not configs or pickled:
        raise CheckpointError(f"{str(path)!r} holds pickled objects or compiled code (or is not an archive "
                              f"torch.export.save wrote); loading it could run code, so it is refused; export the run "
                              f"again with `ddcnn export`")


def _check_onnx(path: Path) -> None:
    """An ONNX file of bounded size whose tensors are all inside it: a tensor stored as external data would make
    ONNX Runtime read another file of any size (ddcnn exports with none)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    try:
        size = path.stat().st_size
        if size > ONNX_LIMIT:
            raise ValueError(f"{size:,} bytes, more than the {ONNX_LIMIT:,} one ONNX file can hold")
        model = onnx.load(str(path), load_external_data=False)
        external = [t.name for t in _get_all_tensors(model) if uses_external_data(t)]
    except Exception as err:  # noqa: BLE001 - protobuf and onnx raise many kinds for a damaged file
        why = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(f"{str(path)!r} is not an ONNX model ddcnn can run ({why}); export it again") from None
    if external:
        raise CheckpointError(f"{str(path)!r} keeps the tensor {external[0]!r} in another file (external data), "
                              f"which ddcnn does not read; export it again with `ddcnn export --format onnx`")


class ExportedModel:
    """An exported file and the JSON beside it: ``images (B, C, *image_size) in [0, 1] -> (B, K)`` on the CPU.

    A .onnx file runs with ONNX Runtime, which interprets its graph without running Python: the format to share.
    A .pt2 file is a program (torch evaluates the expressions and runs the code it carries): it is loaded with
    ``torch.export.load`` only with ``trust_code=True``, after the sanity checks of :func:`check_pt2`. Either way
    the sidecar's classes and image size are checked against the model's output and input before any answer.
    """

    def __init__(self, path: Path, meta: dict | None = None, threads: int | None = None, trust_code: bool = False):
        """``meta``: the JSON's content (default: read from beside the file); ``threads``: ONNX Runtime's threads
        within an operator (default: its own choice); ``trust_code``: load a .pt2 (refused otherwise, before
        anything of it is read)."""
        self.path = Path(path)
        if self.path.suffix == ".pt2" and not trust_code:
            raise _untrusted_program(self.path)
        self.meta = meta if meta is not None else read_json(
            meta_path(self.path), META, "export the run again with `ddcnn export`")
        fmt = self.meta["format"]
        if fmt == "onnx":
            _require_onnx()
            _check_onnx(self.path)
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.log_severity_level = 4  # ONNX Runtime's own log lines: ddcnn reports its errors as one line
            if threads is not None:
                options.intra_op_num_threads = threads
            try:
                self._session = onnxruntime.InferenceSession(str(self.path), options,
                                                             providers=["CPUExecutionProvider"])
            except Exception as err:  # ONNX Runtime's own errors have no common base class
                raise CheckpointError(f"{str(self.path)!r} is not an ONNX model ONNX Runtime can run "
                                      f"({str(err).splitlines()[0][:200]}); export it again") from None
        else:
            if not trust_code:
                raise _untrusted_program(self.path)
            check_pt2(self.path)
            try:
                with _quiet():
                    self._module = torch.export.load(io.BytesIO(self.path.read_bytes())).module()
            except Exception as err:  # torch.export's deserialiser raises many kinds
                raise CheckpointError(f"{str(self.path)!r} is not a .pt2 file this torch {torch.__version__} can "
                                      f"load ({type(err).__name__}); export it again with this version") from None
        self._check_shapes()

    def _check_shapes(self) -> None:
        """Two blank images through the model: it must take the sidecar's input and give one value per class."""
        expected = (self.meta["in_channels"], *self.meta["image_size"])
        try:
            out = self._run(torch.zeros(2, *expected))
        except Exception:  # noqa: BLE001 - whatever the runtime raises for an input the model does not take
            out = None
        if out is None:
            raise CheckpointError(f"{str(meta_path(self.path))!r} says the model takes images "
                                  f"{list(expected)}, but {self.path.name} does not; the two files do not belong "
                                  f"together: export the run again")
        if tuple(out.shape) != (2, len(self.meta["classes"])):
            raise CheckpointError(f"{str(meta_path(self.path))!r} names {len(self.meta['classes'])} classes but "
                                  f"{self.path.name} gives {list(out.shape[1:])} values per image; the two files do "
                                  f"not belong together: export the run again")

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        if self.meta["format"] == "onnx":
            return torch.from_numpy(self._session.run(None, {"images": images.numpy()})[0])
        with torch.no_grad(), _quiet():
            return self._module(images)

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        expected = (self.meta["in_channels"], *self.meta["image_size"])
        if images.dim() != len(expected) + 1 or tuple(images.shape[1:]) != expected:
            raise DataError(f"{self.path.name} takes images (B, {', '.join(map(str, expected))}), got "
                            f"{list(images.shape)}")
        return self._run(images.float().contiguous())


def is_exported(path: Path) -> bool:
    """Whether ``path`` is meant as an exported file (a .pt2 or .onnx file) rather than a run directory."""
    return path.suffix in (".pt2", ".onnx") and not path.is_dir()


def predict_exported(path: Path, files: list[str], trust_code: bool = False) -> Predictions:
    """``ddcnn predict`` with an exported file: per file the class it gives and every class's probability (vote
    share), as :func:`ddcnn.finished.run.predict_files` gives them for a run (no subdomain votes: the file gives
    only its decision). ``trust_code``: a .pt2 file is loaded only with it (see :class:`ExportedModel`)."""
    model = ExportedModel(path, trust_code=trust_code)
    meta = model.meta
    notes: list[str] = []
    images = read_inputs(files, tuple(meta["image_size"]), meta["in_channels"], meta["dataset"],
                         _sidecar_recipe(meta), notes)
    probabilities = model(images)
    rows = prediction_rows(files, meta["strategy"], model.classes, probabilities, probabilities)
    return Predictions(meta["strategy"], list(model.classes), rows, notes, origin=f"exported: {path.name}")


def _sidecar_recipe(meta: dict) -> VolumeRecipe | None:
    """How the sidecar says volumes are prepared: its ``volumes`` recipe, or (a file exported before the recipe was
    written) its window over volumes stretched to the image size."""
    if meta.get("volumes"):
        try:
            return VolumeRecipe.from_json(meta["volumes"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"the sidecar's volumes recipe is damaged ({err!r}); export the run again") from None
    if meta["dataset"] == "volume-folder" and meta.get("window") and len(meta["image_size"]) == 3:
        return VolumeRecipe(tuple(meta["image_size"]), window=tuple(meta["window"]))
    return None
