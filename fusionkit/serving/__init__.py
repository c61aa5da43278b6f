"""Inference outside training: `Predictor`, `explain`, and ONNX export (`export_onnx`,
`OnnxPredictor`).

Nothing here imports the training loop: a prediction server or a notebook loads a checkpoint
with the models, data, config and run-folder layout alone (`evaluate_export` borrows the
report functions of `fusionkit.training` when it is called).

Examples:
    >>> from fusionkit.serving import Predictor
    >>> predictor = Predictor.from_pretrained("runs/quickstart")  # doctest: +SKIP
"""

from fusionkit.serving.explain import Explanation, attention_map, explain, feature_grid
from fusionkit.serving.export import export_onnx
from fusionkit.serving.onnx_predictor import OnnxPredictor, evaluate_export
from fusionkit.serving.predictor import Predictor

__all__ = [
    "Explanation",
    "OnnxPredictor",
    "Predictor",
    "attention_map",
    "evaluate_export",
    "explain",
    "export_onnx",
    "feature_grid",
]
