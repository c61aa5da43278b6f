"""Fusion components: sequence-wise attention, co-attention, modality-wise fusions."""

from fusionkit.fusion.co_attention import CoAttention
from fusionkit.fusion.inputs import FusionOutput
from fusionkit.fusion.modality import (
    ConcatFusion,
    GatedFusion,
    MeanFusion,
    ModalityFusion,
    ModalityWiseAttention,
)
from fusionkit.fusion.sequence import SequenceWiseAttention, should_pack

__all__ = [
    "CoAttention",
    "ConcatFusion",
    "FusionOutput",
    "GatedFusion",
    "MeanFusion",
    "ModalityFusion",
    "ModalityWiseAttention",
    "SequenceWiseAttention",
    "should_pack",
]
