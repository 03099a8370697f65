"""Whole models: the CNN-DNN (decomposition + local CNNs + combiner) and the global CNN it is compared with."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ddcnn.checks import whole
from ddcnn.decomposition import Decomposition
from ddcnn.errors import ConfigError, ShapeError
from ddcnn.models.backbones import check_fits
from ddcnn.models.combiners import DNN, Combiner
from ddcnn.models.ensemble import LocalEnsemble
from ddcnn.models.family import Family

__all__ = ["CNNDNN", "GlobalCNN", "check_fits", "count_parameters", "forward_flops", "transfer_cnn_dnn"]


class CNNDNN(nn.Module):
    """Decomposition, local CNNs and a combiner as one model: ``(B, C, *image_size) -> (B, K)`` scores.

    Trained end to end this is the paper's coherent CNN-DNN; with the ensemble frozen and a DNN combiner it is the
    CNN-DNN of the two-stage method.
    """

    def __init__(self, decomposition: Decomposition, ensemble: LocalEnsemble, combiner: Combiner):
        super().__init__()
        parts = (("decomposition", decomposition, Decomposition), ("ensemble", ensemble, LocalEnsemble),
                 ("combiner", combiner, Combiner))
        for label, value, cls in parts:
            if not isinstance(value, cls):
                raise ConfigError(f"CNNDNN's {label} must be a {cls.__name__}, got {type(value).__name__}")
        if ensemble.n_local != decomposition.n_subdomains:
            raise ConfigError(
                f"the ensemble holds {ensemble.n_local} local CNNs but the decomposition has "
                f"{decomposition.n_subdomains} subdomains; build both for the same grid"
            )
        if combiner.n_local != ensemble.n_local or combiner.num_classes != ensemble.num_classes:
            raise ConfigError(
                f"the combiner expects {combiner.n_local} x {combiner.num_classes} local outputs but the ensemble "
                f"gives {ensemble.n_local} x {ensemble.num_classes}"
            )
        if ensemble.dims != decomposition.dims:
            raise ConfigError(f"a {ensemble.dims}D ensemble cannot run on a {decomposition.dims}D decomposition")
        ensemble.check_subimages(decomposition)
        self.decomposition, self.ensemble, self.combiner = decomposition, ensemble, combiner

    @property
    def num_classes(self) -> int:
        return self.ensemble.num_classes

    def local_logits(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, *image_size) -> (B, N, K)`` logits of every local CNN."""
        if images.dim() == self.decomposition.dims + 2 and images.shape[1] != self.ensemble.in_channels:
            raise ShapeError(f"the model expects {self.ensemble.in_channels} channels, got images "
                             f"{list(images.shape)}")
        return self.ensemble(self.decomposition.split(images))

    def forward(self, images: torch.Tensor, return_local: bool = False):
        local = self.local_logits(images)
        out = self.combiner(local)
        return (out, local) if return_local else out


class GlobalCNN(nn.Module):
    """The baseline: one CNN of the same family at global width on whole images, ``(B, C, *size) -> (B, K)``.

    ``backbone``, ``depth`` and ``backbone_kwargs`` as for :class:`LocalEnsemble`.
    """

    def __init__(self, in_channels: int, num_classes: int, backbone="vgg", width: int = 32,
                 depth: Sequence[int] | None = None, dims: int = 2, backbone_kwargs: dict | None = None):
        super().__init__()
        for label, value in (("in_channels", in_channels), ("num_classes", num_classes), ("width", width)):
            whole(label, value)
        family = Family(backbone, depth, dims, backbone_kwargs)
        self.net = family.build(in_channels, num_classes, width, dims)
        self.in_channels, self.num_classes, self.dims = in_channels, num_classes, dims
        self.backbone, self.width, self.depth = family.name, width, family.depth

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def transfer_cnn_dnn(decomposition: Decomposition, ensemble: LocalEnsemble, combiner: Combiner | None = None,
                     num_classes: int | None = None, **dnn_options) -> CNNDNN:
    """A coherent CNN-DNN initialised from trained local CNNs (and a trained DNN): the paper's transfer learning.

    The trained modules are copied, never shared, so training the result leaves them as they were. Without a
    ``combiner`` a freshly initialised :class:`DNN` (with ``dnn_options``) is used.
    """
    return CNNDNN(decomposition, *transfer_parts(ensemble, combiner, ensemble.n_local, num_classes, **dnn_options))


def transfer_parts(ensemble: LocalEnsemble, combiner: Combiner | None, n_local: int, num_classes: int | None = None,
                   **dnn_options) -> tuple[LocalEnsemble, Combiner]:
    """Trainable copies of the local CNNs (all ``n_local``, or one process's shard of them) and of the DNN (a new
    ``DNN(n_local, ...)`` when ``combiner`` is None): the parts of a transfer CNN-DNN."""
    ensemble = copy.deepcopy(ensemble)
    if combiner is None:
        combiner = DNN(n_local, num_classes or ensemble.num_classes, **dnn_options)
        combiner.to(next(ensemble.parameters()).device)
    else:
        combiner = copy.deepcopy(combiner)
    for p in list(ensemble.parameters()) + list(combiner.parameters()):
        p.requires_grad_(True)
    return ensemble, combiner


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def forward_flops(module: nn.Module, input_shape: Sequence[int]) -> int:
    """Forward FLOPs for ONE input of ``input_shape`` (no batch dim), counted by ``torch.utils.flop_counter``.

    Convolutions and matrix products (2 FLOPs per multiply-add) dominate; elementwise layers are not counted.
    """
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(torch.zeros(1, *input_shape, device=device))
    finally:
        module.train(was_training)
    return int(counter.get_total_flops())


# What a CNN-DNN's checkpoint holds, whatever the backend, the parallelism and the number of processes: the
# ensemble's stacked state (slot-major along dim 0; the grouped backend's own keys) and the DNN's state.
ENSEMBLE = "ensemble.net."
COMBINER = "combiner."


def whole_state(stacked_ensemble: dict, combiner: dict) -> dict:
    """A CNN-DNN's checkpoint layout: the ensemble's stacked state under ``ensemble.net.``, the DNN's under
    ``combiner.``."""
    return {**{ENSEMBLE + k: v for k, v in stacked_ensemble.items()}, **{COMBINER + k: v for k, v in combiner.items()}}


def split_whole_state(weights: dict) -> tuple[dict, dict]:
    """The inverse of :func:`whole_state`: ``(stacked ensemble state, combiner state)``."""
    stacked = {k[len(ENSEMBLE):]: v for k, v in weights.items() if k.startswith(ENSEMBLE)}
    combiner = {k[len(COMBINER):]: v for k, v in weights.items() if k.startswith(COMBINER)}
    return stacked, combiner


def load_whole_state(model: CNNDNN, weights: dict) -> None:
    """Load a CNN-DNN checkpoint (the :func:`whole_state` layout, the local CNNs stacked whatever the backend) into
    a whole model in one process."""
    stacked, combiner = split_whole_state(weights)
    device = next(model.combiner.parameters()).device
    model.ensemble.load_stacked_state_dict({k: v.to(device) for k, v in stacked.items()})
    model.combiner.load_state_dict({k: v.to(device) for k, v in combiner.items()})
