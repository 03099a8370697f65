"""The one registry of strategies: each name, the stages it needs, whose train time it counts and how it scores.

The protocol's test evaluation, ``ddcnn evaluate``, ``ddcnn predict`` and the report all read :data:`STRATEGIES`;
its order is the order of every table.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ddcnn.config import STAGES
from ddcnn.decomposition import Decomposition
from ddcnn.models import LocalEnsemble, MajorityVote, MeanProbability
from ddcnn.models.width import MeanLogits


@dataclass(frozen=True)
class Strategy:
    """How one decision is made.

    ``stages``: the stages whose trained models it uses. ``combiner(trained, n, k)``: for strategies that combine
    the frozen local CNNs' logits ``(B, N, K) -> (B, K)``; ``None`` for a model of whole images (the model of its
    only stage). ``time_stages``: whose train time counts toward it; ``init_stages``: counted too when the
    strategy's model was initialised from them (the transfer CNN-DNN's DNN from the combine stage).
    ``curve_key``: the key of the epoch records of its own stage (the last it counts) that hold its validation
    accuracy. ``scored_every_epoch``: a rule on the local CNNs alone, scored on validation every local epoch (its
    learning curve). ``outputs``: what its ``(B, K)`` scores become as one decision, ``"probabilities"`` or
    ``"votes"`` (each class's share of the subdomains' votes).
    """

    name: str
    label: str
    stages: tuple[str, ...]
    time_stages: tuple[str, ...]
    combiner: Callable[[Mapping[str, nn.Module], int, int], nn.Module] | None = None
    init_stages: tuple[str, ...] = ()
    curve_key: str = "val_accuracy"
    scored_every_epoch: bool = False
    outputs: str = "probabilities"
    whole_image: bool = False  # its model is one CNN of whole images (scores only, no local logits)
    kinds: tuple[str, ...] = ("spatial", "width")  # the decomposition.kind of the runs that score it

    def counted_stages(self, initialised_from: tuple[str, ...] = ()) -> tuple[str, ...]:
        """The stages whose train time counts, in stage order, given the stages the model was initialised from."""
        counted = set(self.time_stages) | {s for s in self.init_stages if s in initialised_from}
        return tuple(s for s in STAGES if s in counted)

    def time_note(self) -> str:
        """What the strategy's train time counts, e.g. ``local + combine``."""
        note = " + ".join(self.time_stages)
        if self.init_stages:
            note += f" (+ {' + '.join(self.init_stages)} when the model was initialised from it)"
        return note


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("global", "global CNN", ("global",), ("global",), whole_image=True),
    Strategy("cnn_dnn", "CNN-DNN", ("local", "combine"), ("local", "combine"),
             combiner=lambda trained, n, k: trained["combine"]),
    Strategy("mean_probability", "mean probability", ("local",), ("local",),
             combiner=lambda trained, n, k: MeanProbability(n, k), curve_key="val_accuracy_mean_probability",
             scored_every_epoch=True),
    Strategy("majority_vote", "majority vote", ("local",), ("local",),
             combiner=lambda trained, n, k: MajorityVote(n, k), curve_key="val_accuracy_majority_vote",
             scored_every_epoch=True, outputs="votes"),
    Strategy("coherent", "coherent CNN-DNN", ("coherent",), ("coherent",)),
    Strategy("transfer", "transfer CNN-DNN", ("transfer",), ("local", "transfer"), init_stages=("combine",)),
    # Width decomposition: the sub-networks' mean logits (without transfer), and the global CNN recomposed from
    # them and trained further.
    Strategy("sub_networks", "sub-network ensemble", ("local",), ("local",),
             combiner=lambda trained, n, k: MeanLogits(n, k), curve_key="val_accuracy_sub_networks",
             scored_every_epoch=True, kinds=("width",)),
    Strategy("global_transfer", "global CNN from sub-networks", ("global_transfer",), ("local", "global_transfer"),
             whole_image=True, kinds=("width",)),
)}


def strategy_names(kind: str = "spatial") -> list[str]:
    """The strategies a run of decomposition.kind ``kind`` can score, in registry order."""
    return [name for name, s in STRATEGIES.items() if kind in s.kinds]


def scored_every_epoch(kind: str = "spatial") -> list[str]:
    """The rules on the local CNNs alone whose validation accuracy the local stage records every epoch (in a run of
    decomposition.kind ``kind``)."""
    return [name for name, s in STRATEGIES.items() if s.scored_every_epoch and kind in s.kinds]


def gives_votes(name: str) -> bool:
    """Whether strategy ``name``'s scores are vote shares rather than probabilities (a name outside the registry,
    e.g. from an exported file's JSON: no)."""
    strategy = STRATEGIES.get(name)
    return strategy is not None and strategy.outputs == "votes"


def available(trained: Collection[str], kind: str = "spatial") -> list[str]:
    """The strategies whose stages were all trained, in registry order; ``kind``: the run's decomposition.kind."""
    return [name for name, s in STRATEGIES.items() if all(stage in trained for stage in s.stages) and kind in s.kinds]


def predictors(trained: Mapping[str, nn.Module], decomposition: Decomposition, num_classes: int,
               kind: str = "spatial") -> dict:
    """Every available strategy as ``normalised images (B, C, *size) -> (scores (B, K), local logits (B, N, K) or
    None)``. The combiners run in float32 outside autocast, on local logits computed under it."""
    n = decomposition.n_subdomains
    out = {}
    for name in available(trained, kind):
        strategy = STRATEGIES[name]
        if strategy.combiner is not None:
            out[name] = _combined(trained["local"], strategy.combiner(trained, n, num_classes), decomposition)
        elif strategy.whole_image:
            out[name] = lambda x, m=trained[strategy.stages[0]]: (m(x), None)
        else:  # a CNN-DNN: its own local logits come with its decision
            out[name] = lambda x, m=trained[name]: m(x, return_local=True)
    return out


def combine_local(combiner: nn.Module, local: torch.Tensor) -> torch.Tensor:
    """``combiner`` on local logits ``(B, N, K)``, in float32 outside autocast."""
    with torch.autocast(local.device.type, enabled=False):
        return combiner(local.float())


def _combined(ensemble: nn.Module, combiner: nn.Module, decomposition: Decomposition):
    # A LocalEnsemble takes subimages; a process's shard of the local CNNs (ShardedLocalCNNs) takes the images.
    takes_images = not isinstance(ensemble, LocalEnsemble)

    def fn(x):
        local = ensemble(x) if takes_images else ensemble(decomposition.split(x))
        return combine_local(combiner, local), local

    return fn
