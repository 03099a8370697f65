"""From a config and the data's shapes to every model of the protocol, built the same way everywhere."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddcnn.config import Config
from ddcnn.decomposition import Decomposition
from ddcnn.errors import ConfigError
from ddcnn.models import BACKBONES, CNNDNN, DNN, GlobalCNN, LocalEnsemble, check_fits, local_width
from ddcnn.models.family import probe
from ddcnn.seeds import derive_seed


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
        self.decomposition = Decomposition(shapes.image_size, cfg.decomposition.grid, cfg.decomposition.overlap)
        self.n_local = self.decomposition.n_subdomains
        self.local_width = cfg.model.local_width or local_width(cfg.model.width, self.n_local)
        self.family_builtin = cfg.model.backbone in BACKBONES
        if self.family_builtin:
            check_fits(self.decomposition, cfg.model.backbone, cfg.model.depth)
        else:  # a foreign backbone: one forward of the global CNN and of a local CNN, before anything is trained
            with torch.random.fork_rng(devices=[]):
                probe(self.global_cnn().net, (shapes.in_channels, *shapes.image_size), shapes.num_classes,
                      cfg.model.backbone, "the global CNN")
                # two local CNNs: the backend's handling of several (the loop's views of one batch) is checked too
                self.ensemble(range(min(2, self.n_local))).check_subimages(self.decomposition)

    @property
    def dims(self) -> int:
        return len(self.shapes.image_size)

    def _seeded(self, stage: str):
        torch.manual_seed(derive_seed(self.cfg.seed, stage, 0))

    def global_cnn(self) -> GlobalCNN:
        self._seeded("global")
        m = self.cfg.model
        return GlobalCNN(self.shapes.in_channels, self.shapes.num_classes, m.backbone, m.width, m.depth, self.dims,
                         m.backbone_kwargs)

    def ensemble(self, indices: range | None = None) -> LocalEnsemble:
        """All N local CNNs, or those of ``indices`` (a process's shard), each initialised from (seed, i)."""
        m = self.cfg.model
        indices = range(self.n_local) if indices is None else indices
        return LocalEnsemble(len(indices), self.shapes.in_channels, self.shapes.num_classes, m.backbone,
                             self.local_width, m.depth, self.dims, m.backend, seed=self.cfg.seed,
                             indices=list(indices), backbone_kwargs=m.backbone_kwargs)

    def dnn(self, stage: str = "combine") -> DNN:
        self._seeded(stage)
        c = self.cfg.combiner
        return DNN(self.n_local, self.shapes.num_classes, c.hidden, c.activation, c.dropout)

    def cnn_dnn(self, stage: str = "coherent") -> CNNDNN:
        return CNNDNN(self.decomposition, self.ensemble(), self.dnn(stage))



def check_processes(env, models: Models, sharded: list[str]) -> None:
    """Refuse more processes (``env``, a DistEnv) than local CNNs when a stage of ``sharded`` gives each process
    its shard of them (training, or loading a finished run under torchrun), on every rank alike."""
    if env.enabled and sharded and env.world > models.n_local:
        # Model and data parallelism together (a 2-D mesh of processes) is not built: refused, not half-done.
        raise ConfigError(
            f"{env.world} processes but only {models.n_local} local CNNs (grid {list(models.decomposition.grid)}): "
            f"in the {', '.join(sharded)} stage(s) every process holds at least one local CNN; start at most "
            f"{models.n_local} processes (--nproc-per-node), use a finer grid, or set stages.<stage>.parallel=data "
            f"for coherent and transfer"
        )
