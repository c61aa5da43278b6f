"""Training, evaluation and prediction for fusionkit models.

Examples:
    >>> from fusionkit.training import Predictor, build_run_config, train
    >>> result = train(build_run_config(train="train.csv", val="val.csv"), "runs/x")
    ... # doctest: +SKIP
"""

from __future__ import annotations

from fusionkit.training.config import DataConfig, TrainConfig, parse_section
from fusionkit.training.evaluate import compute_report, evaluate_checkpoint, format_report
from fusionkit.training.loop import (
    Trainer,
    TrainingError,
    TrainResult,
    build_run_config,
    train,
)
from fusionkit.training.predict import Predictor

__all__ = [
    "DataConfig",
    "Predictor",
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
