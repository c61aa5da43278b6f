"""Inference outside training: `Predictor` and `explain`.

Nothing here imports the training loop: a prediction server or a notebook loads a checkpoint
with the models, data, config and run-folder layout alone.

Examples:
    >>> from fusionkit.serving import Predictor
    >>> predictor = Predictor.from_pretrained("runs/quickstart")  # doctest: +SKIP
"""

from fusionkit.serving.explain import Explanation, attention_map, explain, feature_grid
from fusionkit.serving.predictor import Predictor

__all__ = ["Explanation", "Predictor", "attention_map", "explain", "feature_grid"]
