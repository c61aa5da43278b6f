"""Turn pytest-benchmark JSON runs into ``docs/benchmarks/``: markdown tables, PNG charts, targets.

Usage::

    python -m benchmarks.report .benchmarks/cpu.json [.benchmarks/gpu.json] --out docs/benchmarks

Every number comes from the JSON: times from pytest-benchmark's statistics, everything else
(shapes, tokens, FLOP counts, peak memory, device, dtype, threads) from each case's
``extra_info``. Throughput, FLOP rates, fractions of the matmul ceiling and the target ratios
are derived here. Runs are merged in the order given; a later run replaces an earlier
measurement of the same case on the same device.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.cases import (
    BACKENDS,
    CONTENDED_SHARE,
    DENSE_IMPLS,
    PEER_IMPLS,
    TARGET_LAYER_SHAPE,
    TARGET_MEMORY_SEQ_LEN,
    VARLEN_IMPLS,
    short_dtype,
)

__all__ = ["Row", "build_report", "load_rows", "main"]

REPORT_FILE = "README.md"
MIB = 2**20
#: Goals of the issue (the thresholds are definitions, the measured values come from the JSON).
DENSE_VS_TIMM_MAX = 1.0
DENSE_VS_TORCH_MAX = 1.0
DENSE_CEILING_MIN = 0.8
VARLEN_VS_PEER_MAX = 0.6
MEMORY_VS_MATH_MAX = 0.10
CONTENDED_MARK = " ⚠"
#: The targets are checked for fusionkit's module as used and for its bare layer: the
#: difference is what the module adds (input projections, summary tokens, final norm).
DENSE_TARGET_IMPLS = ("fusionkit", "fusionkit-layer")
VARLEN_TARGET_IMPLS = ("fusionkit-packed", "fusionkit-layer-packed")
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


# Formatting ---------------------------------------------------------------------------------


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


def _flop_unit(device: str) -> tuple[str, float]:
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


# Derived quantities -------------------------------------------------------------------------


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


def _fmt_fraction(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _order(row: Row) -> tuple[Any, ...]:
    return (MODE_ORDER.get(row["mode"], 9), IMPL_ORDER.get(row.impl, 99), row.impl)


def _select(rows: Iterable[Row], **where: Any) -> list[Row]:
    return [r for r in rows if all(r.get(k) == v for k, v in where.items())]


def _groups(rows: Sequence[Row], keys: Sequence[str]) -> list[tuple[tuple[Any, ...], list[Row]]]:
    """Group rows by ``keys`` in first-seen order (the grid order of the run)."""
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    return list(groups.items())


def best_peer(rows: Sequence[Row]) -> Row | None:
    """The fastest of ``torch`` / ``timm`` among rows of one shape, mode and dtype."""
    peers = [r for r in rows if r.impl in PEER_IMPLS]
    return min(peers, key=lambda r: r.median) if peers else None


# Targets ------------------------------------------------------------------------------------


@dataclass
class TargetResult:
    """One target evaluated on one (device, dtype, mode[, ...]) slice of the data."""

    target: str
    where: str
    measured: str
    goal: str
    passed: bool | None
    verdict: str
    #: The same check on the fastest round of each case instead of the median: close to the
    #: median on a quiet machine, the more trustworthy of the two on a shared one.
    on_minima: str = "–"
    #: False when a case of the comparison was timed while other processes used the CPUs.
    reliable: bool = True


def _ratio_target(
    name: str,
    where: str,
    ratio: float,
    limit: float,
    what: str,
    *,
    strict: bool = False,
    on_minima: float | None = None,
    cases: Sequence[Row] = (),
) -> TargetResult:
    passed = ratio < limit if strict else ratio <= limit
    if passed:
        verdict = f"PASS ({(limit - ratio) / limit:.0%} margin)"
    else:
        verdict = f"MISS by {ratio / limit - 1:.0%}: needs {ratio / limit:.2f}× less {what}"
    goal = f"{'<' if strict else '≤'} {limit:.2f}"
    minima = "–" if on_minima is None else f"{on_minima:.2f}"
    reliable = not any(r.contended for r in cases)
    return TargetResult(
        name, _flag(where, cases), f"{ratio:.2f}", goal, passed, verdict, minima, reliable
    )


def _flag(where: str, rows: Sequence[Row]) -> str:
    """``where``, marked when a case of the comparison was timed on a shared machine."""
    return where + (CONTENDED_MARK if any(r.contended for r in rows) else "")


def _ceiling_target(
    name: str, where: str, fraction: float, on_minima: float | None, case: Row
) -> TargetResult:
    passed = fraction >= DENSE_CEILING_MIN
    verdict = (
        "PASS"
        if passed
        else f"MISS by {100 * (DENSE_CEILING_MIN - fraction):.0f} points: needs "
        f"{DENSE_CEILING_MIN / fraction:.2f}× the FLOP rate"
    )
    return TargetResult(
        name,
        _flag(where, [case]),
        _fmt_fraction(fraction),
        f"≥ {DENSE_CEILING_MIN:.0%}",
        passed,
        verdict,
        _fmt_fraction(on_minima),
        not case.contended,
    )


def evaluate_targets(rows: Sequence[Row]) -> list[TargetResult]:
    """The issue's targets, computed from the measured rows only."""
    results: list[TargetResult] = []
    ceiling = ceilings(rows)
    label = TARGET_LAYER_SHAPE.label
    for (device, dtype, mode), group in _groups(
        _select(rows, family="layer", shape=label), ("device", "dtype", "mode")
    ):
        by_impl = {r.impl: r for r in group}
        where = f"{device} {dtype} {mode}, {label}"
        for impl in DENSE_TARGET_IMPLS:
            ours = by_impl.get(impl)
            if ours is None:
                continue
            for peer, limit, strict, title in (
                ("timm", DENSE_VS_TIMM_MAX, False, "timm Block"),
                ("torch", DENSE_VS_TORCH_MAX, True, "nn.TransformerEncoderLayer"),
            ):
                if peer in by_impl:
                    other = by_impl[peer]
                    results.append(
                        _ratio_target(
                            f"dense: {impl} / {title} time",
                            where,
                            ours.median / other.median,
                            limit,
                            "time",
                            strict=strict,
                            on_minima=ours.minimum / other.minimum,
                            cases=[ours, other],
                        )
                    )
            fraction = ceiling_fraction(ours, ceiling)
            if fraction is not None:
                results.append(
                    _ceiling_target(
                        f"dense: {impl} FLOP rate / ceiling",
                        where,
                        fraction,
                        fraction * ours.median / ours.minimum,
                        ours,
                    )
                )
    for (device, dtype, mode), group in _groups(
        _select(rows, family="varlen", shape=label), ("device", "dtype", "mode")
    ):
        by_impl = {r.impl: r for r in group}
        peer = best_peer(group)
        if peer is None:
            continue
        for impl in VARLEN_TARGET_IMPLS:
            packed = by_impl.get(impl)
            if packed is None:
                continue
            where = f"{device} {dtype} {mode}, {label}, text mean {packed['text_mean']:.1f}"
            results.append(
                _ratio_target(
                    f"varlen: {impl} / best padded peer ({peer.impl}) time",
                    where,
                    packed.median / peer.median,
                    VARLEN_VS_PEER_MAX,
                    "time",
                    on_minima=packed.minimum
                    / min(p.minimum for p in group if p.impl in PEER_IMPLS),
                    cases=[packed, peer],
                )
            )
    memory = _select(rows, family="memory", q_len=TARGET_MEMORY_SEQ_LEN)
    for (device, dtype, mode, mask), group in _groups(memory, ("device", "dtype", "mode", "mask")):
        by_impl = {r.impl: r for r in group}
        math_row = by_impl.get("math")
        if math_row is None or not math_row["peak_memory_bytes"]:
            continue
        for backend in ("sdpa", "xformers"):
            if backend not in by_impl:
                continue
            ratio = by_impl[backend]["peak_memory_bytes"] / math_row["peak_memory_bytes"]
            results.append(
                _ratio_target(
                    f"memory at L={TARGET_MEMORY_SEQ_LEN}: {backend} / math peak",
                    f"{device} {dtype} {mode}, mask {mask}",
                    ratio,
                    MEMORY_VS_MATH_MAX,
                    "memory",
                )
            )
    return results


