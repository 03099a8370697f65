"""Where and how a run computes: the device, bf16 autocast, the memory layout, and batched inference."""

from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from ddcnn.config import Config
from ddcnn.data.loading import to_float
from ddcnn.errors import ConfigError
from ddcnn.train.dist import DistEnv

M = TypeVar("M", bound=nn.Module)


@dataclass
class Runtime:
    """Where and how to compute: device, autocast dtype, memory format."""

    device: torch.device
    amp_dtype: torch.dtype | None = None  # bf16 autocast when set
    channels_last: bool = False  # convolution models in channels-last layout (2D; 3D where ``channels_last_3d``)
    channels_last_3d: bool = False

    def prepare(self, model: M, dims: int) -> M:
        """``model`` on the device, in the memory layout chosen for ``dims``-D convolutions."""
        model.to(self.device)
        if self.channels_last and (dims == 2 or self.channels_last_3d):
            model.to(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
        return model

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def predict(self, fn, images: torch.Tensor, normalizer, batch_size: int):
        """``fn`` on normalised images ``(M, C, *size)`` in batches, outputs float32 on the CPU.

        ``fn`` returns a tensor, or a tuple of tensors (``None`` entries stay ``None``); the result has its form.
        """
        chunks = []
        for start in range(0, len(images), batch_size):
            x = normalizer(to_float(images[start:start + batch_size].to(self.device)))
            with self.autocast():
                out = fn(x)
            chunks.append(out if isinstance(out, tuple) else (out,))
        if not chunks:
            return torch.empty(0)
        joined = tuple(None if parts[0] is None else torch.cat([p.float().cpu() for p in parts])
                       for parts in zip(*chunks))
        return joined if isinstance(out, tuple) else joined[0]


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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
