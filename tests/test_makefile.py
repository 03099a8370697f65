"""The Makefile's install: torch from the index TORCH_INDEX names (PyTorch's CPU wheels on a machine without a
GPU), with pip's progress shown; checked with `make -n`, which prints the commands and runs none."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _install_commands(tmp_path, *variables) -> list[str]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    done = subprocess.run(["make", "-n", "-B", "-C", str(ROOT), "install", f"VENV={tmp_path / 'venv'}", *variables],
                          capture_output=True, text=True, check=True)
    return [line for line in done.stdout.splitlines() if " -m pip install " in line]


def test_torch_index_points_pip_at_the_cpu_wheels(tmp_path):
    torch_line, ddcnn_line = _install_commands(tmp_path, "TORCH_INDEX=https://download.pytorch.org/whl/cpu")
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_line and "torch==" in torch_line
    assert "--index-url" not in ddcnn_line  # only torch comes from PyTorch's index; the rest from PyPI
    assert all("-q" not in line.split() and "--progress-bar on" in line for line in (torch_line, ddcnn_line))


def test_without_torch_index_torch_comes_from_pypi(tmp_path):
    assert not any("--index-url" in line for line in _install_commands(tmp_path))
