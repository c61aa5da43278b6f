"""Eager PyTorch against onnxruntime on the CPU, for the offline default model.

Builds the default CMA-CLIP (EfficientNet-Lite0 + all-MiniLM-L6-v2, random fusion and head
weights: the cost is the architecture's), saves it to a temporary folder, exports it with
`fusionkit.serving.export_onnx` and times both on the same inputs, from texts and preprocessed
224 px images to logits and modality weights (tokenising included, image decoding not): the
median latency of a batch of 1 and the throughput of batches of 32. Writes
``docs/results/export_latency.md``.

Run from the repository root: ``python -m benchmarks.export_latency [--rounds 15]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.harness import median_seconds

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

OUT = Path("docs/results/export_latency.md")
TASKS = {"category": {"classes": ["a", "b", "c"]}}
TITLES = (
    "navy blue striped cotton summer dress with short sleeves and a belt",
    "red leather bag",
    "plain white shirt with a round collar",
    "green floral scarf in light silk",
)


def measure(rounds: int, big_rounds: int, big_batch: int) -> dict[str, Any]:
    """Export the default model and time eager and onnxruntime.

    Returns:
        ``export_s``, ``onnx_mib``, ``max_diff`` and, per engine, ``latency_ms`` (batch 1) and
        ``throughput`` (samples/s at ``big_batch``).
    """
    import torch

    from fusionkit.models import CMACLIP, build_model
    from fusionkit.serving import export_onnx
    from fusionkit.serving.onnx_predictor import OnnxModel

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        build_model({"tasks": TASKS}).save_pretrained(Path(tmp) / "checkpoint")
        started = time.perf_counter()
        export = export_onnx(Path(tmp) / "checkpoint", Path(tmp) / "export")
        export_s = time.perf_counter() - started
        onnx_mib = (export / "model.onnx").stat().st_size / 2**20
        eager_model = CMACLIP.from_pretrained(Path(tmp) / "checkpoint")
        onnx_model = OnnxModel(export)

        def batch(size: int) -> dict[str, Any]:
            texts = [TITLES[k % len(TITLES)] for k in range(size)]
            return {"text": texts, "image": torch.randn(size, 3, 224, 224)}

        engines: dict[str, Callable[[dict[str, Any]], Any]] = {
            "eager": lambda given: eager_model(inputs=given),
            "onnxruntime": lambda given: onnx_model(given),
        }
        rows: dict[str, dict[str, float]] = {}
        one, big = batch(1), batch(big_batch)
        with torch.inference_mode():
            for name, run in engines.items():
                latency = median_seconds(lambda run=run: run(one), rounds)
                seconds = median_seconds(lambda run=run: run(big), big_rounds)
                rows[name] = {"latency_ms": latency * 1000, "throughput": big_batch / seconds}
                print(name, rows[name], flush=True)
            eager_out, onnx_out = eager_model(inputs=big), onnx_model(big)
        max_diff = max(
            float((eager_out.logits[t] - onnx_out.logits[t]).abs().max()) for t in TASKS
        )
    return {"export_s": export_s, "onnx_mib": onnx_mib, "max_diff": max_diff, "rows": rows,
            "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    """Measure and write the page.

    Examples:
        >>> main(["--rounds", "15"])  # doctest: +SKIP
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds at batch 1")
    parser.add_argument("--big-rounds", type=int, default=3, help="timed rounds at --big-batch")
    parser.add_argument("--big-batch", type=int, default=32)
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    result = measure(args.rounds, args.big_rounds, args.big_batch)
    import onnxruntime
    import torch

    eager, onnx = result["rows"]["eager"], result["rows"]["onnxruntime"]
    lines = [
        "# ONNX export: eager PyTorch against onnxruntime",
        "",
        "The offline default model (EfficientNet-Lite0 + all-MiniLM-L6-v2, random fusion and "
        "head weights), from texts and preprocessed 224 px images to logits and modality "
        "weights, tokenising included. Latency: median of "
        f"{args.rounds} calls at batch 1; throughput: median of {args.big_rounds} calls at "
        f"batch {args.big_batch}; one warm-up call each.",
        "",
        f"Machine: {os.cpu_count()}-core x86_64 CPU, shared with other jobs (load average "
        f"{load:.1f} when the run started), so the numbers are noisy; torch "
        f"{torch.__version__} ({result['torch_threads']} threads), onnxruntime "
        f"{onnxruntime.__version__} (CPUExecutionProvider, default threads), Python "
        f"{platform.python_version()}.",
        "",
        "Command: `python -m benchmarks.export_latency`.",
        "",
        "| engine | latency, batch 1 | throughput, batch "
        f"{args.big_batch} |",
        "|---|---|---|",
        f"| eager PyTorch | {eager['latency_ms']:.1f} ms | {eager['throughput']:.1f} samples/s |",
        f"| onnxruntime | {onnx['latency_ms']:.1f} ms | {onnx['throughput']:.1f} samples/s |",
        "",
        f"onnxruntime / eager: latency {onnx['latency_ms'] / eager['latency_ms']:.2f}x, "
        f"throughput {onnx['throughput'] / eager['throughput']:.2f}x. Export took "
        f"{result['export_s']:.0f} s; model.onnx is {result['onnx_mib']:.0f} MiB; largest "
        f"|logit difference| at batch {args.big_batch}: {result['max_diff']:.1e}.",
        "",
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
