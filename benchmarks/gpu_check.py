"""``make gpu-check``: everything fusionkit checks on a CUDA GPU, in one command, in 8 minutes.

Usage::

    python -m benchmarks.gpu_check [--out gpu-check] [--budget 480]

The first thing it does is look for CUDA: without it, it says so and exits with status 2 within
seconds, writing nothing. On CUDA it runs, each step even when an earlier one failed:

1. ``env``: torch, CUDA and GPU (``env.json``) and ``python -m xformers.info``
   (``xformers-info.log``);
2. ``tests``: the CUDA subset of the tests, ``pytest tests -m cuda``: the real xformers kernels
   against ``math`` at float16 and bfloat16 tolerances, packed against padded
   (``tests/junit.xml``, ``tests/pytest.log``);
3. ``train``: the quickstart model for two epochs in bfloat16 on the xformers backend
   (``train/config.yaml``, ``train/train.log`` and the run folder's metrics and reports; the
   checkpoints are not kept);
4. ``bench``: the benchmark families on the reduced grid (profile ``cpu``: bfloat16, the
   shapes of ``make bench``) on CUDA, one pytest run per family so that a family cut short by
   the budget loses only itself (``bench/<family>.json`` and ``.log``, all merged into
   ``bench/gpu.json``);
5. ``report``: ``python -m benchmarks.report`` of ``bench/gpu.json`` into ``report/``.

``summary.json`` gives each step's status (``passed``, ``failed``, ``timeout`` or
``skipped``), seconds, exit code, command and log. Each step has a timeout within the overall
budget. The exit status is 0 when every step passed and 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BENCH_FAMILIES",
    "BUDGET_S",
    "StepResult",
    "cuda_unavailable_reason",
    "main",
    "merge_benchmark_runs",
    "run_step",
    "training_config",
]

ROOT = Path(__file__).resolve().parents[1]
#: The whole check must end within this many seconds on one GPU.
BUDGET_S = 480.0
#: Most seconds of the CUDA tests and of the training run; the benchmarks get the rest, at
#: least BENCH_MIN_S, and the report REPORT_RESERVE_S.
TESTS_MAX_S = 120.0
TRAIN_MAX_S = 150.0
BENCH_MIN_S = 150.0
REPORT_RESERVE_S = 30.0
#: Benchmark test files, most telling first (a family the budget cuts short loses only itself).
BENCH_FAMILIES: tuple[str, ...] = ("ceiling", "attention", "layers", "memory", "model")
#: The pytest-benchmark flags of ``make bench-gpu``.
BENCH_FLAGS: tuple[str, ...] = ("--benchmark-enable", "--benchmark-columns=median,min,iqr,rounds")
#: Files of the training run folder kept in ``train/`` (the checkpoints are left out).
TRAIN_SUFFIXES: tuple[str, ...] = (".json", ".jsonl", ".yaml", ".csv", ".txt", ".md", ".png")


def cuda_unavailable_reason() -> str | None:
    """Why this machine cannot run the GPU check, or ``None`` when CUDA is there.

    Asks torch when this Python has it; a Python without torch (before ``make setup``)
    asks the NVIDIA driver through ``nvidia-smi``.

    Returns:
        A one-line reason, or ``None``.
    """
    try:
        import torch
    except ImportError:
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return "there is no torch in this Python and no NVIDIA driver (nvidia-smi)"
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
        if listed.returncode != 0 or "GPU" not in listed.stdout:
            return "nvidia-smi lists no GPU"
        return None
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False)"
    return None


@dataclass
class StepResult:
    """What one step did.

    Attributes:
        name: The step (``tests``, ``train``, ``bench-attention``, ...).
        status: ``passed``, ``failed``, ``timeout`` or ``skipped``.
        seconds: Wall time.
        returncode: The command's exit status (``None`` when it did not finish or run).
        command: The command line.
        log: The log file, relative to the output folder.
        note: Why it was skipped or what failed, if known.
    """

    name: str
    status: str
    seconds: float
    returncode: int | None
    command: str
    log: str | None
    note: str = ""


def run_step(
    name: str, command: Sequence[str], log: Path, timeout_s: float, out: Path
) -> StepResult:
    """Run ``command`` from the repository root, its output into ``log``, within ``timeout_s``.

    A command past its time is stopped with its whole process group (SIGTERM, then SIGKILL).

    Args:
        name: The step's name.
        command: The command and its arguments.
        log: Where its stdout and stderr go.
        timeout_s: Seconds it may take; at most 0 skips it.
        out: The output folder (the result names the log relative to it).

    Returns:
        The step's `StepResult`.

    Examples:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp())
        >>> run_step("hello", ["true"], out / "hello.log", 10, out).status
        'passed'
    """
    shown = " ".join(command)
    log_name = str(log.relative_to(out)) if log.is_relative_to(out) else str(log)
    if timeout_s <= 0:
        return StepResult(name, "skipped", 0.0, None, shown, None, "no time left in the budget")
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"gpu-check: {name} (up to {timeout_s:.0f} s) → {log_name}", flush=True)
    start = time.perf_counter()
    with log.open("w") as stream:
        stream.write(f"$ {shown}\n")
        stream.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
        process = subprocess.Popen(
            list(command),
            cwd=ROOT,
            stdout=stream,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            returncode: int | None = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop(process)
            returncode = None
    seconds = round(time.perf_counter() - start, 1)
    if returncode is None:
        note = f"stopped after {timeout_s:.0f} s"
        return StepResult(name, "timeout", seconds, None, shown, log_name, note)
    status = "passed" if returncode == 0 else "failed"
    return StepResult(name, status, seconds, returncode, shown, log_name)


def _stop(process: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def training_config(quickstart: Path, epochs: int = 2) -> dict[str, Any]:
    """The quickstart config, made short, bfloat16 and on the xformers backend on CUDA.

    Args:
        quickstart: ``configs/quickstart.yaml``.
        epochs: Training epochs.

    Returns:
        The run config as a dict (write it as YAML).
    """
    import yaml

    config = yaml.safe_load(quickstart.read_text())
    config["fusion"]["sequence"]["attention_backend"] = "xformers"
    config["train"].update(
        {"epochs": epochs, "precision": "bf16", "device": "cuda", "early_stopping": 0}
    )
    return config


def merge_benchmark_runs(paths: Sequence[Path], merged: Path) -> int:
    """Merge pytest-benchmark JSON files into one run (the first one's machine and commit).

    Args:
        paths: JSON files; missing or unreadable ones are left out.
        merged: Where the merged run goes.

    Returns:
        The number of benchmark cases in ``merged`` (0: nothing written).
    """
    runs = []
    for path in paths:
        try:
            runs.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    if not runs:
        return 0
    base = dict(runs[0])
    base["benchmarks"] = [case for run in runs for case in run.get("benchmarks", [])]
    if base["benchmarks"]:
        merged.write_text(json.dumps(base, indent=1))
    return len(base["benchmarks"])


def _environment(out: Path) -> dict[str, Any]:
    import torch

    props = torch.cuda.get_device_properties(0)
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0),
        "capability": list(torch.cuda.get_device_capability(0)),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "device_count": torch.cuda.device_count(),
    }
    try:
        import xformers

        env["xformers"] = xformers.__version__
    except Exception as error:  # any import failure is what the tests will report
        env["xformers"] = f"not importable ({type(error).__name__}: {error})"
    (out / "env.json").write_text(json.dumps(env, indent=1))
    return env


class _Budget:
    def __init__(self, total_s: float) -> None:
        self.total_s = total_s
        self.start = time.perf_counter()

    def left(self, reserve_s: float = 0.0) -> float:
        return self.total_s - (time.perf_counter() - self.start) - reserve_s


def _prepare(out: Path) -> None:
    if out.exists():
        if any(out.iterdir()) and not (out / "summary.json").exists():
            raise SystemExit(f"gpu-check: {out} is not empty and holds no earlier gpu-check run")
        shutil.rmtree(out)
    out.mkdir(parents=True)


def _run(out: Path, budget: _Budget) -> list[StepResult]:
    py = sys.executable
    pytest = (py, "-m", "pytest", "-q", "-p", "no:cacheprovider")
    info = run_step(
        "xformers-info", [py, "-m", "xformers.info"], out / "xformers-info.log", 60, out
    )
    junit = out / "tests" / "junit.xml"
    tests = run_step(
        "tests",
        [*pytest, "tests", "-m", "cuda", f"--junitxml={junit}"],
        out / "tests" / "pytest.log",
        min(TESTS_MAX_S, budget.left(REPORT_RESERVE_S + BENCH_MIN_S + TRAIN_MAX_S)),
        out,
    )
    results = [info, tests, _train(out / "train", budget, out)]
    bench = out / "bench"
    runs = [bench / f"{family}.json" for family in BENCH_FAMILIES]
    for family, run in zip(BENCH_FAMILIES, runs, strict=True):
        command = [
            *pytest, f"benchmarks/test_bench_{family}.py", *BENCH_FLAGS,
            "--bench-device=cuda", "--bench-profile=cpu", f"--benchmark-json={run}",
        ]  # fmt: skip
        log = bench / f"{family}.log"
        results.append(
            run_step(f"bench-{family}", command, log, budget.left(REPORT_RESERVE_S), out)
        )
    merged = bench / "gpu.json"
    if merge_benchmark_runs(runs, merged):
        command = [py, "-m", "benchmarks.report", str(merged), "--out", str(out / "report")]
        results.append(
            run_step("report", command, out / "report.log", max(budget.left(), 10.0), out)
        )
    else:
        note = "no benchmark JSON was written"
        results.append(StepResult("report", "skipped", 0.0, None, "", None, note))
    return results


def _train(folder: Path, budget: _Budget, out: Path) -> StepResult:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(training_config(ROOT / "configs" / "quickstart.yaml")))
    with tempfile.TemporaryDirectory(prefix="fusionkit-gpu-check-") as run_dir:
        result = run_step(
            "train",
            [
                sys.executable,
                "-m",
                "fusionkit",
                "train",
                "--config",
                str(config),
                "--output",
                run_dir,
            ],
            folder / "train.log",
            min(TRAIN_MAX_S, budget.left(REPORT_RESERVE_S + BENCH_MIN_S)),
            out,
        )
        run = Path(run_dir)
        for path in sorted(run.iterdir()):
            if path.is_file() and path.suffix in TRAIN_SUFFIXES and path.name != "config.yaml":
                shutil.copy2(path, folder / path.name)
            elif path.name == "config.yaml":
                shutil.copy2(path, folder / "run-config.yaml")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m benchmarks.gpu_check [--out DIR] [--budget SECONDS] [--preflight]``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, default=ROOT / "gpu-check", help="output folder")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for it all")
    parser.add_argument(
        "--preflight", action="store_true", help="only check that CUDA is there, then exit"
    )
    args = parser.parse_args(argv)
    reason = cuda_unavailable_reason()
    if reason is not None:
        print(
            f"make gpu-check needs CUDA, and there is none here: {reason}.\n"
            "Run it on a machine with an NVIDIA GPU (docs/gpu.md). Without one, `make test` "
            "checks fusionkit's xformers code against an emulated kernel.",
            file=sys.stderr,
        )
        return 2
    if args.preflight:
        return 0
    out = args.out.resolve()
    _prepare(out)
    budget = _Budget(args.budget)
    env = _environment(out)
    print(f"gpu-check: {env['device']}, torch {env['torch']}, xformers {env['xformers']}")
    results = _run(out, budget)
    failed = [r.name for r in results if r.status != "passed"]
    summary = {
        "status": "failed" if failed else "passed",
        "failed": failed,
        "seconds": round(time.perf_counter() - budget.start, 1),
        "budget_s": args.budget,
        "environment": env,
        "steps": [asdict(r) for r in results],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    width = max(len(r.name) for r in results)
    for r in results:
        print(f"  {r.name:<{width}}  {r.status:<7}  {r.seconds:6.1f} s  {r.log or r.note}")
    print(f"gpu-check: {summary['status']} in {summary['seconds']} s; {out / 'summary.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
