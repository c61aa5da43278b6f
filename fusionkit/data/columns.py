"""Which columns of a manifest a model reads: those of its modalities and of its tasks."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from fusionkit.errors import ConfigError, DataError

__all__ = ["MODALITY_COLUMNS", "check_modalities", "require_columns"]

#: The modality columns a manifest can hold.
MODALITY_COLUMNS = ("image", "text")


def check_modalities(modalities: Sequence[str]) -> tuple[str, ...]:
    """Validate a choice of modality columns.

    Args:
        modalities: A non-empty subset of ``("image", "text")``, in any order.

    Returns:
        The modalities as a tuple, duplicates dropped.

    Raises:
        ConfigError: ``modalities`` is a string, empty, or names an unknown modality.

    Examples:
        >>> check_modalities(["text"])
        ('text',)
    """
    if isinstance(modalities, str) or not modalities:
        raise ConfigError(
            f"modalities: expected a non-empty sequence of {list(MODALITY_COLUMNS)}, "
            f"got {modalities!r}"
        )
    chosen = tuple(dict.fromkeys(modalities))
    unknown = [m for m in chosen if m not in MODALITY_COLUMNS]
    if unknown:
        raise ConfigError(
            f"modalities: unknown {unknown}; expected some of {list(MODALITY_COLUMNS)}"
        )
    return chosen


def require_columns(
    path: Path, columns: Sequence[str], modalities: Sequence[str], tasks: Iterable[str]
) -> None:
    """Raise unless a manifest has the columns of the used modalities and of every task.

    Args:
        path: The manifest (for the message).
        columns: Its columns.
        modalities: The modality columns read (``image``, ``text``).
        tasks: The task columns.

    Raises:
        DataError: A column is missing; the message lists the columns found.

    Examples:
        >>> require_columns(Path("m.csv"), ["text", "color"], ["text"], ["color"])
    """
    task_names = list(tasks)
    for required in (*modalities, *task_names):
        if required not in columns:
            kind = "task column" if required in task_names else "column"
            raise DataError(f"{path}: no {kind} {required!r}; columns found: {list(columns)}")
