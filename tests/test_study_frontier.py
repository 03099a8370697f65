"""Budget studies: the budgets: syntax and its points, split_seed: seed, the planned producers of shared stages,
and the frontier's claims (ddcnn.study.budgets, ddcnn.study.sharing, ddcnn.study.frontier); packed predictions."""

import numpy as np
import pytest
import yaml

from conftest import tiny_dict
from ddcnn.cli import main
from ddcnn.errors import ConfigError
from ddcnn.predicted import pack_classes, unpack_classes
from ddcnn.study.aggregate import RunData
from ddcnn.study.budgets import extends_budgets, parse_budgets, points
from ddcnn.study.frontier import bootstrap_difference, compare, frontier, non_inferiority
from ddcnn.study.runner import StudyDir, extends
from ddcnn.study.sharing import producers
from ddcnn.study.spec import load_study

BUDGETS = {"global": [6, 3], "local": [3, 6], "transfer": [2, 4], "coherent": [6]}


def write(tmp_path, **changes):
    study = {"name": "s", "base": tiny_dict(2), "axes": {"decomposition.grid": [[2, 2], [4, 4]]}, "seeds": [0, 1],
             "budgets": BUDGETS, "split_seed": "seed", **changes}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_budgets_are_runs_of_their_strategys_stages_each_annealed_at_its_own_epochs():
    pts = points(parse_budgets(BUDGETS, "study"))
    assert [p.id for p in pts] == ["global-3", "global-6", "local-3_transfer-2", "local-3_transfer-4",
                                   "local-6_transfer-2", "local-6_transfer-4", "coherent-6"]
    sets = pts[3].overrides()
    assert "stages.global.enabled=false" in sets and "stages.combine.enabled=true" in sets
    assert {"stages.local.epochs=3", "stages.transfer.epochs=4", "stages.transfer.patience=null",
            "stages.local.keep=last"} <= set(sets)
    assert [p.id for p in points({"local": [2]})] == ["local-2"]


@pytest.mark.parametrize("budgets, message", [
    ({"combine": [3]}, "budgets.combine is not a budgeted strategy"),
    ({"global": [0]}, r"budgets.global = \[0\] must be a non-empty list"),
    ({"global": [3, 3]}, "budgets.global lists 3 twice"),
    ({"transfer": [2]}, "budgets.transfer needs budgets.local"),
    ([3, 6], "budgets must map strategies"),
])
def test_bad_budgets_are_one_error_naming_the_value(budgets, message):
    with pytest.raises(ConfigError, match=message):
        parse_budgets(budgets, "study")


def test_each_run_gets_its_budget_its_seed_and_its_split(tmp_path):
    study = load_study(write(tmp_path))
    plan = StudyDir(study, tmp_path / "out").plan()
    assert len(plan) == 2 * 2 * 7
    run = next(r for r in plan if r.name == "grid-4x4/local-6_transfer-2/seed-1")
    assert run.out == tmp_path / "out/runs/grid-4x4/local-6_transfer-2/seed-1"
    assert {"seed=1", "data.split_seed=1", "decomposition.grid=[4, 4]", "stages.local.epochs=6"} <= set(run.overrides)
    with pytest.raises(ConfigError, match="split_seed = 'yes' can only be seed"):
        load_study(write(tmp_path, split_seed="yes"))


def test_the_first_run_of_a_stage_produces_it_for_the_later_ones(tmp_path):
    study = load_study(write(tmp_path))
    plan = StudyDir(study, tmp_path / "out").plan()
    deps = producers(study, plan)
    # the global CNN of the 4x4 grid is the 2x2 grid's; local 3 + DNN are shared by transfer 2 and 4
    assert deps["grid-4x4/global-3/seed-0"] == {"grid-2x2/global-3/seed-0"}
    assert deps["grid-2x2/local-3_transfer-4/seed-0"] == {"grid-2x2/local-3_transfer-2/seed-0"}
    assert deps["grid-2x2/local-6_transfer-2/seed-0"] == set()  # another local budget: nothing shared
    assert deps["grid-2x2/global-3/seed-1"] == set()  # another seed (and split): nothing shared


def test_a_study_extends_by_more_budgets_but_not_by_fewer(tmp_path):
    old = load_study(write(tmp_path))
    more = load_study(write(tmp_path, budgets={**BUDGETS, "global": [3, 6, 12]}))
    assert extends(old.spec, more) and not extends(more.spec, old)
    assert extends_budgets(None, None) and not extends_budgets(None, BUDGETS)


