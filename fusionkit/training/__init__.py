"""Training and evaluation of fusionkit models.

Inference outside training (`Predictor`, `explain`) lives in :mod:`fusionkit.serving`.

Examples:
    >>> from fusionkit.training import build_run_config, train
    >>> result = train(build_run_config(train="train.csv", val="val.csv"), "runs/x")
    ... # doctest: +SKIP
"""

from __future__ import annotations

from fusionkit.config import DataConfig, TrainConfig, parse_section
from fusionkit.training.evaluate import compute_report, evaluate_checkpoint, format_report
from fusionkit.training.loop import Trainer, TrainingError, TrainResult, train
from fusionkit.training.run_config import build_run_config
from fusionkit.training.tracking import MetricLogger, TensorBoardLogger

__all__ = [
    "DataConfig",
    "MetricLogger",
    "TensorBoardLogger",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingError",
    "build_run_config",
    "compute_report",
    "evaluate_checkpoint",
    "format_report",
    "parse_section",
    "train",
]
