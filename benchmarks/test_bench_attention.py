"""``fusionkit.attention.attention()`` per backend, mask and mode, with ``math`` as baseline.

The grid is :func:`benchmarks.cases.attention_cases`: CMA-CLIP self-attention over the
image+text concatenation and image→text cross-attention, each without a mask and with a key
padding mask whose text lengths average 25% of the padded length.
"""

from __future__ import annotations

from benchmarks.cases import AttentionCase
from benchmarks.harness import Harness
from benchmarks.workloads import attention_workload


def test_attention(benchmark, harness: Harness, attention_case: AttentionCase) -> None:
    benchmark.group = f"attention {attention_case.shape.label} {attention_case.mode}"
    workload = attention_workload(attention_case, harness.device)
    harness.measure(benchmark, workload, attention_case.info(), budget_s=0.6, min_rounds=5)
