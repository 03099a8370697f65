"""``ddcnn evaluate``, and ``ddcnn predict`` under torchrun: a finished run's models, sharded over the processes."""

from __future__ import annotations

import torch

from ddcnn.data.loading import to_float
from ddcnn.data.readers import ImageDataset
from ddcnn.finished.predictions import Predictions, accuracy
from ddcnn.finished.run import predict
from ddcnn.train.best import best_strategy, strategy_metrics
from ddcnn.train.dist import DistEnv
from ddcnn.train.runtime import device_name
from ddcnn.train.saved import ShardedRun
from ddcnn.train.scoring import score_strategies


def evaluate_run(run_dir, device: str | None = None, env: DistEnv | None = None,
                 trust_code: bool = False, splits: dict[str, ImageDataset] | None = None,
                 data_root: str | None = None) -> dict | None:
    """Validation and test accuracy of every saved strategy, recomputed from the checkpoints through the
    protocol's scoring path; written to ``evaluation.json``.

    Under torchrun (``env``) each process holds its shard of the local CNNs and all compute together; rank 0
    writes the file and returns the results, the others None. ``trust_code``, ``data_root``: see
    :class:`ddcnn.finished.run.SavedRun`. ``splits``: ``{"test": ..., "val": ...}`` to score (datasets given from
    Python), else the config's data are read.
    """
    run = ShardedRun(run_dir, device, env, trust_code, data_root)
    if splits is None:
        _, val, test = run.datasets()
        splits = {"val": val, "test": test} if len(val) else {"test": test}
    scores = {split: score_strategies(run.trained, run.decomposition, run.shapes.num_classes, run.run_batches,
                                      to_float(data.images), run.env, run.cfg.decomposition.kind)[0]
              for split, data in splits.items()}
    if not run.env.is_main:
        return None
    previous = run.best or {}  # the evaluation stands on its own without results.json
    strategies = {}
    for name in scores["test"]:
        old = previous.get("strategies", {}).get(name, {})
        strategies[name] = {
            "val_accuracy": accuracy(scores["val"][name], splits["val"].labels) if "val" in scores else None,
            "test_accuracy": accuracy(scores["test"][name], splits["test"].labels),
            "train_seconds": old.get("train_seconds"), "parameters": old.get("parameters"),
            "flops_per_image": old.get("flops_per_image"),
            **strategy_metrics(name, {s: scores[s][name] for s in scores}, splits, run.classes)}
    best, basis = best_strategy(strategies, run.cfg.evaluation.metric) if "val" in scores else (None, None)
    results = {"dataset": run.cfg.data.name, "grid": list(run.decomposition.grid), "best_strategy": best,
               "best_strategy_basis": basis,
               "overlap": list(run.decomposition.overlap), "device_name": device_name(run.runtime.device),
               "torch_version": torch.__version__,
               "strategies": strategies}
    run.run_dir.write_json("evaluation.json", results)
    return results


def predict_files(run_dir, files, strategy: str | None = None, device: str | None = None,
                  env: DistEnv | None = None, trust_code: bool = False) -> Predictions | None:
    """:func:`ddcnn.finished.run.predict_files` under torchrun (``env``): computed by all processes together,
    returned on rank 0, None elsewhere. ``trust_code``: see :class:`ShardedRun`."""
    run = ShardedRun(run_dir, device, env, trust_code)
    predictions, _ = predict(run, files, strategy)
    return predictions if run.env.is_main else None
