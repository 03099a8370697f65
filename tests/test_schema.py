"""Damaged run directories and refused commands: every file of a finished run, damaged in every way a disk, an
editor or a copy can, gives `evaluate`, `predict` and `--resume` one `ddcnn: error:` line that names it, exit
status 2, and leaves every file of the run byte-identical. Refused `--resume` and `--force` touch nothing.

The commands run in-process (``ddcnn.cli.main``); the generated data is made once per set of arguments.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import tiny_dict
from ddcnn.cli import main

PREFIX = "ddcnn: error: "
STAGES = ("global", "local", "combine", "coherent", "transfer")
# Who reads what: the files each command reads back from a finished run.
ALL = ("evaluate", "predict", "resume")
READERS = {"ddcnn-run.json": ALL, "config.yaml": ALL, "data.json": ALL, "results.json": ("evaluate", "predict"),
           "local_timing.json": ("resume",), **{f"manifest:{s}": ALL for s in STAGES},
           **{f"weights:{s}": ALL for s in STAGES}}
# Written for people, never read back (metrics.jsonl is rebuilt from the checkpoints).
UNREAD = re.compile(r"(metrics\.jsonl|report\.md|splits\.json|plots/.*\.png|tensorboard/.*)$")


@pytest.fixture(scope="module", autouse=True)
def generated_once():
    """The tiny generated datasets, made once per argument set: each command would make them again."""
    import ddcnn.data.datasets as select

    real = select.make_generated
    cached = functools.lru_cache(maxsize=8)(lambda *args, **kwargs: real(*args, **kwargs))

    def make(*args, **kwargs):
        def frozen(v):
            return tuple(v) if isinstance(v, list) else v

        ds = cached(*map(frozen, args), **{k: frozen(v) for k, v in kwargs.items()})
        return type(ds)(ds.images.clone(), ds.labels.clone(), list(ds.classes))

    select.make_generated = make
    yield
    select.make_generated = real


@pytest.fixture(scope="module")
def space(tmp_path_factory, finished_run):
    root = tmp_path_factory.mktemp("runfiles")
    shutil.copytree(finished_run[0], root / "run")
    (root / "run" / "evaluation.json").unlink(missing_ok=True)
    (root / "c.yaml").write_text(yaml.safe_dump(tiny_dict(2)))
    np.save(root / "ok.npy", np.zeros((1, 16, 16), np.float32))
    return root


def path_of(run: Path, name: str) -> Path:
    if name.startswith("manifest:"):
        return run / "checkpoints" / f"{name.split(':')[1]}.json"
    if name.startswith("weights:"):
        manifest = json.loads((run / "checkpoints" / f"{name.split(':')[1]}.json").read_text())
        return run / "checkpoints" / manifest["files"]["weights"]["file"]
    return run / name


def snapshot(run: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(run)): (p.read_bytes() if p.is_file() else None) for p in sorted(run.rglob("*"))}


def command(kind: str, space: Path) -> list[str]:
    run = str(space / "run")
    return {"evaluate": ["evaluate", run], "predict": ["predict", run, str(space / "ok.npy")],
            "resume": ["run", str(space / "c.yaml"), "--out", run, "--resume", "--quiet"]}[kind]


# ---------------------------------------------------------------------------------------------- damage --
def _first_number(data):
    """Path (keys/indices) to the first number in ``data``, depth first."""
    if isinstance(data, dict | list):
        for key, value in (data.items() if isinstance(data, dict) else enumerate(data)):
            if isinstance(value, int | float) and not isinstance(value, bool):
                return [key]
            inner = _first_number(value)
            if inner is not None:
                return [key, *inner]
    return None


def _number_replaced(text: bytes, value) -> bytes:
    """The JSON ``text`` with its first number replaced by ``value`` (json writes infinity as ``Infinity``)."""
    data = json.loads(text)
    *parents, last = _first_number(data)
    node = data
    for key in parents:
        node = node[key]
    node[last] = value
    return json.dumps(data).encode()


JSON_DAMAGE = {
    "truncated": lambda b: b[: len(b) // 2],
    "empty": lambda b: b"",
    "not-utf8": lambda b: b"\xff\xfe" + b[2:],
    "list-for-object": lambda b: b"[" + b + b"]",
    "string-for-number": lambda b: _number_replaced(b, "7"),
    "infinity": lambda b: _number_replaced(b, float("inf")),
    "deep-nesting": lambda b: b"[" * 100_000 + b"]" * 100_000,
    "folder": None,
}
YAML_DAMAGE = {
    "truncated": lambda b: b[: len(b) // 2],
    "not-utf8": lambda b: b"\xff\xfe" + b[2:],
    "list-for-mapping": lambda b: b"- 1\n- 2\n",
    "wrong-type": lambda b: b.replace(b"width: 4", b"width: wide"),
    "deep-nesting": lambda b: b"[" * 5_000 + b"]" * 5_000,
    "alias-bomb": lambda b: b"a: &a [x, x, x, x, x, x, x, x, x, x]\n" + b"".join(
        f"{c}: &{c} [{', '.join(['*' + chr(ord(c) - 1)] * 10)}]\n".encode() for c in "bcdefgh"),
    "folder": None,
}
WEIGHTS_DAMAGE = {
    "truncated": lambda b: b[: len(b) // 2],
    "empty": lambda b: b"",
    "flipped-byte": lambda b: b[:-3] + bytes([b[-3] ^ 0xFF]) + b[-2:],
    "other-stage": "other-stage",  # another stage's weights, with the manifest's SHA-256 made to match
    "folder": None,
}


def _cases():
    for name in READERS:
        if name == "config.yaml":
            damages = YAML_DAMAGE
        elif name.startswith("weights:"):
            damages = WEIGHTS_DAMAGE
        else:
            damages = JSON_DAMAGE
        keys = list(damages)
        if name.split(":")[-1] in STAGES[2:] or name in ("manifest:local", "weights:global"):
            # every damage on one manifest and one weights file; two (in turn) on each of the others
            i = STAGES.index(name.split(":")[-1])
            keys = [keys[i % len(keys)], keys[(i + 2) % len(keys)]]
        for damage in keys:
            yield pytest.param(name, damage, id=f"{name}-{damage}")


def _damage(space: Path, name: str, damage: str) -> list[Path]:
    """Damage ``name`` as ``damage`` says; returns the files it changed."""
    run = space / "run"
    path = path_of(run, name)
    table = YAML_DAMAGE if name == "config.yaml" else WEIGHTS_DAMAGE if name.startswith("weights:") else JSON_DAMAGE
    how = table[damage]
    if how is None:
        path.unlink()
        path.mkdir()
        (path / "inside").write_text("a folder where the file belongs")
        return [path]
    if how == "other-stage":
        stage = name.split(":")[1]
        other = "global" if stage != "global" else "combine"
        data = path_of(run, f"weights:{other}").read_bytes()
        path.write_bytes(data)
        manifest = path_of(run, f"manifest:{stage}")
        text = json.loads(manifest.read_text())
        import hashlib

        text["files"]["weights"]["sha256"] = hashlib.sha256(data).hexdigest()
        manifest.write_text(json.dumps(text))
        return [path, manifest]
    path.write_bytes(how(path.read_bytes()))
    return [path]


@pytest.mark.parametrize(("name", "damage"), list(_cases()))
def test_a_damaged_file_is_one_error_that_names_it_and_changes_nothing(space, name, damage, capsys):
    run = space / "run"
    originals = {p: p.read_bytes() for p in (path_of(run, name), *(run / "checkpoints").glob("*.json"))}
    try:
        _damage(space, name, damage)
        before = snapshot(run)
        shown = str(path_of(run, name).relative_to(run))
        for kind in READERS[name]:
            capsys.readouterr()
            status = main(command(kind, space))
            err = capsys.readouterr().err.splitlines()
            assert status == 2, (kind, err)
            assert len(err) == 1 and err[0].startswith(PREFIX), (kind, err)
            assert shown in err[0], (kind, shown, err[0])
            assert snapshot(run) == before, f"{kind} changed the run directory"
    finally:
        for path, data in originals.items():
            if path.is_dir():
                shutil.rmtree(path)
            path.write_bytes(data)


def test_every_file_of_a_finished_run_is_either_read_and_damaged_above_or_never_read(space):
    run = space / "run"
    covered = {str(path_of(run, name).relative_to(run)) for name in READERS}
    files = {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}
    assert covered <= files
    assert not {f for f in files - covered if not UNREAD.fullmatch(f)}, files - covered
    cases = {c.values[0] for c in _cases()}
    assert cases == set(READERS)


# ------------------------------------------------------------------------------------- refused commands --
@pytest.fixture
def own_run(space, tmp_path):
    shutil.copytree(space / "run", tmp_path / "run")
    return tmp_path / "run"


def _refused(capsys, args: list[str]) -> str:
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(PREFIX), err
    return err[0]


def _refused_unchanged(capsys, space: Path, run: Path, flag: str, sets: list[str], fragment: str) -> None:
    """``ddcnn run c.yaml --out RUN FLAG --set ...`` is one refusal holding ``fragment`` and leaves RUN as it was."""
    before = snapshot(run)
    args = ["run", str(space / "c.yaml"), "--out", str(run), flag]
    for s in sets:
        args += ["--set", s]
    assert fragment in _refused(capsys, args)
    assert snapshot(run) == before


@pytest.mark.parametrize(("sets", "fragment"), [
    (["model.width=8"], "model.width was 4"),  # a frozen value
    (["stages.global.epochs=5"], "stage 'global' was checkpointed with epochs = 2"),  # a checkpointed stage's
    (["stages.local.lr=0.5"], "stages.local.lr was 0.001 when stage 'local' finished but is 0.5 now"),
    (["stages.transfer.label_smoothing=0.1"], "stages.transfer.label_smoothing was 0.0"),  # any StageConfig field
    (["stages.combine.schedule=constant"], "stages.combine.schedule was 'cosine'"),
])
def test_a_refused_resume_rewrites_no_config_and_deletes_no_leftover(space, own_run, capsys, sets, fragment):
    (own_run / "checkpoints" / "global-e1.weights.safetensors").write_bytes(b"left by a kill")
    (own_run / ".results.json.ab12cd34.tmp").write_text("half")
    _refused_unchanged(capsys, space, own_run, "--resume", sets, fragment)


def test_a_manifest_the_loader_refuses_keeps_every_checkpoint(space, own_run, capsys):
    """The clean-up of leftovers reads manifests with the loader's reader: a manifest that is readable JSON but
    not a valid manifest (here: a SHA-256 that is no hash) stops the resume before any file is deleted."""
    manifest = own_run / "checkpoints" / "local.json"
    data = json.loads(manifest.read_text())
    data["files"]["weights"]["sha256"] = 12
    manifest.write_text(json.dumps(data))
    (own_run / "checkpoints" / "local-e1.weights.safetensors").write_bytes(b"left by a kill")
    before = snapshot(own_run)
    line = _refused(capsys, ["run", str(space / "c.yaml"), "--out", str(own_run), "--resume"])
    assert "checkpoints/local.json" in line and "sha256" in line
    assert snapshot(own_run) == before


@pytest.mark.parametrize(("sets", "fragment"), [
    (["model.width=100000000"], "lower model.width"),
    (["combiner.hidden=[0]"], "hidden must hold whole numbers of at least 1"),
    (["data.augment.crop_padding=1000000"], "data.augment.crop_padding"),
    (["data.augment.crop_padding=-1"], "data.augment.crop_padding = -1 must not be negative"),
    (["data.workers=-1"], "data.workers = -1 must not be negative"),
    (["stages.global.step_gamma=0"], "stages.global.step_gamma = 0.0 must be positive"),
    (["model.backbone=no_such_module.Net", "model.backend=vmap", "model.depth=null"], "'no_such_module' is not found"),
])
def test_force_refuses_a_new_config_before_it_removes_the_old_run(space, own_run, capsys, sets, fragment):
    """Values checked only when a stage starts (model sizes, batches) are checked before --force removes
    anything: the old run stays whole."""
    _refused_unchanged(capsys, space, own_run, "--force", sets, fragment)


def test_a_file_where_the_checkpoint_folder_belongs(space, own_run, capsys):
    shutil.rmtree(own_run / "checkpoints")
    (own_run / "checkpoints").write_text("not a folder")
    before = snapshot(own_run)
    line = _refused(capsys, ["run", str(space / "c.yaml"), "--out", str(own_run), "--resume"])
    assert "checkpoints" in line and "is a file" in line
    assert snapshot(own_run) == before


# ----------------------------------------------------------------------------------- a run directory is data --
EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")


def boom(**kwargs):
    pathlib.Path({marker!r}).write_text("called")
"""


