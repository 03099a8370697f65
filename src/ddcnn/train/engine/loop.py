"""One training loop for every stage: optimizer, learning-rate schedule, bf16 autocast, NaN guard, checkpoints.

The learning rate is a pure function of the global step, and the random state of every epoch is derived from
``(seed, stage, epoch)`` (:func:`ddcnn.seeds.derive_seed`); together with per-epoch checkpoints this makes a
resumed stage bit-identical to an uninterrupted one on the CPU.

Early stopping (``patience``, ``min_delta``, ``monitor``, ``keep`` of the stage's config) follows Keras'
``EarlyStopping(restore_best_weights=True)``: ``epochs`` is the cap; the best-so-far and the count of epochs
without improvement are part of the checkpointed state, so a resumed stage goes on with them and a stopped stage
stays stopped. Under several processes the stop decision is rank 0's, sent to all: every process stops on the same
epoch.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ddcnn.config import StageConfig
from ddcnn.errors import DDCNNError, TrainingError
from ddcnn.seeds import derive_seed
from ddcnn.train.engine.state import StageState, early_stopping
from ddcnn.train.runtime import Runtime
from ddcnn.train.schedule import lr_fraction
from ddcnn.train.store.checkpoint import CheckpointDir
from ddcnn.train.store.schema import check_stage_settings

# loss_fn(x, y) -> (loss to backpropagate, correct predictions: a count, or one count per local CNN ``(N,)``)
LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def make_optimizer(params: Iterable[nn.Parameter], cfg: StageConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_at(step: int, steps_per_epoch: int, cfg: StageConfig) -> float:
    """Learning rate at global step ``step`` (0-based): linear warmup, then constant, cosine or step decay."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if cfg.schedule == "step":
        return cfg.lr * cfg.step_gamma ** ((step // steps_per_epoch) // cfg.step_every)
    return cfg.lr  # constant, and plateau (times the stage's lr_scale, ddcnn.train.schedule)


class ModelState:
    """How a stage's model and optimizer are saved and restored; the default is their own state dicts."""

    def __init__(self, module: nn.Module):
        self.module = module

    def weights(self) -> dict:
        return self.module.state_dict()

    def load_weights(self, weights: dict) -> None:
        device = next(self.module.parameters()).device
        self.module.load_state_dict({k: v.to(device) for k, v in weights.items()})

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)


class Sync:
    """How a process combines its epoch statistics with the other processes' (a single process: as they are)."""

    is_main = True
    distributed = False

    def reduce(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int):
        return loss_sum, correct, seen

    def seconds(self, value: float) -> float:
        return value

    def any(self, flag: bool) -> bool:
        """True if ``flag`` is true on any process."""
        return flag

    def barrier(self) -> None:
        """Wait until every process gets here."""

    def agree(self, obj):
        """Rank 0's ``obj`` on every process (the decisions all processes must share)."""
        return obj


class Progress:
    """Progress inside an epoch: a tqdm bar on a terminal; elsewhere (a log file, a pipe) a line through ``echo``
    every ``every`` seconds, so that a long epoch is never silent for long."""

    def __init__(self, total: int, desc: str, enabled: bool, echo: Callable[[str], None] | None = None,
                 every: float = 30.0):
        self.bar = None
        self.total, self.desc, self.every, self.done = total, desc, every, 0
        self.echo = echo if enabled else None
        self.start = self.last = time.perf_counter()
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
            self.echo = None

    def update(self, **postfix) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
        elif self.echo is not None and time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            extra = "".join(f", {k} {v}" for k, v in postfix.items())
            self.echo(f"{self.desc}: step {self.done}/{self.total} ({100 * self.done / self.total:.0f} %), "
                      f"{self.last - self.start:.0f} s into the epoch{extra}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _non_finite(stage: str, epoch: int, bad_step: int, bad_weights: bool, cfg: StageConfig) -> TrainingError:
    where = (f"the loss became NaN or infinite in stage {stage!r}, epoch {epoch}, step {bad_step}" if bad_step >= 0
             else f"the weights became NaN or infinite in stage {stage!r}, epoch {epoch}" if bad_weights
             else f"another process's loss or weights became NaN or infinite in stage {stage!r}, epoch {epoch}")
    return TrainingError(f"{where}; the checkpoint of epoch {epoch - 1} is kept: lower the learning rate and "
                         f"resume, e.g. --resume --set stages.{stage}.lr={cfg.lr / 10:g}")


def _resumed(stage: str, state: StageState, epochs: int) -> str:
    """Where a stage with a checkpoint goes on from, for the training log."""
    where = f"[{stage:>8}] checkpoint of epoch {state.epoch}/{epochs}"
    if state.done:
        return f"{where}: finished before, loaded"
    return f"{where} ({state.seconds:.1f} s trained): resuming at epoch {state.epoch + 1}"


@dataclass
class StageSpec:
    """Everything :func:`fit` needs besides the model, its loss and its data: how and where one stage trains.

    ``clip(max_norm)`` clips the gradients (default: one norm over the whole model); ``loss_scale`` turns the
    logged loss into the one reported (the local stage sums N losses and logs their mean); ``saver`` says how the
    model and optimizer are checkpointed; ``sync`` combines the statistics of several processes; ``extra_state``
    is kept in the state of a new stage (a resumed one keeps what it saved).
    """

    stage: str
    cfg: StageConfig
    ckpt: CheckpointDir
    runtime: Runtime
    seed: int
    log: Callable[[dict], None]
    verbose: bool = True
    clip: Callable[[float], object] | None = None
    loss_scale: float = 1.0
    saver: ModelState | None = None
    sync: Sync | None = None
    extra_state: dict | None = None
    echo: Callable[[str], None] | None = None  # a line of the training log (resumed stages, progress)
    check_every: int = 25  # steps between two looks at the NaN guard (each look is a host sync)
    flops_per_image: int = 0  # training FLOPs of one image (forward and backward, ~3x the forward pass)
    network: str = "the model"  # how errors name what trained, e.g. "backbone 'my_nets:Net'"


@dataclass
class FitResult:
    """What a stage's training did: its epochs, the one it kept, why it stopped, its cost, its records.

    ``stop_reason`` is ``"patience"`` (early stopping) or ``"cap"`` (``epochs`` reached); ``kept_epoch`` is the
    epoch whose weights the stage holds and hands on; ``best_epoch`` and ``best_value`` are those of the monitored
    validation metric (None without validation). ``train_flops`` counts the training images seen times the
    stage's ``flops_per_image``. ``extra``: what the stage saved with its state (``spec.extra_state``).
    """

    seconds: float
    train_flops: int
    steps: int
    epochs_run: int
    cap: int
    kept_epoch: int
    best_epoch: int | None
    best_value: float | None
    monitor: str
    stop_reason: str
    history: list[dict]
    extra: dict
    patience: int | None = None
    lr_fraction: float | None = None  # the kept epoch's learning rate over the peak (ddcnn.train.schedule)

    @classmethod
    def from_state(cls, state: StageState, cfg: StageConfig, extra_keys=()) -> FitResult:
        return cls(state.seconds, state.flops, state.step, state.epoch, state.epochs, state.kept_epoch or state.epoch,
                   state.best_epoch, state.best_value, state.monitor, state.stop_reason or "cap", state.history,
                   {k: state.extra[k] for k in extra_keys if k in state.extra}, cfg.patience,
                   lr_fraction(state.history, state.kept_epoch or state.epoch, cfg.lr))

    def summary(self, stage: str, setup_seconds: float = 0.0, setup_flops: int = 0) -> dict:
        """The end-of-stage record of ``metrics.jsonl`` and ``results.json``; ``setup_*``: work before the first
        epoch that the stage's cost includes (the combine stage's pass of the local CNNs over the data)."""
        return {"stage": stage, "event": "end", "epochs_run": self.epochs_run, "cap": self.cap,
                "kept_epoch": self.kept_epoch, "best_epoch": self.best_epoch, "monitor": self.monitor,
                "best_value": self.best_value, "stop_reason": self.stop_reason, "patience": self.patience,
                "lr_fraction": self.lr_fraction,
                "seconds": self.seconds + setup_seconds, "train_flops": self.train_flops + setup_flops,
                "setup_seconds": setup_seconds, "setup_flops": setup_flops}


@dataclass
class _Training:
    """What :func:`fit` works with besides the stage's spec: the model and how it is saved, synchronised, clipped
    and optimised, and the stage's state."""

    model: nn.Module
    saver: ModelState
    sync: Sync
    clip: Callable[[float], object]
    optimizer: torch.optim.Optimizer
    state: StageState


@dataclass
class _Epoch:
    """One epoch's training statistics on this process: the loss summed over its images, the correct predictions
    (a count, or one per local CNN), the images seen, the first step with a non-finite loss (-1: none)."""

    loss_sum: torch.Tensor
    correct: torch.Tensor | None
    seen: int
    bad_step: torch.Tensor
    seconds: float = 0.0


def fit(spec: StageSpec, model: nn.Module, loss_fn: LossFn | None, batches, evaluate: Callable[[], dict] | None
        ) -> FitResult:
    """Train ``model`` for at most ``spec.cfg.epochs`` epochs (fewer under early stopping), resuming from
    ``spec.ckpt`` where the stage left off.

    ``batches`` yields ``(x, y)`` on the device and has ``set_epoch(e)`` and ``len``. After every epoch the model,
    the optimizer and the stage's state are checkpointed and ``spec.log`` receives the epoch's metrics (with the
    validation metrics ``evaluate()`` returns, the cumulative ``seconds`` and ``train_flops``). When the stage ends
    with ``keep: best`` the model is given the best epoch's weights, and those are the stage's last checkpoint. A
    finished stage only loads its weights: ``loss_fn``, ``batches`` and ``evaluate`` are not used.
    """
    cfg = spec.cfg
    run = _start(spec, model)
    extra_keys = tuple(spec.extra_state or ())
    if run.state.done:
        return FitResult.from_state(run.state, cfg, extra_keys)
    if loss_fn is None or batches is None or evaluate is None:
        raise TrainingError(f"stage {spec.stage!r} is not finished but fit was given nothing to train it with")
    if len(batches) == 0:
        raise TrainingError(f"stage {spec.stage!r} has no training batches: the training set is smaller than one "
                            f"batch ({cfg.batch_size}); lower stages.{spec.stage}.batch_size")
    for epoch in range(run.state.epoch + 1, cfg.epochs + 1):
        stats = _train_epoch(spec, run, loss_fn, batches, epoch)
        record = _epoch_record(spec, run, stats, epoch, evaluate)
        _end_epoch(spec, run, record, epoch)
        if run.state.done:
            break
    result = FitResult.from_state(run.state, cfg, extra_keys)
    # The end record counts what the epochs' records count (the combine stage's pass over the data).
    if run.sync.is_main:
        extra = run.state.extra
        spec.log(result.summary(spec.stage, extra.get("feature_seconds", 0.0), extra.get("feature_flops", 0)))
    return result


def _start(spec: StageSpec, model: nn.Module) -> _Training:
    """The optimizer, saver, sync and clip of the stage, and its state: new, or loaded from its checkpoint with the
    model's weights and (for an unfinished stage) the optimizer's state."""
    stage, cfg, ckpt = spec.stage, spec.cfg, spec.ckpt
    run = _Training(model, spec.saver or ModelState(model), spec.sync or Sync(),
                    spec.clip or (lambda max_norm: nn.utils.clip_grad_norm_(model.parameters(), max_norm)),
                    make_optimizer(model.parameters(), cfg), StageState.new(cfg, spec.extra_state))
    if not ckpt.has(stage):
        return run
    weights, saved, opt_state = ckpt.load(stage)
    # The data order and the optimizer state depend on the batch size and optimizer: a resumed stage keeps
    # them; an unfinished one may get more epochs (ddcnn.train.store.schema says what else may change).
    check_stage_settings(stage, saved, cfg)
    run.state = run.state.updated(saved)
    run.state.epochs = cfg.epochs  # more epochs for an unfinished stage (recorded in metrics.jsonl on --resume)
    run.saver.load_weights(weights)
    if opt_state is not None and not run.state.done:
        run.saver.load_optimizer_state(run.optimizer, opt_state)
        for group in run.optimizer.param_groups:  # the config's settings, not the checkpoint's, from here on
            group.update({k: v for k, v in run.optimizer.defaults.items() if k != "lr"})
    if spec.verbose and spec.echo is not None:
        spec.echo(_resumed(stage, run.state, cfg.epochs))
    return run


def _train_epoch(spec: StageSpec, run: _Training, loss_fn: LossFn, batches, epoch: int) -> _Epoch:
    """One epoch of optimizer steps on this process, with the NaN guard; returns its statistics (not yet
    combined with the other processes')."""
    stage, cfg, runtime = spec.stage, spec.cfg, spec.runtime
    steps_per_epoch = len(batches)
    torch.manual_seed(derive_seed(spec.seed, stage, epoch))
    batches.set_epoch(epoch)
    run.model.train()
    progress = Progress(steps_per_epoch, f"[{stage:>8}] epoch {epoch}/{cfg.epochs}", spec.verbose, spec.echo)
    runtime.synchronize()
    start = time.perf_counter()
    stats = _Epoch(torch.zeros((), device=runtime.device), None, 0,
                   torch.full((), -1, dtype=torch.long, device=runtime.device))
    for i, (x, y) in enumerate(batches):
        loss = _step(spec, run, loss_fn, x, y, stats, epoch, i, progress)
        if (i + 1) % spec.check_every == 0 or i + 1 == steps_per_epoch:
            # Several processes decide together at the end of the epoch (no communication inside it).
            if not run.sync.distributed and stats.bad_step.item() >= 0:
                progress.close()
                raise _non_finite(stage, epoch, int(stats.bad_step.item()), False, cfg)
            progress.update(loss=f"{loss.item() * spec.loss_scale:.3f}")
        else:
            progress.update()
    # The last steps' updates can make the weights non-finite with a finite loss: never checkpoint them.
    first_bad = int(stats.bad_step.item())
    bad_weights = not all(bool(torch.isfinite(t).all()) for t in run.model.state_dict().values()
                          if t.is_floating_point())
    if run.sync.any(first_bad >= 0 or bad_weights):
        progress.close()
        raise _non_finite(stage, epoch, first_bad, bad_weights, cfg)
    runtime.synchronize()
    stats.seconds = run.sync.seconds(time.perf_counter() - start)
    progress.close()
    return stats


def _step(spec: StageSpec, run: _Training, loss_fn: LossFn, x, y, stats: _Epoch, epoch: int, i: int,
          progress: Progress) -> torch.Tensor:
    """Optimizer step ``i`` of the epoch on the batch ``(x, y)``; adds to ``stats``, returns the loss."""
    cfg, optimizer = spec.cfg, run.optimizer
    for group in optimizer.param_groups:
        # the progress counts the epoch's steps; lr_scale: schedule plateau's reductions (ddcnn.train.schedule)
        group["lr"] = lr_at(run.state.step, progress.total, cfg) * run.state.lr_scale
    try:
        with spec.runtime.autocast():
            loss, correct = loss_fn(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            run.clip(cfg.grad_clip)
        optimizer.step()
    except DDCNNError:
        raise
    except Exception as err:  # the user's network (or torch under it) failed on a training batch
        progress.close()
        raise TrainingError(
            f"{spec.network} failed in stage {spec.stage!r} (epoch {epoch}, step {i + 1}, a batch of {len(y)}): "
            f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}; the checkpoint of epoch "
            f"{epoch - 1} is kept: fix the network (or the stage's settings) and resume") from err
    run.state.step += 1
    # NaN guard without a host sync per step: remember the first bad step, look every few steps.
    finite = torch.isfinite(loss.detach())
    stats.bad_step = torch.where((stats.bad_step < 0) & ~finite, torch.full_like(stats.bad_step, i + 1),
                                 stats.bad_step)
    stats.loss_sum += loss.detach().float() * len(y)
    stats.correct = correct.detach() if stats.correct is None else stats.correct + correct.detach()
    stats.seen += len(y)
    return loss


def _epoch_record(spec: StageSpec, run: _Training, stats: _Epoch, epoch: int, evaluate: Callable[[], dict]) -> dict:
    """The epoch's metrics: its training statistics over all processes, the validation metrics, the cumulative
    seconds and FLOPs."""
    state = run.state
    state.seconds += stats.seconds
    assert stats.correct is not None  # the epoch had steps
    loss_sum, correct_sum, seen = run.sync.reduce(stats.loss_sum, stats.correct, stats.seen)
    acc = (correct_sum.float() / seen).cpu()
    record = {"stage": spec.stage, "epoch": epoch, "train_loss": (loss_sum / seen).item() * spec.loss_scale,
              "train_accuracy": acc.mean().item(), "lr": run.optimizer.param_groups[0]["lr"]}
    run.model.eval()
    record.update(evaluate())
    state.flops += spec.flops_per_image * seen
    # Cumulative over the stage's epochs (a resumed stage goes on from its checkpoint's); the combine stage's
    # pass of the local CNNs over the data (its setup) counts from the first epoch on, as in results.json.
    record["seconds"] = state.seconds + state.extra.get("feature_seconds", 0.0)
    record["train_flops"] = state.flops + state.extra.get("feature_flops", 0)
    return record


def _end_epoch(spec: StageSpec, run: _Training, record: dict, epoch: int) -> None:
    """Early stopping (rank 0's decision, sent to all), then the checkpoint of the epoch and its metrics."""
    state, cfg = run.state, spec.cfg
    # The decision is rank 0's: every process stops on the same epoch and keeps the same weights.
    early_stopping(state, record, cfg)
    for key, value in run.sync.agree(state.tracked()).items():
        setattr(state, key, value)
    state.epoch = epoch
    state.done = state.stop_reason is not None
    state.history.append(record)
    restore = state.done and state.keep == "best" and state.best_epoch not in (None, epoch)
    state.kept_epoch = (state.best_epoch if restore else epoch) if state.done else None
    # Every process takes part in gathering the state; the main one writes it.
    gathering = time.perf_counter()
    if restore:  # the best epoch's weights, from the checkpoint that names them, become the model's
        weights = spec.ckpt.load_best(spec.stage)
        run.saver.load_weights(weights)
        run.sync.barrier()  # every process has read them before the main one replaces the checkpoint
    else:
        weights = run.saver.weights()
    opt_state = None if state.done else run.saver.optimizer_state(run.optimizer)
    record["gather_seconds"] = time.perf_counter() - gathering  # collecting the state, not in "seconds"
    keep_best = not state.done and state.keep == "best" and state.best_epoch not in (None, epoch)
    if run.sync.is_main:
        spec.ckpt.save(spec.stage, f"e{epoch}", weights, state.as_dict(), optimizer=opt_state, keep_best=keep_best)
        spec.log(record)
