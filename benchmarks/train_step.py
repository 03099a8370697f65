#!/usr/bin/env python
"""Throughput of one training step: the global CNN against the local ensemble (``grouped``, ``vmap`` and ``loop``).

For each configuration (image size, channels, grid, widths, depth, batch) the script measures, one model at a time:

* ``global``: ``ddcnn.GlobalCNN`` of width W on whole images, cross-entropy loss;
* ``grouped``: ``ddcnn.LocalEnsemble(backend="grouped")``, the N local CNNs fused into one network with grouped
  convolutions;
* ``vmap``: ``ddcnn.LocalEnsemble(backend="vmap")``, the N local CNNs as one functional model (``torch.func.vmap``
  over their stacked parameters): the batched backend for any CNN, measured here on the same built-in backbone;
* ``loop``: ``ddcnn.LocalEnsemble(backend="loop")``, N ordinary CNNs called one after the other.

The local width is ``ddcnn.local_width(W, N)`` unless ``--local-width`` is given. With ``--compile`` every model,
global and ensembles alike, is wrapped in ``torch.compile`` with the same mode, so neither side is handicapped.

The timed step
--------------
Images (random normal, ``(B, C, *size)``, float32, channels-last when enabled) and labels (random) are resident on
the device. One step is::

    optimizer.zero_grad(set_to_none=True)
    with autocast(bf16) (CUDA, --precision bf16 only):
        logits = model(images)        # ensembles: decomposition.split(images) -> LocalEnsemble, both inside model
        loss = loss_fn(logits, labels)  # ensembles: ddcnn.local_loss (sum of per-subdomain CE); global: CE
    loss.backward()
    optimizer.step()                  # torch.optim.SGD(lr=0.01, momentum=0.9)

There is no host synchronisation inside the step. After ``--warmup`` steps, each of ``--repeats`` steps is timed
alone: with CUDA events around it and one synchronisation after it on CUDA, with ``time.perf_counter`` on CPU. The
reported figure is the MEDIAN step time; img/s = batch / median.

Derived columns (per image)
---------------------------
* ``fwd FLOP/img``: ``ddcnn.forward_flops(model, shape)`` (convolutions and matrix products, 2 FLOPs per
  multiply-add) of the global CNN on ``(C, *size)`` or of the ensemble on ``(N, C, *subimage)``. One training step
  costs about 3x this (forward, gradient w.r.t. activations, gradient w.r.t. weights): ``train FLOPs = 3 * fwd``.
* ``act B/img``: estimated activation traffic of one training step, per image::

      bytes = 3 * dtype_bytes * sum(numel of the output of every Conv, BatchNorm, ReLU, MaxPool, AdaptiveAvgPool
                                    layer and of every ResNet BasicBlock, for ONE image)

  with ``dtype_bytes`` = 2 for bf16 and 4 for fp32. The factor 3 counts the output written once in the forward pass,
  read once in the backward pass, and its gradient written once in the backward pass. The sizes come from forward
  hooks on a batch-1 evaluation pass. In-place ReLUs are counted like any other layer. Weights, optimizer state,
  the input images, the subimage copy made by ``split``, and re-reads inside kernels are ignored, so this is a
  rough lower-bound-ish model of HBM traffic, good for comparing models, not for absolute claims.
* ``roofline img/s`` = ``1 / max(train_flops / peak_flops, train_bytes / peak_bandwidth)`` with ``--peak-tflops``
  (default 790 bf16 / 60 fp32 on CUDA, i.e. H100/H200 SXM dense) and ``--peak-bw-gbs`` (default 3000 on CUDA). On
  CPU both peaks are measured before the sweep (:func:`measure_cpu_peaks`: the best of a few 1024^2 matmuls in the
  run's precision, and of 256 MiB copies), so "% roofline" is against what this CPU reaches on a plain matmul and
  copy; the header says where the peaks came from.
* ``% roofline`` = measured img/s / roofline img/s; ``TFLOP/s`` = train FLOPs per image * img/s.
* ``peak MiB``: ``torch.cuda.max_memory_allocated`` while building data, compiling and stepping that model (stats
  reset once the model is on the device, so parameters count); "-" on CPU.
* ``vs global`` = ensemble img/s / global img/s of the same configuration; ``vs loop`` = grouped (or vmap) img/s /
  loop img/s.

A model that runs out of memory or fails to compile gets a row with the error; the sweep goes on.

Examples::

    python benchmarks/train_step.py --device cpu --image-size 28 28 --channels 1 --grid 2 2 --width 16 --batch 64
    python benchmarks/train_step.py --sweep cpu --markdown
    python benchmarks/train_step.py --sweep h100 --json h100.json --markdown
    python benchmarks/train_step.py --sweep h100 --compile default --backends grouped --time-budget 300

``--sweep`` fixes the configurations (image size, channels, grid, batch, width, depth, backbone); run settings given
explicitly on the command line (precision, compile, channels-last, warmup, repeats, backends, device, peaks) win over
the preset's.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import ddcnn
from ddcnn.models.backbones import BACKBONES, BasicBlock
from ddcnn.models.cnn_dnn import check_fits

MODEL_KINDS = ("global", "grouped", "vmap", "loop")
ENSEMBLE_BACKENDS = ("grouped", "vmap", "loop")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
CUDA_PEAK_TFLOPS = {"bf16": 790.0, "fp32": 60.0}  # H100/H200 SXM, dense
CUDA_PEAK_BW_GBS = 3000.0
ACTIVATION_LAYERS = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    BasicBlock,
)


# ---------------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Config:
    """One problem size: what is trained, on which images, with which batch."""

    image_size: tuple[int, ...] = (32, 32)
    channels: int = 3
    grid: tuple[int, ...] = (4, 4)
    width: int = 64
    local_width: int | None = None  # None: ddcnn.local_width(width, N)
    depth: tuple[int, ...] = (2, 2, 2)
    backbone: str = "vgg"
    classes: int = 10
    batch: int = 4096

    @property
    def dims(self) -> int:
        return len(self.image_size)

    @property
    def decomposition(self) -> ddcnn.Decomposition:
        return ddcnn.Decomposition(self.image_size, self.grid)

    @property
    def n_local(self) -> int:
        return math.prod(self.grid)

    @property
    def lw(self) -> int:
        return self.local_width if self.local_width is not None else ddcnn.local_width(self.width, self.n_local)

    def validate(self) -> None:
        """Raise ddcnn's ConfigError when the grid does not fit the image or the backbone."""
        check_fits(self.decomposition, self.backbone, self.depth)

    @property
    def label(self) -> str:
        x = "x".join
        sub = x(map(str, self.decomposition.subimage_size))
        return (f"{x(map(str, self.image_size))}x{self.channels}, grid {x(map(str, self.grid))} (N={self.n_local}, "
                f"subimages {sub}), batch {self.batch}, {self.backbone} depth {'-'.join(map(str, self.depth))}, "
                f"width {self.width} global / {self.lw} local")


