"""What the machine cannot give: absurd sizes (ddcnn.sizing, ddcnn.train.budget), paths the OS refuses
(ddcnn.paths), a full disk, and inputs no model can take (empty or complex arrays). Each is one `ddcnn: error:`
line with exit status 2."""

from __future__ import annotations

import errno
import os
import sys

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_dict
from ddcnn.build import Models, Shapes, meta_model
from ddcnn.cli import main
from ddcnn.config import from_dict
from ddcnn.errors import ConfigError, DataError
from ddcnn.paths import user_path
from ddcnn.sizing import _activation_bound, _activation_bytes, _meta_input, count_exactly, stage_sizes
from ddcnn.train.budget import check_budget, held_per_process

PREFIX = "ddcnn: error: "


def one_error(capsys, args) -> str:
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(PREFIX), err
    return err[0]


@pytest.fixture
def cfg_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_dict(2)))
    return "c.yaml"


# --------------------------------------------------------------------------------------------------- sizes --
@settings(max_examples=10, deadline=None)
@given(width=st.integers(1, 6), depth=st.lists(st.integers(1, 2), min_size=1, max_size=2),
       backbone=st.sampled_from(["vgg", "resnet"]), batch=st.integers(1, 9), dims=st.sampled_from([2, 3]))
def test_the_cheap_bound_is_never_below_the_counted_activations(width, depth, backbone, batch, dims):
    cfg = from_dict(tiny_dict(dims), [f"model.width={width}", f"model.depth={depth}", f"model.backbone={backbone}",
                                      f"stages.*.batch_size={batch}"])
    models = Models(cfg, Shapes(1, 3, (16, 16) if dims == 2 else (8, 8, 8)))
    for size in stage_sizes(cfg, models):
        shape = _meta_input(models, size.stage, batch)[0]
        exact = _activation_bytes(meta_model(models, size.stage), torch.empty(shape, device="meta"))
        assert 0 < exact <= size.activation_bytes


def test_parameters_counted_on_the_meta_device_are_the_real_models(tiny_config):
    cfg = tiny_config()
    models = Models(cfg, Shapes(1, 3, (16, 16)))
    real = {"global": models.global_cnn(), "local": models.ensemble(), "combine": models.dnn(),
            "coherent": models.cnn_dnn("coherent"), "transfer": models.cnn_dnn("transfer")}
    for size in stage_sizes(cfg, models):
        assert size.parameters == sum(p.numel() for p in real[size.stage].parameters())


@pytest.mark.parametrize(("sets", "fragments"), [
    (["model.width=1000000"], ["the 'global' stage needs about", "parameters", "but only", "lower model.width"]),
    (["model.width=10000000000"], ["too large to build", "lower model.width"]),
    (["combiner.hidden=[10000000000]"], ["the 'combine' stage needs", "lower combiner.hidden"]),
    (["stages.local.batch_size=100000000"], ["the 'local' stage needs", "lower stages.local.batch_size"]),
    (["data.augment.crop_padding=100000"], ["data.augment.crop_padding"]),
    (["data.image_size=[100000, 100000]"], ["data.image_size = [100000, 100000]", "generated images take",
                                            "lower data.image_size"]),
    (["seed=18446744073709551616"], ["seed = 18446744073709551616 is too large", "2**63"]),
    (["data.split_seed=-9223372036854775809"], ["data.split_seed", "too large"]),
])
def test_absurd_sizes_are_refused_with_the_figure_and_the_fix(cfg_file, capsys, sets, fragments):
    args = ["run", cfg_file, "--out", "out"]
    for s in sets:
        args += ["--set", s]
    line = one_error(capsys, args)
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert not os.path.exists("out")


