"""The measured cases of pytest-benchmark JSON runs, and how the report formats and groups them."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.cases import (
    BACKENDS,
    CONTENDED_SHARE,
    DENSE_IMPLS,
    PEER_IMPLS,
    TARGET_LAYER_SHAPE,
    VARLEN_IMPLS,
)

__all__ = [
    "CONTENDED_MARK",
    "IMPL_ORDER",
    "MIB",
    "MODE_ORDER",
    "Row",
    "best_peer",
    "ceiling_fraction",
    "ceilings",
    "flag",
    "flop_unit",
    "fmt_fraction",
    "fmt_mib",
    "fmt_rate",
    "fmt_time",
    "group_by",
    "label_of_target",
    "load_rows",
    "markdown_table",
    "order_key",
    "select",
]

MIB = 2**20

CONTENDED_MARK = " ⚠"

IMPL_ORDER = {name: i for i, name in enumerate((*BACKENDS, *DENSE_IMPLS, *VARLEN_IMPLS))}

MODE_ORDER = {"fwd": 0, "fwd+bwd": 1}


@dataclass
class Row:
    """One measured case: its ``extra_info`` and timing statistics (seconds)."""

    info: dict[str, Any]
    median: float
    minimum: float
    rounds: int

    def __getitem__(self, key: str) -> Any:
        return self.info[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.info.get(key, default)

    @property
    def family(self) -> str:
        return self.info["family"]

    @property
    def device(self) -> str:
        return self.info["device"]

    @property
    def impl(self) -> str:
        return self.info["impl"]

    @property
    def others_share(self) -> float | None:
        """Share of the CPUs that other processes used while this case was timed."""
        return self.info.get("others_cpu_share")

    @property
    def contended(self) -> bool:
        share = self.others_share
        return self.device == "cpu" and share is not None and share > CONTENDED_SHARE

    @property
    def median_cell(self) -> str:
        """The median, marked when the machine was shared."""
        return fmt_time(self.median) + (CONTENDED_MARK if self.contended else "")

    @property
    def flop_rate(self) -> float:
        """Achieved FLOP/s (counted FLOPs over the median time)."""
        return self.info["flops"] / self.median

    @property
    def peak_mib(self) -> float | None:
        peak = self.info.get("peak_memory_bytes")
        return None if peak is None else peak / MIB


def load_rows(paths: Sequence[Path]) -> tuple[list[Row], list[dict[str, Any]]]:
    """Read pytest-benchmark JSON files.

    Returns:
        The measured cases that carry fusionkit ``extra_info`` (later files replace earlier
        measurements of the same case and device), and one summary per file.

    Raises:
        ValueError: A file is not a pytest-benchmark JSON.
    """
    merged: dict[tuple[str, str, str], Row] = {}
    runs = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        if "benchmarks" not in data:
            raise ValueError(f"{path} is not a pytest-benchmark JSON (no 'benchmarks' key)")
        count = 0
        for bench in data["benchmarks"]:
            info = bench.get("extra_info") or {}
            if "family" not in info or "device" not in info:
                continue
            stats = bench["stats"]
            row = Row(info, stats["median"], stats["min"], stats["rounds"])
            merged[(row.device, row.family, info["case"])] = row
            count += 1
        runs.append(
            {
                "file": Path(path).name,
                "datetime": data.get("datetime", "?"),
                "commit": (data.get("commit_info") or {}).get("id", "?")[:10],
                "dirty": (data.get("commit_info") or {}).get("dirty"),
                "cases": count,
            }
        )
    return list(merged.values()), runs


def fmt_time(seconds: float) -> str:
    """``0.0123`` → ``12.3 ms``."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def fmt_rate(value: float) -> str:
    """``123456`` → ``123k``."""
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def fmt_mib(mib: float | None) -> str:
    if mib is None:
        return "–"
    return f"{mib:.3g}" if mib < 1000 else f"{mib:,.0f}"


def flop_unit(device: str) -> tuple[str, float]:
    return ("TFLOP/s", 1e12) if device == "cuda" else ("GFLOP/s", 1e9)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub markdown table; numeric-looking columns are right-aligned."""
    rows = [list(r) for r in rows]
    align = []
    for i in range(len(headers)):
        cells = [r[i] for r in rows if r[i] not in ("–", "")]
        numeric = bool(cells) and all(c.lstrip("~×-+").lstrip()[:1].isdigit() for c in cells)
        align.append("---:" if numeric else "---")
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def ceilings(rows: Sequence[Row]) -> dict[tuple[str, str], float]:
    """(device, dtype) → the matmul FLOP/s of that run, on its fastest round.

    A ceiling is the best the machine does: its fastest round is the least disturbed one,
    which keeps a busy neighbour during the ceiling case from inflating every fraction.
    """
    return {(r.device, r["dtype"]): r["flops"] / r.minimum for r in rows if r.family == "ceiling"}


def ceiling_fraction(row: Row, ceiling: dict[tuple[str, str], float]) -> float | None:
    """The row's FLOP rate over the matmul ceiling of its device and dtype."""
    peak = ceiling.get((row.device, row["dtype"]))
    return None if not peak else row.flop_rate / peak


def fmt_fraction(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def order_key(row: Row) -> tuple[Any, ...]:
    return (MODE_ORDER.get(row["mode"], 9), IMPL_ORDER.get(row.impl, 99), row.impl)


def select(rows: Iterable[Row], **where: Any) -> list[Row]:
    return [r for r in rows if all(r.get(k) == v for k, v in where.items())]


def group_by(rows: Sequence[Row], keys: Sequence[str]) -> list[tuple[tuple[Any, ...], list[Row]]]:
    """Group rows by ``keys`` in first-seen order (the grid order of the run)."""
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    return list(groups.items())


def best_peer(rows: Sequence[Row]) -> Row | None:
    """The fastest of ``torch`` / ``timm`` among rows of one shape, mode and dtype."""
    peers = [r for r in rows if r.impl in PEER_IMPLS]
    return min(peers, key=lambda r: r.median) if peers else None


def flag(where: str, rows: Sequence[Row]) -> str:
    """``where``, marked when a case of the comparison was timed on a shared machine."""
    return where + (CONTENDED_MARK if any(r.contended for r in rows) else "")


def label_of_target() -> str:
    s = TARGET_LAYER_SHAPE
    return (
        f"batch {s.batch}, {s.image_tokens} image + {s.text_tokens} text tokens, "
        f"dim {s.dim}, {s.heads} heads"
    )
