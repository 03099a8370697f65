import re
from pathlib import Path

import pytest
import yaml

from ddcnn.config import STAGES, apply_overrides, dump_config, from_dict, load_config, parse_set
from ddcnn.errors import ConfigError

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path):
    cfg = load_config(path)
    again = from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_stage_defaults_survive_partial_sections():
    cfg = from_dict({"stages": {"transfer": {"epochs": 3}}})
    assert cfg.stages.transfer.epochs == 3
    assert cfg.stages.transfer.lr == pytest.approx(1e-4)  # the transfer stage's own default, not the generic one
    assert cfg.stages.combine.epochs == 20


def test_overrides_with_dotted_keys_globs_and_yaml_values():
    cfg = from_dict({}, ["stages.*.epochs=2", "decomposition.grid=[4, 4]", "stages.local.lr=1e-3", "seed=7"])
    assert all(cfg.stages.get(s).epochs == 2 for s in STAGES)
    assert cfg.decomposition.grid == [4, 4] and cfg.seed == 7
    assert cfg.stages.local.lr == pytest.approx(0.001)  # PyYAML reads 1e-3 as a string; it is accepted
    assert parse_set("data.root=/tmp/x y") == (["data", "root"], "/tmp/x y")
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"modle": {}}, "unknown config key 'modle' .did you mean 'model'"),
        ({"stages": {"locl": {}}}, "did you mean 'local'"),
        ({"stages": {"local": {"epocs": 3}}}, "stages.local.epocs.*did you mean 'epochs'"),
        ({"seed": "one"}, "seed = 'one' must be a whole number"),
        ({"stages": {"local": {"epochs": 0}}}, "stages.local.epochs = 0 must be positive"),
        ({"stages": {"global": {"batch_size": -8}}}, "stages.global.batch_size = -8 must be positive"),
        ({"stages": {"global": {"lr": 0}}}, "stages.global.lr = 0.0 must be positive"),
        ({"stages": {"global": {"lr": "fast"}}}, "must be a number"),
        ({"decomposition": {"grid": [2, 0]}}, "grid"),
        ({"decomposition": {"overlap": -1}}, "overlap"),
        ({"data": {"name": "fashion_mnist"}}, "did you mean 'fashion-mnist'"),
        ({"stages": {"local": {"optimizer": "adamw2"}}}, "optimizer"),
        ({"data": {"val_fraction": 1.5}}, r"\[0, 1\)"),
        ({"stages": {s: {"enabled": False} for s in STAGES}}, "every stage is disabled"),
        ({"model": {"width": 16.5}}, "whole number"),
        ({"stages": {"local": {"enabled": "yes please"}}}, "true or false"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(data, fragment):
    with pytest.raises(ConfigError, match=fragment):
        from_dict(data)


@pytest.mark.parametrize("expression", ["stages.local.epochs", "=3", "a..b=1", "grid=[1, 2"])
def test_malformed_set_expressions(expression):
    with pytest.raises(ConfigError, match="--set"):
        from_dict({}, [expression])


def test_config_files_that_are_missing_not_yaml_or_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {width: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listing)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ConfigError):
        load_config(binary)


@pytest.mark.parametrize("override, fragment", [
    ("stages.transfer.parallel=pipeline", "parallel = 'pipeline' is not valid; choose one of model, data"),
    ("stages.coherent.parallel=modle", "did you mean 'model'"),
    ("stages.global.parallel=model", "stages.global.parallel = 'model' is not valid; choose one of data, spatial"),
    ("stages.combine.parallel=data", "the combine stage has one way to use several processes: remove the key"),
    ("stages.local.parallel=data", "the local stage has one way"),
])
def test_parallel_is_model_or_data_and_global_data_or_spatial(tiny_config, override, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        tiny_config(overrides=[override])
