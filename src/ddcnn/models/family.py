"""Which CNN the global and the local CNNs are: a built-in family, an import path, a factory or a module.

``backbone`` is one of

* ``"vgg"`` or ``"resnet"``: the built-in families (:mod:`ddcnn.models.backbones`), with ``width`` and ``depth``;
* an import path, ``"package.module.name"`` or ``"package.module:Name"`` (``torchvision.models.resnet18``,
  ``my_package.nets:SmallNet``): the callable it names, used as a factory;
* a factory, any callable returning an ``nn.Module``; it is called with those of the keywords ``in_channels``,
  ``num_classes`` and ``width`` that it names (``num_classes`` also when it takes ``**kwargs``, as torchvision's
  builders do), plus ``backbone_kwargs``, which win over them;
* an ``nn.Module``: a template; every CNN built from it is a copy with each layer's ``reset_parameters()`` rerun, so
  that local CNN ``i`` still starts from ``(seed, i)``.

What ``width`` means for a foreign CNN: the local CNNs get the width rule of the built-ins (``local_width``), but
the width reaches a foreign CNN only through a ``width`` keyword of its factory. A factory without one (torchvision's
``resnet18``, a template module) builds local CNNs as wide as the global CNN.

What a foreign CNN was not told is adapted: when its first convolution takes other than ``in_channels`` channels,
that convolution is replaced by a freshly initialised one with the same kernel, stride, padding and bias (the
first layer adapted, not the images upsampled); when its last ``nn.Linear`` gives other than ``num_classes``
outputs, it is replaced the same way. :func:`probe` then refuses a CNN that fails on the subimages or gives the
wrong output shape, with one error that names it.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from ddcnn.checks import choice
from ddcnn.errors import ConfigError, DDCNNError, ShapeError, did_you_mean
from ddcnn.models.backbones import BACKBONES, build_backbone, check_backbone_args, check_dims

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_import_path(name: str) -> bool:
    """Whether ``name`` is meant as an import path rather than the name of a built-in family."""
    return "." in name or ":" in name


def import_backbone(path: str, label: str = "backbone") -> Callable:
    """The callable that ``path`` (``module.name`` or ``module:Name``) names; ``label`` names the setting in errors."""
    module_name, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attribute:
        raise ConfigError(f"{label} = {path!r} is not an import path; write it as package.module.name or "
                          f"package.module:Name, e.g. torchvision.models.resnet18")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ConfigError(f"{label} = {path!r}: module {err.name or module_name!r} is not found; install it or "
                          f"put it on PYTHONPATH") from None
    except (Exception, SystemExit) as err:  # the user's module failed (or called sys.exit) while importing
        raise ConfigError(f"{label} = {path!r}: importing {module_name!r} failed with {type(err).__name__}: "
                          f"{err}") from None
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            names = [n for n in dir(target) if not n.startswith("_")]
            raise ConfigError(f"{label} = {path!r}: {getattr(target, '__name__', module_name)!r} has no "
                              f"attribute {part!r}{did_you_mean(part, names)}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{label} = {path!r} names a {type(target).__name__}, not a class or function that "
                          f"builds a network")
    return target


class Family:
    """How to build one CNN of the chosen backbone for ``(in_channels, num_classes, width)``.

    ``name`` is how errors and reports call it; ``builtin`` tells the built-in families (which the ``grouped``
    backend can fuse) from foreign ones.
    """

    def __init__(self, backbone, depth: Sequence[int] | None = None, dims: int = 2, kwargs: dict | None = None):
        self.kwargs = dict(kwargs or {})
        self.builtin = isinstance(backbone, str) and backbone in BACKBONES
        self.template: nn.Module | None = None
        self.factory: Callable | None = None
        if self.builtin:
            self.name = backbone
            self.depth: tuple[int, ...] | None = check_backbone_args(backbone, depth, dims)
            if self.kwargs:
                raise ConfigError(f"backbone_kwargs {self.kwargs} apply to imported backbones only; {backbone!r} "
                                  f"takes width and depth")
            return
        if depth is not None:
            raise ConfigError(f"depth {depth!r} applies to the built-in backbones (vgg, resnet) only; set the "
                              f"layers of a foreign backbone through its own arguments (backbone_kwargs)")
        self.depth = None
        check_dims(dims)
        if isinstance(backbone, str):
            if not is_import_path(backbone):
                choice("backbone", backbone, BACKBONES + ("an import path such as torchvision.models.resnet18",))
            self.factory, self.name = import_backbone(backbone), backbone
        elif isinstance(backbone, nn.Module):
            self.template, self.name = backbone, type(backbone).__name__
        elif callable(backbone):
            self.factory = backbone
            self.name = getattr(backbone, "__qualname__", None) or type(backbone).__name__
        else:
            raise ConfigError(f"backbone must be 'vgg', 'resnet', an import path, a factory "
                              f"(in_channels, num_classes, width) -> nn.Module or a module, got {backbone!r}")
        if self.template is not None and self.kwargs:
            raise ConfigError(f"backbone_kwargs {self.kwargs} need a factory; a module is copied as it is")

    def takes_width(self) -> bool:
        """Whether the width reaches the CNNs: the built-in families, and a factory with a ``width`` keyword."""
        if self.builtin:
            return True
        if self.factory is None:  # a module, copied as it is
            return False
        try:
            return "width" in inspect.signature(self.factory).parameters
        except (TypeError, ValueError):
            return False

    def build(self, in_channels: int, num_classes: int, width: int, dims: int, groups: int = 1) -> nn.Module:
        """One CNN ``(B, C, *size) -> (B, K)`` (or ``groups`` fused ones, built-in families only)."""
        if self.builtin:
            return build_backbone(self.name, in_channels, num_classes, width, self.depth, dims, groups)
        if self.template is not None:
            model, told = copy.deepcopy(self.template), set[str]()
            for module in model.modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
        else:
            model, told = self._call(in_channels, num_classes, width)
        _check_parameters(model, self.name)
        if "in_channels" not in told:
            _replace_layer(model, CONVOLUTIONS, first=True, size=in_channels)
        if "num_classes" not in told:
            _replace_layer(model, (nn.Linear,), first=False, size=num_classes)
        return model

    def _call(self, in_channels: int, num_classes: int, width: int) -> tuple[nn.Module, set[str]]:
        factory = self.factory
        assert factory is not None  # set in __init__ for everything but a template module
        parameters: Mapping[str, inspect.Parameter]
        try:
            parameters = inspect.signature(factory).parameters
        except (TypeError, ValueError):  # a builtin without a signature: only backbone_kwargs reach it
            parameters = {}
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        offered = {"in_channels": in_channels, "num_classes": num_classes, "width": width}
        given = {k: v for k, v in offered.items() if k in parameters or (k == "num_classes" and takes_any)}
        given.update(self.kwargs)
        try:
            model = factory(**given)
        except DDCNNError:
            raise
        except (Exception, SystemExit) as err:
            arguments = ", ".join(f"{k}={v!r}" for k, v in given.items())
            raise ConfigError(f"backbone {self.name!r} failed to build with ({arguments}): {type(err).__name__}: "
                              f"{_first_line(err)}; fix backbone_kwargs") from None
        if not isinstance(model, nn.Module):
            raise ConfigError(f"backbone {self.name!r} returned {type(model).__name__!r}, not a torch.nn.Module")
        return model, set(given)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def _check_parameters(model: nn.Module, name: str) -> None:
    lazy = [k for k, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise ConfigError(f"backbone {name!r} has lazy layers ({', '.join(lazy[:3])}); give their sizes, as local "
                          f"CNNs are stacked before they see a subimage")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"backbone {name!r} has no trainable parameters, so there is nothing to train; give a "
                          f"network with weights")
    # Every tensor of a local CNN is stacked slot after slot along dim 0; a 0-dim tensor has no dim 0 to stack on.
    scalars = [k for k, p in model.named_parameters() if p.dim() == 0]
    if scalars:
        raise ConfigError(f"backbone {name!r} has parameters without a dimension ({', '.join(scalars[:3])}); "
                          f"give them shape (1,) so that the local CNNs can be stacked")


@torch.no_grad()
def _replace_layer(model: nn.Module, kinds: tuple, first: bool, size: int) -> None:
    """Replace the first convolution (``first``) or the last linear layer by one taking / giving ``size``."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]
    if not found:
        return
    name, layer = found[0] if first else found[-1]
    if isinstance(layer, nn.Linear):
        if layer.out_features == size:
            return
        new = nn.Linear(layer.in_features, size, bias=layer.bias is not None)
    else:
        if layer.in_channels == size:
            return
        if layer.groups != 1:
            raise ConfigError(f"the first convolution {name!r} is grouped; build the network for {size} input "
                              f"channels (an in_channels argument)")
        new = type(layer)(size, layer.out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                          dilation=layer.dilation, bias=layer.bias is not None, padding_mode=layer.padding_mode)
    new = new.to(next(layer.parameters()).device)
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


