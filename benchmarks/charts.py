"""The PNG charts of the benchmark report (matplotlib, imported on first use)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.cases import (
    short_dtype,
)
from benchmarks.rows import (
    IMPL_ORDER,
    Row,
    ceiling_fraction,
    ceilings,
    fmt_rate,
    fmt_time,
    group_by,
    select,
)

_COLORS = {
    "xformers": "#7b3294",
    "sdpa": "#1b7837",
    "math": "#999999",
    "fusionkit": "#1b7837",
    "fusionkit-layer": "#7fbf7b",
    "fusionkit-packed": "#1b7837",
    "fusionkit-padded": "#a6dba0",
    "fusionkit-layer-packed": "#5aae61",
    "fusionkit-layer-padded": "#d9f0d3",
    "torch": "#ee6677",
    "timm": "#4477aa",
}


def _barh_groups(
    ax: Any,
    groups: Sequence[tuple[str, list[Row]]],
    value: Callable[[Row], float],
    annotate: Callable[[Row], str] | None = None,
) -> None:
    """Horizontal bars: one block per group label, one bar per implementation."""
    impls = sorted({r.impl for _, g in groups for r in g}, key=lambda i: IMPL_ORDER.get(i, 99))
    height = 0.8 / max(1, len(impls))
    ticks, labels = [], []
    for gi, (label, group) in enumerate(groups):
        by_impl = {r.impl: r for r in group}
        for ii, impl in enumerate(impls):
            if impl not in by_impl:
                continue
            y = gi + ii * height
            row = by_impl[impl]
            v = value(row)
            ax.barh(
                y,
                v,
                height=height,
                color=_COLORS.get(impl, "#333333"),
                hatch="//" if row.contended else None,
                label=impl if impl not in ax.get_legend_handles_labels()[1] else None,
            )
            note = annotate(row) if annotate is not None else ""
            if row.contended:
                note += " (shared machine)"
            if note:
                ax.text(v, y, " " + note, va="center", fontsize=7)
        ticks.append(gi + 0.4 - height / 2)
        labels.append(label)
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.invert_yaxis()
    # Below the plot: inside, it would hide the bars of some group.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(3, len(impls)))
    ax.grid(axis="x", alpha=0.3)


def _label_log_axis(axis: Any) -> None:
    """Label a log axis at 1-2-5 steps with plain numbers (``20``, ``50``), not powers of 10."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _attention_chart(rows: Sequence[Row], device: str, path: Path) -> bool:
    import matplotlib.pyplot as plt

    found = select(rows, family="attention", device=device)
    if not found:
        return False
    groups = [
        (f"{k[0]} B{k[1]} {k[2]} {k[3]} {short_dtype(k[4])}", g)
        for k, g in group_by(found, ("shape", "batch", "mask", "mode", "dtype"))
    ]
    fig, ax = plt.subplots(figsize=(9, 0.5 + 0.42 * len(groups) * 1.3))
    _barh_groups(ax, groups, lambda r: r.median * 1e3, lambda r: fmt_time(r.median))
    ax.set_xscale("log")
    _label_log_axis(ax.xaxis)
    ax.set_xlabel("median time (ms, log scale) - shorter is better")
    ax.set_title(f"attention() per backend ({device})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _layer_families_chart(
    rows: Sequence[Row],
    device: str,
    path: Path,
    value: Callable[[Row], float],
    note: Callable[[Row], str],
    xlabel: str,
    what: str,
) -> bool:
    """One panel per layer family (dense, variable-length), one bar block per shape and mode."""
    import matplotlib.pyplot as plt

    families = [(f, select(rows, family=f, device=device)) for f in ("layer", "varlen")]
    families = [(f, found) for f, found in families if found]
    if not families:
        return False
    sizes = [len(group_by(found, ("shape", "mode", "dtype"))) for _, found in families]
    fig, axes = plt.subplots(
        len(families),
        1,
        figsize=(9, 1.6 * len(families) + 1.5 * sum(sizes)),
        squeeze=False,
        gridspec_kw={"height_ratios": sizes},
    )
    titles = {"layer": "dense batch (every token real)", "varlen": "variable-length batch"}
    for ax, (family, found) in zip(axes[:, 0], families, strict=True):
        groups = [
            (f"{k[0]}\n{k[1]} {k[2]}", g) for k, g in group_by(found, ("shape", "mode", "dtype"))
        ]
        _barh_groups(ax, groups, value, note)
        ax.set_xlabel(xlabel)
        ax.set_title(f"one layer, {what}: {titles[family]} ({device})")
        ax.set_xlim(0, ax.get_xlim()[1] * 1.4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _layers_chart(rows: Sequence[Row], device: str, path: Path) -> bool:
    ceiling = ceilings(rows)

    def note(r: Row) -> str:
        fraction = ceiling_fraction(r, ceiling)
        share = "" if fraction is None else f", {100 * fraction:.0f}% of ceiling"
        return f"{fmt_time(r.median)}{share}"

    return _layer_families_chart(
        rows,
        device,
        path,
        lambda r: r.median * 1e3,
        note,
        "median time (ms) - shorter is better",
        "time",
    )


def _memory_chart(rows: Sequence[Row], device: str, path: Path) -> bool:
    import matplotlib.pyplot as plt

    found = select(rows, family="memory", device=device)
    if not found:
        return False
    fig, (mem_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 4.4))
    # Colour: backend; line: mode; marker: mask.
    lines = {"fwd": "-", "fwd+bwd": "--"}
    markers = {"none": "o", "padding": "s"}
    for key, group in group_by(found, ("impl", "mode", "mask", "dtype")):
        impl, mode, mask, dtype = key
        group = sorted(group, key=lambda r: r["q_len"])
        xs = [r["q_len"] for r in group]
        style = {
            "linestyle": lines.get(mode, ":"),
            "marker": markers.get(mask, "^"),
            "color": _COLORS.get(impl, "#333333"),
            "label": f"{impl} {mode} mask={mask} {dtype}",
        }
        mem_ax.plot(xs, [max(r.peak_mib or 0, 1e-3) for r in group], **style)
        time_ax.plot(xs, [r.median * 1e3 for r in group], **style)
    lengths = sorted({r["q_len"] for r in found})
    for ax, ylabel in ((mem_ax, "peak memory (MiB)"), (time_ax, "median time (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, [str(n) for n in lengths])
        _label_log_axis(ax.yaxis)
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    mem_ax.set_title(f"peak memory vs L ({device}): O(L) fused vs O(L²) math")
    time_ax.set_title(f"time vs L ({device})")
    mem_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _throughput_chart(rows: Sequence[Row], device: str, path: Path) -> bool:
    def note(r: Row) -> str:
        return f"{fmt_rate(r['samples'] / r.median)} samples/s"

    return _layer_families_chart(
        rows,
        device,
        path,
        lambda r: r["tokens"] / r.median / 1e3,
        note,
        "real tokens per second (thousands) - longer is better",
        "throughput",
    )

CHARTS: dict[str, Callable[[Sequence[Row], str, Path], bool]] = {
    "attention": _attention_chart,
    "layers": _layers_chart,
    "throughput": _throughput_chart,
    "memory": _memory_chart,
}


def write_charts(rows: Sequence[Row], out: Path) -> dict[str, str]:
    """Draw every chart the data allows; returns chart key → file name (relative to ``out``)."""
    import matplotlib

    matplotlib.use("Agg")
    written = {}
    for device in sorted({r.device for r in rows}):
        for name, draw in CHARTS.items():
            filename = f"{name}_{device}.png"
            if draw(rows, device, out / filename):
                written[f"{name}_{device}"] = filename
    return written