def test_print_commands_give_each_run_the_studys_stage_store(tmp_path, capsys):
    assert main(["study", str(write(tmp_path)), "--out", str(tmp_path / "out"), "--print-commands"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 28 and all(f"--stage-store {tmp_path / 'out' / 'stages'}" in line for line in lines)


def run_data(seed, point, accuracies, val, predictions=None, flops=None):
    """A finished run's results as the frontier reads them: strategy -> (epochs, test accuracy)."""
    strategies = {}
    for name, (epochs, acc) in accuracies.items():
        strategies[name] = {"test_accuracy": acc, "val_accuracy": val.get(name, acc),
                            "cost": {"epochs": epochs, "train_flops": (flops or {}).get(name, sum(epochs.values())),
                                     "seconds": 1.0}}
    return RunData("c", seed, {"strategies": strategies, "test_predictions": predictions or {},
                               "stages": {s: {"lr_fraction": 0.001} for e, _ in accuracies.values() for s in e}})


def test_points_of_shared_stages_are_one_point_and_claims_pair_only_what_shares_local_cnns():
    runs = []
    for seed, shift in enumerate([0.0, 0.01, -0.01, 0.02]):
        runs.append(run_data(seed, "global-3", {"global": ({"global": 3}, 0.80 + shift)}, {}))
        runs.append(run_data(seed, "global-6", {"global": ({"global": 6}, 0.85 + shift)}, {}))
        for transfer in (2, 4):  # the CNN-DNN of local 3 appears in both runs: one point
            runs.append(run_data(seed, f"local-3_transfer-{transfer}", {
                "cnn_dnn": ({"local": 3, "combine": 1}, 0.82 + shift),
                "transfer": ({"local": 3, "combine": 1, "transfer": transfer}, 0.83 + transfer / 100 + shift)}, {}))
    out = frontier(runs, None, target_margin=0.005)
    assert [p["label"] for p in out["points"]["cnn_dnn"]] == ["local 3 + combine 1"]
    assert [p["train_flops"] for p in out["points"]["transfer"]] == [6, 8]
    top = {c["a"]: c for c in out["non_inferiority"]}
    assert not top["transfer"]["paired"] and top["transfer"]["b_label"] == "global 6"
    assert top["transfer"]["mean"] == pytest.approx(0.02)  # 0.87 - 0.85, the seeds' shifts cancel in the means
    assert top["transfer"]["verdict"] == "holds"
    paired = compare(out_point(runs, "transfer", 8), out_point(runs, "cnn_dnn", 4), None)
    assert paired["paired"] and paired["ci_low"] == pytest.approx(0.05) == paired["ci_high"]
    (beats,) = out["beats"]  # transfer beats the CNN-DNN of its own local CNNs: paired, +5 points in every seed
    assert (beats["a"], beats["b"], beats["paired"], beats["verdict"]) == ("transfer", "cnn_dnn", True, "holds")
    # the target: median over seeds of the top global's validation accuracy, minus the margin
    assert out["target"]["val_accuracy"] == pytest.approx(np.median([0.85, 0.86, 0.84, 0.87]) - 0.005)
    assert out["time_to_target"]["global"]["median_flops"] == 6
    equal = [c for c in out["equal_cost"] if c["budget"] == "global 3"]
    assert equal == []  # nothing decomposed costs 3 or less here


def out_point(runs, name, flops):
    from ddcnn.study.frontier import collect_points

    return next(p for p in collect_points(runs)[name] if p["train_flops"] == flops)


def test_non_inferiority_reads_the_interval_against_the_margin():
    assert non_inferiority({"ci_low": -0.005, "ci_high": 0.01}) == "holds"
    assert non_inferiority({"ci_low": -0.03, "ci_high": -0.015}) == "fails"
    assert non_inferiority({"ci_low": -0.02, "ci_high": 0.01}) == "inconclusive"
    assert non_inferiority({"ci_low": None}) == "inconclusive"


def test_the_bootstrap_over_seeds_and_images_brackets_the_observed_difference():
    rng = np.random.default_rng(1)
    a = {s: rng.random(2000) < 0.9 for s in range(5)}
    b = {s: rng.random(2000) < 0.85 for s in range(5)}
    observed = np.mean([a[s].mean() for s in a]) - np.mean([b[s].mean() for s in b])
    boot = bootstrap_difference(a, b, paired=False, replicates=500)
    assert boot["ci_low"] < observed < boot["ci_high"] and boot["ci_high"] - boot["ci_low"] < 0.05
    same = bootstrap_difference(a, a, paired=True, replicates=200)
    assert same["ci_low"] == same["ci_high"] == 0.0  # paired with itself: every replicate's difference is 0


@pytest.mark.parametrize("classes", [[3, 0, 9, 9, 1], list(range(300)), []])
def test_packed_predictions_round_trip(classes):
    assert unpack_classes(pack_classes(classes)) == classes


@pytest.mark.parametrize("text", ["u3:abc", "u1:not base64!", "u2:" + pack_classes([1, 2, 3])[3:]])
def test_damaged_packed_predictions_are_a_value_error(text):
    with pytest.raises(ValueError, match="packed classes"):
        unpack_classes(text)


def test_the_timing_pass_times_every_stage_of_the_budgets_and_prices_each_point(tmp_path, one_thread):
    from ddcnn.study.timing import point_seconds, time_study

    timing = time_study(load_study(write(tmp_path)), repeats=2, steps=1, echo=lambda line: None)
    assert {(r["cell"], r["stage"]) for r in timing["stages"]} == {
        (cell, stage) for cell in ("grid-2x2", "grid-4x4")
        for stage in ("global", "local", "local_critical_path", "combine", "cnn_dnn")}
    for row in timing["stages"]:
        step = row["step_seconds"]
        assert len(step["all"]) == 2 and step["min"] <= step["median"] <= step["max"]
        assert row["steps_per_epoch"] == 4  # 128 training images (160, a fifth for validation) in batches of 32
    table = {r["stage"]: r["epoch_seconds"] for r in timing["stages"] if r["cell"] == "grid-2x2"}
    priced = point_seconds(timing, "grid-2x2", {"local": 3, "combine": 10, "transfer": 2})
    assert priced["seconds"] == pytest.approx(3 * table["local"] + 10 * table["combine"] + 2 * table["cnn_dnn"])
    assert priced["critical_path_seconds"] == pytest.approx(
        3 * table["local_critical_path"] + 10 * table["combine"] + 2 * table["cnn_dnn"])
    assert point_seconds(timing, "grid-3x3", {"global": 1}) is None


def test_the_timing_pass_of_a_study_without_budgets_or_runs_is_one_error_that_writes_nothing(tmp_path, capsys):
    for changes in ({"budgets": None}, {}):
        path = write(tmp_path, **changes)
        assert main(["study", str(path), "--out", str(tmp_path / "out"), "--time"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--time:" in err[0] and "holds no budget study yet" in err[0]
        assert not (tmp_path / "out").exists()
