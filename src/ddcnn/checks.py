"""Argument checks for what a library user can get wrong, in one place.

The config is validated once, at the edge (:func:`ddcnn.config.validate`); these helpers give the library's
constructors the same one-line :class:`~ddcnn.errors.ConfigError` for a value typed in Python (a ``True`` for a
width, ``2.5`` local CNNs, a misspelt backend) instead of a traceback from deep inside torch.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

from ddcnn.errors import ConfigError, did_you_mean


def whole(label: str, value, minimum: int = 1) -> int:
    """``value`` as an ``int`` (an int or a numpy integer; never a bool) of at least ``minimum``."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < minimum:
        kind = {0: "a non-negative whole number", 1: "a positive whole number"}.get(
            minimum, f"a whole number of at least {minimum}")
        raise ConfigError(f"{label} must be {kind}, got {value!r}")
    return number


def wholes(label: str, values, minimum: int = 1, example: str = "[2, 2]", empty: bool = False) -> list[int]:
    """A list of whole numbers of at least ``minimum``, non-empty unless ``empty`` (a string or a single number
    is refused)."""
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise ConfigError(f"{label} must be a list of whole numbers, e.g. {example}, got {values!r}")
    values = list(values)
    if not values and not empty:
        raise ConfigError(f"{label} must not be empty, e.g. {example}")
    try:
        return [whole(label, v, minimum) for v in values]
    except ConfigError:
        raise ConfigError(f"{label} must hold whole numbers of at least {minimum}, e.g. {example}, got "
                          f"{values!r}") from None


def choice(label: str, value, valid: Iterable[str]) -> str:
    """``value`` when it is one of ``valid``, else a ConfigError naming the closest valid choice."""
    valid = tuple(valid)
    if not isinstance(value, str) or value not in valid:
        raise ConfigError(f"{label} = {value!r} is not valid{did_you_mean(str(value), valid)}; choose one of "
                          f"{', '.join(valid)}")
    return value