@dataclass
class Settings:
    """How every configuration is run and measured."""

    device: torch.device
    precision: str
    compile: str
    channels_last: bool
    warmup: int
    repeats: int
    backends: tuple[str, ...]
    peak_tflops: float
    peak_bw_gbs: float
    peak_source: str  # where the two peaks come from, printed in the header
    max_loop_n: int | None = None  # loop backend skipped for larger N (sweeps, to save time)
    lr: float = 0.01


_H100_COMMON = dict(channels=3, width=64, depth=(2, 2, 2), backbone="vgg", classes=10)
_CPU_COMMON = dict(image_size=(28, 28), channels=1, width=16, depth=(2, 2, 2), backbone="vgg", classes=10, batch=256)
SWEEPS: dict[str, dict] = {
    "h100": {
        "description": "H100/H200: bf16, channels-last, VGG (2,2,2) width 64; loop only where N <= 16",
        "settings": dict(device="cuda", precision="bf16", channels_last=True, backends=("grouped", "vmap", "loop"),
                         max_loop_n=16),
        "configs": [
            Config(image_size=(32, 32), grid=(2, 2), batch=4096, **_H100_COMMON),
            Config(image_size=(32, 32), grid=(4, 4), batch=4096, **_H100_COMMON),
            Config(image_size=(128, 128), grid=(4, 4), batch=512, **_H100_COMMON),
            Config(image_size=(256, 256), grid=(8, 8), batch=64, **_H100_COMMON),
        ],
    },
    "cpu": {
        "description": "small CPU set: 28x28x1 (width 16, batch 256) and 24^3x1 (batch 32), fp32, channels-last "
                       "(about a minute on 2 cores)",
        "settings": dict(device="cpu", precision="fp32", channels_last=True, backends=("grouped", "vmap", "loop"),
                         warmup=3, repeats=11),
        "configs": [Config(grid=(2, 2), **_CPU_COMMON), Config(grid=(4, 4), **_CPU_COMMON),
                    Config(**{**_CPU_COMMON, "image_size": (24, 24, 24), "grid": (2, 2, 2), "batch": 32})],
    },
}


