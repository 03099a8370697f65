"""ddcnn.study.stats and the pure parts of ddcnn.study.aggregate, against closed forms, t tables and scipy."""

import math

import pytest

from ddcnn.study.aggregate import CLAIMS, RunData, aggregate, aggregate_cell, claim, learning_curve
from ddcnn.study.stats import Summary, paired_differences, summarize, t_quantile, verdict

# Two-sided 95% points t(0.975, df) from printed Student-t tables (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2).
T_TABLE_975 = {3: 3.182446305, 4: 2.776445105, 9: 2.262157163, 19: 2.093024054, 30: 2.042272456}


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995, 0.25])
def test_t_quantile_matches_the_closed_forms_for_one_and_two_degrees_of_freedom(p):
    # df = 1 is the Cauchy distribution; df = 2 has t = (2p - 1) / sqrt(2 p (1 - p)).
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)


@pytest.mark.parametrize("df,expected", sorted(T_TABLE_975.items()))
def test_t_quantile_matches_the_printed_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=2e-9)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=2e-9)


def test_t_quantile_tends_to_the_normal_quantile():
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959963985, abs=1e-6)


def test_t_quantile_rejects_probabilities_outside_0_1():
    with pytest.raises(ValueError):
        t_quantile(1.0, 4)


def test_the_summary_matches_scipys_interval():
    from scipy import stats

    values = [0.9131, 0.9087, 0.9152, 0.9098, 0.9120]
    low, high = stats.t.interval(0.95, len(values) - 1, loc=stats.tmean(values), scale=stats.sem(values))
    summary = summarize(values)
    assert summary.std == pytest.approx(stats.tstd(values), rel=1e-12)
    assert (summary.ci_low, summary.ci_high) == (pytest.approx(low, rel=1e-12), pytest.approx(high, rel=1e-12))


def test_summary_by_hand():
    s = summarize([0.80, 0.82, 0.84])
    # mean 0.82; deviations -0.02, 0, 0.02 -> s = sqrt(0.0008 / 2) = 0.02; half width t(0.975, 2) * 0.02 / sqrt(3).
    half = 4.302652729911275 * 0.02 / math.sqrt(3)
    assert (s.n, s.mean, s.std) == (3, pytest.approx(0.82), pytest.approx(0.02))
    assert (s.ci_low, s.ci_high) == (pytest.approx(0.82 - half), pytest.approx(0.82 + half))


def test_summary_of_one_or_no_value_has_no_interval():
    assert summarize([0.5]) == Summary(1, 0.5, None, None, None)
    assert summarize([]) == Summary(0, None, None, None, None)


@pytest.mark.parametrize("values,expected", [
    ([0.01, 0.02, 0.015], "holds"), ([-0.01, -0.02, -0.015], "fails"), ([0.03, -0.02, 0.01], "inconclusive"),
    ([0.0, 0.0, 0.0], "inconclusive"), ([0.05], "inconclusive"), ([], "inconclusive"),
])
def test_verdict_from_the_interval(values, expected):
    assert verdict(summarize(values)) == expected


def test_paired_differences_use_only_the_seeds_both_have():
    assert paired_differences({0: 0.9, 1: 0.8, 3: 0.7}, {1: 0.5, 0: 0.6, 2: 0.1}) == \
        {0: pytest.approx(0.3), 1: pytest.approx(0.3)}


def test_a_paired_claim_differs_from_the_unpaired_one():
    # b tracks a seed by seed, 1 point lower: the paired interval is tight although each mean's interval is wide.
    a = {0: 0.80, 1: 0.90, 2: 0.85, 3: 0.95}
    b = {s: v - 0.01 + (0.001 if s % 2 else -0.001) for s, v in a.items()}
    result = claim(a, b)
    assert result["verdict"] == "holds" and result["holds_in"] == 4 and result["n"] == 4
    assert result["mean"] == pytest.approx(0.01)
    assert summarize(list(a.values())).ci_low < summarize(list(b.values())).ci_high  # the means' intervals overlap


def _run(seed, accuracies, curves=()):
    results = {"strategies": {k: {"test_accuracy": v, "train_seconds": 10.0 + seed, "parameters": 100}
                              for k, v in accuracies.items()}, "device": "cpu", "torch_version": "x"}
    return RunData("c", seed, results, list(curves))


