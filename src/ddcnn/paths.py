"""Paths a user gives (command-line options, ``data.root``): one reading of ``~``, and clear errors for paths that no
file system can hold, before anything is created or written."""

from __future__ import annotations

import os
from pathlib import Path

from ddcnn.errors import ConfigError

PATH_MAX = 4096


def _name_max(path: Path) -> int:
    """The longest file name (bytes) the file system of ``path`` (or of its nearest existing parent) allows."""
    for parent in [path, *path.parents]:
        try:
            if parent.exists():
                return os.pathconf(parent, "PC_NAME_MAX")
        except (OSError, ValueError):
            break
    return 255


def user_path(value: str | os.PathLike, option: str) -> Path:
    """``value`` as a Path with ``~`` and ``~user`` expanded; ``option`` (e.g. '--out') names it in the errors for a
    NUL byte, an unknown user and a name or path longer than the file system allows."""
    text = os.fspath(value)
    if "\0" in text:
        raise ConfigError(f"{option} {text!r} holds a NUL byte, which no path can hold; give a plain path")
    if text.startswith("~"):
        expanded = os.path.expanduser(text)
        if expanded.startswith("~"):
            user = text[1:].split("/", 1)[0]
            raise ConfigError(f"{option} {text!r}: there is no user {user!r} on this machine, so '~{user}' means "
                              f"no folder; write the folder out, or use '~/' for your own home")
        text = expanded
    path = Path(text)
    limit = _name_max(path)
    for part in path.parts:
        if len(os.fsencode(part)) > limit:
            raise ConfigError(f"{option} {text[:40]!r}...: the name {part[:20]!r}... is {len(os.fsencode(part))} "
                              f"bytes long but the file system allows at most {limit}; choose a shorter name")
    if len(os.fsencode(text)) >= PATH_MAX:
        raise ConfigError(f"{option} {text[:40]!r}... is {len(os.fsencode(text))} bytes long but paths may have at "
                          f"most {PATH_MAX - 1}; choose a shorter path")
    return path