# ---------------------------------------------------------------------------------------------- models
class SplitEnsemble(ddcnn.CNNDNN):
    """A CNN-DNN whose output is its local logits: ``(B, C, *size) -> (B, N, K)``, the split timed (and compiled)
    with the ensemble. The combiner (mean probability: no parameters) is never called."""

    def __init__(self, decomposition: ddcnn.Decomposition, ensemble: ddcnn.LocalEnsemble):
        super().__init__(decomposition, ensemble, ddcnn.MeanProbability(ensemble.n_local, ensemble.num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.local_logits(images)


def global_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


def ensemble_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return ddcnn.local_loss(logits, labels)[0]


def flop_model(kind: str, cfg: Config) -> tuple[nn.Module, tuple[int, ...]]:
    """The module whose ``ddcnn.forward_flops`` is reported, and its per-sample input shape."""
    if kind == "global":
        return ddcnn.GlobalCNN(cfg.channels, cfg.classes, cfg.backbone, cfg.width, cfg.depth, cfg.dims), (
            cfg.channels, *cfg.image_size)
    ensemble = ddcnn.LocalEnsemble(cfg.n_local, cfg.channels, cfg.classes, cfg.backbone, cfg.lw, cfg.depth, cfg.dims,
                                   backend=kind, seed=0)
    return ensemble, (cfg.n_local, cfg.channels, *cfg.decomposition.subimage_size)


def build_model(kind: str, cfg: Config):
    """``(model on images, module counted for FLOPs, its per-sample input shape, loss function)``."""
    core, shape = flop_model(kind, cfg)
    if kind == "global":
        return core, core, shape, global_loss
    return SplitEnsemble(cfg.decomposition, core), core, shape, ensemble_loss


@torch.no_grad()
def activation_elements(module: nn.Module, input_shape) -> int:
    """Sum of the output sizes of the layers in ``ACTIVATION_LAYERS`` for one input (batch-1 eval pass)."""
    counts: list[int] = []

    # Under vmap a hook sees one slot's output; the ensemble's N slots each write one.
    per_call = module.n_local if getattr(module, "backend", None) == "vmap" else 1

    def hook(_module, _inputs, output):
        counts.append(output.numel() * per_call)

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, ACTIVATION_LAYERS)]
    was_training = module.training
    module.eval()
    try:
        device = next(module.parameters()).device
        module(torch.zeros(1, *input_shape, device=device))
    finally:
        module.train(was_training)
        for h in handles:
            h.remove()
    return sum(counts)


# ---------------------------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cleanup(device: torch.device, compiled: bool) -> None:
    if compiled:
        torch.compiler.reset()  # fresh caches per model: no recompile limit hit, no stale graphs kept alive
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_steps(step, repeats: int, device: torch.device) -> tuple[list[float], torch.Tensor | None]:
    """Seconds of each of ``repeats`` steps (CUDA events on GPU, perf_counter on CPU) and the last loss."""
    times, loss = [], None
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(repeats):
            start.record()
            loss = step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t0)
    return times, loss