def _target_summary(results: Sequence[TargetResult]) -> str:
    sure = [t for t in results if t.reliable]
    passed = sum(bool(t.passed) for t in sure)
    text = f"{passed} of {len(sure)} target checks pass"
    unsure = len(results) - len(sure)
    if unsure:
        text += (
            f"; {unsure} more involve a case timed on a shared machine{CONTENDED_MARK} and "
            "are not counted (rerun `make bench` on a quiet machine)"
        )
    return text + "."


def _targets_section(rows: Sequence[Row]) -> str:
    results = evaluate_targets(rows)
    lines = ["## Targets", ""]
    lines.append(
        "Ratios of cases measured side by side in the same run (medians). Goals: one fusion "
        f"layer no slower than timm's Block (≤ {DENSE_VS_TIMM_MAX:.1f}) and faster than "
        f"`nn.TransformerEncoderLayer`, at least {DENSE_CEILING_MIN:.0%} of the matmul ceiling "
        f"({label_of_target()}, every token real); packed variable-length batches "
        f"≤ {VARLEN_VS_PEER_MAX:.1f}× the best padded peer (same shape, text lengths averaging "
        f"25% of the padding); peak memory of the fused kernels at {TARGET_MEMORY_SEQ_LEN} "
        f"tokens ≤ {MEMORY_VS_MATH_MAX:.0%} of `math`'s."
    )
    lines.append("")
    if not results:
        lines.append("No target case was measured in this run (a `--quick` smoke run has none).")
        return "\n".join(lines)
    lines.append(
        markdown_table(
            ("target", "where", "measured (medians)", "goal", "result", "on fastest rounds"),
            (
                (t.target, t.where, t.measured, t.goal, f"**{t.verdict}**", t.on_minima)
                for t in results
            ),
        )
    )
    lines += ["", _target_summary(results)]
    return "\n".join(lines)


