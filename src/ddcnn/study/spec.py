"""A study file: a base config, axes of config values, seeds; checked once, here, against the config schema.

```yaml
name: fashion_mnist_claims            # optional; default: the file's stem
base: ../configs/fashion_mnist_2x2.yaml   # a config file (relative to this file) or an inline mapping
set: {model.width: 16}                # optional: overrides for every run, as --set would give them
axes:                                 # optional: every combination of the values is one cell
  decomposition.grid: [[2, 2], [4, 4]]
  model.backbone: [vgg, resnet]
seeds: [0, 1, 2, 3, 4]                # every cell runs once per seed
budgets: {global: [3, 6, 12], local: [3, 6], transfer: [2, 3], coherent: [6, 12]}   # optional, see below
split_seed: seed                      # optional: every run's data split follows its seed
```

``budgets`` (:mod:`ddcnn.study.budgets`) makes every budget of every strategy its own run in each cell and seed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ddcnn.config import anchor_paths, apply_overrides, builtin_backbone_only, from_dict
from ddcnn.errors import ConfigError, did_you_mean
from ddcnn.files import load_yaml
from ddcnn.models.settings import check_model_settings
from ddcnn.study.budgets import Point, parse_budgets, points

KEYS = ("name", "base", "set", "axes", "seeds", "budgets", "split_seed")
MAX_RUNS = 10_000  # cells x seeds: a study larger than this is a typo (each run is a whole training)
PLAIN = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Cell:
    """One combination of axis values: ``id`` names its folder, ``values`` maps each axis key to its value."""

    id: str
    values: dict[str, Any]

    @property
    def label(self) -> str:
        return ", ".join(f"{key}={value_text(value)}" for key, value in self.values.items()) or "base"

    def overrides(self) -> list[str]:
        return [f"{key}={_yaml_value(value)}" for key, value in self.values.items()]


@dataclass(frozen=True)
class Study:
    name: str
    path: Path
    base: dict  # the base config with `set` applied: what every run starts from
    axes: dict[str, list]
    seeds: list[int]
    text: str  # the study file as written
    budgets: dict[str, list[int]] | None = None  # strategy -> epochs (ddcnn.study.budgets); None: one run per seed
    split_seed: str | None = None  # "seed": every run's data.split_seed is its seed

    @property
    def spec(self) -> dict:
        """What defines the study's runs (not where its file lives): two studies with the same spec are one study.
        (A study without budgets and split_seed has the spec and SHA-256 it had before they existed.)"""
        extra = {key: value for key, value in (("budgets", self.budgets), ("split_seed", self.split_seed))
                 if value is not None}
        return {"name": self.name, "base": self.base, "axes": self.axes, "seeds": self.seeds, **extra}

    def points(self) -> list[Point | None]:
        """Every budget of a cell as a run (None: no budgets, a cell's run at a seed trains what its config says)."""
        return list(points(self.budgets)) if self.budgets else [None]

    def run_overrides(self, cell: Cell, point: Point | None, seed: int) -> list[str]:
        """The --set overrides of one run: the cell's values, the budget's stages and epochs, the seed (and split)."""
        return [*cell.overrides(), *(point.overrides() if point else []), f"seed={seed}",
                *([f"data.split_seed={seed}"] if self.split_seed == "seed" else [])]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.spec, sort_keys=True).encode()).hexdigest()

    def cells(self) -> list[Cell]:
        keys = list(self.axes)
        combos = [dict(zip(keys, values)) for values in itertools.product(*self.axes.values())]
        if not keys:
            return [Cell("base", {})]
        for ids in (_ids(combos, short=True), _ids(combos, short=False)):
            if len(set(ids)) == len(ids):
                return [Cell(i, c) for i, c in zip(ids, combos)]
        raise ConfigError(f"study {str(self.path)!r}: two cells would share the folder name {ids[0]!r}; give the axis "
                          f"values that differ in more than punctuation")


def _yaml_value(value) -> str:
    """``value`` as --set parses it back: a plain string where YAML reads it unchanged, else JSON (a subset of YAML's
    flow style)."""
    if isinstance(value, str) and value.strip() == value and value:
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)


def value_text(value) -> str:
    if isinstance(value, list):
        return "x".join(value_text(v) for v in value)
    return json.dumps(value) if not isinstance(value, str) else value


def _ids(combos: list[dict], short: bool) -> list[str]:
    def part(key, value):
        name = key.split(".")[-1] if short else key.replace("*", "all")
        return re.sub(r"[^A-Za-z0-9.+-]+", "-", f"{name}-{value_text(value)}").strip("-")

    return ["_".join(part(k, v) for k, v in combo.items()) for combo in combos]


def _read_yaml(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist; give the path of a YAML file")
    try:
        return load_yaml(path.read_text(), f"{what} {str(path)!r}")
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML{where}; fix its syntax") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {str(path)!r} is not a text file; give a YAML file") from None


