import re

import numpy as np
import pytest
import torch

from ddcnn import Decomposition
from ddcnn.errors import ShapeError
from ddcnn.report import (
    format_table,
    plot_confusion_matrix,
    plot_decomposition,
    plot_learning_curves,
    plot_subdomain_heatmap,
    results_table,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ALL_LABELS = ["global CNN", "CNN-DNN", "mean probability", "majority vote", "coherent CNN-DNN", "transfer CNN-DNN"]


def assert_png(path):
    assert path.exists(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 2000, (path, len(data))


def strategy(acc, seconds, params, flops):
    return {"test_accuracy": acc, "train_seconds": seconds, "parameters": params, "flops_per_image": flops}


def full_results(classes=3):
    # Deliberately inserted out of the display order, to check that the table reorders them.
    strategies = {
        "transfer": strategy(0.93456, 45.26, 2_000_000, 3_000_000),
        "majority_vote": strategy(0.80004, 30.0, 400_000, 2_000_000),
        "global": strategy(0.91234, 120.04, 1_234_567, 12_345_678),
        "coherent": strategy(0.9, 60.0, 410_000, 2_100_000),
        "cnn_dnn": strategy(0.92, 35.5, 410_000, 2_100_000),
        "mean_probability": strategy(0.85, 30.0, 400_000, 2_000_000),
    }
    return {
        "dataset": "synthetic",
        "image_size": [12, 12],
        "grid": [2, 2],
        "overlap": [0, 0],
        "subimage_size": [6, 6],
        "num_classes": classes,
        "classes": [f"class {i}" for i in range(classes)],
        "backbone": "vgg",
        "global_width": 8,
        "local_width": 4,
        "device": "cpu",
        "device_name": "test cpu",
        "torch_version": torch.__version__,
        "ddcnn_version": "0.1.0",
        "command": "ddcnn run --config test.yaml",
        "strategies": strategies,
        "local": {
            "test_accuracy": [0.5, 0.75, 0.625, 0.875],
            "val_accuracy": [0.55, 0.7, 0.6, 0.8],
            "measured_seconds": 30.0,
            "critical_path_seconds": 9.5,
            "critical_path_note": "estimated: slowest local CNN timed alone",
        },
        "stage_seconds": {"global": 120.0, "local": 30.0, "combine": 5.5, "coherent": 60.0, "transfer": 10.0},
        "best_strategy": "transfer",
        "confusion_matrix": {"strategy": "transfer", "matrix": [[5, 1, 0], [2, 7, 1], [0, 0, 9]]},
    }


def stage_records(stage, epochs, n_sub=None):
    records = []
    for e in range(1, epochs + 1):
        r = {
            "stage": stage, "epoch": e, "train_loss": 2.0 / e, "train_accuracy": 0.5 + 0.1 * e,
            "val_loss": 2.1 / e, "val_accuracy": 0.45 + 0.1 * e, "lr": 0.01, "seconds": 3.0 * e,
        }
        if n_sub:
            r["val_accuracy_per_subdomain"] = [0.4 + 0.05 * (e + i) for i in range(n_sub)]
        records.append(r)
    return records


def all_metrics():
    return (
        stage_records("global", 3) + stage_records("local", 3, n_sub=4) + stage_records("combine", 2)
        + stage_records("coherent", 2) + stage_records("transfer", 2)
    )


def table_rows(markdown):
    return [line for line in markdown.splitlines() if line.startswith("|")][2:]


# ------------------------------------------------------------------------------------------------------ tables


def test_results_table_rows_in_fixed_order_with_formatted_numbers():
    table = results_table(full_results())
    rows = table_rows(table)
    labels = [row.split("|")[1].strip() for row in rows]
    assert labels == ALL_LABELS
    cells = [c.strip() for c in rows[0].split("|")[1:-1]]
    assert cells == ["global CNN", "—", "91.23", "120.0", "1,234,567", "12.35"]
    transfer = [c.strip() for c in rows[-1].split("|")[1:-1]]
    assert transfer == ["transfer CNN-DNN", "—", "93.46", "45.3", "2,000,000", "3.00"]
    assert [c.strip() for c in rows[3].split("|")[1:-1]][2] == "80.00"
    # header + alignment row, every line a table line
    assert all(line.startswith("|") and line.endswith("|") for line in table.splitlines())


def test_results_table_skips_absent_strategies_and_missing_numbers():
    results = {"strategies": {"majority_vote": strategy(0.5, None, 10, None), "global": strategy(0.25, 1.0, 5, 2e6)}}
    rows = table_rows(results_table(results))
    assert [row.split("|")[1].strip() for row in rows] == ["global CNN", "majority vote"]
    vote = [c.strip() for c in rows[1].split("|")[1:-1]]
    assert vote[2] == "50.00" and vote[4] == "10"
    assert not re.search(r"\d", vote[1] + vote[3] + vote[5])  # missing values, no made-up number
    assert table_rows(results_table({})) == []


def test_format_table_aligned_plain_text():
    text = format_table(full_results())
    lines = text.splitlines()
    assert "|" not in text
    body = lines[2:]
    assert [line[: len(label)] for line, label in zip(body, ALL_LABELS)] == ALL_LABELS
    assert "91.23" in body[0] and "1,234,567" in body[0] and "12.35" in body[0]
    # Right-aligned numeric columns: the accuracies end at the same column.
    ends = {line.index(acc) + len(acc) for line, acc in zip(body, ["91.23", "92.00", "85.00", "80.00", "90.00"])}
    assert len(ends) == 1
    only_global = format_table({"strategies": {"global": strategy(0.5, 2.0, 3, 4e6)}}).splitlines()
    assert len(only_global) == 3 and only_global[2].startswith("global CNN")


# ------------------------------------------------------------------------------------------------------- plots


def test_learning_curves_png(tmp_path):
    path = plot_learning_curves(all_metrics(), tmp_path / "sub" / "curves.png")
    assert path == tmp_path / "sub" / "curves.png"
    assert_png(path)
    # val values may be missing (None) and a single stage is fine
    records = stage_records("global", 2)
    records[0]["val_loss"] = records[0]["val_accuracy"] = None
    assert_png(plot_learning_curves(records, tmp_path / "one.png"))
    assert_png(plot_learning_curves([], tmp_path / "empty.png"))


def test_heatmap_2d_and_3d_with_overlap(tmp_path):
    d2 = Decomposition((12, 12), (2, 3), overlap=2)
    assert_png(plot_subdomain_heatmap(torch.linspace(0.2, 0.9, d2.n_subdomains), d2, tmp_path / "h2.png"))
    d3 = Decomposition((8, 8, 8), (2, 2, 2), overlap=(2, 0, 1))
    path = plot_subdomain_heatmap([0.1 * i for i in range(8)], d3, tmp_path / "h3.png", title="3D")
    assert_png(path)
    with pytest.raises(ShapeError):
        plot_subdomain_heatmap([0.5, 0.5], d2, tmp_path / "bad.png")


def test_decomposition_plot_2d_grey_rgb_and_3d(tmp_path):
    d2 = Decomposition((16, 20), (2, 3), overlap=2)
    assert_png(plot_decomposition(torch.randn(1, 16, 20) * 50 + 7, d2, tmp_path / "grey.png"))
    assert_png(plot_decomposition(np.random.default_rng(0).uniform(-3, 3, (3, 16, 20)), d2, tmp_path / "rgb.png"))
    d3 = Decomposition((8, 10, 10), (2, 2, 2), overlap=1)
    assert_png(plot_decomposition(torch.rand(1, 8, 10, 10), d3, tmp_path / "vol.png"))
    assert_png(plot_decomposition(torch.zeros(1, 16, 20), d2, tmp_path / "flat.png"))  # constant image
    with pytest.raises(ShapeError):
        plot_decomposition(torch.rand(1, 10, 10), d2, tmp_path / "bad.png")


def test_confusion_matrix_png(tmp_path):
    matrix = torch.tensor([[5, 1, 0], [0, 0, 0], [2, 0, 9]])  # a class never seen: its row stays empty
    assert_png(plot_confusion_matrix(matrix, ["a", "bb", "a long class name"], tmp_path / "cm.png", title="t"))
    with pytest.raises(ShapeError):
        plot_confusion_matrix([[1, 2]], ["a"], tmp_path / "bad.png")
    with pytest.raises(ShapeError):
        plot_confusion_matrix(matrix, ["a", "b"], tmp_path / "bad.png")


# ------------------------------------------------------------------------------------------------------ report


def _links(markdown):
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def test_write_report_full_run(tmp_path):
    results = full_results()
    decomposition = Decomposition(results["image_size"], results["grid"], results["overlap"])
    report = write_report(tmp_path, results, all_metrics(), decomposition, sample_image=torch.rand(1, 12, 12))
    assert report == tmp_path / "report.md"
    text = report.read_text()

    for name in ("learning_curves", "local_accuracy", "decomposition", "confusion_matrix"):
        assert_png(tmp_path / "plots" / f"{name}.png")
    links = _links(text)
    assert sorted(links) == sorted(f"plots/{n}.png" for n in
                                   ("learning_curves", "local_accuracy", "decomposition", "confusion_matrix"))
    assert all((tmp_path / link).exists() for link in links)

    assert "synthetic" in text and "2×2" in text
    assert torch.__version__ in text and "0.1.0" in text and "ddcnn run --config test.yaml" in text
    assert results_table(results) in text
    # Both local timings, the critical path flagged as an estimate for one device per local CNN.
    lowered = text.lower()
    assert "critical path" in lowered and "estimate" in lowered and "own device" in lowered
    assert "30.0" in text and "9.5" in text and "slowest local CNN timed alone" in text
    # Per-subdomain accuracies: min / mean / max of the inputs, and each value.
    assert "50.00" in text and "68.75" in text and "87.50" in text
    for acc in ("75.00", "62.50", "55.00", "80.00"):
        assert acc in text
    assert re.search(r"best strategy.*transfer CNN-DNN.*93\.46", text, flags=re.IGNORECASE)


def test_write_report_only_global(tmp_path):
    results = {
        "dataset": "tiny",
        "image_size": [8, 8],
        "grid": [2, 2],
        "overlap": [0, 0],
        "device": "cpu",
        "torch_version": "2.x",
        "ddcnn_version": "0.1.0",
        "command": "ddcnn run `weird` | args",
        "strategies": {"global": strategy(0.5, 1.0, 100, 1000)},
        "stage_seconds": {"global": 1.0},
        "best_strategy": "global",
    }
    report = write_report(tmp_path, results, stage_records("global", 2), decomposition=None)
    text = report.read_text()
    assert_png(tmp_path / "plots" / "learning_curves.png")
    for name in ("local_accuracy", "decomposition", "confusion_matrix"):
        assert not (tmp_path / "plots" / f"{name}.png").exists()
    assert _links(text) == ["plots/learning_curves.png"]
    rows = table_rows(results_table(results))
    assert len(rows) == 1 and "global CNN" in rows[0]
    for absent in ALL_LABELS[1:]:
        assert f"| {absent} |" not in text
    assert "weird" in text


def test_write_report_3d_and_nearly_empty(tmp_path):
    decomposition = Decomposition((6, 8, 8), (2, 2, 1), overlap=(1, 0, 0))
    results = {
        "strategies": {"cnn_dnn": strategy(0.7, 3.0, 50, 500)},
        "local": {"test_accuracy": [0.6, 0.7, 0.8, 0.9], "measured_seconds": 2.0, "critical_path_seconds": 0.5},
    }
    report = write_report(tmp_path / "run", results, [], decomposition, sample_image=torch.rand(2, 6, 8, 8))
    assert_png(tmp_path / "run" / "plots" / "local_accuracy.png")
    assert_png(tmp_path / "run" / "plots" / "decomposition.png")
    text = report.read_text()
    assert "critical path" in text.lower()
    assert all((tmp_path / "run" / link).exists() for link in _links(text))

    empty = write_report(tmp_path / "empty", {}, [])
    assert empty.exists() and _links(empty.read_text()) == []


def test_learning_curves_fit_a_page_and_every_legend_entry_has_its_line(tmp_path):
    from PIL import Image

    from ddcnn.report.plots import learning_curves_figure

    fig = learning_curves_figure(all_metrics())  # five stages, the local one with per-subdomain curves
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["train", "validation",
                                                         "validation, each subdomain (local CNNs)"]
    for line in legend.legend_handles:
        assert line.get_visible() and line.get_linewidth() >= 1 and (line.get_alpha() or 1) >= 0.5
    with Image.open(plot_learning_curves(all_metrics(), tmp_path / "c.png")) as image:
        assert image.width <= 1200  # three stages side by side at most: the text is not shrunk to a strip
    one = learning_curves_figure(stage_records("global", 1))  # one epoch: an integer tick, no 0.5 steps
    ticks = one.axes[0].get_xticks()
    assert list(ticks[(ticks >= 0.5) & (ticks <= 1.5)]) == [1.0]
    assert [t.get_text() for t in one.legends[0].get_texts()] == ["train", "validation"]


def test_the_heat_map_colour_scale_spans_0_to_100_percent():
    from ddcnn.report.plots import colour_range

    near_chance = np.array([9.6, 12.4, 11.0, 10.0])
    assert colour_range(near_chance, (0.0, 100.0)) == (0.0, 100.0)
    assert colour_range(np.array([-5.0, 50.0]), (0.0, 100.0)) == (-5.0, 100.0)  # values outside widen it
    assert colour_range(near_chance, None) == (9.6, 12.4)
    assert colour_range(np.array([np.nan, 3.0]), None) == (2.0, 4.0)


def test_the_report_says_how_each_stage_used_the_processes(tmp_path):
    results = {"dataset": "tiny", "strategies": {"global": strategy(0.5, 1.0, 100, 1000)}, "best_strategy": "global",
               "stages": {"local": {"parallelism": "shards", "processes": 2},
                          "global": {"parallelism": "spatial", "processes": 2},
                          "combine": {"parallelism": "single", "processes": 1}}}
    text = write_report(tmp_path, results, [], decomposition=None).read_text()
    line = next(line for line in text.splitlines() if "Processes:" in line)
    # In stage order, whatever the order in results.json.
    assert line.index("global CNN spatial (2)") < line.index("local CNNs shards (2)") < line.index("single (1)")
    no_record = write_report(tmp_path / "old", {**results, "stages": {"global": {}}}, [], decomposition=None)
    assert "Processes:" not in no_record.read_text()  # a results.json of an earlier ddcnn has no such record
