"""ddcnn.models.settings: the model checks that need the models' names, and the gate in front of imported code."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from ddcnn.config import from_dict
from ddcnn.errors import ConfigError
from ddcnn.models.settings import check_model_settings


def _check(data: dict, trusted: bool = True, source: str = "the config") -> None:
    cfg = from_dict(data)
    check_model_settings(cfg.model, cfg.combiner, trusted, source)


@pytest.mark.parametrize("data, fragment", [
    ({"model": {"backbone": "resnet50"}}, "did you mean 'resnet'"),
    ({"model": {"backend": "vmapp"}}, "model.backend = 'vmapp' is not valid"),
    ({"combiner": {"activation": "relu6"}}, "combiner.activation = 'relu6' is not valid"),
    ({"model": {"backbone_kwargs": {"a": 1}}}, "apply to imported backbones only"),
    ({"model": {"backbone": "torch.nn.Conv2e", "backend": "vmap", "depth": None}}, "has no attribute 'Conv2e'"),
])
def test_bad_model_settings_name_the_key_and_the_fix(data, fragment):
    from_dict(data)  # the config layer alone accepts them: it imports nothing
    with pytest.raises(ConfigError, match=fragment):
        _check(data)


def test_the_config_layer_imports_nothing_from_the_models():
    source = Path(__file__).parents[1] / "src" / "ddcnn" / "config.py"
    imported = [n.module for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.Import)
                 for a in n.names]
    assert not [m for m in imported if m and m.startswith("ddcnn.models")]


def test_an_untrusted_import_path_is_refused_before_its_module_is_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "evil_net.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef Net(**kw): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = {"model": {"backbone": "evil_net:Net", "backend": "vmap", "depth": None}}
    with pytest.raises(ConfigError, match="'runs/x/config.yaml' names the backbone 'evil_net:Net'.*--trust-code"):
        _check(data, trusted=False, source="'runs/x/config.yaml'")
    assert not marker.exists() and "evil_net" not in sys.modules
    _check(data, trusted=True)  # trusted: imported (and checked)
    assert marker.exists()
    sys.modules.pop("evil_net", None)


def test_a_backbone_module_that_calls_sys_exit_at_import(tmp_path, monkeypatch):
    (tmp_path / "exiting_net.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="importing 'exiting_net' failed with SystemExit"):
        _check({"model": {"backbone": "exiting_net:Net", "backend": "vmap", "depth": None}})