def label_of_target() -> str:
    s = TARGET_LAYER_SHAPE
    return (
        f"batch {s.batch}, {s.image_tokens} image + {s.text_tokens} text tokens, "
        f"dim {s.dim}, {s.heads} heads"
    )


# Sections -----------------------------------------------------------------------------------


def _machine_section(rows: Sequence[Row], runs: Sequence[dict[str, Any]]) -> str:
    lines = ["## Runs and machine", ""]
    lines.append(
        markdown_table(
            ("JSON", "date", "commit", "cases"),
            (
                (
                    r["file"],
                    r["datetime"][:19],
                    f"{r['commit']}{' (dirty)' if r['dirty'] else ''}",
                    str(r["cases"]),
                )
                for r in runs
            ),
        )
    )
    lines.append("")
    table = []
    for (device,), group in _groups(rows, ("device",)):
        shares = sorted(r.others_share for r in group if r.others_share is not None)
        first = group[0]
        table.append(
            (
                device,
                str(first.get("device_name", "?")),
                str(first.get("torch", "?")),
                str(first.get("threads", "?")),
                str(first.get("profile", "?")),
                f"{100 * shares[len(shares) // 2]:.0f}% / {100 * shares[-1]:.0f}%"
                if shares and device == "cpu"
                else "–",
                str(first.get("memory_method", "?")),
            )
        )
    lines.append(
        markdown_table(
            (
                "device",
                "processor",
                "torch",
                "torch threads",
                "grid",
                "others' CPU use while timing (median / max)",
                "peak memory measured by",
            ),
            table,
        )
    )
    lines.append("")
    devices = {r.device for r in rows}
    if "cuda" not in devices:
        lines.append(
            "**GPU: not measured yet.** These JSON runs hold no CUDA case; run "
            "`make bench-gpu` on a CUDA machine and pass its JSON to the report as well."
        )
        lines.append("")
    contended = [r for r in rows if r.contended]
    if contended:
        lines.append(
            f"**Shared machine:** other processes used more than {CONTENDED_SHARE:.0%} of the "
            f"CPUs while {len(contended)} of {len(rows)} cases were timed; their medians are "
            f"marked{CONTENDED_MARK}. A busy neighbour stalls every multi-threaded op, so those "
            "times are pessimistic and comparisons involving them are unreliable; the Targets "
            "table also gives each check on the fastest rounds."
        )
        lines.append("")
    return "\n".join(lines)


