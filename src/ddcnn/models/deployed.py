"""A trained strategy as one module for deployment: float images in [0, 1] -> class probabilities.

:class:`Deployed` holds the whole path from the images a dataset reader gives to the decision:

    images (B, C, *image_size) in [0, 1]
      -> (x - mean) / std                        the run's normaliser, one mean and std per channel
      -> a whole-image CNN (the global strategy), or
         split into N subimages (B, N, C, *sub)  the run's decomposition
         -> local CNNs (B, N, K) logits         one grouped network, or N ordinary branches
         -> combiner (B, K) scores              the DNN, mean probability or majority vote
      -> (B, K) probabilities                   softmax of the scores; vote shares for majority vote

Every step is plain tensor code with shapes fixed by the run except the batch size, so ``torch.export`` and the
ONNX exporter trace it with a dynamic batch dimension.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ddcnn.decomposition import Decomposition
from ddcnn.errors import ConfigError
from ddcnn.models.combiners import Combiner, MajorityVote
from ddcnn.models.ensemble import LocalEnsemble

LAYOUTS = ("grouped", "separate")


class Standardise(nn.Module):
    """``(x - mean) / std`` per channel, as the run's normaliser computes it, on ``(B, C, *size)`` images."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float], dims: int):
        super().__init__()
        shape = (1, -1) + (1,) * dims
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(shape))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std


class Branches(nn.Module):
    """N ordinary CNNs side by side: ``(B, N, C, *sub) -> (B, N, K)``, CNN ``i`` on subimage ``i``."""

    def __init__(self, cnns: Sequence[nn.Module]):
        super().__init__()
        self.cnns = nn.ModuleList(cnns)

    def forward(self, subimages: torch.Tensor) -> torch.Tensor:
        return torch.stack([cnn(subimages[:, i]) for i, cnn in enumerate(self.cnns)], dim=1)


def with_layout(ensemble: LocalEnsemble, layout: str | None) -> nn.Module:
    """The local CNNs of ``ensemble`` as a module ``(B, N, C, *sub) -> (B, N, K)`` computing the same function.

    ``None``: the ensemble itself, whatever its backend. ``"grouped"``: one network of grouped convolutions (the
    built-in backbones only; a ``vmap`` or ``loop`` ensemble is rebuilt grouped from its stacked weights, the
    layout every backend saves). ``"separate"``: N ordinary CNNs (:meth:`LocalEnsemble.local_model`), the form
    that ``torch.export`` can trace for a ``vmap`` ensemble (``torch.func.vmap`` is not exportable).
    """
    if layout is None:
        return ensemble
    if layout == "separate":
        return Branches([ensemble.local_model(i) for i in range(ensemble.n_local)]).train(ensemble.training)
    if layout != "grouped":
        raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not ensemble.family.builtin:
        raise ConfigError(f"layout 'grouped' fuses the built-in backbones (vgg, resnet) only; use layout "
                          f"'separate' for {ensemble.backbone!r}")
    if ensemble.backend == "grouped":
        return ensemble
    grouped = LocalEnsemble(ensemble.n_local, ensemble.in_channels, ensemble.num_classes, ensemble.backbone,
                            ensemble.width, ensemble.depth, ensemble.dims, "grouped", seed=ensemble.seed,
                            indices=ensemble.indices)
    grouped.load_stacked_state_dict(ensemble.stacked_state_dict())
    return grouped.to(next(ensemble.parameters()).device).train(ensemble.training)


class Decomposed(nn.Module):
    """Split, local CNNs, combiner: normalised images ``(B, C, *image_size) -> (B, K)`` combiner scores."""

    def __init__(self, decomposition: Decomposition, local: nn.Module, combiner: Combiner):
        super().__init__()
        self.decomposition, self.local, self.combiner = decomposition, local, combiner

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.combiner(self.local(self.decomposition.split(images)))


class Deployed(nn.Module):
    """A strategy end to end: float images ``(B, C, *image_size)`` in [0, 1] -> ``(B, K)`` class probabilities.

    ``net`` maps normalised images to the strategy's scores (logits, log-probabilities or votes, see
    :mod:`ddcnn.models.combiners`). The output is their softmax, i.e. the probability of each class (for mean
    probability exactly the mean of the local probabilities); for majority vote (``shares=True``) each class's
    share of the N votes (:func:`vote_shares`: 4 of 4 votes is 1.000, 2 of 4 is 0.500, with a tie-break below
    1e-6). Either way the argmax is the strategy's decision.
    """

    def __init__(self, standardise: Standardise, net: nn.Module, shares: bool = False):
        super().__init__()
        self.standardise, self.net, self.shares = standardise, net, shares

    @classmethod
    def combined(cls, standardise: Standardise, decomposition: Decomposition, local: nn.Module,
                 combiner: Combiner) -> Deployed:
        """A decomposed strategy: vote shares when ``combiner`` is a majority vote, else probabilities."""
        return cls(standardise, Decomposed(decomposition, local, combiner), isinstance(combiner, MajorityVote))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return scores_to_probabilities(self.net(self.standardise(images)).float(), self.shares)


# Added per place a class holds among the classes with as many votes: far below the printed precision of a share
# (a unanimous vote reads 1.000, 2 of 4 votes 0.500) yet distinct in float32, so the argmax stays the vote's decision.
TIE_BREAK = 1e-7


def scores_to_probabilities(scores: torch.Tensor, shares: bool = False) -> torch.Tensor:
    """``(B, K)`` strategy scores -> ``(B, K)`` probabilities (softmax) or vote shares (:func:`vote_shares`)."""
    return vote_shares(scores) if shares else scores.softmax(-1)


def vote_shares(scores: torch.Tensor) -> torch.Tensor:
    """Majority-vote scores ``(B, K)`` (votes plus a fraction below one that orders tied classes, see
    :class:`~ddcnn.models.combiners.MajorityVote`) -> each class's share of the N votes, ``votes / N``, plus
    :data:`TIE_BREAK` times the number of classes with as many votes that it beats (higher fraction, or the same
    and a higher class index). The argmax is the vote's decision; the shares sum to 1 up to ``K * TIE_BREAK``."""
    votes = scores.floor()
    k = scores.shape[-1]
    index = torch.arange(k, device=scores.device)
    mine, theirs = scores.unsqueeze(-1), scores.unsqueeze(-2)  # [b, c, d]: class c against class d
    beats = (theirs < mine) | ((theirs == mine) & (index.view(1, k) > index.view(k, 1)))
    tied = votes.unsqueeze(-1) == votes.unsqueeze(-2)
    place = (beats & tied).to(scores.dtype).sum(-1)
    return votes / votes.sum(-1, keepdim=True) + TIE_BREAK * place
