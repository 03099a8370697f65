"""The collectives of spatial parallelism, each an autograd Function, and a meter of the bytes they send.

Every process holds a slab of every image along tensor dim 2 (H of ``(B, C, H, W)``, D of ``(B, C, D, H, W)``);
rank ``r`` holds the rows after those of rank ``r - 1``.

* :func:`halo` extends a slab by the rows its neighbours hold that a convolution needs (``lo`` above, ``hi``
  below; zeros at the true image border). Its backward sends the halo rows' gradients back to their owners, who
  add them to the gradients of their boundary rows. Point-to-point ``isend``/``irecv``: written here because
  DTensor's convolution sharding (``torch.distributed.tensor._tp_conv``) shards the last axis only and refuses a
  strided convolution with padding (the ResNet downsampling).
* :func:`sum_gradients`: identity forward; backward all-reduces (sums) the gradient. A parameter applied to every
  slab gets the sum of the slabs' contributions, the gradient of one process running the whole image.
* :func:`replicated_sum`: all-reduce (sum) forward; backward the identity. For a value that every process then
  uses identically (the pooled features of the head): each process's gradient of it is already the whole one.
* BatchNorm's statistics use ``torch.distributed.nn.functional.all_reduce`` (forward and backward sum), whose
  users are the slabs (see :mod:`ddcnn.train.parallel.spatial`).

Bytes are counted per process as sent: a halo as its size, an all-reduce of ``n`` bytes as ``2 (P-1)/P n`` (a
ring all-reduce sends that much from every process).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_reduce as _autograd_all_reduce


class CommMeter:
    """Bytes this process sent, by kind (``halo``, ``allreduce``), since the last :meth:`reset`."""

    def __init__(self):
        self.sent: dict[str, int] = {}

    def add(self, kind: str, nbytes: float) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + int(round(nbytes))

    def all_reduce(self, tensor: torch.Tensor, world: int) -> None:
        self.add("allreduce", 2 * (world - 1) / world * tensor.numel() * tensor.element_size())

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def reset(self) -> None:
        self.sent = {}


def _exchange(to_prev: torch.Tensor | None, to_next: torch.Tensor | None, rank: int, world: int,
              from_prev_like: torch.Tensor | None, from_next_like: torch.Tensor | None, meter: CommMeter | None):
    """Send ``to_prev`` to rank - 1 and ``to_next`` to rank + 1, receive buffers shaped like the ``*_like``
    tensors from them (``None``: nothing that way). Non-blocking both ways, so neighbours never wait on each
    other's order."""
    requests: list = []
    received: list[torch.Tensor | None] = []
    for peer, out, like in ((rank - 1, to_prev, from_prev_like), (rank + 1, to_next, from_next_like)):
        if not 0 <= peer < world:
            received.append(None)
            continue
        if out is not None and out.shape[2] > 0:
            out = out.contiguous()
            requests.append(dist.isend(out, peer))
            if meter is not None:
                meter.add("halo", out.numel() * out.element_size())
        buffer = None
        if like is not None and like.shape[2] > 0:
            buffer = torch.empty(like.shape, dtype=like.dtype, device=like.device)
            requests.append(dist.irecv(buffer, peer))
        received.append(buffer)
    for request in requests:
        request.wait()
    return received


def _rows(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return x.narrow(2, start, stop - start)


class _Halo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lo: int, hi: int, rank: int, world: int, meter):
        ctx.lo, ctx.hi, ctx.rank, ctx.world, ctx.meter, ctx.length = lo, hi, rank, world, meter, x.shape[2]
        length = x.shape[2]
        # Rank r - 1 needs my first ``hi`` rows below its slab; rank r + 1 my last ``lo`` rows above its slab.
        top_like, bottom_like = _rows(x, 0, lo), _rows(x, 0, hi)
        top, bottom = _exchange(_rows(x, 0, hi), _rows(x, length - lo, length), rank, world, top_like, bottom_like,
                                meter)
        # The true image border: the convolution's zero padding.
        top = torch.zeros_like(top_like) if top is None else top
        bottom = torch.zeros_like(bottom_like) if bottom is None else bottom
        return torch.cat([top, x, bottom], dim=2)

    @staticmethod
    def backward(ctx, grad):
        lo, hi, length = ctx.lo, ctx.hi, ctx.length
        grad_top, grad_bottom = _rows(grad, 0, lo), _rows(grad, lo + length, lo + length + hi)
        own = _rows(grad, lo, lo + length).clone()
        # My top halo was rank r - 1's last rows: its gradient goes back there; and so on.
        from_prev, from_next = _exchange(grad_top, grad_bottom, ctx.rank, ctx.world, _rows(own, 0, hi),
                                         _rows(own, length - lo, length), ctx.meter)
        if from_prev is not None:
            own.narrow(2, 0, hi).add_(from_prev)
        if from_next is not None:
            own.narrow(2, length - lo, lo).add_(from_next)
        return own, None, None, None, None, None


def halo(x: torch.Tensor, lo: int, hi: int, rank: int, world: int, meter: CommMeter | None = None) -> torch.Tensor:
    """``(B, C, L, ...) -> (B, C, lo + L + hi, ...)``: the slab with ``lo`` rows of rank - 1 above and ``hi`` rows
    of rank + 1 below (zeros beyond the first and last slab). Every rank calls it together with the same
    ``lo``, ``hi``; every slab holds at least ``max(lo, hi)`` rows."""
    if world == 1 or (lo == 0 and hi == 0):
        pads = [0, 0] * (x.dim() - 3) + [lo, hi]
        return torch.nn.functional.pad(x, pads) if lo or hi else x
    return _Halo.apply(x, lo, hi, rank, world, meter)


class _SumGradients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, world: int, meter):
        ctx.world, ctx.meter = world, meter
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        if ctx.meter is not None:
            ctx.meter.all_reduce(grad, ctx.world)
        return grad, None, None


def sum_gradients(x: torch.Tensor, world: int, meter: CommMeter | None = None) -> torch.Tensor:
    """``x`` itself; its gradient is summed over the processes (for the parameters used on every slab)."""
    return x if world == 1 else _SumGradients.apply(x, world, meter)


class _ReplicatedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, world: int, meter):
        out = x.contiguous().clone()
        dist.all_reduce(out)
        if meter is not None:
            meter.all_reduce(out, world)
        return out

    @staticmethod
    def backward(ctx, grad):
        # Every process used the sum identically: its gradient here is the gradient of each part.
        return grad, None, None


def replicated_sum(x: torch.Tensor, world: int, meter: CommMeter | None = None) -> torch.Tensor:
    """The sum of ``x`` over the processes, on every process, for values used identically by all of them."""
    return x if world == 1 else _ReplicatedSum.apply(x, world, meter)


def slab_sum(x: torch.Tensor, world: int, meter: CommMeter | None = None) -> torch.Tensor:
    """The sum of ``x`` over the processes, whose gradient is summed too (``x`` feeds every slab: BatchNorm's
    statistics); ``torch.distributed.nn.functional.all_reduce``."""
    if world == 1:
        return x
    if meter is not None:
        meter.all_reduce(x, world)
        if x.requires_grad:
            meter.all_reduce(x, world)  # the same all-reduce of the gradient in the backward pass
    return _autograd_all_reduce(x)
