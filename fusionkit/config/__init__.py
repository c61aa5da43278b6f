"""Configuration: the model config a checkpoint stores and the run config a training reads.

The package sits below the models and the training loop, so either (and inference code) can
read a config without importing the other. Fixed sections are pydantic models
(`fusionkit.config.base.Section`); every error names the offending key path.
"""

from fusionkit.config.base import Section
from fusionkit.config.component import ComponentConfig
from fusionkit.config.inputs import InputConfig
from fusionkit.config.model import (
    DEFAULT_TEXT,
    DEFAULT_VISION,
    FusionConfig,
    ModelConfig,
    UnimodalHeadsConfig,
)
from fusionkit.config.run import DataConfig, RunConfig, TrainConfig, parse_section
from fusionkit.errors import did_you_mean

__all__ = [
    "DEFAULT_TEXT",
    "DEFAULT_VISION",
    "ComponentConfig",
    "DataConfig",
    "FusionConfig",
    "InputConfig",
    "ModelConfig",
    "RunConfig",
    "Section",
    "TrainConfig",
    "UnimodalHeadsConfig",
    "did_you_mean",
    "parse_section",
]
