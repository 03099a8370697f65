"""From a config to what a run computes with: the device and precision, and every model of the protocol."""

from __future__ import annotations

import platform
from dataclasses import dataclass

import torch

from ddcnn.config import Config
from ddcnn.decomposition import Decomposition
from ddcnn.errors import ConfigError
from ddcnn.models import CNNDNN, DNN, GlobalCNN, LocalEnsemble, check_fits, local_width
from ddcnn.train.distributed import DistEnv
from ddcnn.train.loop import Runtime, epoch_seed


def make_runtime(cfg: Config, env: DistEnv | None = None) -> Runtime:
    """Device and precision from the config; asking for CUDA on a machine without it is an error. Under torchrun
    each process takes the GPU of its ``LOCAL_RANK``."""
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device = {cfg.device!r} but this machine has no CUDA device; use device=cpu "
                              f"(or device=auto)")
        if env is not None and env.enabled:
            name = f"cuda:{env.local_rank}"
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device = {name!r} but this machine has {torch.cuda.device_count()} GPU(s); use "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        amp = torch.bfloat16
    else:
        amp = None
    # Channels-last is faster for both the global CNN and the grouped ensemble where measured (docs/performance.md):
    # 2D on CUDA and CPU, 3D on CPU. 3D on CUDA keeps the default layout until it is measured.
    return Runtime(device=device, amp_dtype=amp, channels_last=True, channels_last_3d=device.type == "cpu")


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
        check_fits(self.decomposition, cfg.model.backbone, cfg.model.depth)
        self.n_local = self.decomposition.n_subdomains
        self.local_width = cfg.model.local_width or local_width(cfg.model.width, self.n_local)

    @property
    def dims(self) -> int:
        return len(self.shapes.image_size)

    def _seeded(self, stage: str):
        torch.manual_seed(epoch_seed(self.cfg.seed, stage, 0))

    def global_cnn(self) -> GlobalCNN:
        self._seeded("global")
        m = self.cfg.model
        return GlobalCNN(self.shapes.in_channels, self.shapes.num_classes, m.backbone, m.width, m.depth, self.dims)

    def ensemble(self, indices: range | None = None) -> LocalEnsemble:
        """All N local CNNs, or those of ``indices`` (a process's shard), each initialised from (seed, i)."""
        m = self.cfg.model
        indices = range(self.n_local) if indices is None else indices
        return LocalEnsemble(len(indices), self.shapes.in_channels, self.shapes.num_classes, m.backbone,
                             self.local_width, m.depth, self.dims, m.backend, seed=self.cfg.seed,
                             indices=list(indices))

    def dnn(self, stage: str = "combine") -> DNN:
        self._seeded(stage)
        c = self.cfg.combiner
        return DNN(self.n_local, self.shapes.num_classes, c.hidden, c.activation, c.dropout)

    def cnn_dnn(self, stage: str = "coherent") -> CNNDNN:
        return CNNDNN(self.decomposition, self.ensemble(), self.dnn(stage))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
