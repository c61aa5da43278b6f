"""Timing and peak-memory measurement shared by the benchmark modules.

Every case goes through :meth:`Harness.measure`: one call under the memory probe (which is
also the warm-up: lazily built plans and allocator growth stay out of the timings), an
optional calibration call, then ``benchmark.pedantic`` with a round count that fits the
case's time budget. Everything the report needs goes into ``benchmark.extra_info``, so the
report is computed from measured data only.

Peak memory is the most memory the call holds at once beyond what was allocated before it:

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``;
* CPU: the torch profiler with ``profile_memory=True`` records every allocation and free of
  the CPU allocator during the call; the peak of their running sum is the call's own peak.
  Buffers that oneDNN/MKL allocate outside the torch allocator are not seen.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.cases import CONTENDED_SHARE, Environment

__all__ = ["MEMORY_METHODS", "Harness", "device_name", "measure_peak_memory"]

MEMORY_METHODS = {
    "cuda": "torch.cuda.max_memory_allocated during one call, minus the memory held before it",
    "cpu": (
        "torch.profiler (profile_memory=True): peak of the running sum of the CPU allocator's "
        "allocations and frees during one call"
    ),
}
#: Shortest timed round: below it the timer's resolution and Python overhead show, so fast
#: cases repeat the call within a round.
MIN_ROUND_S = 2e-3


def _synchronize(device: str) -> Callable[[], None]:
    if device == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _cpu_peak_memory(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Memory events carry signed byte counts (frees are negative) and a timestamp.
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def _cuda_peak_memory(fn: Callable[[], object]) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def median_seconds(fn: Callable[[], Any], rounds: int) -> float:
    """The median wall time of ``rounds`` calls of ``fn``, after one warm-up call.

    Examples:
        >>> median_seconds(lambda: None, 3) >= 0
        True
    """
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_peak_memory(fn: Callable[[], object], device: str) -> int:
    """Peak bytes that one call of ``fn`` holds beyond what was allocated before it.

    Args:
        fn: The workload.
        device: ``"cpu"`` or ``"cuda"``.

    Returns:
        Bytes (0 if the call allocates nothing).
    """
    return _cuda_peak_memory(fn) if device == "cuda" else _cpu_peak_memory(fn)


def device_name(device: str) -> str:
    """A readable name of the processor that runs the cases."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def busy_cpu_seconds() -> float | None:
    """CPU seconds that every process of the machine has used since boot (Linux).

    Returns:
        The busy seconds, or ``None`` where ``/proc/stat`` cannot be read.
    """
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal: everything but idle and iowait is busy
    # (steal too: on a VM it is time the host gave to someone else).
    busy = sum(fields) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


class _OthersMeter:
    """The share of the machine's CPUs that *other* processes used during a ``with`` block.

    A busy neighbour makes a multi-threaded CPU benchmark wait for its threads; this number
    lets the report flag the cases that were measured on a shared machine.
    """

    def __enter__(self) -> _OthersMeter:
        self.share: float | None = None
        self._wall, self._own = time.perf_counter(), time.process_time()
        self._busy = busy_cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        busy = busy_cpu_seconds()
        wall = time.perf_counter() - self._wall
        if busy is None or self._busy is None or wall <= 0:
            return
        others = (busy - self._busy) - (time.process_time() - self._own)
        self.share = min(1.0, max(0.0, others / (wall * (os.cpu_count() or 1))))


def wait_for_quiet(max_wait_s: float, window_s: float = 0.25) -> float:
    """Sleep until other processes use at most :data:`CONTENDED_SHARE` of the CPUs.

    Args:
        max_wait_s: Give up (and measure anyway) after this long.
        window_s: Length of each sample of the machine's load.

    Returns:
        Seconds spent waiting.
    """
    start = time.perf_counter()
    while True:
        with _OthersMeter() as others:
            time.sleep(window_s)
        waited = time.perf_counter() - start
        if others.share is None or others.share <= CONTENDED_SHARE or waited >= max_wait_s:
            return waited


@dataclass
class Harness:
    """How this run measures: environment, grid profile and thread count.

    Attributes:
        env: Device and xformers availability.
        profile: ``"quick"``, ``"cpu"`` or ``"gpu"``.
        threads: ``torch.get_num_threads()`` for the run.
        quiet_wait_s: On CPU, wait up to this long before timing each case for other
            processes to leave the CPUs (0: never wait).
    """

    env: Environment
    profile: str
    threads: int
    quiet_wait_s: float = 0.0

    @property
    def device(self) -> str:
        return self.env.device

    @property
    def quick(self) -> bool:
        return self.profile == "quick"

    def measure(
        self,
        benchmark: Any,
        fn: Callable[[], object],
        info: dict[str, Any],
        *,
        budget_s: float = 1.0,
        min_rounds: int = 3,
        max_rounds: int = 50,
    ) -> None:
        """Measure ``fn``'s peak memory, then time it with pytest-benchmark.

        Args:
            benchmark: pytest-benchmark's fixture.
            fn: The workload; it must not return before its work is done on the host (CUDA
                work is synchronised here).
            info: The case's description (:meth:`~benchmarks.cases.AttentionCase.info` ...).
            budget_s: Time to spend in timed rounds; slow cases still get ``min_rounds``.
            min_rounds: Fewest timed rounds.
            max_rounds: Most timed rounds.
        """
        sync = _synchronize(self.device)

        def timed() -> None:
            fn()
            sync()

        start = time.perf_counter()
        peak = measure_peak_memory(fn, self.device)
        probe_s = time.perf_counter() - start
        if self.quick:
            rounds, iterations, warmup = 1, 1, 0
        else:
            if probe_s >= budget_s:
                # The profiled call already took the whole budget: a calibration call would
                # only add minutes to the slowest cases.
                one = probe_s
            else:
                start = time.perf_counter()
                timed()
                one = time.perf_counter() - start
            iterations = max(1, math.ceil(MIN_ROUND_S / max(one, 1e-9)))
            rounds = min(max_rounds, max(min_rounds, round(budget_s / (one * iterations))))
            warmup = 1 if one * iterations < 0.25 * budget_s else 0
        waited = 0.0
        if self.device == "cpu" and self.quiet_wait_s > 0:
            waited = wait_for_quiet(self.quiet_wait_s)
        with _OthersMeter() as others:
            benchmark.pedantic(timed, rounds=rounds, iterations=iterations, warmup_rounds=warmup)
        benchmark.extra_info.update(info)
        benchmark.extra_info.update(
            {
                "device": self.device,
                "device_name": device_name(self.device),
                "profile": self.profile,
                "threads": self.threads,
                "torch": torch.__version__,
                "peak_memory_bytes": peak,
                "memory_method": MEMORY_METHODS[self.device],
                "others_cpu_share": others.share,
                "quiet_wait_s": waited,
            }
        )