def _ceiling_section(rows: Sequence[Row]) -> str:
    lines = ["## Machine ceiling: large matmul", ""]
    found = _select(rows, family="ceiling")
    if not found:
        lines.append("Not measured in this run.")
        return "\n".join(lines)
    table = []
    for r in found:
        unit, scale = _flop_unit(r.device)
        table.append(
            (
                r.device,
                r["dtype"],
                r["shape"],
                r.median_cell,
                fmt_time(r.minimum),
                f"{r.flop_rate / scale:.3g} {unit}",
                f"{r['flops'] / r.minimum / scale:.3g} {unit}",
                str(r.rounds),
            )
        )
    headers = (
        "device",
        "dtype",
        "matmul",
        "median",
        "fastest",
        "rate at median",
        "ceiling (fastest round)",
        "rounds",
    )
    lines += [
        markdown_table(headers, table),
        "",
        "Every other table sets its achieved FLOP rate (at its median) against this ceiling "
        "(same device and dtype, same run, fastest round).",
    ]
    return "\n".join(lines)


def _attention_section(rows: Sequence[Row], charts: dict[str, str]) -> str:
    lines = ["## `attention()` per backend, mask and mode", ""]
    found = _select(rows, family="attention")
    if not found:
        lines.append("Not measured in this run.")
        return "\n".join(lines)
    ceiling = ceilings(rows)
    lines.append(
        "`fusionkit.attention.attention(q, k, v, valid_keys=..., backend=...)` on "
        "contiguous `(B, L, H, D)` tensors, head size 64. `self a+b`: self-attention over "
        "`a` image and `b` text tokens; `cross a<-b`: image queries, text keys. `padding`: "
        "text lengths average 25% of `b`. FLOPs count the padded shape (`4·B·H·Lq·Lk·D`, "
        "×3 for fwd+bwd); `math` is the plain PyTorch baseline."
    )
    lines.append("")
    for (device,), device_rows in _groups(found, ("device",)):
        unit, scale = _flop_unit(device)
        table = []
        groups = _groups(device_rows, ("shape", "batch", "heads", "dtype", "mask", "mode"))
        for key, group in groups:
            shape, batch, heads, dtype, mask, mode = key
            baseline = next((r for r in group if r.impl == "math"), None)
            for r in sorted(group, key=_order):
                speedup = "–" if baseline is None else f"{baseline.median / r.median:.2f}×"
                table.append(
                    (
                        shape,
                        str(batch),
                        str(heads),
                        dtype,
                        mask,
                        mode,
                        r.impl,
                        r.median_cell,
                        speedup,
                        fmt_rate(r["tokens"] / r.median),
                        f"{r.flop_rate / scale:.3g}",
                        _fmt_fraction(ceiling_fraction(r, ceiling)),
                        fmt_mib(r.peak_mib),
                    )
                )
        headers = (
            "shape",
            "B",
            "H",
            "dtype",
            "mask",
            "mode",
            "backend",
            "median",
            "speed-up vs math",
            "tokens/s",
            unit,
            "% ceiling",
            "peak MiB",
        )
        lines += [f"### {device}", "", markdown_table(headers, table), ""]
        if not any(r.impl == "xformers" for r in device_rows):
            lines += [
                "xformers: not measured here (its kernels are CUDA-only or it is not installed).",
                "",
            ]
        if f"attention_{device}" in charts:
            lines += [f"![attention {device}]({charts[f'attention_{device}']})", ""]
    return "\n".join(lines)


