"""The machine's matmul ceiling, measured in the same run as every other case.

A large square matmul (fp32 on CPU; bf16 and fp32 on CUDA) is about the highest FLOP rate
the device reaches; the report divides each case's achieved rate by it.
"""

from __future__ import annotations

from benchmarks.cases import CeilingCase
from benchmarks.harness import Harness
from benchmarks.workloads import ceiling_workload


def test_ceiling(benchmark, harness: Harness, ceiling_case: CeilingCase) -> None:
    benchmark.group = "ceiling"
    workload = ceiling_workload(ceiling_case, harness.device)
    harness.measure(benchmark, workload, ceiling_case.info(), budget_s=1.5, min_rounds=5)
