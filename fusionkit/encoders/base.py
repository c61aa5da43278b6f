"""The output every encoder adapter returns: a padded token sequence and its mask.

The fusion layers only ever see `EncoderOutput`, so any backbone that can produce one
(a timm CNN, a ViT, a Hugging Face text model) plugs into the same fusion code.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["EncoderOutput"]


@dataclass
class EncoderOutput:
    """Tokens of one modality for a batch, with a mask of the real tokens.

    Attributes:
        tokens: Float tensor of shape ``(B, N, C)``.
        mask: Bool tensor of shape ``(B, N)``; ``True`` marks a real token, ``False`` padding
            (or every position of a sample whose input is missing).

    Example:
        >>> out = EncoderOutput(torch.zeros(2, 5, 8), torch.ones(2, 5, dtype=torch.bool))
        >>> out.tokens.shape
        torch.Size([2, 5, 8])
    """

    tokens: Tensor
    mask: Tensor