def _layer_section(rows: Sequence[Row], charts: dict[str, str]) -> str:
    lines = ["## One fusion layer against its peers (every token real)", ""]
    found = _select(rows, family="layer")
    if not found:
        lines.append("Not measured in this run.")
        return "\n".join(lines)
    lines.append(
        "`fusionkit`: `SequenceWiseAttention(layers=1)` as used (per-modality input "
        "projections, type embeddings, 2 summary tokens, the layer, the final norm); "
        "`fusionkit-layer`: its `TransformerLayer` alone on the padded concatenation. "
        "`torch`: `nn.TransformerEncoderLayer(norm_first=True, batch_first=True, "
        "activation='gelu')`; `timm`: `vision_transformer.Block(qkv_bias=True)`; equal width, "
        "heads and MLP ratio 4. FLOPs: one layer on the real tokens "
        "(`2·n·d·(4d + 2·4d) + 4·n²·d` per sample, ×3 for fwd+bwd), the same count for every "
        "implementation, so the rate compares useful work."
    )
    lines.append("")
    lines.append(_layer_tables(rows, found, varlen=False))
    for device in sorted({r.device for r in found}):
        if f"layers_{device}" in charts:
            lines += ["", f"![layers {device}]({charts[f'layers_{device}']})"]
    return "\n".join(lines)


def _varlen_section(rows: Sequence[Row], charts: dict[str, str]) -> str:
    lines = ["## Variable-length batches: packed against padded", ""]
    found = _select(rows, family="varlen")
    if not found:
        lines.append("Not measured in this run.")
        return "\n".join(lines)
    lines.append(
        "Text lengths are log-normal (σ 0.6) quantiles with mean 25% of the padded length; "
        "image tokens are all real. `fusionkit-packed`: `SequenceWiseAttention(packing=True)` "
        "computes on the real tokens only; `fusionkit-padded`: the same module with "
        "`packing=False`; the peers run on the padded concatenation with a key padding mask. "
        "Tokens/s and FLOP/s count real tokens only."
    )
    lines.append("")
    lines.append(_layer_tables(rows, found, varlen=True))
    return "\n".join(lines)


def _layer_tables(rows: Sequence[Row], found: Sequence[Row], *, varlen: bool) -> str:
    ceiling = ceilings(rows)
    out = []
    for (device,), device_rows in _groups(found, ("device",)):
        unit, scale = _flop_unit(device)
        table = []
        for key, group in _groups(device_rows, ("shape", "dtype", "mode")):
            shape, dtype, mode = key
            peer = best_peer(group)
            for r in sorted(group, key=_order):
                ratio = "–" if peer is None else f"{r.median / peer.median:.2f}"
                cells = [shape, dtype, mode, r.impl]
                if varlen:
                    cells += [f"{r['text_mean']:.1f}", f"{100 * r['real_fraction']:.0f}%"]
                cells += [
                    r.median_cell,
                    ratio,
                    fmt_rate(r["tokens"] / r.median),
                    fmt_rate(r["samples"] / r.median),
                    f"{r.flop_rate / scale:.3g}",
                    _fmt_fraction(ceiling_fraction(r, ceiling)),
                    fmt_mib(r.peak_mib),
                ]
                table.append(cells)
        headers = ["shape", "dtype", "mode", "impl"]
        if varlen:
            headers += ["text mean", "real"]
        headers += [
            "median",
            "time / best peer",
            "tokens/s",
            "samples/s",
            unit,
            "% ceiling",
            "peak MiB",
        ]
        out += [f"### {device}", "", markdown_table(headers, table), ""]
    return "\n".join(out)


