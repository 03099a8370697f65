"""The epoch loop on its own: the learning-rate schedule, resuming, and what a stage's spec controls."""

import math

import pytest
import torch

from ddcnn.config import StageConfig
from ddcnn.errors import CheckpointError
from ddcnn.train.engine.loop import StageSpec, fit, lr_at
from ddcnn.train.runtime import Runtime
from ddcnn.train.store.checkpoint import CheckpointDir


def test_warmup_rises_linearly_to_the_learning_rate():
    cfg = StageConfig(epochs=4, lr=0.4, warmup_epochs=1.0, schedule="constant")
    assert [lr_at(s, 4, cfg) for s in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert lr_at(4, 4, cfg) == pytest.approx(0.4) and lr_at(15, 4, cfg) == pytest.approx(0.4)


def test_cosine_falls_from_the_learning_rate_to_zero_after_warmup():
    cfg = StageConfig(epochs=3, lr=2.0, warmup_epochs=1.0, schedule="cosine")
    steps, warmup, total = 10, 10, 30
    assert lr_at(warmup, steps, cfg) == pytest.approx(2.0)
    assert lr_at(warmup + (total - warmup) // 2, steps, cfg) == pytest.approx(1.0)  # half way: half the rate
    assert lr_at(total, steps, cfg) == pytest.approx(0.0, abs=1e-12)
    rates = [lr_at(s, steps, cfg) for s in range(warmup, total)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert lr_at(warmup + 5, steps, cfg) == pytest.approx(1.0 + math.cos(math.pi * 5 / 20))


def test_step_schedule_decays_every_step_every_epochs():
    cfg = StageConfig(epochs=9, lr=1.0, schedule="step", step_every=3, step_gamma=0.5)
    per_epoch = [lr_at(epoch * 5, 5, cfg) for epoch in range(9)]
    assert per_epoch == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25])


class Batches:
    def __init__(self, n=4):
        g = torch.Generator().manual_seed(0)
        self.data = [(torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(n)]

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        return iter(self.data)


def _train(tmp_path, epochs=2, grad_clip=None, clip=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    records = []
    cfg = StageConfig(epochs=epochs, batch_size=8, optimizer="sgd", lr=0.5, momentum=0.0, schedule="constant",
                      grad_clip=grad_clip)
    spec = StageSpec("x", cfg, CheckpointDir(tmp_path), Runtime(torch.device("cpu")), 0, records.append,
                     verbose=False, clip=clip and (lambda max_norm: clip(model, max_norm)))

    def loss_fn(x, y):
        out = model(x)
        return torch.nn.functional.cross_entropy(out, y), (out.argmax(-1) == y).sum()

    state = fit(spec, model, loss_fn, Batches(), lambda: {"val_accuracy": None})
    return model, state, records


def test_fit_logs_and_checkpoints_every_epoch(tmp_path):
    model, state, records = _train(tmp_path, epochs=3)
    assert [r.get("epoch") for r in records] == [1, 2, 3, None] and records[-1]["event"] == "end"
    assert state.epochs_run == 3 and state.stop_reason == "cap" and state.steps == 12
    weights, saved, _ = CheckpointDir(tmp_path).load("x")
    assert saved["epoch"] == 3
    for key, value in model.state_dict().items():
        assert torch.equal(weights[key], value)


def test_the_clip_of_the_spec_runs_when_the_config_sets_grad_clip(tmp_path):
    """A clip that zeroes the gradients keeps the weights where they started; the same run without grad_clip
    moves them (the control: the run does step)."""
    torch.manual_seed(0)
    start = torch.nn.Linear(3, 2).state_dict()
    calls = []

    def zero_grads(model, max_norm):
        calls.append(max_norm)
        for p in model.parameters():
            p.grad.zero_()

    control, _, _ = _train(tmp_path / "a", clip=zero_grads)
    assert calls == [] and not torch.equal(control.weight, start["weight"])
    clipped, _, _ = _train(tmp_path / "b", grad_clip=0.25, clip=zero_grads)
    assert calls == [0.25] * 8
    assert torch.equal(clipped.weight, start["weight"]) and torch.equal(clipped.bias, start["bias"])


def test_a_resumed_stage_refuses_a_changed_number_of_epochs(tmp_path):
    _train(tmp_path, epochs=2)
    with pytest.raises(CheckpointError, match="epochs = 2 but the config now says 3"):
        _train(tmp_path, epochs=3)


# ------------------------------------------------------------------------------------------------ early stopping
def _scripted(tmp_path, scores, crash_at=None, monitor="val_accuracy", **stopping):
    """A stage whose validation metric follows ``scores`` epoch by epoch; returns (model, result, records, the
    weights after every epoch). ``crash_at``: the evaluation of that epoch raises (a kill after its training)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    records, snapshots = [], {}
    cfg = StageConfig(epochs=len(scores), batch_size=8, optimizer="sgd", lr=0.5, momentum=0.0, schedule="constant",
                      monitor=monitor, **stopping)
    spec = StageSpec("x", cfg, CheckpointDir(tmp_path), Runtime(torch.device("cpu")), 0, records.append,
                     verbose=False)

    def loss_fn(x, y):
        out = model(x)
        return torch.nn.functional.cross_entropy(out, y), (out.argmax(-1) == y).sum()

    def evaluate():
        epoch = len(snapshots) + 1 + (len(CheckpointDir(tmp_path).state("x")["history"])
                                      if CheckpointDir(tmp_path).has("x") and not snapshots else 0)
        if epoch == crash_at:
            raise KeyboardInterrupt
        snapshots[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        return {monitor: scores[epoch - 1]}

    result = fit(spec, model, loss_fn, Batches(), evaluate)
    return model, result, records, snapshots


def test_a_stage_that_stops_improving_stops_after_patience_epochs_and_keeps_the_best(tmp_path):
    # epoch 3 is the best; 0.605 is not better than 0.6 + min_delta; epochs 4 and 5 are the patience
    model, result, records, snapshots = _scripted(tmp_path, [0.5, 0.55, 0.6, 0.605, 0.58, 0.9, 0.95],
                                                  patience=2, min_delta=0.01)
    assert (result.epochs_run, result.best_epoch, result.kept_epoch, result.stop_reason) == (5, 3, 3, "patience")
    assert [r.get("epoch") for r in records] == [1, 2, 3, 4, 5, None] and records[-1]["kept_epoch"] == 3
    weights, state, optimizer = CheckpointDir(tmp_path).load("x")
    assert state["done"] and optimizer is None
    for key, value in snapshots[3].items():  # the model and its last checkpoint hold epoch 3's weights
        assert torch.equal(model.state_dict()[key], value) and torch.equal(weights[key], value)
        assert not torch.equal(snapshots[5][key], value)


def test_keep_last_and_the_cap_and_a_falling_loss(tmp_path):
    model, result, _, snapshots = _scripted(tmp_path / "last", [0.5, 0.6, 0.4], patience=5, keep="last")
    assert (result.epochs_run, result.best_epoch, result.kept_epoch, result.stop_reason) == (3, 2, 3, "cap")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in snapshots[3].items())
    _, result, _, _ = _scripted(tmp_path / "loss", [1.0, 0.8, 0.9, 0.85], monitor="val_loss", patience=2)
    assert (result.epochs_run, result.best_epoch, result.kept_epoch, result.best_value) == (4, 2, 2, 0.8)


def test_a_killed_stage_resumes_with_its_best_so_far_and_a_stopped_stage_stays_stopped(tmp_path):
    scores = [0.5, 0.7, 0.6, 0.65, 0.62, 0.9]
    whole = _scripted(tmp_path / "whole", scores, patience=3)
    with pytest.raises(KeyboardInterrupt):  # killed after epoch 4's training: epochs 1-3 are checkpointed
        _scripted(tmp_path / "killed", scores, crash_at=4, patience=3)
    assert CheckpointDir(tmp_path / "killed").state("x")["bad_epochs"] == 1
    model, result, records, _ = _scripted(tmp_path / "killed", scores, patience=3)
    assert [r.get("epoch") for r in records] == [4, 5, None]
    assert (result.epochs_run, result.kept_epoch, result.stop_reason) == (whole[1].epochs_run, 2, "patience")
    for key, value in whole[0].state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    again = fit(StageSpec("x", StageConfig(epochs=6, batch_size=8, optimizer="sgd", patience=3),
                          CheckpointDir(tmp_path / "killed"), Runtime(torch.device("cpu")), 0, records.append),
                torch.nn.Linear(3, 2), None, None, None)
    assert (again.epochs_run, again.kept_epoch, again.stop_reason) == (5, 2, "patience")


def test_a_resumed_stage_says_where_it_goes_on_from(tmp_path):
    cfg = StageConfig(epochs=3, batch_size=8, optimizer="sgd", lr=0.5, momentum=0.0, schedule="constant")
    model = torch.nn.Linear(3, 2)

    def loss_fn(x, y):
        out = model(x)
        return torch.nn.functional.cross_entropy(out, y), (out.argmax(-1) == y).sum()

    def killed(record):  # the process dies once epoch 1 is checkpointed
        raise KeyboardInterrupt

    spec = StageSpec("x", cfg, CheckpointDir(tmp_path), Runtime(torch.device("cpu")), 0, killed, verbose=False)
    with pytest.raises(KeyboardInterrupt):
        fit(spec, model, loss_fn, Batches(), lambda: {"val_accuracy": None})
    lines: list[str] = []
    records: list[dict] = []
    spec = StageSpec("x", cfg, CheckpointDir(tmp_path), Runtime(torch.device("cpu")), 0, records.append,
                     verbose=True, echo=lines.append)
    fit(spec, model, loss_fn, Batches(), lambda: {"val_accuracy": None})
    assert lines[0].startswith("[       x] checkpoint of epoch 1/3 (") and lines[0].endswith("resuming at epoch 2")
    assert [r["epoch"] for r in records if "epoch" in r] == [2, 3]  # then the end-of-stage record
    lines.clear()
    fit(spec, model, None, None, None)  # finished: loaded, not trained
    assert lines == ["[       x] checkpoint of epoch 3/3: finished before, loaded"]


def test_progress_without_a_terminal_prints_a_line_every_so_often():
    from ddcnn.train.engine.loop import Progress

    lines: list[str] = []
    progress = Progress(4, "[   local] epoch 1/2", enabled=True, echo=lines.append, every=0.0)
    for _ in range(4):
        progress.update(loss="0.5")
    progress.close()
    assert lines[0].startswith("[   local] epoch 1/2: step 1/4 (25 %), ") and lines[0].endswith(", loss 0.5")
    assert len(lines) == 4 and lines[-1].startswith("[   local] epoch 1/2: step 4/4 (100 %)")
    quiet: list[str] = []
    progress = Progress(4, "x", enabled=True, echo=quiet.append, every=3600.0)  # not yet due
    progress.update()
    silent: list[str] = []
    off = Progress(4, "x", enabled=False, echo=silent.append, every=0.0)  # --quiet
    off.update()
    assert quiet == [] and silent == []


def test_a_checkpoint_without_the_early_stopping_keys_resumes(tmp_path):
    """A stage checkpointed by an earlier ddcnn (no flops, monitor, keep, best-so-far in its state) resumes to the
    same weights as one that never stopped."""
    import json

    cfg = StageConfig(epochs=3, batch_size=8, optimizer="sgd", lr=0.5, momentum=0.0, schedule="constant")

    def run(folder, log):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)

        def loss_fn(x, y):
            out = model(x)
            return torch.nn.functional.cross_entropy(out, y), (out.argmax(-1) == y).sum()

        spec = StageSpec("x", cfg, CheckpointDir(folder), Runtime(torch.device("cpu")), 0, log, verbose=False)
        return model, fit(spec, model, loss_fn, Batches(), lambda: {"val_accuracy": None})

    whole, _ = run(tmp_path / "whole", lambda record: None)

    def killed(record):  # dies once epoch 1 is checkpointed
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "old", killed)
    manifest = tmp_path / "old" / "x.json"
    data = json.loads(manifest.read_text())
    for key in ("flops", "monitor", "keep", "best_epoch", "best_value", "bad_epochs", "stop_reason", "kept_epoch"):
        data["state"].pop(key, None)
    manifest.write_text(json.dumps(data))
    resumed, result = run(tmp_path / "old", lambda record: None)
    assert result.epochs_run == 3 and result.stop_reason == "cap"
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), whole.state_dict().values()))


def test_the_stage_state_is_what_the_checkpoint_schema_reads_and_round_trips():
    """The stage's state is declared once (StageState); what it writes is a state the checkpoint's schema knows,
    key by key, and reading it back gives the same state."""
    from ddcnn.files import conform
    from ddcnn.train.engine.state import StageState
    from ddcnn.train.store.schema import TRAINING_STATE

    cfg = StageConfig(epochs=2, batch_size=8)
    state = StageState.new(cfg, {"feature_seconds": 0.5, "feature_flops": 3})
    state.epoch, state.history, state.best_epoch, state.stop_reason = 1, [{"epoch": 1, "train_loss": 0.5,
        "train_accuracy": 0.5, "lr": 0.1, "seconds": 1.0}], 1, None
    written = state.as_dict()
    conform(written, TRAINING_STATE)
    assert set(written) <= {key.rstrip("?") for key in TRAINING_STATE.schema}
    assert StageState.new(cfg).updated(written) == state
