"""Full CMA-CLIP: inference and a training step, built by ``fusionkit.models.build_model``.

The place for whole-model cases, apart from the component families. The model is built from
a config of the documented shape (``{"model": "cma_clip", "vision": {"name": "timm", ...},
"text": {"name": "huggingface", ...}, "fusion": {...}, "tasks": {...}}``, see
:meth:`benchmarks.cases.ModelCase.config`). Skipped, with the reason, where
``fusionkit.models`` cannot be imported.
"""

from __future__ import annotations

import pytest

from benchmarks.cases import ModelCase
from benchmarks.harness import Harness

pytest.importorskip(
    "fusionkit.models", reason="fusionkit.models cannot be imported: no full-model cases"
)

from benchmarks.workloads import model_workload


def test_model(benchmark, harness: Harness, model_case: ModelCase) -> None:
    benchmark.group = f"model {model_case.label} {model_case.mode}"
    workload, measured = model_workload(model_case, harness.device)
    harness.measure(benchmark, workload, model_case.info() | measured, budget_s=3.0, min_rounds=3)
