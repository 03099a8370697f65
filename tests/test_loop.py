"""The epoch loop on its own: the learning-rate schedule, resuming, and what a stage's spec controls."""

import math

import pytest
import torch

from ddcnn.config import StageConfig
from ddcnn.errors import CheckpointError
from ddcnn.train.checkpoint import CheckpointDir
from ddcnn.train.loop import StageSpec, fit, lr_at
from ddcnn.train.runtime import Runtime


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
    assert [r["epoch"] for r in records] == [1, 2, 3] and state["done"] and state["step"] == 12
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
    assert [r["epoch"] for r in records] == [2, 3]
    lines.clear()
    fit(spec, model, None, None, None)  # finished: loaded, not trained
    assert lines == ["[       x] checkpoint of epoch 3/3: finished before, loaded"]


def test_progress_without_a_terminal_prints_a_line_every_so_often():
    from ddcnn.train.loop import Progress

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