def test_aggregate_cell_reads_strategy_names_from_the_results_and_marks_claims_it_cannot_measure():
    runs = [_run(s, {"cnn_dnn": 0.9 + s / 100, "mean_probability": 0.85, "new_rule": 0.5}) for s in range(3)]
    cell = aggregate_cell(runs)
    assert set(cell["strategies"]) == {"cnn_dnn", "mean_probability", "new_rule"}
    assert cell["strategies"]["cnn_dnn"]["accuracy"]["mean"] == pytest.approx(0.91)
    assert cell["strategies"]["cnn_dnn"]["train_seconds"]["mean"] == pytest.approx(11.0)
    assert cell["claims"]["cnn_dnn - mean_probability"]["verdict"] == "holds"
    missing = cell["claims"]["transfer - coherent"]
    assert missing["verdict"] == "not measured" and missing["missing"] == ["transfer", "coherent"]
    assert len(cell["claims"]) == len(CLAIMS)


def test_learning_curve_averages_epochs_and_keeps_the_last_record_of_a_repeated_epoch():
    def record(epoch, value, stage="transfer"):
        return {"stage": stage, "epoch": epoch, "val_accuracy": value}

    runs = [RunData("c", 0, {}, [record(1, 0.5), record(2, 0.1), record(2, 0.7), record(1, 0.9, "coherent")]),
            RunData("c", 1, {}, [record(1, 0.6), record(2, 0.8)])]
    curve = learning_curve(runs, "transfer")
    assert [p["epoch"] for p in curve] == [1, 2]
    assert curve[0]["mean"] == pytest.approx(0.55) and curve[1]["mean"] == pytest.approx(0.75)
    assert curve[1]["n"] == 2 and curve[1]["ci_low"] < 0.75 < curve[1]["ci_high"]


def test_aggregate_reports_each_cells_seed_states():
    cells = [{"id": "c", "label": "c", "values": {}}, {"id": "d", "label": "d", "values": {}}]
    data = aggregate(cells, [_run(0, {"cnn_dnn": 0.9})], {"c": {0: "finished", 1: "failed"}, "d": {0: "new"}})
    assert data["cells"][0]["seeds"] == {"finished": [0], "failed": [1], "interrupted": [], "new": []}
    assert data["cells"][1]["seeds"]["new"] == [0] and data["cells"][1]["strategies"] == {}
    assert data["environment"]["device"] == "cpu"


def test_the_claims_matrix_and_summary_show_every_claim_of_every_cell():
    from ddcnn.study.report import claims_matrix, summary_text

    cells = [{"id": "c", "label": "grid=2x2", "values": {}}, {"id": "b", "label": "grid=4x4", "values": {}}]
    runs = [_run(s, {"cnn_dnn": 0.90 + s / 1000, "mean_probability": 0.88}) for s in range(3)]
    data = {"name": "s", **aggregate(cells, runs, {"c": {s: "finished" for s in range(3)}, "b": {0: "new"}})}
    lines = claims_matrix(data).splitlines()
    assert lines[0] == "| claim | grid=2x2 | grid=4x4 |" and len(lines) == 2 + len(CLAIMS)  # no axes: the labels
    assert lines[2].startswith("| CNN-DNN − mean probability | +2.10 [") and "3/3 **holds** |" in lines[2]
    assert lines[2].endswith("| not measured |") and lines[3].endswith("| not measured | not measured |")
    summary = summary_text(data)
    assert "3 of 4 runs finished, 1 not started" in summary and len(summary.splitlines()) == 3 + 2 * len(CLAIMS)


def test_a_ratio_claim_is_the_t_interval_of_the_log_ratios():
    from ddcnn.study.stats import ratio_summary

    ratios = [0.5, 0.6, 0.55, 0.7]
    logs = summarize([math.log(r) for r in ratios])
    got = ratio_summary(ratios)
    assert got["geometric_mean"] == pytest.approx(math.prod(ratios) ** (1 / 4))
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((math.exp(logs.ci_low), math.exp(logs.ci_high)))
    assert got["verdict"] == "holds" and ratio_summary([2.0, 2.5, 1.8])["verdict"] == "fails"
    assert ratio_summary([0.5, 2.0])["verdict"] == "inconclusive" and ratio_summary([0.5])["verdict"] == "inconclusive"


def test_a_cell_under_early_stopping_is_converged_only_when_every_stage_annealed():
    from ddcnn.study.aggregate import regime

    def run(seed, fraction):
        stage = {"patience": 3, "stop_reason": "patience", "epochs_run": 5, "lr_fraction": fraction}
        return RunData("c", seed, {"strategies": {}, "stages": {"global": stage}})

    assert regime([run(0, 0.05), run(1, 0.1)])["regime"] == "converged"
    assert regime([run(0, 0.05), run(1, 0.5)])["regime"] == "early stopping, not annealed"
    assert regime([run(0, None)])["regime"] == "early stopping, not annealed"  # an earlier ddcnn's: not known
