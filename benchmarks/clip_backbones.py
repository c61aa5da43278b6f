"""What the paper's CLIP ViT-B/32 towers cost on this machine, next to the offline defaults.

Builds CMA-CLIP twice, each in a fresh process so that its peak memory is its own: with the
open_clip ViT-B-32 image and text towers (random weights: ``pretrained: false``, the
architecture and cost of a real checkpoint) and with the default offline EfficientNet-Lite0 +
all-MiniLM-L6-v2. For each it measures the parameters, the build time, the median time of an
inference forward and of a training step (forward, backward and AdamW step, both towers
fine-tuned) on a batch of ``--batch`` images at 224 px with 12-word titles, and the process's
peak resident memory. Writes ``docs/results/clip_backbones.md``.

Run from the repository root: ``python -m benchmarks.clip_backbones [--batch 8 --rounds 5]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import median_seconds

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

OUT = Path("docs/results/clip_backbones.md")
TASKS = {"category": {"classes": ["bag", "dress", "hat", "shirt"]}}
FUSION = {"dim": 512, "sequence": {"name": "transformer", "layers": 1, "heads": 8},
          "modality": {"name": "keyless"}}
#: Model name → (vision, text) sections, fine-tuned.
MODELS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "open_clip ViT-B-32 (paper)": (
        {"name": "open_clip", "model_name": "ViT-B-32", "pretrained": False},
        {"name": "open_clip", "model_name": "ViT-B-32", "pretrained": False},
    ),
    "EfficientNet-Lite0 + MiniLM (default)": (
        {"name": "timm", "model_name": "tf_efficientnet_lite0",
         "pretrained": "efficientnet_lite0"},
        {"name": "sentence_transformers", "model_name_or_path": "all-MiniLM-L6-v2"},
    ),
}
TITLE = "navy blue striped cotton summer dress with short sleeves and a belt"


def measure(name: str, batch: int, rounds: int) -> dict[str, Any]:
    """Build one model and time it (run in a fresh process by :func:`main`).

    Returns:
        ``params`` (millions), ``build_s``, ``forward_s``, ``train_step_s``, ``peak_rss_gib``.
    """
    import torch

    from fusionkit.models import build_model

    torch.manual_seed(0)
    vision, text = MODELS[name]
    started = time.perf_counter()
    model = build_model({"vision": vision, "text": text, "fusion": FUSION,
                         "head": {"name": "mlp", "hidden_dim": 512}, "tasks": TASKS,
                         "image_size": 224})
    build = time.perf_counter() - started
    images = torch.randn(batch, 3, 224, 224)
    texts = [TITLE] * batch
    targets = {"category": torch.zeros(batch, dtype=torch.long)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def forward() -> None:
        model.eval()
        with torch.inference_mode():
            model(images=images, texts=texts)

    def train_step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        model.loss(model(images=images, texts=texts), targets).backward()
        optimizer.step()

    return {
        "params": sum(p.numel() for p in model.parameters()) / 1e6,
        "build_s": build,
        "forward_s": median_seconds(forward, rounds),
        "train_step_s": median_seconds(train_step, rounds),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main(argv: list[str] | None = None) -> None:
    """Measure every model in its own process and write the page.

    Examples:
        >>> main(["--batch", "8"])  # doctest: +SKIP
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process's model
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure(args.one, args.batch, args.rounds)))
        return
    rows = {}
    for name in MODELS:
        child = subprocess.run(
            [sys.executable, "-m", "benchmarks.clip_backbones", "--one", name,
             "--batch", str(args.batch), "--rounds", str(args.rounds)],
            check=True, capture_output=True, text=True,
        )
        rows[name] = json.loads(child.stdout.strip().splitlines()[-1])
        print(name, rows[name], flush=True)
    lines = [
        "# CLIP backbones: cost on a CPU",
        "",
        f"CMA-CLIP with both towers fine-tuned, batch of {args.batch} images at 224 px and "
        f"12-word titles; median of {args.rounds} rounds after a warm-up, each model in a fresh "
        f"process (peak memory is the process's). {os.cpu_count()}-core x86_64 CPU, shared with "
        f"other jobs; Python {platform.python_version()}. Random weights (the cost of a "
        "checkpoint is that of its architecture).",
        "",
        "Command: `python -m benchmarks.clip_backbones`.",
        "",
        "| model | parameters | build | inference forward | training step | peak memory |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['params']:.1f} M | {row['build_s']:.1f} s | "
            f"{row['forward_s']:.2f} s | {row['train_step_s']:.2f} s | "
            f"{row['peak_rss_gib']:.2f} GiB |"
        )
    paper, default = rows.values()
    ratio = {key: paper[key] / default[key] for key in ("train_step_s", "forward_s", "params")}
    lines += [
        "",
        f"Ratios (paper / default): training step {ratio['train_step_s']:.1f}x, inference "
        f"{ratio['forward_s']:.1f}x, parameters {ratio['params']:.1f}x.",
        "",
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
