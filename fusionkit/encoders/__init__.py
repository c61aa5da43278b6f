"""Encoder adapters: vision backbones and text transformers as token sequences.

Importing this package registers the ``vision_encoder`` components ``"timm"``,
``"open_clip"`` and ``"huggingface"`` (CLIP and SigLIP vision towers) and the ``text_encoder``
components ``"sentence_transformers"``, ``"huggingface"`` (text towers of CLIP and SigLIP
included) and ``"open_clip"``. Every adapter returns an `EncoderOutput` (tokens ``(B, N, C)``,
a bool mask, and the position of the token the backbone pools where it has one) and states its
``width``. Pretrained weights come only from offline packages or local files.

Examples:
    >>> from fusionkit.encoders import TimmVisionEncoder
    >>> TimmVisionEncoder("resnet18")(torch.randn(2, 3, 64, 64)).tokens.shape
    torch.Size([2, 4, 512])
"""

from __future__ import annotations

from fusionkit.encoders.base import EncoderOutput, check_images
from fusionkit.encoders.hf_clip import HuggingFaceVisionEncoder
from fusionkit.encoders.open_clip import OpenCLIPTextEncoder, OpenCLIPVisionEncoder
from fusionkit.encoders.text import (
    PRESENT_KEY,
    BaseTextEncoder,
    HuggingFaceTextEncoder,
    SentenceTransformersTextEncoder,
)
from fusionkit.encoders.vision import TimmVisionEncoder
from fusionkit.encoders.weights import (
    OFFLINE_TEXT_MODELS,
    OFFLINE_VISION_WEIGHTS,
    OfflineTextModel,
    OfflineVisionWeights,
    enforce_offline_mode,
    load_offline_vision_weights,
    load_state_dict_file,
    load_vision_checkpoint,
    load_vision_weights,
    map_state_dict_in_order,
    offline_vision_state_dict,
    resolve_text_model_path,
)

__all__ = [
    "OFFLINE_TEXT_MODELS",
    "OFFLINE_VISION_WEIGHTS",
    "PRESENT_KEY",
    "BaseTextEncoder",
    "EncoderOutput",
    "HuggingFaceTextEncoder",
    "HuggingFaceVisionEncoder",
    "OfflineTextModel",
    "OfflineVisionWeights",
    "OpenCLIPTextEncoder",
    "OpenCLIPVisionEncoder",
    "SentenceTransformersTextEncoder",
    "TimmVisionEncoder",
    "check_images",
    "enforce_offline_mode",
    "load_offline_vision_weights",
    "load_state_dict_file",
    "load_vision_checkpoint",
    "load_vision_weights",
    "map_state_dict_in_order",
    "offline_vision_state_dict",
    "resolve_text_model_path",
]