def _received(run: Path, backbone: str, kwargs: dict) -> None:
    """``run`` as someone may send it: its config.yaml names ``backbone`` (an import path) with ``kwargs``."""
    config = run / "config.yaml"
    data = yaml.safe_load(config.read_text())
    data["model"].update(backbone=backbone, backbone_kwargs=kwargs, backend="vmap", depth=None)
    config.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.mark.parametrize(("backbone", "kwargs"), [
    ("evil_net:boom", {}),
    ("os.system", {"command": "touch {marker}"}),
    ("subprocess.getoutput", {"cmd": "touch {marker}"}),
    ("builtins.open", {"file": "{marker}", "mode": "w"}),
    ("shutil.rmtree", {"path": "{victim}"}),
])
def test_a_received_run_naming_code_as_its_backbone_runs_nothing(space, own_run, tmp_path, monkeypatch, capsys,
                                                                 backbone, kwargs):
    """evaluate, predict, show and run --resume (with the run's own config.yaml, or with one's own config) import
    nothing the run directory names: one error, before the module is imported, every file as it was."""
    import sys

    marker, victim = tmp_path / "marker", tmp_path / "victim"
    victim.mkdir()
    (tmp_path / "evil_net.py").write_text(EVIL.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    _received(own_run, backbone, {k: v.format(marker=marker, victim=victim) for k, v in kwargs.items()})
    before = snapshot(own_run)
    config = str(own_run / "config.yaml")
    for args in (["evaluate", str(own_run)], ["predict", str(own_run), str(space / "ok.npy")],
                 ["run", config, "--out", str(own_run), "--resume"], ["show", config, "--png", str(tmp_path / "g.png")],
                 ["run", str(space / "c.yaml"), "--out", str(own_run), "--resume"]):
        line = _refused(capsys, args)
        assert f"'{backbone}'" in line and ("--trust-code" in line or "model.backbone was" in line), (args, line)
        assert not marker.exists() and victim.is_dir() and "evil_net" not in sys.modules, args
        assert snapshot(own_run) == before, args
    if backbone == "evil_net:boom":  # the opt-in: now it is imported (and its factory called)
        assert main(["evaluate", str(own_run), "--trust-code"]) == 2
        assert marker.read_text() == "called"
        sys.modules.pop("evil_net", None)


def test_a_resumed_stage_may_change_its_parallelism_but_not_how_it_trains():
    from ddcnn.config import StageConfig
    from ddcnn.errors import CheckpointError
    from ddcnn.train.store.schema import stage_changes

    state = {"epoch": 1, "done": False, "epochs": 3, "batch_size": 8, "optimizer": "adam"}
    saved = {"epochs": 3, "batch_size": 8, "optimizer": "adam", "parallel": "model"}
    now = StageConfig(epochs=3, batch_size=8, optimizer="adam", parallel="data")
    assert stage_changes("coherent", state, saved, now) == []  # checkpoints do not depend on the parallelism
    with pytest.raises(CheckpointError, match="stages.coherent.label_smoothing"):
        stage_changes("coherent", state, {**saved, "label_smoothing": 0.0},
                      StageConfig(epochs=3, batch_size=8, optimizer="adam", label_smoothing=0.1))
