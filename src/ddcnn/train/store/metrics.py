"""Where an epoch's metrics go: ``metrics.jsonl``, TensorBoard (when installed) and one line on the terminal."""

from __future__ import annotations

from collections.abc import Callable

from ddcnn.files import own_folder
from ddcnn.train.schedule import stop_text
from ddcnn.train.store.rundir import RunDir


class MetricsLog:
    """One record per epoch per stage, written by rank 0 only; :meth:`close` closes the TensorBoard event file."""

    def __init__(self, run_dir: RunDir, verbose: bool = True, print_line: Callable[[str], None] | None = None):
        self.run_dir, self.verbose = run_dir, verbose
        self.print = print_line or (lambda line: print(line, flush=True))  # flushed: one line per epoch in a log
        self._writer = None
        self._opened = False

    def _tensorboard(self):
        """The SummaryWriter, opened with the first record (a resumed finished run adds no event file); None when
        the tensorboard package is not installed."""
        if not self._opened:
            self._opened = True
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                return None
            # Its event file gets a new name of time, host and process: no file a sender placed is opened. The
            # folder is the run's own (a link is refused), so nothing is written outside the run.
            folder = own_folder(self.run_dir.path / "tensorboard", self.run_dir.path)
            self._writer = SummaryWriter(str(folder))
        return self._writer

    def __call__(self, record: dict) -> None:
        self.run_dir.append_metrics(record)
        if record.get("event") == "end":
            if self.verbose:
                self.print(end_line(record))
            return
        writer = self._tensorboard()
        if writer is not None:
            for key, value in record.items():
                if isinstance(value, float):
                    writer.add_scalar(f"{record['stage']}/{key}", value, record["epoch"])
            writer.flush()
        if self.verbose:
            self.print(epoch_line(record))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def epoch_line(record: dict) -> str:
    """``[   local] epoch   3  loss 0.4123  train  85.10%  val  84.90%  stage time    12.3 s``: the stage's training
    time so far, cumulative over its epochs (as ``seconds`` in metrics.jsonl)."""
    val = record.get("val_accuracy")
    val = f"{100 * val:6.2f}%" if val is not None else "   n/a"
    return (f"[{record['stage']:>8}] epoch {record['epoch']:3d}  loss {record['train_loss']:.4f}  "
            f"train {100 * record['train_accuracy']:6.2f}%  val {val}  stage time {record['seconds']:7.1f} s")


def end_line(record: dict) -> str:
    """``[   local] stopped by patience at LR 0.5; stopped early after 7 of 20 epochs; kept epoch 4 (val_accuracy
    0.8512)``, or ``... ran 20 of 20``: first the stop as :func:`ddcnn.train.schedule.stop_text` names it
    (converged only at a tenth of the peak LR or less; a record without ``lr_fraction`` has none)."""
    early = record["stop_reason"] == "patience" and record["epochs_run"] < record["cap"]
    how = "stopped early after" if early else "ran"  # patience that runs out at the cap is no early stop
    label = "" if record.get("lr_fraction") is None else \
        f"{stop_text({**record, 'stop_reason': 'patience' if early else 'cap'})}; "
    best = "" if record.get("best_value") is None else f" ({record['monitor']} {record['best_value']:.4f})"
    return (f"[{record['stage']:>8}] {label}{how} {record['epochs_run']} of {record['cap']} epochs; kept epoch "
            f"{record['kept_epoch']}{best if record['kept_epoch'] == record.get('best_epoch') else ''}")
