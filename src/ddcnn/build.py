"""From a config and the data's shapes to every model of the protocol, built the same way everywhere: in training,
evaluation, prediction and ``ddcnn show``, and on the meta device for the checks made before a run (shapes, no
memory)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ddcnn.config import Config, n_parts
from ddcnn.decomposition import Decomposition
from ddcnn.errors import ConfigError, DDCNNError
from ddcnn.models import BACKBONES, CNNDNN, DNN, GlobalCNN, LocalEnsemble, check_fits, local_width
from ddcnn.models.cnn_dnn import whole_state
from ddcnn.models.ensemble import resolve_backend
from ddcnn.models.family import probe
from ddcnn.models.width import WholeImages, sub_width
from ddcnn.seeds import derive_seed


def with_backend(cfg: Config) -> Config:
    """A copy of ``cfg`` with ``model.backend: auto`` made concrete for its backbone and grid: what a run records in
    its config.yaml, so that the file says which backend ran and a resumed run compares against it."""
    n_local = n_parts(cfg)
    backend = resolve_backend(cfg.model.backend, cfg.model.backbone in BACKBONES, n_local)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backend=backend))


@dataclass
class Shapes:
    """What the models need to know about the data."""

    in_channels: int
    num_classes: int
    image_size: tuple[int, ...]


class Models:
    """Builds every model of an experiment from the config, the same way in training, evaluation and prediction."""

    def __init__(self, cfg: Config, shapes: Shapes):
        self.cfg, self.shapes = cfg, shapes
        d = cfg.decomposition
        builtin = self.family_builtin = cfg.model.backbone in BACKBONES
        self.width_kind = d.kind == "width"
        if self.width_kind and not builtin:
            raise ConfigError(f"decomposition.kind = 'width' recomposes the built-in backbones (vgg, resnet) only, "
                              f"whose every layer splits into groups of channels; {cfg.model.backbone!r} has no such "
                              f"rule: use model.backbone: vgg or resnet, or decomposition.kind: spatial")
        self.decomposition: Decomposition
        if self.width_kind and d.input == "whole":  # every sub-network sees the whole image
            self.decomposition = WholeImages(shapes.image_size, n_parts(cfg))
        else:
            self.decomposition = Decomposition(shapes.image_size, d.grid, d.overlap)
        self.n_local = self.decomposition.n_subdomains
        self.local_width = sub_width(cfg.model.width, self.n_local) if self.width_kind else \
            cfg.model.local_width or local_width(cfg.model.width, self.n_local)
        # model.depth describes vgg and resnet: a shipped config sets it, and naming another backbone with --set
        # model.backbone=... must not need a second --set to clear it.
        self.depth = cfg.model.depth if builtin else None
        self.notes: list[str] = []
        if not builtin and cfg.model.depth is not None:
            self.notes.append(f"model.depth {cfg.model.depth} applies to vgg and resnet only: ignored for "
                              f"{cfg.model.backbone} (its layers are set through model.backbone_kwargs)")
        if builtin:
            check_fits(self.decomposition, cfg.model.backbone, self.depth)
        else:  # a foreign backbone: one forward of the global CNN and of a local CNN, before anything is trained
            with torch.random.fork_rng(devices=[]):
                probe(self.global_cnn().net, (shapes.in_channels, *shapes.image_size), shapes.num_classes,
                      cfg.model.backbone, "the global CNN")
                # two local CNNs: the backend's handling of several (the loop's views of one batch) is checked too
                self.ensemble(range(min(2, self.n_local))).check_subimages(self.decomposition)

    @property
    def backend(self) -> str:
        """The local CNNs' backend, ``auto`` resolved for all N of them (a process's shard runs the same one)."""
        return resolve_backend(self.cfg.model.backend, self.cfg.model.backbone in BACKBONES, self.n_local)

    @property
    def dims(self) -> int:
        return len(self.shapes.image_size)

    def _seeded(self, stage: str):
        torch.manual_seed(derive_seed(self.cfg.seed, stage, 0))

    def global_cnn(self, stage: str = "global") -> GlobalCNN:
        """The global CNN as ``stage`` starts it (global_transfer then overwrites it with the sub-networks)."""
        self._seeded(stage)
        m = self.cfg.model
        return GlobalCNN(self.shapes.in_channels, self.shapes.num_classes, m.backbone, m.width, self.depth, self.dims,
                         m.backbone_kwargs)

    def ensemble(self, indices: range | None = None) -> LocalEnsemble:
        """All N local CNNs, or those of ``indices`` (a process's shard), each initialised from (seed, i)."""
        m = self.cfg.model
        indices = range(self.n_local) if indices is None else indices
        return LocalEnsemble(len(indices), self.shapes.in_channels, self.shapes.num_classes, m.backbone,
                             self.local_width, self.depth, self.dims, self.backend, seed=self.cfg.seed,
                             indices=list(indices), backbone_kwargs=m.backbone_kwargs)

    def dnn(self, stage: str = "combine") -> DNN:
        self._seeded(stage)
        c = self.cfg.combiner
        return DNN(self.n_local, self.shapes.num_classes, c.hidden, c.activation, c.dropout)

    def cnn_dnn(self, stage: str = "coherent") -> CNNDNN:
        return CNNDNN(self.decomposition, self.ensemble(), self.dnn(stage))


def stage_model(models, stage: str) -> nn.Module:
    """The model ``stage`` trains, built as training, evaluation and prediction build it."""
    if stage in ("global", "global_transfer"):
        return models.global_cnn(stage)
    if stage == "local":
        return models.ensemble()
    if stage == "combine":
        return models.dnn("combine")
    return models.cnn_dnn(stage)


def weight_shapes(stage: str, model: nn.Module) -> dict[str, tuple]:
    """``{name: shape}`` of what ``stage``'s checkpoint holds for ``model``: the local CNNs in the stacked layout,
    a CNN-DNN as :class:`~ddcnn.models.cnn_dnn.whole_state` saves it (works on the meta device)."""
    if isinstance(model, LocalEnsemble):
        state = model.stacked_state_dict()
    elif isinstance(model, CNNDNN):
        state = whole_state(model.ensemble.stacked_state_dict(), model.combiner.state_dict())
    else:
        state = model.state_dict()
    return {k: tuple(v.shape) for k, v in state.items()}


def meta_model(models, stage: str) -> nn.Module:
    """``stage``'s model on the meta device; a model too large even to describe is a ConfigError."""
    # Building seeds torch's global generators: a check before training must leave them as they were.
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=cuda), torch.device("meta"):
            return stage_model(models, stage)
    except (DDCNNError, RuntimeError, NotImplementedError) as err:
        if "meta" not in str(err).lower() or models.family_builtin:
            if isinstance(err, DDCNNError):
                raise
            raise ConfigError(f"the {stage!r} model of this config is too large to build ({err}); lower "
                              f"model.width, model.local_width or combiner.hidden") from None
        # A foreign network that reads its weights' values while it is built (an .item() in __init__) cannot be
        # built without memory; one global and two local CNNs of it were built for real already (the pre-check of
        # Models), so it is built on the CPU to be counted.
        with torch.random.fork_rng(devices=cuda), torch.device("cpu"):
            return stage_model(models, stage)
    except (OverflowError, ValueError, MemoryError) as err:
        raise ConfigError(f"the {stage!r} model of this config is too large to build ({err}); lower model.width, "
                          f"model.local_width or combiner.hidden") from None
