"""The package's imports go one way: no module reaches itself again through other modules' imports (counting
imports inside functions and under TYPE_CHECKING, the ones a refactor moves to the top). The layers themselves are
import-linter contracts in pyproject.toml, run by ``make lint``."""

from __future__ import annotations

import ast
from pathlib import Path

import ddcnn
from ddcnn.config import STAGES
from ddcnn.train.stages import TRAINERS

SRC = Path(ddcnn.__file__).parent


def _module_name(path: Path, root: Path) -> str:
    parts = ("ddcnn", *path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, every import statement anywhere in the module."""
    modules = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                for alias in node.names:  # `from pkg import module` names a module, `from module import name` not
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_cycle_through_function_level_imports(tmp_path):
    pkg = tmp_path / "ddcnn"
    (pkg / "train").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "train" / "__init__.py").write_text("")
    (pkg / "train" / "a.py").write_text("from ddcnn.train.b import f\n")
    (pkg / "train" / "b.py").write_text("def f():\n    from ddcnn.train import a\n")
    (pkg / "c.py").write_text("from .train import b\n")
    graph = import_graph(pkg)
    assert graph["ddcnn.c"] == {"ddcnn.train.b"}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and sorted(cycle[:-1]) == ["ddcnn.train.a", "ddcnn.train.b"]
    (pkg / "train" / "b.py").write_text("def f():\n    pass\n")
    assert find_cycle(import_graph(pkg)) is None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "ddcnn.train.engine.loop" in graph and graph["ddcnn.train.engine.loop"]  # the graph is read, not empty
    assert find_cycle(graph) is None


def test_every_stage_has_one_trainer_in_the_order_of_the_stages():
    assert tuple(TRAINERS) == STAGES
