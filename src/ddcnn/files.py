"""Reading back what a user or a run wrote: text, JSON and YAML checked against a small declarative schema.

A schema is plain data: ``int``, ``float`` (any finite number), ``str``, ``bool``, ``None`` (null), ``Any``,
``[item]`` (a list of ``item``), ``{"key": value, "key?": value}`` (an object with these keys, ``?`` marking an
optional one; other keys are allowed), :class:`MapOf` (an object of any keys), :class:`Opt` (or null) and
:class:`Check` (a base schema plus a condition). :func:`read_json` gives either data of the schema's shape or one
error that names the file, the place in it and what is wrong; truncated, non-UTF-8, non-finite (``Infinity``,
``NaN``), too deeply nested files and a folder where the file belongs are errors of the same kind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ddcnn.errors import CheckpointError, ConfigError, DDCNNError, LinkError


@dataclass(frozen=True)
class Opt:
    """``schema`` or null."""

    schema: Any


@dataclass(frozen=True)
class MapOf:
    """An object with any keys, every value of ``schema``."""

    schema: Any


@dataclass(frozen=True)
class Check:
    """``schema`` and ``test(value)``; ``what`` says what the test asks, e.g. 'a positive whole number'."""

    schema: Any
    test: Callable[[Any], bool]
    what: str


class _Mismatch(Exception):
    def __init__(self, where: str, message: str):
        super().__init__(where, message)
        self.where, self.message = where, message


_KINDS = {int: "a whole number", float: "a number", str: "a string", bool: "true or false", None: "null"}


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int):
        return "a whole number"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


def _expected(schema) -> str:
    if isinstance(schema, Check):
        return schema.what
    if isinstance(schema, Opt):
        return f"{_expected(schema.schema)} or null"
    if isinstance(schema, list):
        return "a list"
    if isinstance(schema, dict | MapOf):
        return "an object"
    return _KINDS.get(schema, "anything")


def conform(value, schema, where: str = "") -> Any:
    """``value`` if it has the shape ``schema`` describes, else :class:`_Mismatch` naming the place."""
    at = where or "the top level"
    if schema is Any:
        return value
    if isinstance(schema, Opt):
        return None if value is None else conform(value, schema.schema, where)
    if isinstance(schema, Check):
        try:
            conform(value, schema.schema, where)
        except _Mismatch as err:
            if err.where != at or not err.message.startswith("is "):  # keep 'lacks the key ...' and inner places
                raise
            raise _Mismatch(at, f"is {_kind(value)} but must be {schema.what}") from None
        if not schema.test(value):
            shown = repr(value) if len(repr(value)) <= 40 else _kind(value)
            raise _Mismatch(at, f"is {shown} but must be {schema.what}")
        return value
    ok = True
    if schema is None:
        ok = value is None
    elif schema is bool:
        ok = isinstance(value, bool)
    elif schema is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif schema is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    elif schema is str:
        ok = isinstance(value, str)
    elif isinstance(schema, list):
        if not isinstance(value, list):
            ok = False
        else:
            for i, item in enumerate(value):
                conform(item, schema[0], f"{where}[{i}]")
    elif isinstance(schema, MapOf | dict):
        if not isinstance(value, dict):
            ok = False
        elif isinstance(schema, MapOf):
            for key, item in value.items():
                conform(item, schema.schema, f"{where}.{key}" if where else str(key))
        else:
            for key, sub in schema.items():
                name = key.rstrip("?")
                if name not in value:
                    if not key.endswith("?"):
                        raise _Mismatch(at, f"lacks the key {name!r}")
                    continue
                conform(value[name], sub, f"{where}.{name}" if where else name)
    if not ok:
        raise _Mismatch(at, f"is {_kind(value)} but must be {_expected(schema)}")
    return value


_BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def plain_name(name: str) -> bool:
    """Whether ``name`` holds no control character (a newline, a terminal escape, a bidirectional override): a
    name read from a file reaches terminals, CSV and JSON consumers, where those would forge or hide output."""
    return not any(unicodedata.category(c) == "Cc" or c in _BIDI_CONTROLS for c in name)


CLASS_NAMES = Check([Check(str, plain_name, "a name without control characters (newlines, terminal escapes)")],
                    lambda v: len(v) >= 2 and len(set(v)) == len(v), "a list of two or more distinct names")


def read_bytes(path: Path, fix: str, error: type[DDCNNError] = CheckpointError) -> bytes:
    """The bytes of ``path``; a missing file, a folder in its place or an OS error is ``error`` naming it."""
    if path.is_dir():
        raise error(f"{str(path)!r} is a folder where a file belongs; {fix}")
    if not path.is_file():
        raise error(f"{str(path)!r} does not exist; {fix}")
    try:
        return path.read_bytes()
    except OSError as err:
        raise error(f"{str(path)!r} cannot be read ({err.strerror}); {fix}") from None


def read_text(path: Path, fix: str, error: type[DDCNNError] = CheckpointError) -> str:
    try:
        return read_bytes(path, fix, error).decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{str(path)!r} is corrupt (not UTF-8 text); {fix}") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a finite number")


def parse_json(text: str, path: Path, schema, fix: str, error: type[DDCNNError] = CheckpointError) -> Any:
    """``text`` (the content of ``path``) as JSON of the shape ``schema``; anything else is one ``error``."""
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise error(f"{str(path)!r} is corrupt (nested too deeply to be a file ddcnn wrote); {fix}") from None
    except ValueError as err:
        raise error(f"{str(path)!r} is corrupt (not valid JSON: {err}); {fix}") from None
    try:
        return conform(data, schema)
    except _Mismatch as err:
        raise error(f"{str(path)!r} is corrupt ({err.where} {err.message}); {fix}") from None


def read_json(path: Path, schema, fix: str, error: type[DDCNNError] = CheckpointError) -> Any:
    """The JSON file ``path``, checked against ``schema``; every way it can be wrong is one ``error`` naming it."""
    return parse_json(read_text(path, fix, error), path, schema, fix, error)


# ---------------------------------------------------------------------------------------------------- YAML --
# An alias repeats a node without repeating its text: ten nested lists of ten aliases stand for 10**10 values in a
# few hundred bytes. A config may expand to this many nodes per byte of text (and always to this many in all).
EXPANSION_PER_BYTE = 10
EXPANSION_FLOOR = 10_000


def _expanded_size(node, sizes: dict, visiting: set) -> int:
    """Number of nodes ``node`` stands for once every alias is written out (memoised: linear in the text)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in visiting:
        return -1  # refers to itself
    visiting.add(key)
    total = 1
    children = node.value if isinstance(node, yaml.SequenceNode) else \
        [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
    for child in children:
        size = _expanded_size(child, sizes, visiting)
        if size < 0:
            return -1
        total += size
    visiting.discard(key)
    sizes[key] = total
    return total


def load_yaml(text: str, where: str, error: type[DDCNNError] = ConfigError) -> Any:
    """``yaml.safe_load`` of ``text`` that refuses aliases expanding far beyond the text, self-reference and deep
    nesting (``where`` names the text in the messages). Syntax errors are left to the caller as ``yaml.YAMLError``.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {}, set())
        limit = max(EXPANSION_FLOOR, EXPANSION_PER_BYTE * len(text))
        if size < 0:
            raise error(f"{where} holds a YAML alias that refers to itself; write the value out instead of '*name'")
        if size > limit:
            raise error(f"{where} expands through YAML aliases ('&name' ... '*name') to {size:,} values from "
                        f"{len(text):,} characters (at most {limit:,} are accepted); write the values out instead")
        return loader.construct_document(node)
    except RecursionError:
        raise error(f"{where} nests too deeply; write it as a flat YAML config") from None
    finally:
        loader.dispose()


# Atomic writes: a file holds either its old or its new content, never a part (checkpoints, run and study files).


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def naming(path: Path):
    """OS errors inside name ``path`` (a failed flush or fsync names no file): the user is told which file."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno is not None:
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def atomic_write(path: Path, data: bytes, check: Callable[[Path], None] | None = None,
                 under: Path | None = None) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either the old or the new content, never a part.

    A symbolic link at ``path`` is replaced, never written through: the file it points to stays as it was.
    ``under``: the folder the user named (a run or study directory, itself possibly a link they made); the
    folders between it and ``path`` are made by :func:`own_folder`, which refuses one that is a link.
    ``check``: called with the complete temporary file before it takes ``path``'s place; what it raises is raised
    with the temporary file removed and ``path`` untouched.
    """
    with naming(path):
        _atomic_write(path, data, check, under)


def own_folder(folder: Path, under: Path) -> Path:
    """Create ``folder`` (inside ``under``) and its parents up to ``under``; a folder on the way that is a symbolic
    link (``plots/``, ``checkpoints/`` of a received run pointing elsewhere) is one :class:`LinkError`, because
    writing into it would write outside the directory. ``under`` itself may be a link: the user named it."""
    folder, under = Path(folder), Path(under)
    under.mkdir(parents=True, exist_ok=True)
    try:
        parts = folder.relative_to(under).parts
    except ValueError:
        raise ValueError(f"{folder} is not inside {under}") from None
    current = under
    for part in parts:
        current = current / part
        if current.is_symlink():
            raise LinkError(f"{str(current)!r} is a symbolic link inside {str(under)!r}; ddcnn writes only into "
                            f"folders of its own there, never through a link: remove the link (or choose another "
                            f"output folder)")
        try:
            current.mkdir()
        except FileExistsError:
            if not current.is_dir():
                raise
    return folder


def refuse_linked_folders(root: Path, names) -> None:
    """Refuse, before anything is written, sub-folders ``names`` of ``root`` that are symbolic links."""
    for name in names:
        if (Path(root) / name).is_symlink():
            own_folder(Path(root) / name, root)  # raises the one LinkError


def open_append(path: Path, mode: str = "a"):
    """``open(path, mode)`` (``a`` or ``w``, text) for a file that grows while a run writes it (metrics.jsonl, a
    log): a symbolic link at ``path`` is refused (``O_NOFOLLOW``), so nothing is appended through one."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_APPEND if mode == "a" else os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise LinkError(f"{str(path)!r} is a symbolic link; ddcnn never writes through one: remove the link "
                            f"(or choose another output folder)") from None
        raise
    return os.fdopen(fd, mode)


