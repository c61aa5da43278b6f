"""Stratified splits over groups of samples, shared by the data sets fusionkit builds offline.

Samples that look or read alike (an emoji's skin-tone variants, one icon name across themes)
form a *unit* that must land in one split, or the test split would leak the answer. Units are
dealt per stratum (a label), in a seeded order, each to the split furthest below its share.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TypeVar

from fusionkit.errors import ConfigError

__all__ = ["SPLIT_FRACTIONS", "check_int", "grouped_split"]

#: The share of samples of each split.
SPLIT_FRACTIONS: Mapping[str, float] = {"train": 0.70, "val": 0.15, "test": 0.15}

_Record = TypeVar("_Record")


def grouped_split(
    records: Sequence[_Record],
    unit: Callable[[_Record], Hashable],
    stratum: Callable[[_Record], str],
    rng_label: str,
    fractions: Mapping[str, float] = SPLIT_FRACTIONS,
) -> dict[str, list[_Record]]:
    """Assign whole units to splits, per stratum, in the proportions of ``fractions``.

    Within a stratum the units are shuffled by a generator seeded with ``rng_label``; the split
    furthest below its share (in samples) takes the next unit, the first split of
    ``fractions`` winning ties, so every stratum's first unit goes there (training: its
    classes are known to the model).

    Args:
        records: The samples, in a deterministic order.
        unit: A sample's unit key (sortable); a unit's samples share one split.
        stratum: A sample's stratum; a unit's first sample decides the unit's.
        rng_label: Seed of the shuffle (e.g. ``"fusionkit-emoji:0"``).
        fractions: Split name → share.

    Returns:
        Split name → its samples, in the order of ``records``.

    Examples:
        >>> split = grouped_split(list(range(20)), lambda r: r // 2, lambda r: "a", "doc")
        >>> {name: len(rows) for name, rows in split.items()}
        {'train': 14, 'val': 4, 'test': 2}
    """
    units: dict[Hashable, list[_Record]] = defaultdict(list)
    for record in records:
        units[unit(record)].append(record)
    by_stratum: dict[str, list[Hashable]] = defaultdict(list)
    for key, members in units.items():
        by_stratum[stratum(members[0])].append(key)

    rng = random.Random(rng_label)
    assigned: dict[Hashable, str] = {}
    for name in sorted(by_stratum):
        keys = sorted(by_stratum[name])  # type: ignore[type-var]
        rng.shuffle(keys)
        counts = dict.fromkeys(fractions, 0)
        total = sum(len(units[key]) for key in keys)
        for key in keys:
            split = max(fractions, key=lambda s: fractions[s] * total - counts[s])
            assigned[key] = split
            counts[split] += len(units[key])
    splits: dict[str, list[_Record]] = {name: [] for name in fractions}
    for record in records:
        splits[assigned[unit(record)]].append(record)
    return splits


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``.

    Raises:
        ConfigError: Otherwise, naming the argument.

    Examples:
        >>> check_int("image_size", 64, 16)
        64
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value
