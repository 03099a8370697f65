import json
import os

import pytest
import torch

from ddcnn import files as files_module
from ddcnn.errors import CheckpointError
from ddcnn.files import atomic_write
from ddcnn.train.store.checkpoint import CheckpointDir


def _trained(steps=3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(16, 4)).pow(2).mean().backward()
        opt.step()
    return model, opt


def test_weights_optimizer_and_state_round_trip_so_training_continues_identically(tmp_path):
    model, opt = _trained()
    ckpt = CheckpointDir(tmp_path)
    ckpt.save("local", "e1", model.state_dict(), {"epoch": 1, "history": [{"a": 1.5}]}, opt.state_dict())
    weights, state, opt_state = ckpt.load("local")
    assert state == {"epoch": 1, "history": [{"a": 1.5}]}
    clone, clone_opt = _trained(0)
    clone.load_state_dict(weights)
    clone_opt.load_state_dict(opt_state)
    x = torch.randn(16, 4)
    for m, o in ((model, opt), (clone, clone_opt)):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()
    for a, b in zip(model.state_dict().values(), clone.state_dict().values()):
        assert torch.equal(a, b)


def test_old_versions_are_removed_once_the_manifest_names_the_new_one(tmp_path):
    model, _ = _trained(0)
    ckpt = CheckpointDir(tmp_path)
    ckpt.save("global", "e1", model.state_dict(), {"epoch": 1})
    ckpt.save("global", "e2", model.state_dict(), {"epoch": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global-e2.weights.safetensors", "global.json"]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_files_are_detected_before_use(tmp_path, damage):
    model, _ = _trained(0)
    ckpt = CheckpointDir(tmp_path)
    ckpt.save("global", "e1", model.state_dict(), {"epoch": 1})
    path = tmp_path / "global-e1.weights.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        ckpt.load("global")


def test_a_corrupt_or_missing_manifest_entry_is_a_checkpoint_error(tmp_path):
    model, _ = _trained(0)
    ckpt = CheckpointDir(tmp_path)
    ckpt.save("global", "e1", model.state_dict(), {"epoch": 1})
    (tmp_path / "global-e1.weights.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        ckpt.load("global")
    (tmp_path / "global.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt.load("global")


@pytest.mark.parametrize("name", ["/abs/victim.safetensors", "../victim.safetensors", "sub/x.safetensors",
                                  "victim.txt", 7])
def test_a_manifest_naming_files_outside_the_checkpoint_folder_is_refused_and_deletes_nothing(tmp_path, name):
    model, _ = _trained(0)
    ckpt = CheckpointDir(tmp_path / "checkpoints")
    (tmp_path / "checkpoints").mkdir()
    ckpt.save("global", "e1", model.state_dict(), {"epoch": 1})
    victim = tmp_path / "victim.safetensors"
    victim.write_text("keep me")
    if isinstance(name, str) and name.startswith("/abs/"):
        name = str(victim)
    manifest = json.loads((tmp_path / "checkpoints" / "global.json").read_text())
    manifest["files"]["weights"]["file"] = name
    (tmp_path / "checkpoints" / "global.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt.load("global")
    ckpt.save("global", "e2", model.state_dict(), {"epoch": 2})  # replaces the bad manifest
    assert victim.read_text() == "keep me"
    assert ckpt.load("global")[1] == {"epoch": 2}


def test_a_write_killed_before_the_rename_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    atomic_write(path, b'{"v": 1}')

    def killed(*args):
        raise KeyboardInterrupt  # stands in for the process dying between write and rename

    monkeypatch.setattr(files_module.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, b'{"v": 2}')
    assert json.loads(path.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["f.json"]


def test_checkpoints_hold_no_pickles(tmp_path):
    model, opt = _trained()
    ckpt = CheckpointDir(tmp_path)
    ckpt.save("local", "e1", model.state_dict(), {"epoch": 1}, opt.state_dict())
    for p in tmp_path.iterdir():
        assert p.suffix in (".safetensors", ".json")
        assert b"\x80\x04" not in p.read_bytes()[:2]


def test_written_files_get_the_mode_the_umask_gives_new_files(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.json", b"{}")
        (tmp_path / "b.json").write_bytes(b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "b.json").stat().st_mode & 0o777 == 0o644
