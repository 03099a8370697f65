"""The checks of the config's model and combiner sections that need the models' own names, and the one place that
decides whether an imported backbone may be imported.

:func:`ddcnn.config.validate` checks types and ranges only and imports nothing; what needs this layer (the
backbone families, the backends, the activations) and what imports the user's code is checked here, by every
command, before any data is read or any file is written.

**Trust.** A backbone import path (``my_package.nets:SmallNet``) names code that ddcnn imports and calls, with
``backbone_kwargs`` as its arguments. A config the user gives on the command line is theirs: its import path is
imported as they asked. A config read from a run directory (``evaluate``, ``predict``, a ``ddcnn run`` of a run's
or a study's own ``config.yaml``/``base.yaml``) is data someone else may have written: its import path is refused,
before its module is imported, unless the user passes ``--trust-code`` for that command. There is no allowlist of
"well-known" libraries: the file also chooses the arguments (torchvision's ``weights=`` downloads and loads a
file), and a name such as ``torchvision.models.resnet18`` only means that library when the installed package and
everything on ``sys.path`` before it are trusted -- which is what ``--trust-code`` says.
"""

from __future__ import annotations

from typing import Any

from ddcnn.checks import choice
from ddcnn.errors import ConfigError
from ddcnn.models.backbones import BACKBONES
from ddcnn.models.combiners import ACTIVATIONS
from ddcnn.models.ensemble import BACKENDS
from ddcnn.models.family import import_backbone, is_import_path


def untrusted_backbone(backbone: str, source: str) -> ConfigError:
    """The refusal of an import path read from ``source`` (a file the user did not write for this command)."""
    return ConfigError(f"{source} names the backbone {backbone!r}, an import path: ddcnn would import and run that "
                       f"code, and does not for a file it did not get on the command line; nothing of it was "
                       f"imported. Pass --trust-code (trust_code=True in Python) if you trust whoever wrote {source}")


def builtin_only_error(backbone: str, splits: tuple[str, str]) -> ConfigError:
    """The refusal of ``backbone`` by a setting that splits the built-in backbones' layers: ``splits`` is
    ``(the setting, its fix)``."""
    return ConfigError(f"{splits[0]} the layers of the built-in backbones (vgg, resnet) only, not {backbone!r}; "
                       f"{splits[1]}")


def check_model_settings(model: Any, combiner: Any, trusted: bool = True, source: str = "the config",
                         builtin_only: tuple[str, str] | None = None) -> None:
    """Check ``model`` (a :class:`~ddcnn.config.ModelConfig`) and ``combiner`` (a ``CombinerConfig``) against the
    models' names; an import path as backbone is imported (and so checked) only when ``trusted``, else refused
    with :func:`untrusted_backbone` before anything is imported. ``builtin_only``: ``(a setting, its fix)`` that
    splits the layers of the backbone, which only the built-in families can be
    (:func:`ddcnn.config.builtin_backbone_only`)."""
    choice("model.backend", model.backend, BACKENDS)
    choice("combiner.activation", combiner.activation, tuple(ACTIVATIONS))
    if model.backbone in BACKBONES:
        if model.backbone_kwargs:
            raise ConfigError(f"model.backbone_kwargs = {model.backbone_kwargs} apply to imported backbones only; "
                              f"{model.backbone!r} takes model.width and model.depth")
        return
    if not is_import_path(model.backbone):
        choice("model.backbone", model.backbone, BACKBONES + ("an import path such as torchvision.models.resnet18",))
    if builtin_only:
        raise builtin_only_error(model.backbone, builtin_only)
    if not trusted:
        raise untrusted_backbone(model.backbone, source)
    import_backbone(model.backbone, "model.backbone")
    # model.depth, set by a shipped config for vgg and resnet, is ignored for an imported backbone (with a note:
    # ddcnn.build.Models), so that naming one takes a single --set.
    if model.backend == "grouped":
        raise ConfigError(f"model.backend = 'grouped' fuses vgg and resnet only; set model.backend: auto (or vmap, "
                          f"or loop) for {model.backbone!r}, e.g. --set model.backend=auto")
