"""Assembled models: `CMACLIP` and `build_model`."""

import fusionkit.encoders  # noqa: F401  (registers the encoder adapters a config may name)
from fusionkit.config import ComponentConfig, FusionConfig, ModelConfig
from fusionkit.models.cma_clip import CMACLIP, CMACLIPOutput, build_model

__all__ = [
    "CMACLIP",
    "CMACLIPOutput",
    "ComponentConfig",
    "FusionConfig",
    "ModelConfig",
    "build_model",
]
