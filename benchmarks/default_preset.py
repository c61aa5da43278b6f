"""How long the zero-config command takes on the emoji set, on two CPU cores.

Times ``fusionkit train --train emoji:train --val emoji:val --tasks group`` exactly as a new
user runs it (the default preset, no config), in a child process pinned to ``--cores`` CPUs
with as many torch threads, from process start to exit: loading the encoders, encoding the
frozen image tokens into an empty feature cache (a fresh ``FUSIONKIT_CACHE`` per round),
every epoch until early stopping, the blend fits and the checkpoints. The emoji set itself is
built before the clock starts (it is built once per machine). The budget is 15 minutes.

Each round also records the share of the machine's CPUs that other processes used while it
ran: on a shared machine a busy neighbour slows a run down, and the page says so.

Run from the repository root: ``python -m benchmarks.default_preset [--rounds 3]``; writes
``docs/results/default_preset.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.harness import busy_cpu_seconds

OUT = Path("docs/results/default_preset.md")
BUDGET_S = 15 * 60
COMMAND = ["train", "--train", "emoji:train", "--val", "emoji:val", "--tasks", "group"]


def _pin(cores: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that pins the child to ``cores`` of the CPUs this process may use."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) <= cores:
        return None
    return lambda: os.sched_setaffinity(0, allowed[:cores])


def _children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's finished (reaped) children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_round(work: Path, cores: int) -> dict[str, Any]:
    """One timed run of the zero-config command with an empty feature cache.

    Args:
        work: An empty folder for the run and its feature cache.
        cores: CPUs the child may use (and its torch threads).

    Returns:
        ``wall_s``, ``epochs`` and ``epoch_s`` (model → its epochs, and each epoch's time in
        training steps: the fused model, then the text-only and image-only models the preset
        trains beside it), ``val_accuracy`` (of the run: the blend of the three),
        ``fused_val_accuracy`` (of the fused model alone) and ``others_share`` (CPU share used
        by other processes meanwhile; ``None`` where ``/proc/stat`` is unreadable).

    Raises:
        RuntimeError: The command failed (its stderr tail is in the message).
    """
    run = work / "run"
    threads = str(cores)
    env = {**os.environ, "FUSIONKIT_CACHE": str(work / "cache"), "OMP_NUM_THREADS": threads,
           "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "fusionkit", "-q", *COMMAND, "--output", str(run)]
    children_before = _children_cpu_seconds()
    busy_before, started = busy_cpu_seconds(), time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, preexec_fn=_pin(cores))
    _, stderr = child.communicate()
    wall = time.perf_counter() - started
    busy_after = busy_cpu_seconds()
    if child.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({child.returncode}): {stderr[-3000:]}")
    own = _children_cpu_seconds() - children_before
    others = None
    if busy_before is not None and busy_after is not None:
        spent = busy_after - busy_before - own
        others = min(1.0, max(0.0, spent / (wall * (os.cpu_count() or 1))))
    models = {"fused": run, **{m: run / "unimodal" / m for m in ("text", "image")}}
    epochs = {}
    for name, folder in models.items():
        if (folder / "metrics.jsonl").is_file():
            lines = (folder / "metrics.jsonl").read_text().splitlines()
            epochs[name] = [json.loads(line)["epoch_seconds"] for line in lines]
    blend = run / "members_val_report.json"
    report = json.loads((blend if blend.is_file() else run / "val_report.json").read_text())
    fused = json.loads((run / "val_report.json").read_text())
    return {
        "wall_s": wall,
        "epochs": {name: len(seconds) for name, seconds in epochs.items()},
        "epoch_s": epochs,
        "val_accuracy": report["mean"].get("accuracy"),
        "fused_val_accuracy": fused["mean"].get("accuracy"),
        "others_share": others,
    }


def write_page(rounds: list[dict[str, Any]], cores: int) -> str:
    """The results page for the timed rounds.

    Args:
        rounds: What :func:`time_round` returned, one per round.
        cores: CPUs each round was pinned to.

    Returns:
        The page's Markdown (also written to :data:`OUT`).
    """
    import torch

    median = statistics.median(r["wall_s"] for r in rounds)
    verdict = "within" if median <= BUDGET_S else "**over**"
    lines = [
        "# The default preset's training time on emoji",
        "",
        "`fusionkit train --train emoji:train --val emoji:val --tasks group`: the default "
        "preset (`medium`: MiniLM fine-tuned, EfficientNet-Lite0 frozen, its tokens cached), "
        "which trains the fused model, then the text-only and the image-only model, and "
        "blends the three on val (`train.unimodal_models`), timed from process start to exit "
        f"with an empty feature cache, on {cores} CPU cores ({cores} torch threads). The "
        "emoji set is built beforehand.",
        "",
        f"Machine: {os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}, "
        f"Python {platform.python_version()}. `others` is the share of the machine's CPUs "
        "that other processes used during the round: above a few percent, the round was "
        "slowed down by them. `training steps` is the time in the training steps of each "
        "model, summed over its epochs (fused / text-only / image-only); `the rest` is the "
        "wall time less those: starting Python, loading the encoders, encoding the images "
        "into the cache, validating and fitting the heads' blend after every epoch, "
        "checkpoints, reloading `best/`, and fitting the blend of the three models. `val "
        "accuracy` is the run's (the blend of the three), then the fused model's alone.",
        "",
        "Command: `python -m benchmarks.default_preset` (or `make bench-preset`).",
        "",
        "| round | wall | epochs | training steps (s) | the rest | val accuracy | others |",
        "|---|---|---|---|---|---|---|",
    ]

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    for k, r in enumerate(rounds, 1):
        share = "-" if r["others_share"] is None else f"{r['others_share']:.0%}"
        epochs = " / ".join(str(n) for n in r["epochs"].values())
        steps = " / ".join(f"{sum(s):.0f}" for s in r["epoch_s"].values())
        outside = r["wall_s"] - sum(sum(s) for s in r["epoch_s"].values())
        lines.append(f"| {k} | {r['wall_s']:.0f} s | {epochs} | {steps} | {outside:.0f} s "
                     f"| {fmt(r['val_accuracy'])}; {fmt(r['fused_val_accuracy'])} | {share} |")
    lines += [
        "",
        f"Median wall time: **{median:.0f} s** ({median / 60:.1f} min), {verdict} the budget "
        f"of {BUDGET_S // 60} minutes.",
        "",
    ]
    page = "\n".join(lines)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(page)
    return page


def main(argv: list[str] | None = None) -> None:
    """Time the rounds and write the page.

    Examples:
        >>> main(["--rounds", "3"])  # doctest: +SKIP
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed runs (median reported)")
    parser.add_argument("--cores", type=int, default=2, help="CPUs the run may use")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.cores < 1:
        parser.error("--rounds and --cores must be at least 1")
    from fusionkit.data.sources import materialize_source

    materialize_source("emoji", progress=True)  # built before the clock starts
    rounds = []
    for k in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="fusionkit-preset-") as work:
            rounds.append(time_round(Path(work), args.cores))
        print(f"round {k + 1}: {rounds[-1]}", flush=True)
    print(write_page(rounds, args.cores))


if __name__ == "__main__":
    main()
