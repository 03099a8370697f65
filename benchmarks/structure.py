"""Counts of the package's shape, for a source tree given by its ``src`` folder (this checkout's by default, or an
older checkout's to compare):

* **parallelism deciders**: the places outside ``config.py`` (which holds the choice list) that decide how a stage
  uses the processes: calls of the functions ``parallelism(...)``, ``parallel_mode(...)`` or ``choose(...)`` (not
  a method that hands a stage the one choice, ``ctx.parallelism(stage)``), comparisons with one of the names
  ``"single"``, ``"data"``, ``"model"``, ``"spatial"``, and ``isinstance`` tests of a parallel wrapper class; one
  per source line;
* **spatial modules**: the modules outside ``config.py`` that know spatial parallelism (the name ``"spatial"`` as a
  value, but not as a decomposition's ``kind``; an import of a ``spatial`` module, or a name of its API);
* **modules loaded by** ``import ddcnn.export``, and those of them under ``ddcnn.train.engine`` (the training loop,
  or ``ddcnn.train.loop`` in the flat layout);
* **the longest functions** under ``ddcnn/train/``;
* **files to follow the transfer stage to its checkpoint**: ``ddcnn run`` of a tiny generated run (local, combine,
  transfer) under a profiler; the ddcnn source files whose functions are on the stack when the transfer stage
  writes its first checkpoint, or ran inside the transfer stage before that write.

    python benchmarks/structure.py                    # this checkout
    python benchmarks/structure.py --src /tmp/old/src # another checkout (e.g. a git worktree of an older commit)

Prints one markdown table; ``--json`` prints the numbers as JSON.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = {"single", "data", "model", "spatial"}
DECIDERS = {"parallelism", "parallel_mode", "choose"}
WRAPPERS = {"ShardedCNNDNN", "ShardedLocalCNNs", "SpatialCNN", "DistributedDataParallel"}
# The spatial API's names, of this checkout and of older ones (spatial_global: whether the global stage is spatial).
SPATIAL_NAMES = {"SpatialCNN", "SpatialParallel", "slab_rows", "spatial_step_bytes", "spatial_backbone_error",
                 "spatial_global", "Spatial", "HaloConv", "WholeImageBatchNorm", "WholeImageMean", "SPLITS_LAYERS"}


def _modules(src: Path) -> dict[str, Path]:
    root = src / "ddcnn"
    return {".".join(("ddcnn", *p.relative_to(root).with_suffix("").parts)): p for p in sorted(root.rglob("*.py"))}


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def parallelism_deciders(src: Path) -> list[str]:
    """``module:line`` of every place that decides the parallelism (see the module's docstring)."""
    sites = set()
    for module, path in _modules(src).items():
        if module == "ddcnn.config":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            hit = False
            if isinstance(node, ast.Call):
                name = _name(node.func)
                if isinstance(node.func, ast.Name) and name in DECIDERS:
                    hit = True
                elif name == "isinstance" and len(node.args) == 2:
                    kinds = node.args[1]
                    parts = kinds.elts if isinstance(kinds, ast.Tuple) else [kinds]
                    flat = []
                    for part in parts:  # ``A | B`` spelled as a union
                        while isinstance(part, ast.BinOp):
                            flat.append(part.right)
                            part = part.left
                        flat.append(part)
                    hit = any(_name(p) in WRAPPERS for p in flat)
            elif isinstance(node, ast.Compare):
                values = [node.left, *node.comparators]
                for v in values:
                    if isinstance(v, ast.Constant) and v.value in MODES:
                        hit = True
                    if isinstance(v, ast.Tuple) and any(isinstance(e, ast.Constant) and e.value in MODES
                                                        for e in v.elts):
                        hit = True
            if hit:
                sites.add(f"{module}:{node.lineno}")
    return sorted(sites)


def _kinds(tree: ast.AST) -> set[int]:
    """The ids of the constants that stand for a decomposition's ``kind`` (``"spatial"`` or ``"width"``), not a
    parallelism: defaults and values of a parameter, keyword, variable or field named ``kind``/``kinds``, and
    comparisons with one."""
    found: set[int] = set()

    def mark(node: ast.AST | None) -> None:
        if node is not None:
            found.update(id(n) for n in ast.walk(node) if isinstance(n, ast.Constant))

    def kind(node: ast.AST | None) -> bool:
        name = node.arg if isinstance(node, ast.arg | ast.keyword) else _name(node) if node is not None else None
        return name is not None and name.rstrip("s").endswith("kind")

    for node in ast.walk(tree):
        if isinstance(node, ast.arguments):
            positional = node.posonlyargs + node.args
            for arg, default in zip(positional[len(positional) - len(node.defaults):], node.defaults):
                if kind(arg):
                    mark(default)
            for arg, default in zip(node.kwonlyargs, node.kw_defaults):
                if kind(arg):
                    mark(default)
        elif isinstance(node, ast.keyword) and kind(node):
            mark(node.value)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(kind(t) for t in targets):
                mark(node.value)
        elif isinstance(node, ast.Compare) and any(kind(v) for v in [node.left, *node.comparators]):
            mark(node)
    return found


def spatial_modules(src: Path) -> list[str]:
    found = []
    for module, path in _modules(src).items():
        if module == "ddcnn.config":
            continue
        tree = ast.parse(path.read_text())
        kinds = _kinds(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and node.value == "spatial" and id(node) not in kinds) or \
                    (isinstance(node, ast.ImportFrom) and (node.module or "").endswith("spatial")) or \
                    (isinstance(node, ast.alias) and node.name in SPATIAL_NAMES) or \
                    _name(node) in SPATIAL_NAMES:
                found.append(module)
                break
    return found


def longest_functions(src: Path, top: int = 5) -> list[tuple[str, int]]:
    lengths = []
    for module, path in _modules(src).items():
        if not module.startswith("ddcnn.train"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lengths.append((f"{module}.{node.name}", node.end_lineno - node.lineno + 1))
    return sorted(lengths, key=lambda t: -t[1])[:top]


def _python(src: Path, code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout


def export_modules(src: Path) -> dict:
    code = ("import sys, json, ddcnn.export\n"
            "m = sorted(k for k in sys.modules if k == 'ddcnn' or k.startswith('ddcnn.'))\n"
            "print(json.dumps(m))")
    loaded = json.loads(_python(src, code).strip().splitlines()[-1])
    engine = [m for m in loaded if m.startswith("ddcnn.train.engine") or m == "ddcnn.train.loop"]
    return {"loaded": len(loaded), "of": len(_modules(src)), "engine": engine,
            "train": [m for m in loaded if m.startswith("ddcnn.train")]}


_TRACE = r'''
import sys, yaml, torch
from pathlib import Path
torch.set_num_threads(1)
src = Path(sys.argv[1]).resolve()
out = Path(sys.argv[2])
cfg = {"name": "trace", "device": "cpu", "seed": 0,
       "data": {"name": "generated", "image_size": [16, 16], "num_classes": 3, "generated_train": 96,
                "generated_test": 32, "val_fraction": 0.25},
       "decomposition": {"grid": [2, 2]}, "model": {"width": 4, "depth": [1, 1]}, "combiner": {"hidden": [8]},
       "stages": {"global": {"enabled": False}, "coherent": {"enabled": False},
                  "local": {"epochs": 1, "batch_size": 32}, "combine": {"epochs": 1, "batch_size": 32},
                  "transfer": {"epochs": 1, "batch_size": 32}}}
(out / "trace.yaml").write_text(yaml.safe_dump(cfg))
inside, files, stack_files, done = [0], set(), set(), [False]

def mine(code):
    try:
        return Path(code.co_filename).resolve().is_relative_to(src)
    except (OSError, ValueError):
        return False

def profile(frame, event, arg):
    if done[0] or event != "call" or not mine(frame.f_code):
        return
    name = frame.f_code.co_name
    if name == "train_transfer":
        inside[0] = 1
    if inside[0]:
        files.add(frame.f_code.co_filename)
        if name == "save" and frame.f_locals.get("stage") == "transfer":
            f = frame
            while f is not None:
                if mine(f.f_code):
                    stack_files.add(f.f_code.co_filename)
                f = f.f_back
            done[0] = True

from ddcnn.cli import main
sys.setprofile(profile)
main(["run", str(out / "trace.yaml"), "--out", str(out / "run"), "--quiet"])
sys.setprofile(None)
rel = sorted(str(Path(p).resolve().relative_to(src)) for p in files | stack_files)
import json
print(json.dumps(rel))
'''


def transfer_files(src: Path) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", _TRACE, str(src), tmp], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the traced run failed:\n{done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def measure(src: Path) -> dict:
    return {"parallelism_deciders": parallelism_deciders(src), "spatial_modules": spatial_modules(src),
            "export": export_modules(src), "longest_functions": longest_functions(src),
            "transfer_files": transfer_files(src), "train_files": len([m for m in _modules(src)
                                                                        if m.startswith("ddcnn.train.")])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1] / "src")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    m = measure(args.src.resolve())
    if args.json:
        print(json.dumps(m, indent=1))
        return
    deciders = m["parallelism_deciders"]
    files = sorted({d.split(":")[0] for d in deciders})
    longest = ", ".join(f"{name.removeprefix('ddcnn.train.')} {n}" for name, n in m["longest_functions"][:3])
    rows = [
        ("places deciding the parallelism", f"{len(deciders)} in {len(files)} modules"),
        ("modules knowing spatial parallelism (besides config)", str(len(m["spatial_modules"]))),
        ("modules loaded by `import ddcnn.export`", f"{m['export']['loaded']} of {m['export']['of']}"),
        ("... of them in the training engine", str(len(m["export"]["engine"]))),
        ("longest functions in train/ (lines)", longest),
        ("files to follow the transfer stage to its checkpoint", str(len(m["transfer_files"]))),
        ("modules under train/", str(m["train_files"])),
    ]
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