@torch.no_grad()
def probe(model: nn.Module, input_shape: Sequence[int], num_classes: int, name: str, what: str = "a local CNN"):
    """Refuse a network that fails on one input of ``input_shape`` ``(C, *size)`` or gives other than
    ``(1, num_classes)`` logits, with one error naming it and the shapes (one sample, eval mode, no gradient); then
    :func:`train_probe` on a batch of two in training mode."""
    param = next(model.parameters(), None)
    x = torch.zeros(1, *input_shape, device=param.device if param is not None else None)
    was_training = model.training
    model.eval()
    try:
        out = model(x)
    except DDCNNError:
        raise
    except Exception as err:
        raise ShapeError(f"backbone {name!r} cannot be {what} for inputs of shape {list(x.shape)}: "
                         f"{type(err).__name__}: {_first_line(err)}; use larger subimages (a coarser grid) or a "
                         f"network made for small inputs") from None
    finally:
        model.train(was_training)
    shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != [1, num_classes]:
        raise ShapeError(f"backbone {name!r} maps inputs of shape {list(x.shape)} to {shape}, but {what} must give "
                         f"[1, {num_classes}] logits; make it end in {num_classes} outputs")
    train_probe(model, x.expand(2, *x.shape[1:]), [2, num_classes], name, what)


def train_probe(model: nn.Module, x: torch.Tensor, expected: list[int], name: str, what: str) -> None:
    """Refuse a network that fails in training mode on the batch ``x`` (two samples), gives there other than
    ``expected`` logits, or cannot be differentiated: one training step's forward and backward pass, on a copy (the
    model's weights, statistics and gradients stay as they were)."""
    model = copy.deepcopy(model).train()
    x = x.clone()  # the network may change its input in place, as the training batches allow
    try:
        with torch.enable_grad():
            out = model(x)
            shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            if shape == expected:
                out.float().sum().backward()
    except DDCNNError:
        raise
    except Exception as err:
        raise ShapeError(f"backbone {name!r} fails as {what} in training mode (a batch of {x.shape[0]}, with the "
                         f"backward pass): {type(err).__name__}: {_first_line(err)}; fix the network for training "
                         f"batches") from None
    if shape != expected:
        raise ShapeError(f"backbone {name!r} maps a training batch of shape {list(x.shape)} to {shape} in training "
                         f"mode, but {what} must give {expected} logits there too (one tensor, one row per image)")
