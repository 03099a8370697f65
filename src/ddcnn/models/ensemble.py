"""N independent local CNNs evaluated in one call.

``LocalEnsemble`` maps subimages ``(B, N, C, *sub)`` to local logits ``(B, N, K)``. Three backends compute the
same function:

* ``"grouped"`` (built-in backbones; what ``"auto"``, the default, picks for them): the N CNNs fused into one
  network with grouped convolutions (see ``backbones``); one kernel launch per layer for all subdomains, which is
  what makes training them on one device fast.
* ``"vmap"`` (any backbone): the N CNNs as one functional model, ``torch.func.vmap`` of ``functional_call`` over
  their stacked parameters and buffers. BatchNorm running statistics are stacked too and updated in place through
  their per-slot views, exactly as N separate models update theirs.
* ``"loop"``: N ordinary CNNs in a ``ModuleList`` called one after the other; the reference implementation.

``"auto"`` picks ``grouped`` for the built-in families and, for another network, ``vmap`` from 16 local CNNs on,
else ``loop`` (:func:`resolve_backend`).

``grouped`` and ``vmap`` keep one module, ``net``, with the names of ONE local CNN and every tensor the N slot
tensors concatenated along dim 0 (scalars such as ``num_batches_tracked`` once): the same state dict keys and
layout for both, and the layout every backend saves (:meth:`LocalEnsemble.stacked_state_dict`).

Local CNN ``i`` is initialised from the pair ``(seed, i)`` only, so the same local CNN comes out whichever backend,
process or shard builds it.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from ddcnn.checks import choice, whole, wholes
from ddcnn.errors import ConfigError, ShapeError
from ddcnn.models.backbones import check_fits, load_slot_state, slot_state
from ddcnn.models.family import Family, probe, train_probe
from ddcnn.seeds import derive_seed

BACKENDS = ("auto", "grouped", "loop", "vmap")
# From this many local CNNs on, vmap beats loop for a foreign backbone (docs/performance.md: 2.1x with 16 small
# CNNs on the CPU, slower or equal with 4 or 8).
VMAP_FROM = 16
_AS_STRIDED_WARNING = r"There is a performance drop because we have not yet implemented the batching rule for " \
    r"aten::as_strided_\."


def resolve_backend(backend: str, builtin: bool, n_local: int) -> str:
    """``backend`` made concrete: ``"auto"`` is ``grouped`` for the built-in families (vgg, resnet), and for a
    foreign backbone ``vmap`` from :data:`VMAP_FROM` local CNNs on, else ``loop``; any other value is kept."""
    if backend != "auto":
        return backend
    if builtin:
        return "grouped"
    return "vmap" if n_local >= VMAP_FROM else "loop"


def slot_seed(seed: int, index: int) -> int:
    """The seed that initialises local CNN ``index`` of an ensemble seeded with ``seed``."""
    return derive_seed(seed, "local CNN", index)


def stack_modules(singles: list[nn.Module]) -> nn.Module:
    """One module with the names of ``singles[0]`` and every parameter and buffer the slots' tensors concatenated
    along dim 0 (0-dim buffers, the same in every slot, once). It holds the state of the ``vmap`` backend; its own
    ``forward`` is only ever called through :func:`torch.func.functional_call` with per-slot views."""
    params, buffers = stack_module_state(singles)
    net = copy.deepcopy(singles[0])
    for name, value in {**params, **buffers}.items():
        owner, _, leaf = name.rpartition(".")
        module = net.get_submodule(owner)
        if name in params:
            module._parameters[leaf] = nn.Parameter(value.detach().flatten(0, 1).clone())
        else:
            module._buffers[leaf] = value.flatten(0, 1).clone() if value.dim() > 1 else value[0].clone()
    return net


class LocalEnsemble(nn.Module):
    """N local CNNs with no shared parameters: ``(B, N, C, *sub) -> (B, N, K)`` logits.

    Args:
        n_local: number of local CNNs held here.
        in_channels, num_classes: channels of a subimage, classes to predict.
        backbone: ``"vgg"``, ``"resnet"``, an import path, a factory ``(in_channels, num_classes, width) ->
            nn.Module`` or a module (see :mod:`ddcnn.models.family`); ``width`` the first stage's channels of ONE
            local CNN; ``depth`` the layers per stage of a built-in family (its default when ``None``); ``dims``
            2 or 3; ``backbone_kwargs`` more arguments for a foreign backbone's factory.
        backend: ``"grouped"`` (built-in backbones), ``"vmap"``, ``"loop"`` or ``"auto"`` (the default: see
            :func:`resolve_backend`).
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
        backbone="vgg",
        width: int = 16,
        depth: Sequence[int] | None = None,
        dims: int = 2,
        backend: str = "auto",
        seed: int | None = None,
        indices: Sequence[int] | None = None,
        backbone_kwargs: dict | None = None,
    ):
        super().__init__()
        for label, value in (("n_local", n_local), ("in_channels", in_channels), ("num_classes", num_classes),
                             ("width", width)):
            whole(label, value)
        choice("backend", backend, BACKENDS)
        self.family = Family(backbone, depth, dims, backbone_kwargs)
        backend = resolve_backend(backend, self.family.builtin, n_local)
        if backend == "grouped" and not self.family.builtin:
            raise ConfigError(f"backend 'grouped' fuses the built-in backbones (vgg, resnet) only; use backend "
                              f"'auto', 'vmap' or 'loop' for {self.family.name!r}")
        indices = list(range(n_local)) if indices is None else wholes("indices", indices, 0, example="[0, 1]")
        if len(indices) != n_local:
            raise ConfigError(f"indices {indices} must name {n_local} local CNNs")
        seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else whole("seed", seed, 0)
        self.n_local, self.in_channels, self.num_classes = n_local, in_channels, num_classes
        self.backbone, self.width, self.depth, self.dims = self.family.name, width, self.family.depth, dims
        self.backend, self.seed, self.indices = backend, seed, indices

        singles = [self._seeded_single(i) for i in indices]
        if backend == "loop":
            self.models = nn.ModuleList(singles)
        elif backend == "vmap":
            self.net = stack_modules(singles)
        else:
            with torch.random.fork_rng(devices=[]):  # its own initialisation is overwritten slot by slot
                self.net = self._build(groups=n_local)
            for slot, single in enumerate(singles):
                load_slot_state(self.net, single.state_dict(), n_local, slot)
        self.min_input_size = getattr(singles[0], "min_input_size", None)

    def _build(self, groups: int = 1) -> nn.Module:
        return self.family.build(self.in_channels, self.num_classes, self.width, self.dims, groups)

    def _seeded_single(self, index: int) -> nn.Module:
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
            logits = torch.stack([m(subimages[:, i]) for i, m in enumerate(self.models)], dim=1)
        elif self.backend == "vmap":
            logits = self._vmap_forward(subimages)
        else:
            # (B, N, C, *sub) -> (B, N*C, *sub): slot i owns channels [i*C, (i+1)*C), as the grouped layers expect.
            logits = self.net(subimages.reshape(b, self.n_local * self.in_channels, *subimages.shape[3:]))
            return logits.view(b, self.n_local, self.num_classes)
        if logits.shape != (b, self.n_local, self.num_classes):
            raise ShapeError(f"backbone {self.backbone!r} gives local logits {list(logits.shape)} for subimages "
                             f"{list(subimages.shape)}; a local CNN must end in {self.num_classes} outputs")
        return logits

    def _vmap_forward(self, subimages: torch.Tensor) -> torch.Tensor:
        """``(B, N, C, *sub) -> (B, N, K)``: ``self.net`` called once per slot, batched over the slots by vmap.

        Each slot gets views ``(N, ...)[i]`` of the stacked tensors, so BatchNorm's in-place running-statistics
        update lands in its own rows of the stacked buffers; a 0-dim buffer (``num_batches_tracked``) is shared,
        counted once per call, as every slot sees the same batches.
        """
        n = self.n_local
        params = {k: v.unflatten(0, (n, -1)) for k, v in self.net.named_parameters()}
        buffers = {k: v.unflatten(0, (n, -1)) for k, v in self.net.named_buffers() if v.dim() > 0}
        shared = {k: v for k, v in self.net.named_buffers() if v.dim() == 0}

        def one_slot(slot_params, slot_buffers, x):
            return functional_call(self.net, {**slot_params, **slot_buffers, **shared}, (x,))

        with warnings.catch_warnings():
            # Adaptive pooling of a channels-last tensor (the run's layout, faster for vmap too on the CPU) resizes
            # its output with as_strided_, which vmap has no batching rule for: torch runs it slot by slot and warns
            # on every run. The cost is measured (docs/performance.md); exactly that warning is silenced here.
            warnings.filterwarnings("ignore", message=_AS_STRIDED_WARNING, category=UserWarning)
            # randomness="different": each local CNN draws its own dropout masks, as N separate networks would.
            return vmap(one_slot, in_dims=(0, 0, 1), out_dims=1, randomness="different")(params, buffers, subimages)

    def check_subimages(self, decomposition) -> None:
        """Refuse subimages the local CNNs cannot take: smaller than a built-in family accepts, or, for a foreign
        backbone, failing (or giving other than ``(1, K)`` logits) on a one-sample probe of local CNN 0."""
        if self.family.builtin:
            check_fits(decomposition, self.backbone, self.depth)
        else:
            probe(self.local_model(0), (self.in_channels, *decomposition.subimage_size), self.num_classes,
                  self.backbone)
            # The ensemble itself too: its backend (loop's views of the batch, vmap's batching rules) in training.
            x = torch.zeros(2, self.n_local, self.in_channels, *decomposition.subimage_size,
                            device=next(self.parameters()).device)
            train_probe(self, x, [2, self.n_local, self.num_classes], self.backbone,
                        f"a local CNN (backend {self.backend!r})")

    # ------------------------------------------------------------------ moving single local CNNs in and out
    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.n_local:
            raise ConfigError(f"local CNN index {i} is out of range for an ensemble of {self.n_local}")

    def local_model(self, i: int) -> nn.Module:
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
        if self.backend != "loop":
            return {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        states = [m.state_dict() for m in self.models]
        return {k: (v.detach().clone() if v.dim() == 0 else torch.cat([s[k] for s in states]))
                for k, v in states[0].items()}

    def load_stacked_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`stacked_state_dict`."""
        if self.backend != "loop":
            self.net.load_state_dict(state)
            return
        for i, m in enumerate(self.models):
            load_slot_state(m, slot_state(state, self.n_local, i), 1, 0)

    def parameters_by_position(self) -> list[list[nn.Parameter]]:
        """For each parameter of one CNN, the tensors holding it: one stacked tensor (grouped) or N (loop)."""
        if self.backend != "loop":
            return [[p] for p in self.net.parameters()]
        return [list(ps) for ps in zip(*[list(m.parameters()) for m in self.models])]

    def stacked_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's per-parameter state in the stacked layout (``{"state": {j: {...}}, "param_groups"}``),
        so that it can be gathered across shards and loaded into either backend."""
        out = {}
        for j, params in enumerate(self.parameters_by_position()):
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
        for j, params in enumerate(self.parameters_by_position()):
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


def local_loss(local_logits: torch.Tensor, targets: torch.Tensor,
               weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Training loss of the local CNNs: ``(B, N, K), (B,) -> (scalar, (N,))``; ``weight`` ``(K,)``: class weights,
    each local CNN's loss then the weighted mean over the batch, as ``F.cross_entropy(weight=...)`` takes it.

    Each local CNN is trained on its own mean cross-entropy against the image's label. The total is the SUM of the
    N losses, not their mean, so that the gradient reaching slot ``i`` is exactly the gradient of its own loss and
    optimisers (SGD, Adam) update each slot as if it were trained alone.
    """
    b, n, k = local_logits.shape
    per_sample = F.cross_entropy(local_logits.reshape(b * n, k).float(), targets.repeat_interleave(n),
                                 weight=weight, reduction="none").view(b, n)
    per_slot = per_sample.mean(0) if weight is None else per_sample.sum(0) / weight[targets].sum()
    return per_slot.sum(), per_slot.detach()