def _check_plain(value, where: str) -> None:
    """Refuse what YAML reads but a config or JSON cannot hold (a date, a timestamp, binary data)."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, where)
            _check_plain(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, PLAIN) or (isinstance(value, float) and value != value):
        raise ConfigError(f"{where} = {value!r} is a {type(value).__name__}, which a config cannot hold; quote it "
                          f"to make it a string, e.g. '{value}'")


def load_study(path: str | Path, trusted: bool = True) -> Study:
    """Read and check a study file: every axis value and every cell must make a valid config. An import path as
    backbone is imported (to check it) only when ``trusted``; else it is refused (see :mod:`ddcnn.models.settings`).
    """
    path = Path(path)
    data = _read_yaml(path, "study file")
    where = f"study {str(path)!r}"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping with base, axes and seeds, not a {type(data).__name__}")
    _check_plain(data, where)
    for key in data:
        if key not in KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}{did_you_mean(str(key), KEYS)}; valid keys: "
                              f"{', '.join(KEYS)}")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ConfigError(f"{where}: name = {name!r} must be letters, digits, '.', '_' or '-', starting with a "
                          f"letter or digit (it names the folder runs/NAME), e.g. my_study")

    base = data.get("base")
    if isinstance(base, str):
        base_data = _read_yaml(path.parent / base, f"{where}: base config")
        if not isinstance(base_data, dict):
            raise ConfigError(f"{where}: base config {base!r} must hold a mapping of config keys to values")
        _check_plain(base_data, f"{where}: base config {base!r}")
        base_data, _, notes = anchor_paths(base_data, path.parent / base)  # base.yaml records data.root absolute
    elif isinstance(base, dict):
        base_data, _, notes = anchor_paths(base, path)
    else:
        raise ConfigError(f"{where}: base must be a config file (a path relative to the study file) or a mapping of "
                          f"config keys, e.g. base: ../configs/fashion_mnist_2x2.yaml")

    settings = data.get("set") or {}
    if not isinstance(settings, dict):
        raise ConfigError(f"{where}: set must map config keys to values, e.g. set: {{model.width: 16}}")
    if isinstance(settings.get("data.root"), str):  # written in the study file: relative to it
        anchored, _, more = anchor_paths({"data": {"root": settings["data.root"]}}, path)
        settings = {**settings, **{f"data.{k}": v for k, v in anchored["data"].items()}}
        notes += more
    for note in notes:
        print(f"ddcnn: note: {note}", file=sys.stderr)
    axes = data.get("axes") or {}
    if not isinstance(axes, dict):
        raise ConfigError(f"{where}: axes must map config keys to lists of values, e.g. axes: {{model.backbone: "
                          f"[vgg, resnet]}}")
    budgets = parse_budgets(data["budgets"], where) if data.get("budgets") is not None else None
    split_seed = data.get("split_seed")
    if split_seed not in (None, "seed"):
        raise ConfigError(f"{where}: split_seed = {split_seed!r} can only be seed (every run's data split follows its "
                          f"seed); for one split for all runs set data.split_seed under set:")
    if split_seed and ("data.split_seed" in settings or "data.split_seed" in axes):
        raise ConfigError(f"{where}: split_seed: seed sets data.split_seed for every run; remove it from set or axes")
    for key in ("seed", "name"):
        if key in settings or key in axes:
            raise ConfigError(f"{where}: {key!r} cannot be set or be an axis; the study sets it for every run "
                              f"({'list the seeds under seeds:' if key == 'seed' else 'name the study with name:'})")
    runs = len(data.get("seeds") or []) if isinstance(data.get("seeds"), list) else 1
    runs *= len(points(budgets)) if budgets else 1
    for values in axes.values():
        runs *= len(values) if isinstance(values, list) else 1
    if runs > MAX_RUNS:
        raise ConfigError(f"{where}: its axes and seeds make {runs:,} runs, more than {MAX_RUNS:,}; split it into "
                          f"smaller studies or give fewer values")
    base_data["name"] = name
    source = repr(str(path))
    _check(base_data, [], f"{where}: the base config", trusted, source)
    sets = [f"{k}={_yaml_value(v)}" for k, v in settings.items()]
    _check(base_data, sets, f"{where}: set", trusted, source)
    base_data = apply_overrides(base_data, sets)

    clean_axes = {}
    for key, values in axes.items():
        if not isinstance(values, list):
            raise ConfigError(f"{where}: axis {key!r} must be a list of values, e.g. {key}: [{_yaml_value(values)}]")
        if not values:
            raise ConfigError(f"{where}: axis {key!r} has no values, so the study would have no runs; give at least "
                              f"one value or remove the axis")
        texts = [json.dumps(v, sort_keys=True) for v in values]
        if len(set(texts)) != len(texts):
            duplicate = next(t for t in texts if texts.count(t) > 1)
            raise ConfigError(f"{where}: axis {key!r} lists the value {duplicate} twice; give each value once")
        for value in values:
            _check(base_data, [f"{key}={_yaml_value(value)}"], f"{where}: axis {key!r} = {value_text(value)}",
                   trusted, source)
        clean_axes[str(key)] = values

    seeds = data.get("seeds")
    if not isinstance(seeds, list) or not seeds or any(isinstance(s, bool) or not isinstance(s, int) or
                                                       not 0 <= s < 2**63 for s in seeds):
        raise ConfigError(f"{where}: seeds must be a non-empty list of whole numbers from 0 to 2**63 - 1, e.g. "
                          f"seeds: [0, 1, 2, 3, 4], got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        duplicate = next(s for s in seeds if seeds.count(s) > 1)
        raise ConfigError(f"{where}: seed {duplicate} is listed twice; each seed gives one run per cell, list it once")

    study = Study(name, path, base_data, clean_axes, list(seeds), path.read_text(), budgets, split_seed)
    for cell in study.cells():  # combinations of valid values can still clash (a check across sections)
        for point in study.points():
            label = f"cell {cell.label}" + (f", budget {point.id}" if point else "")
            _check(base_data, study.run_overrides(cell, point, seeds[0]), f"{where}: {label}", trusted, source)
    return study


def _check(base: dict, overrides: list[str], where: str, trusted: bool, source: str) -> None:
    """A valid config, with the models' names (an imported backbone is imported, and so checked, when trusted)."""
    try:
        cfg = from_dict(base, overrides)
        check_model_settings(cfg.model, cfg.combiner, trusted, source, builtin_only=builtin_backbone_only(cfg))
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
