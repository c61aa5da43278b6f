"""The key ratios of a run: fusionkit against its peers, measured side by side.

Each ratio compares cases timed in the same run (medians, and the fastest rounds beside them).
What each ratio should be, fusionkit's performance goals, is written in ``docs/benchmarks.md``,
not here: this module measures, the docs judge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.cases import PEER_IMPLS, TARGET_LAYER_SHAPE, TARGET_MEMORY_SEQ_LEN
from benchmarks.rows import (
    Row,
    best_peer,
    ceiling_fraction,
    ceilings,
    flag,
    fmt_fraction,
    group_by,
    label_of_target,
    markdown_table,
    select,
)

__all__ = ["KeyRatio", "key_ratios", "ratios_section"]

#: Ratios are taken for fusionkit's module as used and for its bare layer: the difference is
#: what the module adds (input projections, summary tokens, final norm).
DENSE_IMPLS = ("fusionkit", "fusionkit-layer")
VARLEN_IMPLS = ("fusionkit-packed", "fusionkit-layer-packed")


@dataclass
class KeyRatio:
    """One ratio on one (device, dtype, mode[, ...]) slice of the data.

    Attributes:
        name: What is compared.
        where: The slice, marked when a case of it was timed on a shared machine.
        measured: The ratio of the medians (or the fraction of the ceiling).
        on_minima: The same on the fastest round of each case: close to the median on a
            quiet machine, the more trustworthy of the two on a shared one.
    """

    name: str
    where: str
    measured: str
    on_minima: str = "–"


def _ratio(name: str, where: str, ours: Row, other: Row, *, memory: bool = False) -> KeyRatio:
    if memory:
        value = ours["peak_memory_bytes"] / other["peak_memory_bytes"]
        return KeyRatio(name, flag(where, [ours, other]), f"{value:.2f}")
    return KeyRatio(
        name,
        flag(where, [ours, other]),
        f"{ours.median / other.median:.2f}",
        f"{ours.minimum / other.minimum:.2f}",
    )


def key_ratios(rows: Sequence[Row]) -> list[KeyRatio]:
    """The key ratios, computed from the measured rows only.

    Args:
        rows: The measured cases.

    Returns:
        Dense layer time against timm's Block and ``nn.TransformerEncoderLayer`` and its share
        of the matmul ceiling; packed variable-length time against the best padded peer; peak
        memory of the fused kernels against ``math``'s.
    """
    results: list[KeyRatio] = []
    ceiling = ceilings(rows)
    label = TARGET_LAYER_SHAPE.label
    layer = select(rows, family="layer", shape=label)
    for (device, dtype, mode), group in group_by(layer, ("device", "dtype", "mode")):
        by_impl = {r.impl: r for r in group}
        where = f"{device} {dtype} {mode}, {label}"
        for impl in DENSE_IMPLS:
            ours = by_impl.get(impl)
            if ours is None:
                continue
            for peer, title in (("timm", "timm Block"), ("torch", "nn.TransformerEncoderLayer")):
                if peer in by_impl:
                    results.append(
                        _ratio(f"dense: {impl} / {title} time", where, ours, by_impl[peer])
                    )
            fraction = ceiling_fraction(ours, ceiling)
            if fraction is not None:
                results.append(
                    KeyRatio(
                        f"dense: {impl} FLOP rate / ceiling",
                        flag(where, [ours]),
                        fmt_fraction(fraction),
                        fmt_fraction(fraction * ours.median / ours.minimum),
                    )
                )
    varlen = select(rows, family="varlen", shape=label)
    for (device, dtype, mode), group in group_by(varlen, ("device", "dtype", "mode")):
        by_impl = {r.impl: r for r in group}
        peer = best_peer(group)
        if peer is None:
            continue
        fastest_peer = min(p.minimum for p in group if p.impl in PEER_IMPLS)
        for impl in VARLEN_IMPLS:
            packed = by_impl.get(impl)
            if packed is None:
                continue
            where = f"{device} {dtype} {mode}, {label}, text mean {packed['text_mean']:.1f}"
            ratio = _ratio(f"varlen: {impl} / best padded peer ({peer.impl}) time", where,
                           packed, peer)
            ratio.on_minima = f"{packed.minimum / fastest_peer:.2f}"
            results.append(ratio)
    memory = select(rows, family="memory", q_len=TARGET_MEMORY_SEQ_LEN)
    for (device, dtype, mode, mask), group in group_by(memory, ("device", "dtype", "mode", "mask")):
        by_impl = {r.impl: r for r in group}
        math_row = by_impl.get("math")
        if math_row is None or not math_row["peak_memory_bytes"]:
            continue
        for backend in ("sdpa", "xformers"):
            if backend in by_impl:
                results.append(
                    _ratio(
                        f"memory at L={TARGET_MEMORY_SEQ_LEN}: {backend} / math peak",
                        f"{device} {dtype} {mode}, mask {mask}",
                        by_impl[backend],
                        math_row,
                        memory=True,
                    )
                )
    return results


def ratios_section(rows: Sequence[Row]) -> str:
    """The report's "Key ratios" section."""
    results = key_ratios(rows)
    lines = [
        "## Key ratios",
        "",
        "fusionkit against its peers, cases measured side by side in the same run (medians; "
        f"the dense and packed layers at {label_of_target()}). The goals they are held to are "
        "stated in the Goals section of the Benchmarks page (`docs/benchmarks.md`).",
        "",
    ]
    if not results:
        lines.append("No key case was measured in this run (a `--quick` smoke run has none).")
        return "\n".join(lines)
    lines.append(
        markdown_table(
            ("ratio", "where", "measured (medians)", "on fastest rounds"),
            ((r.name, r.where, r.measured, r.on_minima) for r in results),
        )
    )
    return "\n".join(lines)
