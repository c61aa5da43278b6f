"""fusionkit: multimodal fusion components for PyTorch.

Assemble CMA-CLIP (Liu et al., 2021) from any timm vision backbone and any text backbone:
sequence-wise attention over image-patch and text tokens, modality-wise (keyless) attention per
task, multi-task heads, all kept in a registry so a config names the parts.
"""

from fusionkit.attention import attention
from fusionkit.errors import FusionkitError, RegistryError
from fusionkit.fusion import CoAttention, ModalityWiseAttention, SequenceWiseAttention
from fusionkit.heads import MultiTaskHead
from fusionkit.models import CMACLIP, ModelConfig, build_model
from fusionkit.registry import create, list_components, register
from fusionkit.tasks import TaskSpec

__version__ = "0.1.0"

__all__ = [
    "CMACLIP",
    "CoAttention",
    "FusionkitError",
    "ModalityWiseAttention",
    "ModelConfig",
    "MultiTaskHead",
    "RegistryError",
    "SequenceWiseAttention",
    "TaskSpec",
    "attention",
    "build_model",
    "create",
    "list_components",
    "register",
]
