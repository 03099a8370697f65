"""VGG- and ResNet-style CNNs in 2D and 3D, built once for one network or for N independent ones side by side.

Every builder takes ``groups``. With ``groups=1`` it returns an ordinary CNN made of ``torch.nn`` layers. With
``groups=N`` it returns N independent CNNs of the same architecture fused into one network: every convolution is
grouped (``groups=N``), so slot ``i`` owns channels ``[i*c, (i+1)*c)`` of every layer; BatchNorm is per channel and
therefore per slot already; the head is one linear map per slot. No parameter, statistic or activation is shared
between slots, so the fused network computes exactly what N separate networks compute.

Both variants have the same module names, and every parameter or buffer of the fused network is the N slot
tensors stacked along dim 0 (``(N*out, ...)``). :func:`slot_state` and :func:`load_slot_state` move one slot in and
out of an ordinary CNN with that layout.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ddcnn.checks import choice, whole, wholes
from ddcnn.errors import ConfigError, ShapeError

BACKBONES = ("vgg", "resnet")
DEFAULT_DEPTH = {"vgg": (2, 2, 2), "resnet": (2, 2, 2)}


def _layer(kind: str, dims: int):
    return {
        ("conv", 2): nn.Conv2d, ("conv", 3): nn.Conv3d,
        ("bn", 2): nn.BatchNorm2d, ("bn", 3): nn.BatchNorm3d,
        ("maxpool", 2): nn.MaxPool2d, ("maxpool", 3): nn.MaxPool3d,
        ("avgpool", 2): nn.AdaptiveAvgPool2d, ("avgpool", 3): nn.AdaptiveAvgPool3d,
    }[kind, dims]


class GroupedLinear(nn.Module):
    """N independent linear maps, ``(B, N*F) -> (B, N*K)``; weight ``(N*K, F)``, bias ``(N*K,)``.

    The parameter names and layout match ``nn.Linear`` stacked N times, so one slot is an ``nn.Linear(F, K)``.
    """

    def __init__(self, groups: int, in_features: int, out_features: int):
        super().__init__()
        self.groups, self.in_features, self.out_features = groups, in_features, out_features
        self.weight = nn.Parameter(torch.empty(groups * out_features, in_features))
        self.bias = nn.Parameter(torch.empty(groups * out_features))
        bound = 1 / math.sqrt(in_features)  # nn.Linear's default initialisation, per slot
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k, f = self.groups, self.out_features, self.in_features
        out = torch.einsum("bnf,nkf->bnk", x.reshape(-1, n, f), self.weight.view(n, k, f))
        return (out + self.bias.view(n, k)).reshape(-1, n * k)


def _linear(groups: int, in_features: int, out_features: int) -> nn.Module:
    return nn.Linear(in_features, out_features) if groups == 1 else GroupedLinear(groups, in_features, out_features)


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, dims: int, groups: int, stride: int = 1, relu: bool = True):
        layers = [
            _layer("conv", dims)(cin * groups, cout * groups, 3, stride=stride, padding=1, groups=groups, bias=False),
            _layer("bn", dims)(cout * groups),
        ]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convolutions and a shortcut), per slot when ``groups > 1``."""

    def __init__(self, cin: int, cout: int, dims: int, groups: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            ConvBNReLU(cin, cout, dims, groups, stride=stride), ConvBNReLU(cout, cout, dims, groups, relu=False)
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                _layer("conv", dims)(cin * groups, cout * groups, 1, stride=stride, groups=groups, bias=False),
                _layer("bn", dims)(cout * groups),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class Head(nn.Module):
    """Global average pooling and one linear classifier per slot: ``(B, N*F, *spatial) -> (B, N*K)``."""

    def __init__(self, features: int, num_classes: int, dims: int, groups: int):
        super().__init__()
        self.pool = _layer("avgpool", dims)(1)
        self.fc = _linear(groups, features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


class Backbone(nn.Sequential):
    """A CNN (or N fused CNNs): ``(B, groups*C, *spatial) -> (B, groups*K)`` logits.

    Attributes ``name``, ``width``, ``depth``, ``dims``, ``groups``, ``in_channels``, ``num_classes`` describe it,
    ``min_input_size`` is the smallest spatial extent (per axis) it accepts.
    """

    def __init__(self, name, in_channels, num_classes, width, depth, dims, groups, layers):
        super().__init__(layers)
        self.name, self.in_channels, self.num_classes = name, in_channels, num_classes
        self.width, self.depth, self.dims, self.groups = width, tuple(depth), dims, groups
        self.min_input_size = min_input_size(name, depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.dims + 2 or x.shape[1] != self.groups * self.in_channels:
            raise ShapeError(
                f"{self.name} backbone expects input (B, {self.groups * self.in_channels}, "
                f"{', '.join(['...'] * self.dims)}), got {list(x.shape)}"
            )
        if min(x.shape[2:]) < self.min_input_size:
            raise ShapeError(
                f"input of spatial size {list(x.shape[2:])} is smaller than the {self.min_input_size} pixels per "
                f"axis that this {self.name} backbone with {len(self.depth)} stages needs"
            )
        return super().forward(x)


def check_backbone_args(name: str, depth: Sequence[int] | None, dims: int) -> tuple[int, ...]:
    """Validate a built-in family's arguments and return the depth (the family's default when ``None``)."""
    choice("backbone", name, BACKBONES)
    check_dims(dims)
    return tuple(wholes("depth", DEFAULT_DEPTH[name] if depth is None else depth, example="[2, 2, 2]"))


def check_dims(dims: int) -> int:
    if whole("dims", dims) not in (2, 3):
        raise ConfigError(f"dims must be 2 (images) or 3 (volumes), got {dims!r}")
    return dims


def check_fits(decomposition, backbone: str, depth: Sequence[int] | None) -> None:
    """Refuse a decomposition whose subimages are smaller than a built-in backbone accepts, suggesting a grid
    that fits."""
    depth = DEFAULT_DEPTH[backbone] if depth is None else depth
    need = min_input_size(backbone, depth)
    if min(decomposition.subimage_size) >= need:
        return
    fitting = [max(1, min(g, length // need)) for g, length in zip(decomposition.grid, decomposition.image_size)]
    raise ConfigError(
        f"grid {list(decomposition.grid)} cuts {list(decomposition.image_size)} images into subimages of "
        f"{list(decomposition.subimage_size)}, smaller than the {need} pixels per axis that the {backbone} backbone "
        f"with {len(depth)} stages needs; use a coarser grid such as {fitting} or fewer stages"
    )


def min_input_size(name: str, depth: Sequence[int] | None = None) -> int:
    """Smallest input extent per axis: every stage after the first halves the resolution once."""
    depth = DEFAULT_DEPTH[name] if depth is None else depth
    return 2 ** (len(depth) - 1)


def build_backbone(
    name: str = "vgg",
    in_channels: int = 1,
    num_classes: int = 10,
    width: int = 16,
    depth: Sequence[int] | None = None,
    dims: int = 2,
    groups: int = 1,
) -> Backbone:
    """A VGG- or ResNet-style CNN with stages of width ``width * 2**s``.

    * ``vgg``: per stage ``depth[s]`` blocks of conv3x3-BatchNorm-ReLU, max pooling between stages.
    * ``resnet``: a conv3x3-BatchNorm-ReLU stem, then per stage ``depth[s]`` basic blocks; the first block of every
      stage after the first has stride 2.

    Both end in global average pooling and a linear layer to ``num_classes`` logits.
    """
    depth = check_backbone_args(name, depth, dims)
    for label, value in (("width", width), ("in_channels", in_channels), ("num_classes", num_classes),
                         ("groups", groups)):
        whole(label, value)
    layers: dict[str, nn.Module] = {}
    cin = in_channels
    if name == "resnet":
        layers["stem"] = ConvBNReLU(in_channels, width, dims, groups)
        cin = width
    for s, n_layers in enumerate(depth):
        cout = width * 2**s
        blocks: list[nn.Module] = []
        for k in range(n_layers):
            if name == "vgg":
                blocks.append(ConvBNReLU(cin, cout, dims, groups))
            else:
                blocks.append(BasicBlock(cin, cout, dims, groups, stride=2 if (s > 0 and k == 0) else 1))
            cin = cout
        if name == "vgg" and s > 0:
            blocks.insert(0, _layer("maxpool", dims)(2))
        layers[f"stage{s + 1}"] = nn.Sequential(*blocks)
    layers["head"] = Head(cin, num_classes, dims, groups)
    return Backbone(name, in_channels, num_classes, width, depth, dims, groups, OrderedDict(layers))


def local_width(global_width: int, n_local: int) -> int:
    """Width of a local CNN so that N of them have about the global CNN's parameters: ``round(w / sqrt(N))``.

    Parameters of a CNN grow with the square of its width, so N local CNNs of width ``w / sqrt(N)`` together hold
    about as many parameters as one CNN of width ``w`` (the heads and first layers make it approximate).
    """
    return max(1, round(global_width / math.sqrt(n_local)))


def slot_state(state: dict[str, torch.Tensor], groups: int, index: int) -> dict[str, torch.Tensor]:
    """Slot ``index`` of a fused network's state dict, as the state dict of one ordinary CNN."""
    return {k: (v if v.dim() == 0 else v.unflatten(0, (groups, -1))[index]).clone() for k, v in state.items()}


@torch.no_grad()
def load_slot_state(fused: nn.Module, single_state: dict[str, torch.Tensor], groups: int, index: int) -> None:
    """Write one ordinary CNN's state dict into slot ``index`` of a fused network (in place)."""
    target = fused.state_dict()
    missing = set(target) ^ set(single_state)
    if missing:
        raise ShapeError(f"the local CNN does not match the ensemble's architecture (differing keys: "
                         f"{sorted(missing)[:4]})")
    for key, tensor in target.items():
        value = single_state[key]
        if tensor.dim() == 0:
            tensor.copy_(value)  # num_batches_tracked: one counter for all slots
            continue
        slot = tensor.unflatten(0, (groups, -1))[index]
        if slot.shape != value.shape:
            raise ShapeError(
                f"the local CNN's {key} has shape {list(value.shape)} but the ensemble's slot has "
                f"{list(slot.shape)}; build the local CNN with the ensemble's backbone, width and depth"
            )
        slot.copy_(value)
