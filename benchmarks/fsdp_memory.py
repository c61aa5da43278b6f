"""Memory per GPU of a ViT-B/16 + BERT-base CMA-CLIP under DDP and FSDP: computed, not measured.

Builds the model without backbone weights (on PyTorch's ``meta`` device: shapes only): timm
``vit_base_patch16_224`` with random init through fusionkit's timm adapter, a BERT-base
(``transformers.BertConfig()`` defaults: 12 layers, hidden 768) as fusionkit's Hugging Face
adapter holds it, and the CMA-CLIP fusion of ``--dim`` with ``--layers`` sequence-wise
attention layers and ``--tasks`` tasks. Both backbones are fine-tuned (every parameter
trains). From the parameter counts of the units fusionkit shards
(:func:`fusionkit.training.sharding.shard_units`) and of the rest (the root group), it
computes per GPU, in bytes:

- DDP: float32 weights (4 P), float32 gradients (4 P), DDP's flat gradient buckets for the
  all-reduce (4 P: ``gradient_as_bucket_view`` is off), AdamW's two float32 moments (8 P);
  with bf16 autocast also the bfloat16 copies of the weights that autocast keeps for the
  step (2 P).
- FSDP over N GPUs: the float32 weights, gradients and AdamW moments sharded (16 P / N),
  plus the working set of gathered parameters: the root group all step long, and two units
  at a time (the one running and the one prefetched), each with its parameters in the
  compute dtype (2 bytes in bf16, 4 in fp32) and its unsharded gradient (reduced in
  float32: 4 bytes).

Activations are left out: they depend on the batch, the sequence lengths and
``train.activation_checkpointing``, and are the same per GPU for DDP and FSDP at the same
per-GPU batch. So are the CUDA context, allocator fragmentation and communication buffers.

Run from the repository root: ``python -m benchmarks.fsdp_memory`` (writes
``docs/results/fsdp_memory.md``; ``--out -`` prints it).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

OUT = Path("docs/results/fsdp_memory.md")
GIB = 2**30
GPUS = (2, 4, 8)


class BertBase(nn.Module):
    """BERT-base as fusionkit's Hugging Face text adapter holds it (``model``, ``width``)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        self.model = BertModel(BertConfig())
        self.width = self.model.config.hidden_size
        self.num_prefix_tokens = 0


@dataclass(frozen=True)
class Counts:
    """Parameter counts of the model, split as FSDP groups them."""

    total: int
    units: int
    largest_unit: int
    vision: int
    text: int

    @property
    def root(self) -> int:
        """Parameters outside every unit: the root group, gathered all step long."""
        return self.total - self.units


def build_model(dim: int, layers: int, tasks: int) -> nn.Module:
    """The ViT-B/16 + BERT-base CMA-CLIP, its backbones on the meta device (no weights)."""
    from fusionkit.config import ModelConfig
    from fusionkit.encoders import TimmVisionEncoder
    from fusionkit.models import CMACLIP

    config = ModelConfig.from_dict({
        "vision": {"name": "timm", "model_name": "vit_base_patch16_224"},
        "text": {"name": "huggingface", "model_name_or_path": "bert-base (built in memory)"},
        "fusion": {"dim": dim, "sequence": {"name": "transformer", "layers": layers,
                                            "heads": 8}},
        "tasks": {f"task{k}": {"num_classes": 10} for k in range(tasks)},
    })
    with torch.device("meta"):
        vision, text = TimmVisionEncoder("vit_base_patch16_224"), BertBase()
    return CMACLIP(config, vision=vision, text=text)  # the small fusion stack is real


def count(model: Any) -> Counts:
    """Parameter counts of ``model`` by FSDP unit."""
    from fusionkit.training.sharding import shard_units

    units = [sum(p.numel() for p in unit.parameters()) for unit in shard_units(model)]
    return Counts(
        total=sum(p.numel() for p in model.parameters()),
        units=sum(units),
        largest_unit=max(units),
        vision=sum(p.numel() for p in model.vision.parameters()),
        text=sum(p.numel() for p in model.text.parameters()),
    )


