"""The sections of the benchmark report: one markdown section per family of cases."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks.cases import (
    CONTENDED_SHARE,
)
from benchmarks.rows import (
    CONTENDED_MARK,
    Row,
    best_peer,
    ceiling_fraction,
    ceilings,
    flop_unit,
    fmt_fraction,
    fmt_mib,
    fmt_rate,
    fmt_time,
    group_by,
    markdown_table,
    order_key,
    select,
)


def machine_section(rows: Sequence[Row], runs: Sequence[dict[str, Any]]) -> str:
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
    for (device,), group in group_by(rows, ("device",)):
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


def ceiling_section(rows: Sequence[Row]) -> str:
    lines = ["## Machine ceiling: large matmul", ""]
    found = select(rows, family="ceiling")
    if not found:
        lines.append("Not measured in this run.")
        return "\n".join(lines)
    table = []
    for r in found:
        unit, scale = flop_unit(r.device)
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


def attention_section(rows: Sequence[Row], charts: dict[str, str]) -> str:
    lines = ["## `attention()` per backend, mask and mode", ""]
    found = select(rows, family="attention")
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
    for (device,), device_rows in group_by(found, ("device",)):
        unit, scale = flop_unit(device)
        table = []
        groups = group_by(device_rows, ("shape", "batch", "heads", "dtype", "mask", "mode"))
        for key, group in groups:
            shape, batch, heads, dtype, mask, mode = key
            baseline = next((r for r in group if r.impl == "math"), None)
            for r in sorted(group, key=order_key):
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
                        fmt_fraction(ceiling_fraction(r, ceiling)),
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


def layer_section(rows: Sequence[Row], charts: dict[str, str]) -> str:
    lines = ["## One fusion layer against its peers (every token real)", ""]
    found = select(rows, family="layer")
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
    lines.append(layer_tables(rows, found, varlen=False))
    for device in sorted({r.device for r in found}):
        if f"layers_{device}" in charts:
            lines += ["", f"![layers {device}]({charts[f'layers_{device}']})"]
    return "\n".join(lines)


def varlen_section(rows: Sequence[Row], charts: dict[str, str]) -> str:
    lines = ["## Variable-length batches: packed against padded", ""]
    found = select(rows, family="varlen")
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
    lines.append(layer_tables(rows, found, varlen=True))
    return "\n".join(lines)


def layer_tables(rows: Sequence[Row], found: Sequence[Row], *, varlen: bool) -> str:
    ceiling = ceilings(rows)
    out = []
    for (device,), device_rows in group_by(found, ("device",)):
        unit, scale = flop_unit(device)
        table = []
        for key, group in group_by(device_rows, ("shape", "dtype", "mode")):
            shape, dtype, mode = key
            peer = best_peer(group)
            for r in sorted(group, key=order_key):
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
                    fmt_fraction(ceiling_fraction(r, ceiling)),
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


def model_section(rows: Sequence[Row]) -> str:
    lines = ["## Full model: CMA-CLIP", ""]
    found = select(rows, family="model")
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
    for (device,), device_rows in group_by(found, ("device",)):
        unit, scale = flop_unit(device)
        table = [
            (
                r["shape"],
                r["dtype"],
                r["mode"],
                r.median_cell,
                fmt_rate(r["tokens"] / r.median),
                fmt_rate(r["samples"] / r.median),
                f"{r.flop_rate / scale:.3g}",
                fmt_fraction(ceiling_fraction(r, ceiling)),
                fmt_mib(r.peak_mib),
                fmt_rate(r.get("trainable_params", 0)),
            )
            for r in sorted(device_rows, key=order_key)
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


def memory_section(rows: Sequence[Row], charts: dict[str, str]) -> str:
    lines = ["## Peak memory against sequence length", ""]
    found = select(rows, family="memory")
    if not found:
        lines.append("Not measured in this run.")
        return "\n".join(lines)
    lines.append(
        "`attention()` at batch 1, 8 heads of 64, L tokens; `padding` masks the second half "
        "of the keys. Peak memory is the call's own (see the machine table for how it is "
        "measured); inputs are not counted, outputs and gradients are."
    )
    lines.append("")
    for (device,), device_rows in group_by(found, ("device",)):
        table = []
        for key, group in group_by(device_rows, ("q_len", "dtype", "mask", "mode")):
            length, dtype, mask, mode = key
            baseline = next((r for r in group if r.impl == "math"), None)
            for r in sorted(group, key=order_key):
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

- Cases come from `benchmarks/cases.py` and its grids (products of shapes × dtypes × masks
  × implementations × modes, as in xformers' `benchmarks/`); timing is pytest-benchmark's
  (`pedantic`, rounds sized to a per-case time budget, warm-up calls before timing); the
  median is reported.
- `fwd`: inference (`eval()`, `torch.inference_mode()`); `fwd+bwd`: a training step's forward
  and backward (train mode, dropout 0), gradients reset before each call.
- FLOPs come from closed formulas (`benchmarks/grid.py`): 2 per multiply-add of every
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
