"""The exception hierarchy of fusionkit.

Every error fusionkit raises on purpose derives from `FusionkitError`, so callers can
catch one type. Subclasses also derive from the built-in type callers already expect
(``ValueError`` for bad values, ``KeyError`` for unknown names, ``FileNotFoundError`` for
missing files), so ``except ValueError`` keeps working.

This module imports nothing of fusionkit: every layer may use it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "BackendUnavailableError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FusionkitError",
    "MissingDependencyError",
    "RegistryError",
    "ShapeError",
    "StorageError",
    "TrainingError",
    "did_you_mean",
]


class FusionkitError(Exception):
    """Base class of every error fusionkit raises deliberately."""


class RegistryError(FusionkitError, KeyError):
    """An unknown component kind or name, or a name registered twice."""

    def __str__(self) -> str:
        # KeyError quotes its message; show it as written.
        return str(self.args[0]) if self.args else ""


class ShapeError(FusionkitError, ValueError):
    """A tensor argument has the wrong rank, size, dtype or batch size."""


class ConfigError(FusionkitError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


class DataError(FusionkitError, ValueError):
    """A data set, manifest or sample cannot be read as asked."""


class CheckpointError(FusionkitError, ValueError):
    """A checkpoint is missing, corrupt, or does not match the model."""


class MissingDependencyError(FusionkitError, ImportError):
    """An optional package or an offline weight package is not installed."""


class BackendUnavailableError(FusionkitError, RuntimeError):
    """An attention backend was asked for where it cannot run (the message says why)."""


class TrainingError(FusionkitError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class StorageError(FusionkitError, OSError):
    """A file could not be written (disk full, no permission); the previous version is intact.

    Carries the ``errno`` of the underlying `OSError`, so ``except OSError`` and checks of
    ``error.errno == errno.ENOSPC`` keep working.
    """

    def __str__(self) -> str:
        # OSError would print "[Errno 28] ..."; the message already names the cause.
        return str(self.strerror) if self.strerror else super().__str__()


def did_you_mean(
    word: str,
    choices: Iterable[str],
    *,
    limit: int = 1,
    cutoff: float = 0.6,
    list_choices: bool = True,
    what: str = "accepted",
) -> str:
    """The hint of every "unknown name" error: the closest choices, then (optionally) all.

    Args:
        word: The unknown name.
        choices: The accepted names.
        limit: How many close matches to suggest at most.
        cutoff: Similarity (0-1) a choice needs to be suggested.
        list_choices: Also list every choice (leave out for long lists).
        what: The word before the list, e.g. ``"registered"``.

    Returns:
        E.g. ``"did you mean 'epochs'? accepted: epochs, lr"``; empty when nothing is close
        and ``list_choices`` is false.

    Examples:
        >>> did_you_mean("epoch", ["epochs", "lr"])
        "did you mean 'epochs'? accepted: epochs, lr"
        >>> did_you_mean("trans", ["transformer", "co_attention"], list_choices=False)
        "did you mean 'transformer'?"
    """
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(word), choices, n=limit, cutoff=cutoff)
    parts = []
    if close:
        parts.append(f"did you mean {', '.join(repr(c) for c in close)}?")
    if list_choices:
        parts.append(f"{what}: {', '.join(choices) or 'none'}")
    return " ".join(parts)
