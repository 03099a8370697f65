"""A study's claims on evaluation.metric, its metrics beyond accuracy, its clipped intervals, and its base.yaml's
data.root relative to the file that names it."""

import pytest
import yaml

from conftest import tiny_dict
from ddcnn.study.aggregate import RunData, aggregate_cell
from ddcnn.study.report import metrics_table, strategies_table
from ddcnn.study.spec import load_study


def _run(seed: int, metric: str, values: dict) -> RunData:
    """A finished run whose strategies have the test accuracy and balanced accuracy of ``values``."""
    strategies = {name: {"test_accuracy": acc, "train_seconds": 1.0, "parameters": 10,
                         "test_metrics": {"balanced_accuracy": bal, "macro_f1": bal, "roc_auc": None}}
                  for name, (acc, bal) in values.items()}
    return RunData("c", seed, {"strategies": strategies, "evaluation_metric": metric})


def test_the_claims_compare_the_metric_evaluation_metric_names():
    # transfer is ahead in accuracy but behind in balanced accuracy, in every seed
    values = [{"transfer": (0.9, 0.5 + s / 100), "global": (0.8, 0.7 + s / 50)} for s in range(3)]
    by_accuracy = aggregate_cell([_run(s, "accuracy", v) for s, v in enumerate(values)])
    by_balanced = aggregate_cell([_run(s, "balanced_accuracy", v) for s, v in enumerate(values)])
    assert by_accuracy["claims"]["transfer - global"]["mean"] == pytest.approx(0.1)
    assert by_balanced["claims_metric"] == "balanced_accuracy"
    assert by_balanced["claims"]["transfer - global"]["mean"] == pytest.approx(-0.2 - 0.01)
    assert by_balanced["strategies"]["global"]["metrics"]["balanced_accuracy"]["mean"] == pytest.approx(0.72)
    assert "—" in metrics_table({"cells": [{"label": "c", **by_balanced}]})  # no ROC AUC: a dash, not a number


def test_the_strategy_table_clips_intervals_to_0_100():
    summary = {"mean": 0.6, "std": 0.5, "ci_low": -0.4, "ci_high": 1.3, "n": 2}
    cell = {"label": "a=1", "strategies": {"global": {"accuracy": summary, "train_seconds": summary,
                                                      "parameters": 5}}}
    row = strategies_table({"cells": [cell]}).splitlines()[-1]
    assert "[0.00, 100.00]" in row and "-40" not in row and "130" not in row


def test_base_yaml_records_data_root_relative_to_the_base_file(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "studies").mkdir()
    base = tiny_dict(2)
    base["data"]["root"] = "../data"
    (tmp_path / "configs" / "b.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "studies" / "s.yaml").write_text(yaml.safe_dump({"base": "../configs/b.yaml", "seeds": [0]}))
    monkeypatch.chdir("/")
    study = load_study(tmp_path / "studies" / "s.yaml")
    assert study.base["data"]["root"] == str(tmp_path / "data")
    assert study.base["data"]["root_as_written"].startswith("../data (in ")
