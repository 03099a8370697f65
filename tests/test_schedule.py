"""ddcnn.train.schedule: reduce on plateau before early stopping, the learning rate at the kept epoch, and the
stop labels: no stage is "converged" unless its learning rate had fallen to a tenth of its peak or less."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import tiny_dict
from ddcnn.config import StageConfig, from_dict
from ddcnn.errors import ConfigError
from ddcnn.train.engine.state import StageState, early_stopping
from ddcnn.train.protocol import Experiment
from ddcnn.train.schedule import CONVERGED, converged, lr_fraction, reduce_on_plateau, stop_text
from ddcnn.train.store.metrics import end_line


def flat(epochs: int, cfg: StageConfig) -> dict:
    """Early stopping's state after ``epochs`` epochs whose validation accuracy never improves on the first."""
    state = StageState.new(cfg)
    stopped_at = None
    for epoch in range(1, epochs + 1):
        early_stopping(state, {"epoch": epoch, "val_accuracy": 0.5}, cfg)
        if state.stop_reason:
            stopped_at = epoch
            break
    return {"stop_reason": state.stop_reason, "lr_scale": state.lr_scale, "stopped_at": stopped_at}


def test_plateau_lowers_the_rate_before_patience_may_stop_the_stage():
    cfg = StageConfig(epochs=50, schedule="plateau", patience=2, plateau_factor=0.5, plateau_floor=0.2)
    state = flat(50, cfg)
    # epoch 1 is the best; every 2 epochs without improvement: 0.5 (epoch 3), 0.25 (5), 0.2, the floor (7); 2 more
    # at the floor: stop (9)
    assert state["stop_reason"] == "patience" and state["stopped_at"] == 9
    assert state["lr_scale"] == pytest.approx(0.2)


def test_without_plateau_patience_stops_at_whatever_rate_the_schedule_has():
    state = flat(50, StageConfig(epochs=50, schedule="cosine", patience=2))
    assert state["stop_reason"] == "patience" and state["stopped_at"] == 3 and state["lr_scale"] == 1.0
    cosine = StageConfig(schedule="cosine", patience=2)
    assert not reduce_on_plateau(StageState.new(cosine), cosine)


def test_the_cap_ends_a_stage_whose_plateau_lowered_its_rate_on_the_last_epoch():
    state = flat(3, StageConfig(epochs=3, schedule="plateau", patience=2))
    assert state["stop_reason"] == "cap" and state["lr_scale"] == pytest.approx(0.1)


@given(st.floats(0, 1), st.sampled_from(["patience", "cap"]))
def test_only_a_stage_at_a_tenth_of_its_peak_rate_is_called_converged(fraction, reason):
    text = stop_text({"lr_fraction": fraction, "stop_reason": reason})
    assert ("converged" in text) == (fraction <= CONVERGED + 1e-9) == converged({"lr_fraction": fraction})
    if "converged" not in text:
        assert text.startswith("stopped by patience at LR" if reason == "patience" else "cap at LR")


def test_the_fraction_is_the_kept_epochs_rate_over_the_peak():
    history = [{"lr": 0.002}, {"lr": 0.001}, {"lr": 0.0001}]
    assert lr_fraction(history, 2, 0.002) == 0.5 and lr_fraction(history, 3, 0.002) == 0.05
    assert lr_fraction([], None, 0.002) is None


def test_a_stage_stopped_early_under_cosine_says_so_and_one_under_plateau_converges(tmp_path, one_thread):
    # val_loss with a huge min_delta never improves after epoch 1: patience 1 stops at epoch 2 of 6
    stopped = ["stages.*.monitor=val_loss", "stages.*.min_delta=100", "stages.*.patience=1", "stages.*.epochs=6",
               "stages.local.enabled=false", "stages.combine.enabled=false", "stages.transfer.enabled=false",
               "stages.coherent.enabled=false"]
    results = Experiment(from_dict(tiny_dict(2), stopped), tmp_path / "cosine", verbose=False).run()
    glob = results["stages"]["global"]
    assert glob["stop_reason"] == "patience" and glob["kept_epoch"] == 1 and glob["lr_fraction"] > CONVERGED
    assert "converged" not in end_line(glob) and "stopped by patience at LR" in end_line(glob)
    results = Experiment(from_dict(tiny_dict(2), [*stopped, "stages.global.schedule=plateau", "stages.*.keep=last"]),
                         tmp_path / "plateau", verbose=False).run()
    glob = results["stages"]["global"]
    assert glob["stop_reason"] == "patience" and glob["epochs_run"] == 3 and glob["lr_fraction"] == 0.1
    assert end_line(glob).startswith("[  global] converged (patience, LR 0.1 of peak)")
    records = [json.loads(line) for line in (tmp_path / "plateau" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] / 0.001 for r in records if r.get("stage") == "global" and "epoch" in r] == \
        pytest.approx([1, 1, 0.1])


@pytest.mark.parametrize("change, message", [
    (["stages.global.schedule=plateau"], "patience is not set"),
    (["stages.global.schedule=plateau", "stages.global.patience=2", "stages.global.plateau_factor=1.5"],
     "plateau_factor = 1.5 must be above 0 and below 1"),
])
def test_plateau_settings_are_checked(change, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(tiny_dict(2), change)