def _atomic_write(path: Path, data: bytes, check: Callable[[Path], None] | None = None,
                  under: Path | None = None) -> None:
    if under is not None:
        own_folder(path.parent, under)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the run's files get the mode any new file gets
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)  # rename(2) replaces a link at ``path`` itself, it does not follow it
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str, under: Path | None = None) -> None:
    atomic_write(path, text.encode(), under=under)


# Received archives: members read with absolute caps (a zip member's header, written by the sender, may claim any
# size; the stream is cut at the cap whatever it claims).
MEMBER_LIMIT = 64 * 2**20  # a JSON or text member (a manifest, a config): far above what ddcnn writes


def read_member(archive, name: str, limit: int = MEMBER_LIMIT) -> bytes:
    """The bytes of ``archive``'s (a :class:`zipfile.ZipFile`) member ``name``, at most ``limit`` of them: a
    member that claims or inflates to more is :class:`ValueError`, after reading at most ``limit + 1`` bytes."""
    info = archive.getinfo(name)
    if info.file_size > limit:
        raise ValueError(f"member {name!r} inflates to {info.file_size:,} bytes, more than the {limit:,} accepted")
    with archive.open(info) as member:
        data = member.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"member {name!r} inflates to more than the {limit:,} bytes accepted")
    return data
