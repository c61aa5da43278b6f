"""Training-time augmentation of fused inputs: modality dropout and modality swap.

Both act on encoder tokens and masks, after the encoders (or the feature cache), so cached and
live features are treated alike.

- **Modality dropout** hides a whole modality from some training samples: every modality's path
  learns to classify on its own, and the model has seen samples with a modality missing before
  it meets them at test time. The hidden modality is masked out exactly as a missing one is (its
  tokens do not enter the sequence-wise attention and its modality-wise weight is 0).
- **Modality swap** gives some training samples one modality of another sample of the batch (a
  product photo with another product's title), keeping their labels: the model learns that a
  modality can be misleading, and the sequence-wise attention can learn to notice when image
  and text disagree, so that the modality-wise weights move away from the swapped modality.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["drop_modalities", "swap_modalities"]


def drop_modalities(
    masks: Mapping[str, Tensor], p: float, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Hide one modality of a random subset of samples by clearing its token mask.

    Each sample with at least two present modalities loses, with probability ``p``, one of
    them, chosen uniformly among its present ones. A sample never loses its last modality.

    Args:
        masks: Modality → ``(B, N)`` bool token masks (True = real token).
        p: Probability in ``[0, 1]`` that a sample loses a modality.
        generator: Random source (default: torch's global generator).

    Returns:
        New masks; the inputs are not modified.

    Raises:
        ValueError: ``p`` outside ``[0, 1]``, or masks that are not ``(B, N)`` bool tensors
            of one batch size.

    Examples:
        >>> masks = {"image": torch.ones(4, 3, dtype=torch.bool),
        ...          "text": torch.ones(4, 5, dtype=torch.bool)}
        >>> dropped = drop_modalities(masks, 1.0, torch.Generator().manual_seed(0))
        >>> [int(dropped["image"][i].any()) + int(dropped["text"][i].any()) for i in range(4)]
        [1, 1, 1, 1]
    """
    _check(masks, p)
    names = list(masks)
    out = dict(masks)
    if p == 0.0 or len(names) < 2:
        return out
    device = masks[names[0]].device
    present = torch.stack([masks[name].any(dim=1) for name in names], dim=1).cpu()
    batch = present.shape[0]
    drop = (torch.rand(batch, generator=generator) < p) & (present.sum(dim=1) >= 2)
    # A uniform choice among the present modalities: the largest random key wins.
    keys = torch.rand(batch, len(names), generator=generator).masked_fill(~present, -1.0)
    chosen = keys.argmax(dim=1)
    for index, name in enumerate(names):
        hide = (drop & (chosen == index)).to(device)
        out[name] = masks[name] & ~hide[:, None]
    return out


def swap_modalities(
    tokens: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    p: float,
    modality: str,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Give a random subset of samples the ``modality`` of another sample of the batch.

    Each sample is chosen with probability ``p``; a chosen sample takes the tokens and mask
    of ``modality`` from a different sample (drawn uniformly among the others), its other
    modalities and its labels unchanged. A batch of one sample is returned unchanged.

    Args:
        tokens: Modality → ``(B, N, C)`` tokens.
        masks: Modality → ``(B, N)`` bool token masks.
        p: Probability in ``[0, 1]`` that a sample gets a swapped ``modality``.
        modality: The modality to swap, e.g. ``"text"``.
        generator: Random source (default: torch's global generator).

    Returns:
        New ``(tokens, masks)``; the inputs are not modified.

    Raises:
        ValueError: ``p`` outside ``[0, 1]``, ``modality`` not among the inputs, tokens and
            masks with different modalities or shapes.

    Examples:
        >>> tokens = {"text": torch.arange(4.0).view(4, 1, 1), "image": torch.zeros(4, 2, 1)}
        >>> masks = {m: torch.ones(t.shape[:2], dtype=torch.bool) for m, t in tokens.items()}
        >>> swapped, _ = swap_modalities(tokens, masks, 1.0, "text", torch.Generator())
        >>> bool((swapped["text"].flatten() != torch.arange(4.0)).all())
        True
    """
    _check(masks, p)
    if set(tokens) != set(masks):
        raise ValueError(f"tokens and masks name different modalities: {sorted(tokens)} vs "
                         f"{sorted(masks)}")
    for name, value in tokens.items():
        if value.dim() != 3 or value.shape[:2] != masks[name].shape:
            raise ValueError(f"tokens[{name!r}]: expected (B, N, C) matching its (B, N) mask")
    if modality not in masks:
        raise ValueError(f"modality: {modality!r} is not among the inputs {sorted(masks)}")
    out_tokens, out_masks = dict(tokens), dict(masks)
    batch = masks[modality].shape[0]
    if p == 0.0 or batch < 2:
        return out_tokens, out_masks
    chosen = torch.rand(batch, generator=generator) < p
    # Another sample for each: a uniform offset in [1, B) never lands on the sample itself.
    offsets = torch.randint(1, batch, (batch,), generator=generator)
    source = torch.where(chosen, (torch.arange(batch) + offsets) % batch, torch.arange(batch))
    source = source.to(masks[modality].device)
    out_tokens[modality] = tokens[modality][source]
    out_masks[modality] = masks[modality][source]
    return out_tokens, out_masks


def _check(masks: Mapping[str, Tensor], p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: expected a probability in [0, 1], got {p}")
    for name, mask in masks.items():
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise ValueError(f"masks[{name!r}]: expected a (B, N) bool tensor")
    sizes = {mask.shape[0] for mask in masks.values()}
    if len(sizes) > 1:
        raise ValueError(f"masks disagree on the batch size: {sorted(sizes)}")
