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


def anchored(value: str, named_in: Path | None, option: str) -> tuple[str, str | None]:
    """A path as an absolute one, and a note when the old reading had to be used.

    A relative path written in a config file (``named_in``) is relative to that file's folder, so a config, a run's
    ``config.yaml`` and a study's ``base.yaml`` work from any directory; one given on the command line
    (``named_in`` None: ``--set``) is relative to the current directory, as a shell user expects. A config that
    still relies on the current directory (nothing at the path beside the file, something at the path from here)
    keeps working, with a note that says how to fix it. ``~`` is expanded first.
    """
    path = user_path(value, option)
    if path.is_absolute():
        return str(path), None
    here = Path.cwd() / path
    if named_in is None:
        return os.path.normpath(here), None
    folder = Path(os.path.abspath(named_in)).parent
    beside = folder / path
    if not beside.exists() and here.exists():
        return os.path.normpath(here), (
            f"{option} = {value!r} in {str(named_in)!r} is read from the current directory ({os.path.normpath(here)}), "
            f"as before; a relative path in a config file is relative to that file: write it as "
            f"{os.path.relpath(here, folder)!r} or as an absolute path")
    return os.path.normpath(beside), None
