"""Latency and throughput of ``fusionkit serve``, with micro-batching and without.

Saves the default offline model (EfficientNet-Lite0 + all-MiniLM-L6-v2, random fusion and
heads: the cost of a trained checkpoint is that of its architecture) to a temporary folder,
then for ``--max-batch 32`` (micro-batching) and ``--max-batch 1`` (one sample per forward)
starts a real server process and measures over HTTP, with a 224 px PNG and a 12-word title
per request:

- the first request after ``/health`` turned ready (the warm-up should make it ordinary);
- p50 / p99 latency of one client sending ``--requests`` requests one after another;
- throughput and p50 / p99 latency with ``--clients`` clients sending ``--burst`` requests
  in all, each sending its next request as soon as its last is answered.

Writes ``docs/results/serve_latency.md``. The clients run on the same machine as the server.

Run from the repository root: ``python -m benchmarks.serve_latency [--requests 100]``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

OUT = Path("docs/results/serve_latency.md")
TASKS = {"category": {"classes": ["bag", "dress", "hat", "shirt"]},
         "color": {"classes": ["black", "blue", "green", "red", "white"]},
         "pattern": {"classes": ["plain", "striped", "dotted"], "multi_label": True}}
TITLES = ["navy blue striped cotton summer dress with short sleeves and a belt",
          "red leather handbag with a gold clasp and a long adjustable strap",
          "plain white linen shirt with a button down collar and long sleeves",
          "green wool winter hat with a dotted pattern and a soft lining inside"]


def _image(seed: int) -> bytes:
    """A 224 px PNG: a coloured garment-like shape on white."""
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (224, 224), "white")
    draw = ImageDraw.Draw(picture)
    colour = [(20, 40, 120), (180, 30, 30), (240, 240, 240), (30, 120, 40)][seed % 4]
    draw.rectangle((60 + seed, 40, 164 - seed, 200), fill=colour)
    draw.polygon([(60, 40), (20, 90), (60, 110)], fill=colour)
    for y in range(50, 200, 20):
        draw.line((60, y, 164, y), fill=(255, 255, 255), width=3)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _save_model(folder: Path) -> Path:
    import torch

    from fusionkit.models import build_model

    torch.manual_seed(0)
    model = build_model({"tasks": TASKS})  # the offline default encoders
    model.save_pretrained(folder / "model")
    return folder / "model"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _measure(checkpoint: Path, max_batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """Start a server with ``--max-batch max_batch`` and time it; stops it afterwards."""
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "fusionkit", "-q", "serve", "--checkpoint", str(checkpoint),
         "--port", str(port), "--max-batch", str(max_batch), "--device", args.device],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited: {server.stderr.read()}")
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        ready_s = time.perf_counter() - started
        images = [_image(i) for i in range(4)]

        def form(i: int) -> dict[str, Any]:
            return {"data": {"text": TITLES[i % 4]},
                    "files": {"image": ("item.png", images[i % 4], "image/png")}}

        with httpx.Client(timeout=120) as client:
            def one(i: int) -> float:
                begin = time.perf_counter()
                response = client.post(f"{url}/predict", **form(i))
                response.raise_for_status()
                return time.perf_counter() - begin

            first = one(0)
            sequential = [one(i) for i in range(args.requests)]

        async def burst() -> tuple[float, list[float]]:
            latencies: list[float] = []
            counter = iter(range(args.burst))
            limits = httpx.Limits(max_connections=args.clients)
            async with httpx.AsyncClient(timeout=300, limits=limits) as client:
                async def worker() -> None:
                    for i in counter:
                        begin = time.perf_counter()
                        response = await client.post(f"{url}/predict", **form(i))
                        response.raise_for_status()
                        latencies.append(time.perf_counter() - begin)

                begin = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(args.clients)))
                return time.perf_counter() - begin, latencies

        before = httpx.get(f"{url}/metadata").json()["batching"]
        forward_batch = before["forward_batch"]
        elapsed, loaded = asyncio.run(burst())
        after = httpx.get(f"{url}/metadata").json()["batching"]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    batches = after["batches"] - before["batches"]
    return {
        "ready_s": ready_s,
        "first_ms": first * 1000,
        "p50_ms": statistics.median(sequential) * 1000,
        "p99_ms": _percentile(sequential, 99) * 1000,
        "throughput": args.burst / elapsed,
        "load_p50_ms": statistics.median(loaded) * 1000,
        "load_p99_ms": _percentile(loaded, 99) * 1000,
        "mean_batch": (after["samples"] - before["samples"]) / max(batches, 1),
        "forward_batch": forward_batch,
    }


def main(argv: list[str] | None = None) -> None:
    """Measure both modes and write the page.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Examples:
        >>> main(["--requests", "20", "--burst", "64"])  # doctest: +SKIP
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100, help="sequential requests")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--burst", type=int, default=256, help="requests of the clients")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--max-batch", type=int, nargs="+", default=[32, 1],
                        help="server settings to compare (1: one sample per forward)")
    parser.add_argument("--engines", nargs="+", default=["eager", "onnx"],
                        choices=("eager", "onnx"),
                        help="serve the checkpoint (eager PyTorch) and/or its ONNX export")
    parser.add_argument("--out", type=Path, default=OUT, help="page to write")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        served = {"eager": _save_model(Path(tmp))}
        if "onnx" in args.engines:
            from fusionkit.serving.export import export_onnx

            served["onnx"] = export_onnx(served["eager"], Path(tmp) / "export")
        for engine in args.engines:
            for max_batch in args.max_batch:
                mode = (f"micro-batching (--max-batch {max_batch})" if max_batch > 1
                        else "one at a time (--max-batch 1)")
                name = f"{engine}: {mode}"
                rows[name] = _measure(served[engine], max_batch, args)
                print(name, {k: round(v, 2) for k, v in rows[name].items()}, flush=True)
    import torch

    lines = [
        "# Serving: latency and throughput of `fusionkit serve`",
        "",
        "The default offline model (EfficientNet-Lite0 + all-MiniLM-L6-v2, random fusion and "
        "heads) behind a real `fusionkit serve` process, serving the checkpoint (eager "
        "PyTorch) or its ONNX export (onnxruntime), called over HTTP with a 224 px PNG "
        "and a 12-word title per request (multipart form). One client: "
        f"{args.requests} requests one after another. Under load: {args.clients} clients "
        f"sending {args.burst} requests in all, each as soon as its last is answered.",
        "",
        f"Machine: {os.cpu_count()}-core {platform.machine()} CPU ({args.device}), shared "
        f"with other jobs (load average {load:.1f} at the start); the clients run on the same "
        f"cores. Python {platform.python_version()}, torch {torch.__version__}.",
        "",
        f"Command: `python -m benchmarks.serve_latency --requests {args.requests} "
        f"--clients {args.clients} --burst {args.burst} --device {args.device} "
        f"--max-batch {' '.join(map(str, args.max_batch))} --engines "
        f"{' '.join(args.engines)}`.",
        "",
        "| server | ready after | first request | p50, 1 client | p99, 1 client | "
        f"throughput, {args.clients} clients | p50 under load | p99 under load | "
        "mean batch | forward batch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['ready_s']:.1f} s | {row['first_ms']:.0f} ms | "
            f"{row['p50_ms']:.0f} ms | {row['p99_ms']:.0f} ms | "
            f"{row['throughput']:.1f} req/s | {row['load_p50_ms']:.0f} ms | "
            f"{row['load_p99_ms']:.0f} ms | {row['mean_batch']:.1f} | {row['forward_batch']} |"
        )
    lines.append("")
    for name, row in rows.items():
        engine = name.split(":")[0]
        single = rows.get(f"{engine}: one at a time (--max-batch 1)")
        first = f"first request / p50: {row['first_ms'] / row['p50_ms']:.2f}x"
        if single is None or row is single:
            lines.append(f"- {name}: {first}.")
            continue
        lines.append(
            f"- {name} / one at a time: throughput {row['throughput'] / single['throughput']:.2f}x,"
            f" p50 latency of one client {row['p50_ms'] / single['p50_ms']:.2f}x; {first}."
        )
    lines += [
        "",
        "Micro-batching pays where a forward of several samples costs less per sample than "
        "one of a single sample. The server measures that at start and cuts each micro-batch "
        "into forwards of the size with the least time per sample (`forward batch`; "
        "`--forward-batch` sets it): on this 2-core CPU eager PyTorch is cheapest per sample "
        "at a few samples (a larger batch's activations no longer fit the caches), "
        "onnxruntime at large batches. The clients run on the server's two cores; "
        "differences of a few tens of percent between runs are the noise of a shared "
        "machine. A GPU (`--device cuda`) is not measured.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
