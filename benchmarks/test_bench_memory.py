"""Peak memory against sequence length (up to 4096 tokens), per attention backend.

The fused kernels (sdpa, xformers) never hold the ``(B, H, L, L)`` probabilities, so their
peak grows as O(L); the ``math`` reference materialises them and grows as O(L²). Time is
recorded too, so the same table shows that both grow as O(L²) in compute.
"""

from __future__ import annotations

from benchmarks.cases import AttentionCase
from benchmarks.harness import Harness
from benchmarks.workloads import attention_workload


def test_memory(benchmark, harness: Harness, memory_case: AttentionCase) -> None:
    benchmark.group = f"memory {memory_case.mode} {memory_case.mask}"
    workload = attention_workload(memory_case, harness.device)
    # Memory is the point here: one or two timed rounds are enough for the time column.
    harness.measure(benchmark, workload, memory_case.info(), budget_s=0.5, min_rounds=1)
