"""ddcnn's own errors.

Every error a user can cause (a typo in a config, a grid that does not fit, a corrupt file) is raised as a
subclass of :class:`DDCNNError`, with one sentence that says what is wrong, which value, and how to fix it. The
command line prints that sentence alone (``ddcnn: error: ...``) and exits with status 2.

The classes also derive from the matching built-in exception, so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class DDCNNError(Exception):
    """Base class of every error ddcnn raises on purpose."""


class ConfigError(DDCNNError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


class ShapeError(DDCNNError, ValueError):
    """A tensor, image or grid does not have the shape that is needed."""


class DataError(DDCNNError, ValueError):
    """A dataset file exists but its content is wrong (bad magic number, truncated, labels out of range)."""


class DataNotFoundError(DDCNNError, FileNotFoundError):
    """A dataset directory or file is missing."""


class CheckpointError(DDCNNError, ValueError):
    """A checkpoint is missing, corrupt, or was written by a different configuration."""


class ExportError(DDCNNError, RuntimeError):
    """An exported model does not compute what the run's model computes; nothing is written."""


class LinkError(DDCNNError, ValueError):
    """A file or folder ddcnn would write in a run or study directory is a symbolic link (it writes through none)."""


class TrainingError(DDCNNError, RuntimeError):
    """Training cannot go on (for example the loss became NaN); the last good checkpoint is kept."""


def closest(name: str, choices) -> str:
    """The valid choice closest to ``name``, for 'did you mean' messages ('' when nothing is close)."""
    import difflib

    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return match[0] if match else ""


def did_you_mean(name: str, choices) -> str:
    """' (did you mean 'x'?)' or '' — to append to an error message."""
    match = closest(name, choices)
    return f" (did you mean {match!r}?)" if match else ""