def measure(kind: str, cfg: Config, st: Settings) -> dict:
    """Build one model, time its training step, and return its row (measured and derived columns)."""
    device = st.device
    torch.manual_seed(0)
    model, core, shape, loss_fn = build_model(kind, cfg)
    model = model.to(device).train()
    if st.channels_last:
        model = model.to(memory_format=torch.channels_last if cfg.dims == 2 else torch.channels_last_3d)
    fwd_flops = ddcnn.forward_flops(core, shape)
    act_bytes = 3 * DTYPE_BYTES[st.precision] * activation_elements(core, shape)
    params = ddcnn.count_parameters(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    images = torch.randn(cfg.batch, cfg.channels, *cfg.image_size, device=device)
    if st.channels_last:
        images = images.contiguous(memory_format=torch.channels_last if cfg.dims == 2 else torch.channels_last_3d)
    labels = torch.randint(0, cfg.classes, (cfg.batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=st.lr, momentum=0.9)
    run = model if st.compile == "none" else torch.compile(model, mode=None if st.compile == "default" else st.compile)
    mark_step = getattr(torch.compiler, "cudagraph_mark_step_begin", None) if st.compile != "none" else None
    bf16 = st.precision == "bf16"

    def step() -> torch.Tensor:
        if mark_step is not None:
            mark_step()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
            loss = loss_fn(run(images), labels)
        loss.backward()
        optimizer.step()
        return loss

    t0 = time.perf_counter()
    for _ in range(st.warmup):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - t0
    times, loss = time_steps(step, st.repeats, device)
    loss_value = float(loss.detach()) if loss is not None else float("nan")  # one sync, after timing

    median = statistics.median(times)
    img_s = cfg.batch / median
    train_flops = 3 * fwd_flops
    roofline = 1.0 / max(train_flops / (st.peak_tflops * 1e12), act_bytes / (st.peak_bw_gbs * 1e9), 1e-30)
    return dict(
        img_s=img_s, ms_step=median * 1e3, ms_min=min(times) * 1e3, ms_max=max(times) * 1e3,
        fwd_flops=fwd_flops, train_flops=train_flops, bytes_img=act_bytes, roofline_img_s=roofline,
        roofline_pct=100.0 * img_s / roofline, tflops=train_flops * img_s / 1e12,
        peak_mem_mib=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        warmup_s=warmup_s, loss=loss_value, params=params,
    )


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "out of memory"
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:200]


def run_config(cfg: Config, st: Settings, deadline: float | None, log) -> list[dict]:
    """Rows for the global CNN and every requested backend on one configuration."""
    rows = []
    for kind in ("global", *st.backends):
        row = dict(config=cfg.label, model=kind, n_local=1 if kind == "global" else cfg.n_local,
                   width=cfg.width if kind == "global" else cfg.lw, batch=cfg.batch, image_size=list(cfg.image_size),
                   channels=cfg.channels, grid=list(cfg.grid), depth=list(cfg.depth), backbone=cfg.backbone,
                   precision=st.precision, compile=st.compile, channels_last=st.channels_last, note="")
        if kind == "loop" and st.max_loop_n is not None and cfg.n_local > st.max_loop_n:
            row["note"] = f"skipped: N={cfg.n_local} > {st.max_loop_n}"
        elif deadline is not None and time.monotonic() >= deadline:
            row["note"] = "skipped: time budget exhausted"
        else:
            log(f"  measuring {kind} ...")
            t0 = time.perf_counter()
            try:
                row.update(measure(kind, cfg, st))
            except Exception as exc:  # OOM, compile failure, ...: report it and go on with the sweep
                row["error"] = row["note"] = _error_text(exc)
                log("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:]).rstrip())
            _cleanup(st.device, st.compile != "none")
            log(f"  {kind}: {row.get('img_s', 0):.0f} img/s ({time.perf_counter() - t0:.1f} s) {row['note']}")
        rows.append(row)
    by_model = {r["model"]: r for r in rows if "img_s" in r}
    for r in rows:
        if "img_s" not in r or r["model"] == "global":
            continue
        if "global" in by_model:
            r["ratio_global"] = r["img_s"] / by_model["global"]["img_s"]
        if r["model"] in ("grouped", "vmap") and "loop" in by_model:
            r["ratio_loop"] = r["img_s"] / by_model["loop"]["img_s"]
    return rows


# ---------------------------------------------------------------------------------------------- output
def _num(x: float) -> str:
    """Compact fixed-point: 1,234 / 12.3 / 1.23 / 0.0123."""
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if abs(x) >= 0.1 else f"{x:.3g}"


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def table_columns() -> list[tuple[str, object]]:
    """(header, function of a measured row) for the printed table; unmeasured rows print '-' but the note."""
    def opt(key, fmt):
        return lambda r: fmt(r[key]) if r.get(key) is not None else "-"

    return [
        ("model", lambda r: r["model"]), ("N", lambda r: str(r["n_local"])), ("width", lambda r: str(r["width"])),
        ("batch", lambda r: str(r["batch"])),
        ("img/s", opt("img_s", lambda v: f"{v:,.0f}")), ("ms/step", opt("ms_step", _num)),
        ("vs global", opt("ratio_global", lambda v: f"{v:.2f}x")),
        ("vs loop", opt("ratio_loop", lambda v: f"{v:.2f}x")),
        ("fwd FLOP/img", opt("fwd_flops", _si)), ("act B/img", opt("bytes_img", _si)),
        ("roofline img/s", opt("roofline_img_s", lambda v: f"{v:,.0f}")),
        ("% roofline", opt("roofline_pct", _num)), ("TFLOP/s", opt("tflops", _num)),
        ("peak MiB", opt("peak_mem_mib", lambda v: f"{v:,.0f}")), ("warmup s", opt("warmup_s", lambda v: f"{v:.1f}")),
        ("note", lambda r: r.get("note", "")),
    ]


def format_table(rows: list[dict], markdown: bool) -> str:
    cols = table_columns()
    cells = [[fn(r) for _, fn in cols] for r in rows]
    heads = [h for h, _ in cols]
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" if i == 0 or i == len(heads) - 1 else "---:"
                                                                 for i in range(len(heads))) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    align = [str.ljust if i in (0, len(heads) - 1) else str.rjust for i in range(len(heads))]
    lines = ["  ".join(align[i](h, widths[i]) for i, h in enumerate(heads)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(align[i](c, widths[i]) for i, c in enumerate(row)).rstrip() for row in cells]
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header_info(st: Settings, argv: list[str]) -> dict:
    dev = st.device
    cuda = dev.type == "cuda" and torch.cuda.is_available()  # a dry run may name cuda on a machine without it
    if cuda:
        name = f"{torch.cuda.get_device_name(dev)} ({dev})"
    elif dev.type == "cuda":
        name = "cuda (not available on this machine)"
    else:
        name = f"CPU {_cpu_name()} ({torch.get_num_threads()} threads, {os.cpu_count()} cores visible)"
    return {
        "device": name, "torch": torch.__version__, "cuda": torch.version.cuda or "-",
        "cudnn": str(torch.backends.cudnn.version()) if cuda else "-", "python": platform.python_version(),
        "precision": st.precision + (" (torch.autocast bf16)" if st.precision == "bf16" else
                                     (" (TF32 off)" if dev.type == "cuda" else "")),
        "compile": st.compile, "channels_last": st.channels_last, "warmup": st.warmup, "repeats": st.repeats,
        "cudnn_benchmark": dev.type == "cuda", "peak_tflops": st.peak_tflops, "peak_bw_gbs": st.peak_bw_gbs,
        "peak_source": st.peak_source,
        "command": "python benchmarks/train_step.py " + shlex.join(argv),
    }


def format_header(info: dict, markdown: bool) -> str:
    peaks = f"{info['peak_tflops']:.3g} TFLOP/s, {info['peak_bw_gbs']:.3g} GB/s ({info['peak_source']})"
    lines = [
        f"device: {info['device']}",
        f"torch {info['torch']} | CUDA {info['cuda']} | cuDNN {info['cudnn']} | python {info['python']}",
        f"precision: {info['precision']} | compile: {info['compile']} | channels-last: "
        f"{'on' if info['channels_last'] else 'off'} | cudnn.benchmark: {'on' if info['cudnn_benchmark'] else 'off'}"
        f" | warmup {info['warmup']}, median of {info['repeats']} steps",
        f"roofline peaks: {peaks}",
        f"command: {info['command']}",
    ]
    if markdown:
        return "## ddcnn training-step throughput\n\n" + "\n".join(f"- {line}" for line in lines)
    return "ddcnn training-step throughput\n" + "\n".join(lines)


# ---------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog="See the module docstring for the exact timing and traffic models.")
    g = p.add_argument_group("configuration (ignored with --sweep)")
    g.add_argument("--image-size", type=int, nargs="+", default=[32, 32], metavar="N", help="H W, or D H W for 3D")
    g.add_argument("--channels", type=int, default=3)
    g.add_argument("--grid", type=int, nargs="+", default=None, metavar="N", help="subimages per axis (default 4 each)")
    g.add_argument("--width", type=int, default=64, help="global CNN width")
    g.add_argument("--local-width", type=int, default=None, help="local CNN width (default ddcnn.local_width(W, N))")
    g.add_argument("--depth", type=int, nargs="+", default=[2, 2, 2])
    g.add_argument("--backbone", choices=BACKBONES, default="vgg")
    g.add_argument("--classes", type=int, default=10)
    g.add_argument("--batch", type=int, default=None, help="default 4096 on CUDA, 64 on CPU")
    r = p.add_argument_group("run settings")
    r.add_argument("--sweep", choices=sorted(SWEEPS), help="; ".join(f"{k}: {v['description']}"
                                                                    for k, v in SWEEPS.items()))
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="default auto (cuda if present)")
    r.add_argument("--precision", choices=tuple(DTYPE_BYTES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    r.add_argument("--compile", choices=COMPILE_MODES, default=None, help="torch.compile mode for ALL models")
    r.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="default on for CUDA 2D")
    r.add_argument("--warmup", type=int, default=None, help="default 5 (2 on CPU)")
    r.add_argument("--repeats", type=int, default=None, help="default 20 (5 on CPU)")
    r.add_argument("--backends", default=None, help="comma-separated ensemble backends (default grouped,vmap,loop)")
    r.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="skip the models and configurations left once this much time has passed")
    r.add_argument("--peak-tflops", type=float, default=None, help="roofline compute peak (default: see docstring)")
    r.add_argument("--peak-bw-gbs", type=float, default=None, help="roofline bandwidth peak in GB/s")
    o = p.add_argument_group("output")
    o.add_argument("--json", type=Path, default=None, metavar="PATH", help="write header and rows (after each config)")
    o.add_argument("--markdown", action="store_true", help="print Markdown tables")
    o.add_argument("--dry-run", action="store_true", help="check and list the configurations, measure nothing")
    return p


def resolve(args, parser) -> tuple[list[Config], Settings]:
    preset = SWEEPS[args.sweep] if args.sweep else {"settings": {}, "configs": None}
    pre = preset["settings"]

    def pick(name, fallback):
        value = getattr(args, name)
        return value if value is not None else pre.get(name, fallback)

    device_name = pick("device", "auto")
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name == "cuda" and not torch.cuda.is_available() and not args.dry_run:
        parser.error("CUDA is not available here; use --device cpu (or --sweep cpu)")
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    precision = pick("precision", "bf16" if cuda else "fp32")
    compile_mode = pick("compile", "none")

    if preset["configs"] is not None:
        configs = list(preset["configs"])
    else:
        dims = len(args.image_size)
        if dims not in (2, 3):
            parser.error("--image-size takes 2 (H W) or 3 (D H W) numbers")
        grid = tuple(args.grid) if args.grid else (4,) * dims
        configs = [Config(image_size=tuple(args.image_size), channels=args.channels, grid=grid, width=args.width,
                          local_width=args.local_width, depth=tuple(args.depth), backbone=args.backbone,
                          classes=args.classes, batch=args.batch or (4096 if cuda else 64))]
    for cfg in configs:
        try:
            cfg.validate()
        except (ddcnn.DDCNNError, ValueError) as exc:
            parser.error(str(exc))
    channels_last = pick("channels_last", cuda and all(c.dims == 2 for c in configs))

    backends = args.backends.split(",") if args.backends else list(pre.get("backends", ENSEMBLE_BACKENDS))
    backends = [b.strip() for b in backends if b.strip()]
    bad = [b for b in backends if b not in ENSEMBLE_BACKENDS]
    if bad:
        parser.error(f"unknown backend(s) {bad}; choose from {list(ENSEMBLE_BACKENDS)}")
    warmup = pick("warmup", 5 if cuda else 2)
    repeats = pick("repeats", 20 if cuda else 5)
    if repeats < 1 or warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if compile_mode != "none" and warmup < 2:
        parser.error("with --compile, use --warmup 2 or more so that compilation is not timed")
    given = (args.peak_tflops, args.peak_bw_gbs)
    if cuda:
        peak_tflops, peak_bw, source = CUDA_PEAK_TFLOPS[precision], CUDA_PEAK_BW_GBS, "H100/H200 SXM datasheet"
    elif None not in given:  # both given: nothing to measure
        peak_tflops, peak_bw, source = given[0], given[1], "given"
    elif args.dry_run:
        peak_tflops, peak_bw, source = float("nan"), float("nan"), "not measured in a dry run"
    else:
        peak_tflops, peak_bw = measure_cpu_peaks(precision)
        source = "measured on this CPU: 1024^2 matmul, 256 MiB copy"
    if given != (None, None):
        peak_tflops = peak_tflops if args.peak_tflops is None else args.peak_tflops
        peak_bw = peak_bw if args.peak_bw_gbs is None else args.peak_bw_gbs
        source = "given" if None not in given else source + "; partly given"
    st = Settings(device=device, precision=precision, compile=compile_mode, channels_last=bool(channels_last),
                  warmup=warmup, repeats=repeats, backends=tuple(dict.fromkeys(backends)), peak_tflops=peak_tflops,
                  peak_bw_gbs=peak_bw, peak_source=source, max_loop_n=pre.get("max_loop_n"))
    return configs, st


def measure_cpu_peaks(precision: str, repeats: int = 5) -> tuple[float, float]:
    """(TFLOP/s, GB/s) this CPU reaches: the best of ``repeats`` timings of four 1024^2 matmuls in ``precision``
    and of one 256 MiB copy (read + write)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    src, dst = torch.empty(2**26), torch.empty(2**26)  # 256 MiB of float32 each
    src.fill_(1.0), dst.fill_(0.0)  # touch the pages before timing

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    flops = 4 * 2 * 1024**3 / best(lambda: [a @ b for _ in range(4)])
    bandwidth = 2 * src.numel() * src.element_size() / best(lambda: dst.copy_(src))
    return flops / 1e12, bandwidth / 1e9


def _write_json(path: Path | None, info: dict, rows: list[dict], skipped: list[str]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"header": info, "rows": rows, "skipped_configs": skipped}, indent=1, default=str))


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; print the header and one table per configuration; return all rows."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    configs, st = resolve(args, parser)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    info = header_info(st, argv)
    print(format_header(info, args.markdown), flush=True)
    if args.dry_run:
        for cfg in configs:
            kinds = ["global"] + [b for b in st.backends if not (b == "loop" and st.max_loop_n is not None
                                                                 and cfg.n_local > st.max_loop_n)]
            print(f"\n{cfg.label}: {', '.join(kinds)}")
        return []

    saved = dict(bench=torch.backends.cudnn.benchmark, cudnn_tf32=torch.backends.cudnn.allow_tf32,
                 matmul_tf32=torch.backends.cuda.matmul.allow_tf32)
    if st.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if st.precision == "fp32":  # true fp32, matching the fp32 roofline peak
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    start = time.monotonic()
    deadline = start + args.time_budget if args.time_budget is not None else None
    rows: list[dict] = []
    skipped: list[str] = []
    try:
        for i, cfg in enumerate(configs):
            if deadline is not None and time.monotonic() >= deadline:
                skipped = [c.label for c in configs[i:]]
                print(f"\ntime budget of {args.time_budget:g} s exhausted after {time.monotonic() - start:.0f} s; "
                      f"skipped {len(skipped)} configuration(s):", flush=True)
                for label in skipped:
                    print(f"  skipped: {label}", flush=True)
                break
            log(f"[{time.monotonic() - start:.0f} s] {cfg.label}")
            cfg_rows = run_config(cfg, st, deadline, log)
            rows += cfg_rows
            title = f"### {cfg.label}" if args.markdown else cfg.label
            print(f"\n{title}\n\n{format_table(cfg_rows, args.markdown)}", flush=True)
            _write_json(args.json, info, rows, skipped)
    finally:
        torch.backends.cudnn.benchmark = saved["bench"]
        torch.backends.cudnn.allow_tf32 = saved["cudnn_tf32"]
        torch.backends.cuda.matmul.allow_tf32 = saved["matmul_tf32"]
    _write_json(args.json, info, rows, skipped)
    print(f"\ntotal {time.monotonic() - start:.0f} s" + (f"; rows written to {args.json}" if args.json else ""),
          flush=True)
    return rows


if __name__ == "__main__":
    main()
