"""Combine N local predictions into one decision: ``(B, N, K)`` local logits -> ``(B, K)`` scores.

Every combiner works on the local CNNs' probabilities (the softmax of their logits), as in the paper, and returns
scores whose argmax is the decision:

* :class:`MeanProbability` and :class:`WeightedMean` return the log of the combined probability, so ``softmax`` of
  the output gives that probability back and cross-entropy on the output is its negative log-likelihood;
* :class:`DNN` returns logits of a dense network (the CNN-DNN's combiner, trainable);
* :class:`MajorityVote` returns vote counts plus a tie-break fraction below one (not differentiable).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import nn

from ddcnn.checks import choice, whole, wholes
from ddcnn.errors import ConfigError, ShapeError

COMBINERS = ("dnn", "mean_probability", "majority_vote", "weighted_mean")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class Combiner(nn.Module):
    """Base class: checks the input shape; subclasses implement :meth:`combine`."""

    trainable = False

    def __init__(self, n_local: int, num_classes: int):
        super().__init__()
        whole("n_local", n_local), whole("num_classes", num_classes)
        self.n_local, self.num_classes = n_local, num_classes

    def forward(self, local_logits: torch.Tensor) -> torch.Tensor:
        if local_logits.dim() != 3 or tuple(local_logits.shape[1:]) != (self.n_local, self.num_classes):
            raise ShapeError(
                f"{type(self).__name__} expects local logits (B, {self.n_local}, {self.num_classes}), got "
                f"{list(local_logits.shape)}"
            )
        return self.combine(local_logits.float())

    def combine(self, local_logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"n_local={self.n_local}, num_classes={self.num_classes}"


class MeanProbability(Combiner):
    """Mean of the N local probability vectors; returns its log (log-probabilities, ``(B, K)``)."""

    def combine(self, local_logits):
        n = local_logits.shape[1]
        return torch.logsumexp(local_logits.log_softmax(-1), dim=1) - torch.log(torch.tensor(float(n)))


class WeightedMean(Combiner):
    """Learned convex combination of the local probabilities (one weight per subdomain, softmax-normalised).

    Starts as :class:`MeanProbability`; returns log-probabilities ``(B, K)``.
    """

    trainable = True

    def __init__(self, n_local: int, num_classes: int):
        super().__init__(n_local, num_classes)
        self.weight_logits = nn.Parameter(torch.zeros(n_local))

    def combine(self, local_logits):
        log_w = self.weight_logits.log_softmax(0).view(1, -1, 1)
        return torch.logsumexp(local_logits.log_softmax(-1) + log_w, dim=1)


class MajorityVote(Combiner):
    """Each subdomain votes for its most probable class; the class with most votes wins.

    Ties are broken by the highest probability summed over the subdomains among the tied classes, then by the
    lowest class index. Returns ``votes + summed_probability / (N + 1)``: the integer part counts the votes and
    the fraction (always below one) orders the tied classes. Not differentiable; nothing to train.
    """

    def combine(self, local_logits):
        probs = local_logits.softmax(-1)
        n, k = probs.shape[1], probs.shape[2]
        votes = nn.functional.one_hot(probs.argmax(-1), k).sum(1).to(probs.dtype)
        return votes + probs.sum(1) / (n + 1)


class DNN(Combiner):
    """Dense network over the concatenated N*K local probabilities -> K logits (the CNN-DNN's combiner).

    Args:
        hidden: sizes of the hidden layers (default :func:`default_hidden`: two layers of ``min(512, max(64, 4*N*K))``).
        activation: ``"relu"``, ``"gelu"``, ``"tanh"`` or ``"silu"``.
        dropout: dropout probability after each hidden layer.
    """

    trainable = True

    def __init__(self, n_local: int, num_classes: int, hidden: Sequence[int] | None = None,
                 activation: str = "relu", dropout: float = 0.0):
        super().__init__(n_local, num_classes)
        choice("activation", activation, ACTIVATIONS)
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be a number in [0, 1), got {dropout!r}")
        inputs = n_local * num_classes
        if hidden is None:
            hidden = default_hidden(n_local, num_classes)
        hidden = wholes("hidden", hidden, example="[64, 64]", empty=True)
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(inputs, width), ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            inputs = width
        layers.append(nn.Linear(inputs, num_classes))
        self.mlp = nn.Sequential(*layers)
        self.hidden, self.activation, self.dropout = list(hidden), activation, float(dropout)

    def combine(self, local_logits):
        return self.mlp(local_logits.softmax(-1).flatten(1))


def default_hidden(n_local: int, num_classes: int) -> list[int]:
    """Two hidden layers of ``min(512, max(64, 4 * N * K))`` units."""
    width = min(512, max(64, 4 * n_local * num_classes))
    return [width, width]


def build_combiner(name: str, n_local: int, num_classes: int, **options) -> Combiner:
    """A combiner by name (``COMBINERS``); ``options`` go to :class:`DNN`."""
    classes = {"dnn": DNN, "mean_probability": MeanProbability, "majority_vote": MajorityVote,
               "weighted_mean": WeightedMean}
    choice("combiner", name, COMBINERS)
    if options and name != "dnn":
        raise ConfigError(f"combiner {name!r} takes no options, got {sorted(options)}")
    return classes[name](n_local, num_classes, **options)
