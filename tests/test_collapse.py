"""report/collapse.py: the report warns of a strategy that predicts one class for almost every test item."""

from ddcnn.report import write_report
from ddcnn.report.collapse import COLLAPSE, collapse_warnings, collapsed


def test_one_class_for_almost_every_item_is_a_collapse():
    assert collapsed([96, 4]) == (0, 0.96) and collapsed([2, 98, 0]) == (1, 0.98)
    assert collapsed([90, 10]) is None and collapsed([0, 0]) is None and collapsed([]) is None
    assert collapsed([round(100 * COLLAPSE), 100 - round(100 * COLLAPSE)]) is not None


def test_the_report_names_each_collapsed_strategy_and_its_class(tmp_path, capsys):
    results = {"classes": ["normal", "abnormal"], "best_strategy": "global", "strategies": {
        "global": {"test_accuracy": 0.7, "test_predicted": [0, 30]},
        "cnn_dnn": {"test_accuracy": 0.8, "test_predicted": [12, 18]}}}
    assert [line.split(" predicts")[0] for line in collapse_warnings(results)] == ["global"]
    report = write_report(tmp_path, results, []).read_text()
    assert "**Warning:** global predicts class 'abnormal' for 100 % of the test items" in report
    assert "cnn_dnn predicts" not in report
    assert "global predicts class 'abnormal'" in capsys.readouterr().err
