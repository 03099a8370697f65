"""N independent local CNNs evaluated in one call.

``LocalEnsemble`` maps subimages ``(B, N, C, *sub)`` to local logits ``(B, N, K)``. Two backends compute the same
function:

* ``"grouped"`` (default): the N CNNs fused into one network with grouped convolutions (see ``backbones``); one
  kernel launch per layer for all subdomains, which is what makes training them on one device fast.
* ``"loop"``: N ordinary CNNs in a ``ModuleList`` called one after the other; the reference implementation.

Local CNN ``i`` is initialised from the pair ``(seed, i)`` only, so the same local CNN comes out whichever backend,
process or shard builds it.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ddcnn.errors import ConfigError, ShapeError, did_you_mean
from ddcnn.models.backbones import Backbone, build_backbone, check_backbone_args, load_slot_state, slot_state
from ddcnn.seeds import derive_seed

BACKENDS = ("grouped", "loop")


def _whole(value) -> int | None:
    """``value`` as an int when it is a whole number (int, numpy integer; not bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def slot_seed(seed: int, index: int) -> int:
    """The seed that initialises local CNN ``index`` of an ensemble seeded with ``seed``."""
    return derive_seed(seed, "local CNN", index)


class LocalEnsemble(nn.Module):
    """N local CNNs with no shared parameters: ``(B, N, C, *sub) -> (B, N, K)`` logits.

    Args:
        n_local: number of local CNNs held here.
        in_channels, num_classes: channels of a subimage, classes to predict.
        backbone: ``"vgg"`` or ``"resnet"``; ``width`` the first stage's channels of ONE local CNN; ``depth`` the
            layers per stage (family default when ``None``); ``dims`` 2 or 3.
        backend: ``"grouped"`` or ``"loop"``.
        seed: local CNN ``i`` is initialised from ``(seed, indices[i])``; ``None`` draws the seed from torch's
            global generator (so ``torch.manual_seed`` still makes it reproducible).
        indices: the global subdomain numbers of the local CNNs held here (default ``range(n_local)``); a shard
            of a larger ensemble passes its slice so that its CNNs equal the full ensemble's.
    """

    def __init__(
        self,
        n_local: int,
        in_channels: int,
        num_classes: int,
        backbone: str = "vgg",
        width: int = 16,
        depth: Sequence[int] | None = None,
        dims: int = 2,
        backend: str = "grouped",
        seed: int | None = None,
        indices: Sequence[int] | None = None,
    ):
        super().__init__()
        if not isinstance(n_local, int) or isinstance(n_local, bool) or n_local < 1:
            raise ConfigError(f"n_local must be a positive whole number of local CNNs, got {n_local!r}")
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}{did_you_mean(str(backend), BACKENDS)}; choose one of "
                              f"{BACKENDS}")
        for label, value in (("in_channels", in_channels), ("num_classes", num_classes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{label} must be a positive whole number, got {value!r}")
        depth = check_backbone_args(backbone, width, depth, dims)
        if seed is not None and (_whole(seed) is None or seed < 0):
            raise ConfigError(f"seed must be a non-negative whole number (or None), got {seed!r}")
        if indices is None:
            indices = list(range(n_local))
        else:
            try:
                whole = [None] if isinstance(indices, str) else [_whole(i) for i in indices]
            except TypeError:  # not iterable
                whole = [None]
            if any(i is None or i < 0 for i in whole):
                raise ConfigError(f"indices must be a list of non-negative subdomain numbers, got {indices!r}")
            indices = whole
        if len(indices) != n_local:
            raise ConfigError(f"indices {indices} must name {n_local} local CNNs")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.n_local, self.in_channels, self.num_classes = n_local, in_channels, num_classes
        self.backbone, self.width, self.depth, self.dims = backbone, width, depth, dims
        self.backend, self.seed, self.indices = backend, int(seed), indices

        singles = [self._seeded_single(i) for i in indices]
        if backend == "loop":
            self.models = nn.ModuleList(singles)
        else:
            with torch.random.fork_rng(devices=[]):  # its own initialisation is overwritten slot by slot
                self.net = self._build(groups=n_local)
            for slot, single in enumerate(singles):
                load_slot_state(self.net, single.state_dict(), n_local, slot)
        self.min_input_size = singles[0].min_input_size

    def _build(self, groups: int = 1) -> Backbone:
        return build_backbone(
            self.backbone, self.in_channels, self.num_classes, self.width, self.depth, self.dims, groups
        )

    def _seeded_single(self, index: int) -> Backbone:
        # fork_rng keeps the caller's global generator untouched by the initialisation.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(slot_seed(self.seed, index))
            return self._build()

    def extra_repr(self) -> str:
        return (f"n_local={self.n_local}, backbone={self.backbone!r}, width={self.width}, depth={self.depth}, "
                f"dims={self.dims}, backend={self.backend!r}")

    def forward(self, subimages: torch.Tensor) -> torch.Tensor:
        expected_dim = self.dims + 3
        if subimages.dim() != expected_dim or subimages.shape[1] != self.n_local or (
            subimages.shape[2] != self.in_channels
        ):
            raise ShapeError(
                f"LocalEnsemble expects subimages (B, {self.n_local}, {self.in_channels}, "
                f"{', '.join(['h', 'w'] if self.dims == 2 else ['d', 'h', 'w'])}), got {list(subimages.shape)}"
            )
        b = subimages.shape[0]
        if self.backend == "loop":
            return torch.stack([m(subimages[:, i]) for i, m in enumerate(self.models)], dim=1)
        # (B, N, C, *sub) -> (B, N*C, *sub): slot i owns channels [i*C, (i+1)*C), as the grouped layers expect.
        logits = self.net(subimages.reshape(b, self.n_local * self.in_channels, *subimages.shape[3:]))
        return logits.view(b, self.n_local, self.num_classes)

    # ------------------------------------------------------------------ moving single local CNNs in and out
    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.n_local:
            raise ConfigError(f"local CNN index {i} is out of range for an ensemble of {self.n_local}")

    def local_model(self, i: int) -> Backbone:
        """Slot ``i`` as a standalone ordinary CNN ``(B, C, *sub) -> (B, K)``: same weights, same BatchNorm state."""
        self._check_index(i)
        single = self._build()
        if self.backend == "loop":
            single.load_state_dict(self.models[i].state_dict())
        else:
            single.load_state_dict(slot_state(self.net.state_dict(), self.n_local, i))
        device = next(self.parameters()).device
        return single.to(device).train(self.training)

    def set_local_model(self, i: int, module: nn.Module) -> None:
        """Copy an ordinary local CNN (as returned by :meth:`local_model`) into slot ``i``."""
        self._check_index(i)
        state = module.state_dict()
        if self.backend == "loop":
            target = self.models[i]
            load_slot_state(target, state, 1, 0)
        else:
            load_slot_state(self.net, state, self.n_local, i)

    # ------------------------------------------------------------------ one layout for both backends
    def stacked_state_dict(self) -> dict[str, torch.Tensor]:
        """The ensemble's state in the grouped layout, whatever the backend: one ordinary CNN's keys, every tensor
        the N slot tensors concatenated along dim 0 (scalars such as ``num_batches_tracked`` once)."""
        if self.backend == "grouped":
            return {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        states = [m.state_dict() for m in self.models]
        return {k: (v.detach().clone() if v.dim() == 0 else torch.cat([s[k] for s in states]))
                for k, v in states[0].items()}

    def load_stacked_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`stacked_state_dict`."""
        if self.backend == "grouped":
            self.net.load_state_dict(state)
            return
        for i, m in enumerate(self.models):
            load_slot_state(m, slot_state(state, self.n_local, i), 1, 0)

    def _parameters_by_position(self) -> list[list[nn.Parameter]]:
        """For each parameter of one CNN, the tensors holding it: one stacked tensor (grouped) or N (loop)."""
        if self.backend == "grouped":
            return [[p] for p in self.net.parameters()]
        return [list(ps) for ps in zip(*[list(m.parameters()) for m in self.models])]

    def stacked_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's per-parameter state in the stacked layout (``{"state": {j: {...}}, "param_groups"}``),
        so that it can be gathered across shards and loaded into either backend."""
        out = {}
        for j, params in enumerate(self._parameters_by_position()):
            states = [optimizer.state.get(p, {}) for p in params]
            if not states[0]:
                continue
            out[j] = {k: (torch.cat([st[k] for st in states]).detach().cpu() if torch.is_tensor(v) and v.dim() > 0
                          else (v.detach().cpu().clone() if torch.is_tensor(v) else v))
                      for k, v in states[0].items()}
        hyper = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        return {"state": out, "param_groups": [hyper]}

    def load_stacked_optimizer_state(self, optimizer: torch.optim.Optimizer, stacked: dict) -> None:
        """Inverse of :meth:`stacked_optimizer_state` (the optimizer holds this ensemble's parameters)."""
        for j, params in enumerate(self._parameters_by_position()):
            entry = stacked["state"].get(j)
            if entry is None:
                continue
            for i, p in enumerate(params):
                optimizer.state[p] = {
                    k: (v.unflatten(0, (len(params), -1))[i].to(p.device).clone()
                        if torch.is_tensor(v) and v.dim() > 0 else (v.clone() if torch.is_tensor(v) else v))
                    for k, v in entry.items()
                }
        for group in optimizer.param_groups:
            group.update({k: v for k, v in stacked["param_groups"][0].items() if k not in ("params", "lr")})

    # ------------------------------------------------------------------ per-slot views of the parameters
    def slot_tensors(self, grads: bool = False) -> list[torch.Tensor]:
        """Every parameter (or its gradient) viewed as ``(N, ...)``, slot along dim 0."""
        out = []
        if self.backend == "loop":
            # A copy, not a view: the loop backend keeps each slot's tensors apart.
            for tensors in zip(*[list(m.parameters()) for m in self.models]):
                if not grads:
                    out.append(torch.stack([t.detach() for t in tensors]))
                elif any(t.grad is not None for t in tensors):
                    out.append(torch.stack([torch.zeros_like(t) if t.grad is None else t.grad for t in tensors]))
            return out
        for p in self.net.parameters():
            t = p.grad if grads else p.detach()
            if t is not None:
                out.append(t.unflatten(0, (self.n_local, -1)))
        return out

    @torch.no_grad()
    def grad_norms(self) -> torch.Tensor:
        """Gradient 2-norm of each local CNN, ``(N,)``."""
        grads = self.slot_tensors(grads=True)
        if not grads:
            return torch.zeros(self.n_local)
        return torch.stack([g.reshape(self.n_local, -1).float().pow(2).sum(1) for g in grads]).sum(0).sqrt()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip each local CNN's gradient to ``max_norm`` separately (a global clip would couple the slots).

        Returns the norms before clipping, ``(N,)``.
        """
        norms = self.grad_norms()
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        if self.backend == "loop":
            for m, s in zip(self.models, scale.tolist()):
                for p in m.parameters():
                    if p.grad is not None:
                        p.grad.mul_(s)
        else:
            for p in self.net.parameters():
                if p.grad is not None:
                    g = p.grad.unflatten(0, (self.n_local, -1))
                    g.mul_(scale.to(g.device, g.dtype).view(-1, *[1] * (g.dim() - 1)))
        return norms


def local_loss(local_logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Training loss of the local CNNs: ``(B, N, K), (B,) -> (scalar, (N,))``.

    Each local CNN is trained on its own mean cross-entropy against the image's label. The total is the SUM of the
    N losses, not their mean, so that the gradient reaching slot ``i`` is exactly the gradient of its own loss and
    optimisers (SGD, Adam) update each slot as if it were trained alone.
    """
    b, n, k = local_logits.shape
    per_sample = F.cross_entropy(local_logits.reshape(b * n, k).float(), targets.repeat_interleave(n),
                                 reduction="none").view(b, n)
    per_slot = per_sample.mean(0)
    return per_slot.sum(), per_slot.detach()
