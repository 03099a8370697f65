"""docs/options.md lists every config key with the default the code has, and no key the code lacks."""

import dataclasses
import re
from pathlib import Path

from ddcnn.config import Config, StageConfig

DOC = Path(__file__).parents[1] / "docs" / "options.md"


def _keys(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), f.name.rstrip("_")
        if isinstance(value, StageConfig):
            continue  # listed once, as stages.*.KEY
        if dataclasses.is_dataclass(value):
            yield from _keys(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


def test_every_key_is_listed_with_its_default():
    rows = dict(re.findall(r"^\| `([\w.*]+)` \| `(.*?)` \|", DOC.read_text(), re.M))
    code = dict(_keys(Config()))
    code.update({f"stages.*.{k}": v for k, v in _keys(StageConfig())})
    assert set(rows) == set(code)
    assert {k: rows[k] for k in code} == {k: repr(v) for k, v in code.items()}
