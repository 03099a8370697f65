"""ddcnn.files: the schema check every run-directory reader uses, and the YAML loader that refuses alias bombs."""

from __future__ import annotations

import json
import math
import string

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ddcnn.config import parse_set
from ddcnn.errors import CheckpointError, ConfigError
from ddcnn.files import EXPANSION_FLOOR, Check, MapOf, Opt, _Mismatch, conform, load_yaml, parse_json
from ddcnn.train.store.schema import DATA_FACTS, LOCAL_TIMING, MARKER, RESULTS

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=12)
SCHEMA = st.recursive(st.sampled_from([int, float, str, bool, None]),
                      lambda inner: st.lists(inner, min_size=1, max_size=1)
                      | st.dictionaries(st.sampled_from(["a", "b?", "c"]), inner, max_size=2)
                      | inner.map(Opt) | inner.map(MapOf),
                      max_leaves=6)


def _fits(value, schema) -> bool:
    """The schema's meaning written out again, independently of ``conform``."""
    if isinstance(schema, Opt):
        return value is None or _fits(value, schema.schema)
    if isinstance(schema, MapOf):
        return isinstance(value, dict) and all(_fits(v, schema.schema) for v in value.values())
    if isinstance(schema, dict):
        return isinstance(value, dict) and all(
            (k.rstrip("?") in value and _fits(value[k.rstrip("?")], s)) or (k.endswith("?") and k[:-1] not in value)
            for k, s in schema.items())
    if isinstance(schema, list):
        return isinstance(value, list) and all(_fits(v, schema[0]) for v in value)
    if schema is float:
        return type(value) in (int, float) and math.isfinite(value)
    if schema is None:
        return value is None
    return type(value) is schema


@settings(max_examples=300, deadline=None)
@given(JSON, SCHEMA)
def test_conform_accepts_exactly_the_values_of_the_schema(value, schema):
    try:
        conform(value, schema)
        ok = True
    except _Mismatch:
        ok = False
    assert ok == _fits(value, schema)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=60) | st.text(max_size=60).map(str.encode))
def test_any_bytes_in_a_run_file_give_data_of_the_schema_or_one_checkpoint_error(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "data.json"
    for schema in (MARKER, DATA_FACTS, LOCAL_TIMING, RESULTS):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        try:
            parse_json(text, path, schema, "fix")
        except CheckpointError as err:
            assert "data.json" in str(err) and str(err).endswith("fix")


def test_a_mismatch_names_the_place_and_both_kinds():
    schema = {"strategies": MapOf({"test_accuracy": Check(float, lambda v: 0 <= v <= 1, "a number from 0 to 1")})}
    with pytest.raises(_Mismatch) as info:
        conform({"strategies": {"global": {"test_accuracy": "high"}}}, schema)
    assert info.value.where == "strategies.global.test_accuracy"
    assert info.value.message == "is a string but must be a number from 0 to 1"
    with pytest.raises(_Mismatch, match="lacks the key 'strategies'"):
        conform({}, schema)


@pytest.mark.parametrize("text", ["[" * 50_000 + "]" * 50_000, '{"a": ' * 50_000 + "1" + "}" * 50_000, "NaN",
                                  "-Infinity", '{"format": 1e999}'])
def test_deep_or_non_finite_json_is_a_clear_error(tmp_path, text):
    with pytest.raises(CheckpointError, match="'.*x.json' is corrupt"):
        parse_json(text, tmp_path / "x.json", MARKER, "restore it")


def _bomb(levels: int, fan: int = 10) -> str:
    lines = [f"a0: &a0 [{', '.join(['x'] * fan)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fan)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [5, 9])
def test_yaml_whose_aliases_expand_far_beyond_its_text_is_refused(levels):
    with pytest.raises(ConfigError, match=r"expands through YAML aliases .* to [\d,]+ values from \d+ characters"):
        load_yaml(_bomb(levels), "config file 'c.yaml'")
    with pytest.raises(ConfigError, match="expands through YAML aliases"):
        parse_set(f"model.depth={_flow_bomb(levels)}")


def _flow_bomb(levels: int) -> str:
    text = "&b0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"
    for i in range(1, levels):
        text = f"&b{i} [{text}, " + ", ".join([f"*b{i - 1}"] * 9) + "]"
    return text


def test_aliases_that_stay_small_are_read_as_before():
    text = "base: &base {epochs: 2, lr: 0.1}\nstages: {local: *base, global: *base}\n"
    assert load_yaml(text, "c") == yaml.safe_load(text)
    assert load_yaml(_bomb(2), "c") == yaml.safe_load(_bomb(2))  # 111 values from ~80 characters: fine
    assert 10 ** 3 < EXPANSION_FLOOR


def test_yaml_that_refers_to_itself_or_nests_too_deeply_is_refused():
    with pytest.raises(ConfigError, match="refers to itself"):
        load_yaml("a: &a [1, *a]\n", "c")
    with pytest.raises(ConfigError, match="nests too deeply"):
        load_yaml("[" * 5000 + "]" * 5000, "c")


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=string.printable, max_size=80))
def test_the_yaml_loader_reads_what_safe_load_reads(text):
    try:
        expected = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError):
        return
    try:
        assert json.dumps(load_yaml(text, "c"), default=str) == json.dumps(expected, default=str)
    except ConfigError as err:
        assert "aliases" in str(err) or "refers to itself" in str(err)