def _model_section(rows: Sequence[Row]) -> str:
    lines = ["## Full model: CMA-CLIP", ""]
    found = _select(rows, family="model")
    if not found:
        lines.append(
            "Not measured in this run (`benchmarks/test_bench_model.py` is skipped where "
            "`fusionkit.models` cannot be imported)."
        )
        return "\n".join(lines)
    lines.append(
        "`fusionkit.models.build_model(config)`: timm vision backbone (random weights) and the "
        "offline all-MiniLM-L6-v2 text model, both frozen, sequence-wise attention (one layer), "
        "keyless modality-wise attention and MLP heads for two tasks. `fwd`: "
        "`model(images=..., texts=...)` under `inference_mode` (texts are tokenised inside); "
        "`fwd+bwd`: forward, multi-task loss and backward (fusion and heads train). FLOPs are "
        "counted by `torch.utils.flop_counter` on one call (it does not see the fused CPU "
        "attention kernel)."
    )
    lines.append("")
    ceiling = ceilings(rows)
    for (device,), device_rows in _groups(found, ("device",)):
        unit, scale = _flop_unit(device)
        table = [
            (
                r["shape"],
                r["dtype"],
                r["mode"],
                r.median_cell,
                fmt_rate(r["tokens"] / r.median),
                fmt_rate(r["samples"] / r.median),
                f"{r.flop_rate / scale:.3g}",
                _fmt_fraction(ceiling_fraction(r, ceiling)),
                fmt_mib(r.peak_mib),
                fmt_rate(r.get("trainable_params", 0)),
            )
            for r in sorted(device_rows, key=_order)
        ]
        headers = (
            "model",
            "dtype",
            "mode",
            "median",
            "tokens/s",
            "samples/s",
            unit,
            "% ceiling",
            "peak MiB",
            "trainable params",
        )
        lines += [f"### {device}", "", markdown_table(headers, table), ""]
    return "\n".join(lines)


def _memory_section(rows: Sequence[Row], charts: dict[str, str]) -> str:
    lines = ["## Peak memory against sequence length", ""]
    found = _select(rows, family="memory")
    if not found:
        lines.append("Not measured in this run.")
        return "\n".join(lines)
    lines.append(
        "`attention()` at batch 1, 8 heads of 64, L tokens; `padding` masks the second half "
        "of the keys. Peak memory is the call's own (see the machine table for how it is "
        "measured); inputs are not counted, outputs and gradients are."
    )
    lines.append("")
    for (device,), device_rows in _groups(found, ("device",)):
        table = []
        for key, group in _groups(device_rows, ("q_len", "dtype", "mask", "mode")):
            length, dtype, mask, mode = key
            baseline = next((r for r in group if r.impl == "math"), None)
            for r in sorted(group, key=_order):
                share = "–"
                if baseline is not None and baseline["peak_memory_bytes"]:
                    share = f"{r['peak_memory_bytes'] / baseline['peak_memory_bytes']:.3f}"
                table.append(
                    (
                        str(length),
                        dtype,
                        mask,
                        mode,
                        r.impl,
                        fmt_mib(r.peak_mib),
                        share,
                        r.median_cell,
                    )
                )
        headers = ("L", "dtype", "mask", "mode", "backend", "peak MiB", "÷ math peak", "median")
        lines += [f"### {device}", "", markdown_table(headers, table), ""]
        if f"memory_{device}" in charts:
            lines += [f"![memory {device}]({charts[f'memory_{device}']})", ""]
    return "\n".join(lines)


