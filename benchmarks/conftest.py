"""pytest wiring of the benchmark suite: options, case parametrisation, threads, seeding.

Options (each also read from an environment variable, so ``make`` targets and CI can set it):

* ``--bench-device {cpu,cuda}`` (``FUSIONKIT_BENCH_DEVICE``, default ``cpu``);
* ``--bench-profile {quick,cpu,gpu}`` (``FUSIONKIT_BENCH_PROFILE``, default ``gpu`` on CUDA
  and ``cpu`` on CPU); ``--quick`` is ``--bench-profile=quick``: every family once, at tiny
  shapes, in seconds (the smoke test runs it);
* ``--bench-threads N`` (``FUSIONKIT_BENCH_THREADS``, default 2): torch intra-op threads;
* ``--bench-quiet-wait SECONDS`` (``FUSIONKIT_BENCH_QUIET_WAIT``, default 0): on a shared CPU
  machine, wait up to that long before timing each case for other processes to go idle.

A test asks for its cases by naming one of the fixtures in :data:`CASE_FIXTURES`; the grid
comes from :mod:`benchmarks.cases` for the profile and environment of the run.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator

import pytest
import torch

from benchmarks import cases
from benchmarks.harness import Harness

#: Fixture name → the case family it is parametrised with.
CASE_FIXTURES: dict[str, Callable[[str, cases.Environment], list]] = {
    "attention_case": cases.attention_cases,
    "memory_case": cases.memory_cases,
    "layer_case": cases.layer_cases,
    "varlen_case": cases.varlen_cases,
    "ceiling_case": cases.ceiling_cases,
    "model_case": cases.model_cases,
}
_HARNESS = pytest.StashKey[Harness]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fusionkit benchmarks")
    group.addoption(
        "--bench-device",
        choices=("cpu", "cuda"),
        default=os.environ.get("FUSIONKIT_BENCH_DEVICE", "cpu"),
        help="device the benchmark cases run on (default: cpu)",
    )
    group.addoption(
        "--bench-profile",
        choices=cases.PROFILES,
        default=os.environ.get("FUSIONKIT_BENCH_PROFILE"),
        help="grid size: quick (smoke), cpu (reduced), gpu (full); default by device",
    )
    group.addoption(
        "--quick",
        action="store_const",
        const="quick",
        dest="bench_profile",
        help="smoke mode: every case family once at tiny shapes",
    )
    group.addoption(
        "--bench-quiet-wait",
        type=float,
        default=float(os.environ.get("FUSIONKIT_BENCH_QUIET_WAIT", "0")),
        metavar="SECONDS",
        help="on CPU, wait up to SECONDS before each case for other processes to leave the "
        "CPUs (a shared machine); default 0: never wait",
    )
    group.addoption(
        "--bench-threads",
        type=int,
        default=int(os.environ.get("FUSIONKIT_BENCH_THREADS", "2")),
        help="torch intra-op threads (default: 2)",
    )


def pytest_configure(config: pytest.Config) -> None:
    try:
        env = cases.detect_environment(config.getoption("bench_device"))
    except RuntimeError as error:
        raise pytest.UsageError(str(error)) from error
    profile = config.getoption("bench_profile") or cases.default_profile(env)
    threads = config.getoption("bench_threads")
    # Fixed threads make runs comparable across machines and runs; the report states them.
    torch.set_num_threads(threads)
    config.stash[_HARNESS] = Harness(
        env=env,
        profile=profile,
        threads=threads,
        quiet_wait_s=config.getoption("bench_quiet_wait"),
    )


def pytest_report_header(config: pytest.Config) -> str:
    harness = config.stash[_HARNESS]
    return (
        f"fusionkit benchmarks: device={harness.device} profile={harness.profile} "
        f"threads={harness.threads} xformers={harness.env.xformers} torch={torch.__version__}"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    harness = metafunc.config.stash[_HARNESS]
    for name, family in CASE_FIXTURES.items():
        if name in metafunc.fixturenames:
            selected = family(harness.profile, harness.env)
            metafunc.parametrize(name, selected, ids=[case.id for case in selected])


@pytest.fixture
def harness(request: pytest.FixtureRequest) -> Harness:
    """The run's :class:`~benchmarks.harness.Harness`."""
    return request.config.stash[_HARNESS]


@pytest.fixture(autouse=True)
def _seed() -> Iterator[None]:
    # Every case draws its inputs and weights from the same seed, whatever runs before it.
    random.seed(0)
    torch.manual_seed(0)
    yield
