"""One fusion layer against its peers, on dense and on variable-length batches.

* ``layer``: every token real. fusionkit's ``SequenceWiseAttention`` (one layer, as used)
  and its bare ``TransformerLayer`` against ``torch.nn.TransformerEncoderLayer``
  (``norm_first``, ``batch_first``) and timm's ViT ``Block`` at equal width, heads and MLP
  ratio, on the same tokens.
* ``varlen``: text lengths average 25% of the padded length. fusionkit packed (real tokens
  only) against the same module padded and the peers on the padded concatenation.
"""

from __future__ import annotations

from benchmarks.cases import LayerCase
from benchmarks.harness import Harness
from benchmarks.workloads import layer_workload


def test_layer(benchmark, harness: Harness, layer_case: LayerCase) -> None:
    benchmark.group = f"layer {layer_case.shape.label} {layer_case.mode}"
    workload = layer_workload(layer_case, harness.device)
    harness.measure(benchmark, workload, layer_case.info(), budget_s=2.0, min_rounds=5)


def test_varlen(benchmark, harness: Harness, varlen_case: LayerCase) -> None:
    benchmark.group = f"varlen {varlen_case.shape.label} {varlen_case.mode}"
    workload = layer_workload(varlen_case, harness.device)
    harness.measure(benchmark, workload, varlen_case.info(), budget_s=2.0, min_rounds=5)