def test_the_budget_compares_with_the_memory_given(tiny_config):
    cfg = tiny_config()
    models = Models(cfg, Shapes(1, 3, (16, 16)))
    need = max(s.training_bytes for s in stage_sizes(cfg, models))
    check_budget(cfg, models, torch.device("cpu"), free=need)
    with pytest.raises(ConfigError, match="but only"):
        check_budget(cfg, models, torch.device("cpu"), free=_activation_bound(models.dnn(), 1, 1, ()) // 10)


@pytest.mark.parametrize("parallel", ["model", "data"])
def test_several_processes_are_sized_by_what_each_one_holds(tiny_config, parallel):
    """A model-parallel process holds half the local CNNs (and the DNN); a data-parallel one half the batch: with
    2 processes the transfer stage needs less per process than in one, and a budget between the two passes."""
    cfg = tiny_config(overrides=[f"stages.transfer.parallel={parallel}"])
    models = Models(cfg, Shapes(1, 3, (16, 16)))
    size = stage_sizes(cfg, models, ["transfer"])[0]
    count_exactly(cfg, models, size)  # as check_budget does before it refuses
    held = held_per_process(cfg, models, size, 2)
    assert held.training_bytes < size.training_bytes
    if parallel == "model":
        dnn = sum(p.numel() for p in models.dnn().parameters())
        assert held.parameters == dnn + (size.parameters - dnn) // 2  # 2 of the 4 local CNNs
    else:
        assert held.parameters == size.parameters
    between = (held.training_bytes + size.training_bytes) // 2
    check_budget(cfg, models, torch.device("cpu"), free=between, world=2, stages=["transfer"])
    with pytest.raises(ConfigError, match="but only"):
        check_budget(cfg, models, torch.device("cpu"), free=between, world=1, stages=["transfer"])


@pytest.mark.parametrize(("sets", "fragment"), [
    (["model.width=1099511627776"], "lower model.width"),
    (["combiner.hidden=[1099511627776]"], "lower model.width, model.local_width or combiner.hidden"),
])
def test_show_sizes_the_models_before_it_builds_them(cfg_file, capsys, sets, fragment):
    """`ddcnn show` builds three models for real: a width of 2**40 is refused by the estimate, not the allocator."""
    args = ["show", cfg_file, "--png", "grid.png"]
    for s in sets:
        args += ["--set", s]
    assert fragment in one_error(capsys, args)
    assert not os.path.exists("grid.png")


def test_seeds_up_to_two_to_the_63_train(tiny_config):
    cfg = tiny_config(overrides=[f"seed={2**63 - 1}"])
    Models(cfg, Shapes(1, 3, (16, 16))).ensemble()


# ---------------------------------------------------------------------------------------------------- paths --
@pytest.mark.parametrize(("option_args", "fragments"), [
    (["run", "c.yaml", "--out", "a\0b"], ["--out", "NUL byte"]),
    (["run", "c.yaml", "--out", "x" * 300], ["--out", "300 bytes long", "at most 255"]),
    (["run", "c.yaml", "--out", "~nosuchuser_ddcnn/run"], ["no user 'nosuchuser_ddcnn'", "'~/'"]),
    (["evaluate", "~nosuchuser_ddcnn/run"], ["the run directory", "no user 'nosuchuser_ddcnn'"]),
    (["predict", "run", "~nosuchuser_ddcnn/x.png"], ["the file", "no user"]),
    (["show", "c.yaml", "--png", "y" * 300 + ".png"], ["--png", "at most 255"]),
    (["data", "fetch", "mnist", "--dir", "~nosuchuser_ddcnn"], ["--dir", "no user"]),
    (["run", "c.yaml", "--out", "o", "--set", "data.name=image-folder", "--set", "data.root=~nosuchuser_ddcnn/p"],
     ["data.root", "no user"]),
    (["run", "c.yaml", "--out", "somefile/run"], ["'somefile/run'", "not writable", "another --out"]),
])
def test_paths_the_os_refuses_are_one_clear_error(cfg_file, capsys, option_args, fragments):
    open("somefile", "w").close()
    line = one_error(capsys, option_args)
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def test_tilde_means_the_home_folder_for_every_path_option(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert user_path("~/runs/a", "--out") == tmp_path / "runs" / "a"
    assert user_path(os.path.expanduser("~root") + "/x", "--out") == user_path("~root/x", "--out")


def test_a_config_name_that_no_folder_can_have(cfg_file, capsys):
    line = one_error(capsys, ["run", cfg_file, "--set", "name=" + "n" * 300])
    assert "runs/NAME" in line and "at most 255" in line


# -------------------------------------------------------------------------------------------- a full disk --
def test_a_full_disk_under_the_run_directory_is_one_error_naming_the_file(cfg_file, capsys, monkeypatch):
    import ddcnn.files as files

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    line = one_error(capsys, ["run", cfg_file, "--out", "out"])
    assert "out/config.yaml" in line and "No space left on device" in line and "free some space" in line
    assert not [p for p in os.listdir("out") if p.endswith(".tmp")]  # no half-written file


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_on_standard_output_is_one_error(cfg_file, capsys, monkeypatch):
    full = open("/dev/full", "w")  # noqa: SIM115 - closed below, after main has written to it
    monkeypatch.setattr(sys, "stdout", full)
    try:
        line = one_error(capsys, ["show", cfg_file, "--png", "grid.png"])
    finally:
        full.close()
    assert "cannot write the output" in line and "No space left on device" in line


# ------------------------------------------------------------------------------------------------- inputs --
@pytest.mark.parametrize(("array", "fragment"), [
    (np.zeros((1, 0, 16), np.float32), "an axis of length 0"),
    (np.zeros((1, 16, 16), np.complex64), "complex numbers"),
])
def test_empty_and_complex_arrays_to_predict(finished_run, tmp_path, capsys, array, fragment):
    np.save(tmp_path / "x.npy", array)
    line = one_error(capsys, ["predict", str(finished_run[0]), str(tmp_path / "x.npy")])
    assert "x.npy" in line and fragment in line


def test_a_volume_with_an_empty_axis(tmp_path):
    from ddcnn.data.volume_folder import load_volume_folder

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        np.save(tmp_path / c / "v.npy", np.zeros((4, 4, 4), np.float32))
    np.save(tmp_path / "b" / "empty.npy", np.zeros((4, 0, 4), np.float32))
    with pytest.raises(DataError, match=r"empty.npy holds an empty volume of shape \(4, 0, 4\) \(an axis of length 0"):
        load_volume_folder(tmp_path, (4, 4, 4))


# ------------------------------------------------------------------------------------------------- report --
def test_class_names_with_mathtext_and_a_failing_plot_still_give_the_report(tmp_path, capsys, monkeypatch):
    import ddcnn.report.markdown as markdown
    from ddcnn.report import write_report

    classes = ["$x", "a\\b", "^_{}$$", "$\\frac{"]
    results = {"classes": classes, "num_classes": 4, "image_size": [8, 8], "grid": [2, 2], "overlap": [0, 0],
               "strategies": {"global": {"test_accuracy": 0.5}}, "best_strategy": "global",
               "confusion_matrix": {"strategy": "global", "matrix": [[1, 0, 0, 0]] * 4}}
    write_report(tmp_path, results, [])
    assert (tmp_path / "plots" / "confusion_matrix.png").stat().st_size > 0

    def broken(*args, **kwargs):
        raise ValueError("no fonts here")

    monkeypatch.setattr(markdown, "plot_confusion_matrix", broken)
    capsys.readouterr()
    report = write_report(tmp_path / "second", results, [])
    err = capsys.readouterr().err
    assert "ddcnn: warning: the plot 'confusion matrix' could not be drawn (ValueError: no fonts here)" in err
    assert "could not be drawn" in report.read_text() and "## Results" in report.read_text()
