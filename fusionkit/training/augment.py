"""Training-time augmentation of fused inputs: modality dropout.

Hiding a whole modality from some training samples makes every modality's path learn to
classify on its own, so the fused model does not lean on whichever modality fits the training
set first, and it has seen samples with a modality missing before it meets them at test time.
The hidden modality is masked out exactly as a missing one is (its tokens do not enter the
sequence-wise attention and its modality-wise weight is 0), so cached and live features are
treated alike.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["drop_modalities"]


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

    Example:
        >>> masks = {"image": torch.ones(4, 3, dtype=torch.bool),
        ...          "text": torch.ones(4, 5, dtype=torch.bool)}
        >>> dropped = drop_modalities(masks, 1.0, torch.Generator().manual_seed(0))
        >>> [int(dropped["image"][i].any()) + int(dropped["text"][i].any()) for i in range(4)]
        [1, 1, 1, 1]
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: expected a probability in [0, 1], got {p}")
    names = list(masks)
    for name in names:
        mask = masks[name]
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise ValueError(f"masks[{name!r}]: expected a (B, N) bool tensor")
    sizes = {masks[name].shape[0] for name in names}
    if len(sizes) > 1:
        raise ValueError(f"masks disagree on the batch size: {sorted(sizes)}")
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