METHOD = """## Method

- Cases come from `benchmarks/cases.py` (products of shapes × dtypes × masks × implementations
  × modes, as in xformers' `benchmarks/`); timing is pytest-benchmark's (`pedantic`, rounds
  sized to a per-case time budget, warm-up calls before timing); the median is reported.
- `fwd`: inference (`eval()`, `torch.inference_mode()`); `fwd+bwd`: a training step's forward
  and backward (train mode, dropout 0), gradients reset before each call.
- FLOPs come from closed formulas (`benchmarks/cases.py`): 2 per multiply-add of every
  matmul; elementwise work, softmax and norms are not counted; the backward is 2× the forward
  (recomputation inside fused kernels is not counted). Full-model cases are counted once with
  `torch.utils.flop_counter` instead. The matmul ceiling is measured in the same run.
- Peak memory is measured once per case, outside the timed rounds.
- A shared machine distorts multi-threaded CPU timings (a busy neighbour stalls every
  parallel op). The harness measures the CPU share other processes used while each case was
  timed (from `/proc/stat`) and, with `--bench-quiet-wait`, first waits for them to go idle;
  cases timed while others used more than 10% of the CPUs are marked ⚠ (hatched in charts).
- Regenerate: `make bench` (CPU) / `make bench-gpu` (CUDA), then
  `python -m benchmarks.report .benchmarks/*.json --out docs/benchmarks`.
"""


# Charts -------------------------------------------------------------------------------------

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

    found = _select(rows, family="attention", device=device)
    if not found:
        return False
    groups = [
        (f"{k[0]} B{k[1]} {k[2]} {k[3]} {short_dtype(k[4])}", g)
        for k, g in _groups(found, ("shape", "batch", "mask", "mode", "dtype"))
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

    families = [(f, _select(rows, family=f, device=device)) for f in ("layer", "varlen")]
    families = [(f, found) for f, found in families if found]
    if not families:
        return False
    sizes = [len(_groups(found, ("shape", "mode", "dtype"))) for _, found in families]
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
            (f"{k[0]}\n{k[1]} {k[2]}", g) for k, g in _groups(found, ("shape", "mode", "dtype"))
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

    found = _select(rows, family="memory", device=device)
    if not found:
        return False
    fig, (mem_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 4.4))
    # Colour: backend; line: mode; marker: mask.
    lines = {"fwd": "-", "fwd+bwd": "--"}
    markers = {"none": "o", "padding": "s"}
    for key, group in _groups(found, ("impl", "mode", "mask", "dtype")):
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


# Entry point --------------------------------------------------------------------------------


def build_report(
    rows: Sequence[Row], runs: Sequence[dict[str, Any]], charts: dict[str, str]
) -> str:
    """The markdown page."""
    throughput = [
        f"![throughput {d}]({charts[f'throughput_{d}']})"
        for d in sorted({r.device for r in rows})
        if f"throughput_{d}" in charts
    ]
    sections = [
        "# fusionkit benchmarks\n\n"
        "Speed, throughput, FLOP rate and peak memory of fusionkit's attention and fusion "
        "layer, next to plain PyTorch and timm, generated by `python -m benchmarks.report` "
        "from pytest-benchmark JSON. Do not edit by hand.",
        _machine_section(rows, runs),
        _targets_section(rows),
        _ceiling_section(rows),
        _layer_section(rows, charts),
        _varlen_section(rows, charts),
        "\n\n".join(throughput),
        _attention_section(rows, charts),
        _memory_section(rows, charts),
        _model_section(rows),
        METHOD,
    ]
    return "\n\n".join(s.strip() for s in sections if s.strip()) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m benchmarks.report JSON [JSON ...] --out DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON run(s)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="output folder")
    args = parser.parse_args(argv)
    missing = [p for p in args.json if not p.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(map(str, missing))}")
    rows, runs = load_rows(args.json)
    if not rows:
        parser.error(
            "the JSON holds no fusionkit benchmark case (was it run with --benchmark-enable?)"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    charts = write_charts(rows, args.out)
    report = args.out / REPORT_FILE
    report.write_text(build_report(rows, runs, charts))
    print(f"wrote {report} and {len(charts)} chart(s) from {len(rows)} case(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
