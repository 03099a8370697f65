"""The one scoring path of a run's models: the protocol's evaluation at the end of a run and ``ddcnn evaluate``
score every strategy through :func:`score_strategies`, on validation and test images alike."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ddcnn.decomposition import Decomposition
from ddcnn.strategies import STRATEGIES, available, combine_local
from ddcnn.train.dist import DistEnv


def score_strategies(trained: Mapping[str, nn.Module], decomposition: Decomposition, num_classes: int, predict,
                     images: torch.Tensor, env: DistEnv | None = None, kind: str = "spatial"
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Scores ``(M, K)`` (float32, CPU) of every available strategy on ``images`` ``(M, C, *size)``, and the local
    CNNs' logits ``(M, N, K)`` (None without the local stage): the one scoring path of the protocol's evaluation
    and of ``ddcnn evaluate``.

    ``predict(fn, images)`` runs ``fn`` over normalised batches of ``images``. ``trained["local"]`` is a
    :class:`LocalEnsemble` (it takes subimages) or, under several processes (``env``), this process's
    :class:`~ddcnn.train.parallel.model.ShardedLocalCNNs`; the local CNNs' logits are computed once for every
    strategy that combines them.
    Models spread over the processes are run by all of them together, the others on rank 0 only: the scores are
    complete on rank 0. ``kind``: the run's decomposition.kind (which strategies it scores).
    """
    env = env or DistEnv()
    n = decomposition.n_subdomains
    names = available(trained, kind)
    local = None
    if "local" in trained:
        ensemble = trained["local"]
        if _spans(ensemble) or env.is_main:
            local = predict(ensemble if _spans(ensemble) else lambda x: ensemble(decomposition.split(x)), images)
    scores = {}
    for name in names:
        strategy = STRATEGIES[name]
        if strategy.combiner is not None:
            if env.is_main:
                assert local is not None  # the combiner's strategies need the local stage
                combiner = strategy.combiner(trained, n, num_classes)
                device = next((p.device for p in combiner.parameters()), local.device)
                with torch.no_grad():  # scoring: no graph through the combiner
                    scores[name] = combine_local(combiner, local.to(device)).float().cpu()
            continue
        model = trained[strategy.stages[0]]
        if _spans(model) or env.is_main:
            scores[name] = predict(model, images)
    return scores, local


def _spans(model: nn.Module) -> bool:
    """Whether ``model`` is this process's part of a model spread over the processes (all must run it): a shard
    of the local CNNs, a model-parallel CNN-DNN, or a spatial-parallel global CNN (the wrappers of
    :mod:`ddcnn.train.parallel` say so)."""
    return getattr(model, "spans_processes", False)
