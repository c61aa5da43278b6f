"""Configuration: the model config a checkpoint stores and the run config a training reads.

The package sits below the models and the training loop, so either (and inference code) can
read a config without importing the other.
"""

from fusionkit.config.model import (
    DEFAULT_TEXT,
    DEFAULT_VISION,
    ComponentConfig,
    FusionConfig,
    ModelConfig,
)
from fusionkit.config.run import DataConfig, TrainConfig, parse_section

__all__ = [
    "DEFAULT_TEXT",
    "DEFAULT_VISION",
    "ComponentConfig",
    "DataConfig",
    "FusionConfig",
    "ModelConfig",
    "TrainConfig",
    "parse_section",
]