def per_gpu(counts: Counts, strategy: str, precision: str, gpus: int) -> dict[str, float]:
    """Bytes per GPU by kind (see the module docstring for the model).

    ``strategy`` is ``ddp``, ``fsdp``, or ``single`` (one GPU: neither buckets nor shards).
    """
    p = counts.total
    if strategy in ("ddp", "single"):
        buckets = 4 * p if strategy == "ddp" else 0
        rows = {"weights": 4 * p, "gradients": 4 * p + buckets, "adamw": 8 * p,
                "working": 2 * p if precision == "bf16" else 0}
    else:
        compute = 2 if precision == "bf16" else 4
        gathered = counts.root + 2 * counts.largest_unit
        rows = {"weights": 4 * p / gpus, "gradients": 4 * p / gpus, "adamw": 8 * p / gpus,
                "working": gathered * (compute + 4)}
    rows["total"] = sum(rows.values())
    return rows


def report(counts: Counts, dim: int, layers: int, tasks: int) -> str:
    """The markdown page."""
    millions = f"{counts.total / 1e6:.1f} M"
    lines = [
        "# Memory per GPU: ViT-B/16 + BERT-base CMA-CLIP, DDP and FSDP",
        "",
        "**Computed, not measured** (no GPU was available to measure it): parameter counts of",
        "the real modules, built without weights, times the bytes each strategy keeps per",
        "GPU. Written by `python -m benchmarks.fsdp_memory`; the assumptions are in that",
        "script's docstring. Activations are not included: they are the same per GPU for",
        "both strategies at the same per-GPU batch, and `train.activation_checkpointing`",
        "shrinks the backbones' share of them.",
        "",
        f"Model: timm `vit_base_patch16_224` ({counts.vision / 1e6:.1f} M) + BERT-base "
        f"({counts.text / 1e6:.1f} M) + CMA-CLIP fusion (dim {dim}, {layers} sequence-wise "
        f"layer(s), {tasks} task(s)): **{millions} parameters**, every one trained with "
        "AdamW. FSDP shards "
        f"{counts.units / 1e6:.1f} M of them in per-block units (largest "
        f"{counts.largest_unit / 1e6:.2f} M); the root group ({counts.root / 1e6:.1f} M: "
        "embeddings, projections, modality-wise attention, heads) is gathered for the whole "
        "step.",
        "",
        "| strategy | precision | GPUs | weights | gradients | AdamW | gathered / autocast "
        "copies | total per GPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    # DDP replicates: the same for any number of GPUs.
    settings = [("single", 1), ("ddp", GPUS[0]), *(("fsdp", n) for n in GPUS)]
    for precision in ("fp32", "bf16"):
        for strategy, gpus in settings:
            row = per_gpu(counts, strategy, precision, gpus)
            shown = {"single": "1", "ddp": "any"}.get(strategy, str(gpus))
            name = "one GPU" if strategy == "single" else strategy
            cells = " | ".join(f"{row[k] / GIB:.2f} GiB" for k in
                               ("weights", "gradients", "adamw", "working", "total"))
            lines.append(f"| {name} | {precision} | {shown} | {cells} |")
    lines += [
        "",
        "One GPU is a run without `torchrun` (`train.strategy: fsdp` in one process "
        "trains unsharded, the same). DDP's gradients column counts its flat all-reduce "
        "buckets beside the gradients. bf16 is `train.precision: bf16`: autocast, and under "
        "FSDP `MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`; the "
        "weights and AdamW moments kept between steps stay float32.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Compute the table and write it (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512, help="fusion width")
    parser.add_argument("--layers", type=int, default=1, help="sequence-wise attention layers")
    parser.add_argument("--tasks", type=int, default=3, help="classification tasks")
    parser.add_argument("--out", default=str(OUT), help="output file, '-' for stdout")
    args = parser.parse_args(argv)
    model = build_model(args.dim, args.layers, args.tasks)
    text = report(count(model), args.dim, args.layers, args.tasks)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
