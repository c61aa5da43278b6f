"""Which columns of a manifest a model reads: those of its inputs and of its tasks.

A model's inputs are named (``title``, ``front``, ...) and each reads one column of the
manifest as an image path or a text (:class:`InputColumn`). The ``vision:`` / ``text:``
shorthand is the two inputs ``image`` and ``text``, reading the columns of the same names.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fusionkit.errors import ConfigError, DataError

__all__ = [
    "MODALITY_COLUMNS",
    "InputColumn",
    "check_modalities",
    "input_columns",
    "require_columns",
]

_LOG = logging.getLogger("fusionkit.data")

#: The modality columns of the ``vision:`` / ``text:`` shorthand.
MODALITY_COLUMNS = ("image", "text")
#: Keys of a sample that no input can be named (a sample holds its inputs beside them).
RESERVED_INPUT_NAMES = ("id", "targets")


@dataclass(frozen=True)
class InputColumn:
    """The manifest column one input reads, and what its cells hold.

    Attributes:
        kind: ``"image"`` (cells are image paths) or ``"text"``.
        column: The column's name in the manifest header.

    Examples:
        >>> InputColumn("text", "title").column
        'title'
    """

    kind: Literal["image", "text"]
    column: str


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


def input_columns(
    inputs: Mapping[str, Any] | None = None, modalities: Sequence[str] = MODALITY_COLUMNS
) -> dict[str, InputColumn]:
    """The columns a data set reads, by input name.

    Args:
        inputs: Input name → anything with ``kind`` and ``column`` (an :class:`InputColumn`,
            or a model's ``config.inputs``); when None, the shorthand ``modalities``.
        modalities: A subset of ``("image", "text")``: the shorthand inputs of those names,
            each reading the column of its name.

    Returns:
        Input name → :class:`InputColumn`, in order.

    Raises:
        ConfigError: No input, an input of an unknown kind, a reserved name (``id``,
            ``targets``), or two inputs reading one column.

    Examples:
        >>> input_columns(modalities=["text"])
        {'text': InputColumn(kind='text', column='text')}
    """
    if inputs is None:
        return {m: InputColumn(m, m) for m in check_modalities(modalities)}  # type: ignore[arg-type]
    if not isinstance(inputs, Mapping) or not inputs:
        raise ConfigError(f"inputs: expected a non-empty mapping of input names, got {inputs!r}")
    columns: dict[str, InputColumn] = {}
    readers: dict[str, str] = {}
    for name, spec in inputs.items():
        kind, column = getattr(spec, "kind", None), getattr(spec, "column", None)
        if name in RESERVED_INPUT_NAMES:
            raise ConfigError(f"inputs: {name!r} is reserved; name the input otherwise")
        if kind not in MODALITY_COLUMNS or not isinstance(column, str) or not column:
            raise ConfigError(
                f"inputs[{name!r}]: expected kind 'image' or 'text' and a column name, "
                f"got kind={kind!r}, column={column!r}"
            )
        if column in readers:
            raise ConfigError(
                f"inputs[{name!r}]: column {column!r} is already read by input "
                f"{readers[column]!r}"
            )
        readers[column] = name
        columns[name] = InputColumn(kind, column)
    return columns


def require_columns(
    path: Path,
    columns: Sequence[str],
    inputs: Mapping[str, InputColumn] | Sequence[str],
    tasks: Iterable[str],
    *,
    warn: bool = True,
) -> list[str]:
    """Check a manifest's header against the inputs and tasks it is read for.

    Every task needs its column. An input whose column is absent is missing for every sample
    (as if each of its cells were empty), with a warning that names it; a manifest with none
    of the input columns has nothing to read and is refused.

    Args:
        path: The manifest (for messages).
        columns: Its columns.
        inputs: Input name → :class:`InputColumn`, or shorthand modality names.
        tasks: The task columns.
        warn: Log a warning per absent input column.

    Returns:
        The names of the inputs whose column is absent.

    Raises:
        DataError: A task column is missing, or every input column is; the message lists the
            columns found.

    Examples:
        >>> require_columns(Path("m.csv"), ["text", "color"], ["text"], ["color"])
        []
    """
    specs = inputs if isinstance(inputs, Mapping) else input_columns(modalities=inputs)
    for task in tasks:
        if task not in columns:
            raise DataError(f"{path}: no task column {task!r}; columns found: {list(columns)}")
    absent = [name for name, spec in specs.items() if spec.column not in columns]
    if len(absent) == len(specs):
        wanted = " or ".join(repr(spec.column) for spec in specs.values())
        raise DataError(f"{path}: no column {wanted}; columns found: {list(columns)}")
    for name in absent if warn else ():
        _LOG.warning(
            "%s: no column %r (input %r); every sample is used without that input; "
            "columns found: %s", path, specs[name].column, name, list(columns),
        )
    return absent
