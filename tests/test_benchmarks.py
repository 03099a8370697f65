"""benchmarks/train_step.py on tiny CPU configurations: rows, FLOPs column, error rows, presets. No timing asserts."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

import ddcnn

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"
TINY = ["--device", "cpu", "--image-size", "16", "16", "--channels", "1", "--grid", "2", "2", "--width", "4",
        "--depth", "1", "1", "--batch", "8", "--warmup", "1", "--repeats", "2", "--classes", "3"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("ddcnn_bench_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _expected_flops():
    glob = ddcnn.GlobalCNN(1, 3, "vgg", 4, (1, 1), 2)
    expected = {"global": ddcnn.forward_flops(glob, (1, 16, 16))}
    lw = ddcnn.local_width(4, 4)
    for backend in ("grouped", "vmap", "loop"):
        ens = ddcnn.LocalEnsemble(4, 1, 3, "vgg", lw, (1, 1), 2, backend=backend)
        expected[backend] = ddcnn.forward_flops(ens, (4, 1, 8, 8))
    return expected, lw


def test_tiny_cpu_run_has_all_rows_and_the_library_flops(bench, one_thread, tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = bench.main(TINY + ["--json", str(out), "--markdown"])
    printed = capsys.readouterr().out

    assert [r["model"] for r in rows] == ["global", "grouped", "vmap", "loop"]
    expected, lw = _expected_flops()
    for row in rows:
        assert "error" not in row, row
        assert row["img_s"] > 0 and row["ms_step"] > 0
        assert row["fwd_flops"] == expected[row["model"]] > 0
        assert row["train_flops"] == 3 * row["fwd_flops"]
        assert row["bytes_img"] > 0 and row["roofline_img_s"] > 0
        assert row["peak_mem_mib"] is None  # CPU
    assert [r["width"] for r in rows] == [4, lw, lw, lw]
    assert [r["n_local"] for r in rows] == [1, 4, 4, 4]
    assert rows[1]["ratio_loop"] > 0 and rows[2]["ratio_loop"] > 0 and rows[3]["ratio_global"] > 0
    # fp32: 4 bytes per element, 3 passes; the fused, vmapped and loop ensembles move the same activations
    assert rows[0]["bytes_img"] % 12 == 0 and rows[1]["bytes_img"] == rows[2]["bytes_img"] == rows[3]["bytes_img"]

    for model in ("global", "grouped", "vmap", "loop"):
        assert f"| {model} |" in printed
    assert "measured on this CPU" in printed and "command: python benchmarks/train_step.py --device cpu" in printed
    saved = json.loads(out.read_text())
    assert [r["model"] for r in saved["rows"]] == ["global", "grouped", "vmap", "loop"]
    assert saved["header"]["precision"].startswith("fp32")


def test_a_failing_backend_is_a_row_with_its_error(bench, one_thread, monkeypatch, capsys):
    real = bench.build_model

    def broken(kind, cfg):
        if kind == "loop":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(kind, cfg)

    monkeypatch.setattr(bench, "build_model", broken)
    rows = bench.main(TINY + ["--repeats", "1"])
    printed = capsys.readouterr().out
    by_model = {r["model"]: r for r in rows}
    assert by_model["global"]["img_s"] > 0 and by_model["grouped"]["img_s"] > 0
    assert "img_s" not in by_model["loop"] and "simulated" in by_model["loop"]["error"]
    assert "ratio_loop" not in by_model["grouped"]
    assert "simulated" in printed


def test_time_budget_skips_models_and_configurations(bench, capsys):
    rows = bench.main(["--sweep", "cpu", "--time-budget", "0"])
    printed = capsys.readouterr().out
    assert rows == []
    assert f"skipped {len(bench.SWEEPS['cpu']['configs'])} configuration(s)" in printed


@pytest.mark.parametrize("sweep", ["h100", "cpu"])
def test_sweep_presets_are_valid_configurations(bench, sweep, capsys):
    assert bench.main(["--sweep", sweep, "--dry-run"]) == []
    printed = capsys.readouterr().out
    configs = bench.SWEEPS[sweep]["configs"]
    assert printed.count("global, grouped") == len(configs)
    for cfg in configs:
        cfg.validate()
        assert cfg.label in printed
    if sweep == "h100":
        assert "N=64" in printed and printed.count("global, grouped, vmap, loop") == 3  # loop only where N <= 16
        assert all(c.batch in (4096, 512, 64) for c in configs)


EXPORT_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "export_throughput.py"


def test_export_throughput_times_every_form_of_the_same_model(one_thread, capsys):
    """benchmarks/export_throughput.py on a tiny model: a row per grid and layout, every column that can run."""
    spec = importlib.util.spec_from_file_location("ddcnn_bench_export", EXPORT_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--grids", "2x2", "--layouts", "separate", "--image-size", "16", "16", "--width", "4",
                        "--depth", "1", "1", "--classes", "3", "--batch", "4", "--warmup", "0", "--repeats", "1"])
    has_onnx = all(importlib.util.find_spec(m) for m in ("onnxscript", "onnxruntime"))
    assert [(r["grid"], r["layout"]) for r in rows] == [("2x2", "separate")]
    assert rows[0]["eager"] > 0 and rows[0]["pt2"] > 0 and (rows[0]["onnxruntime"] > 0 if has_onnx else
                                                              rows[0]["onnxruntime"] is None)
    assert "| 2x2 | separate |" in capsys.readouterr().out
