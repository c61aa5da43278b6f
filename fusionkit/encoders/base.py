"""The output every encoder adapter returns: a padded token sequence and its mask.

The fusion layers only ever see `EncoderOutput`, so any backbone that can produce one
(a timm CNN, a ViT, a Hugging Face text model) plugs into the same fusion code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fusionkit.errors import ShapeError

__all__ = ["EncoderOutput", "FreezableEncoder", "backbone_blocks", "check_images"]


@dataclass
class EncoderOutput:
    """Tokens of one modality for a batch, with a mask of the real tokens.

    Attributes:
        tokens: Float tensor of shape ``(B, N, C)``.
        mask: Bool tensor of shape ``(B, N)``; ``True`` marks a real token, ``False`` padding
            (or every position of a sample whose input is missing).
        summary: Long tensor ``(B,)``: the position of each sample's summary token, the one
            the backbone itself pools (a ViT's class token, CLIP's end-of-text token); None
            when the backbone has none (CNNs, BERT-style encoders mark nothing).

    Examples:
        >>> out = EncoderOutput(torch.zeros(2, 5, 8), torch.ones(2, 5, dtype=torch.bool))
        >>> out.tokens.shape, out.summary
        (torch.Size([2, 5, 8]), None)
    """

    tokens: Tensor
    mask: Tensor
    summary: Tensor | None = None

    def summary_tokens(self) -> Tensor:
        """The summary token of every sample, ``(B, C)``.

        Returns:
            ``tokens[b, summary[b]]`` for each sample ``b``.

        Raises:
            ShapeError: The encoder marks no summary token.

        Examples:
            >>> out = EncoderOutput(torch.arange(6.0).view(1, 3, 2),
            ...                     torch.ones(1, 3, dtype=torch.bool), torch.tensor([2]))
            >>> out.summary_tokens()
            tensor([[4., 5.]])
        """
        if self.summary is None:
            raise ShapeError("this encoder marks no summary token (EncoderOutput.summary)")
        rows = torch.arange(self.tokens.shape[0], device=self.tokens.device)
        return self.tokens[rows, self.summary.to(self.tokens.device)]


def check_images(
    images: Any, name: str = "images", shape: str = "(B, C, H, W)", channels: int | None = None
) -> None:
    """Reject what no vision encoder can use: a non-tensor, a wrong rank, an empty batch or
    image, a non-float dtype, or NaN/inf pixels.

    The finiteness test is one ``torch.isfinite(images).all()``: a NaN pixel would otherwise
    spread through the backbone and every attention into NaN logits for the whole batch.

    Args:
        images: The argument to check, expected a 4-d float tensor.
        name: The argument name used in messages.
        shape: The expected shape as shown in messages, e.g. ``"(B, 3, H, W)"``.
        channels: The number of channels the encoder takes, checked when given.

    Raises:
        ShapeError: The message names ``name``, the expected shape and what was found.

    Examples:
        >>> images = torch.zeros(1, 3, 8, 8)
        >>> images[0, 0, 0, 0] = float("nan")
        >>> check_images(images)
        Traceback (most recent call last):
        ...
        fusionkit.errors.ShapeError: images: 1 of 192 values are NaN or infinite...
    """
    if not isinstance(images, Tensor):
        raise ShapeError(f"{name}: expected a float tensor of shape {shape}, got {type(images)}")
    if images.ndim != 4 or 0 in images.shape:
        raise ShapeError(
            f"{name}: expected a non-empty tensor of shape {shape}, got {tuple(images.shape)}"
        )
    if channels is not None and images.shape[1] != channels:
        raise ShapeError(f"{name}: expected shape {shape}, got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ShapeError(
            f"{name}: expected a floating-point tensor of shape {shape}, got dtype {images.dtype}"
        )
    if not bool(torch.isfinite(images).all()):
        bad = int((~torch.isfinite(images)).sum())
        raise ShapeError(
            f"{name}: {bad} of {images.numel()} values are NaN or infinite; "
            "check the image files and the preprocessing"
        )


def backbone_blocks(module: nn.Module, minimum: int = 2) -> list[nn.Module]:
    """The repeated blocks of a backbone: the units FSDP shards and activation checkpointing
    recomputes.

    A block list is an ``nn.ModuleList`` or ``nn.Sequential`` of at least ``minimum`` children
    of one class, each holding parameters: a timm ViT's ``blocks``, a ResNet's ``layer1`` to
    ``layer4``, an EfficientNet's or ConvNeXt's stages, a BERT's ``encoder.layer``, a CLIP
    tower's ``resblocks``. The outermost such lists are taken, in module order; blocks nested inside
    a taken block are not listed again.

    Args:
        module: An encoder (or any module).
        minimum: The fewest children a block list has (1 takes a fusion's single layer).

    Returns:
        The blocks; empty when the module has no block list.

    Examples:
        >>> backbone_blocks(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))[1]
        Linear(in_features=2, out_features=2, bias=True)
        >>> backbone_blocks(nn.Linear(2, 2))
        []
    """
    found: list[nn.Module] = []
    taken: list[str] = []
    for name, child in module.named_modules():
        if any(name.startswith(prefix) for prefix in taken):
            continue
        if not isinstance(child, (nn.ModuleList, nn.Sequential)):
            continue
        members = list(child.children())
        if (
            len(members) >= minimum
            and len({type(m) for m in members}) == 1
            and all(any(True for _ in m.parameters()) for m in members)
        ):
            found.extend(members)
            taken.append(f"{name}.")
    return found


class FreezableEncoder(nn.Module):
    """An encoder that can be frozen: no gradient reaches its parameters, and its modules stay
    in eval mode (batch-norm statistics and dropout fixed) even after ``.train()``.

    Subclasses build their modules, then call `_set_frozen`.

    Attributes:
        frozen: Whether the encoder is frozen.

    Examples:
        >>> class Tiny(FreezableEncoder):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.model = nn.Dropout(0.5)
        ...         self._set_frozen(True)
        >>> Tiny().train().model.training
        False
    """

    frozen: bool = False

    def _set_frozen(self, freeze: bool) -> None:
        self.frozen = bool(freeze)
        if self.frozen:
            self.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> FreezableEncoder:
        """Set training mode; a frozen encoder stays in eval mode.

        Args:
            mode: Training (``True``) or evaluation (``False``) mode.

        Returns:
            ``self``.
        """
        super().train(mode)
        if self.frozen:
            for child in self.children():
                child.eval()
        return self
