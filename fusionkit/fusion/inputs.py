"""Validation and output types shared by the fusion components."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fusionkit.errors import ConfigError, ShapeError

__all__ = [
    "FusionOutput",
    "check_dims",
    "check_input_dims",
    "check_modality_inputs",
    "check_records_attention",
    "check_token_inputs",
]


@dataclass
class FusionOutput:
    """What a sequence fusion returns.

    Attributes:
        summaries: Modality → fused summary embedding ``(B, dim)``; zeros for a sample that
            lacks the modality.
        present: Modality → ``(B,)`` bool, True where the sample has that modality.
        tokens: Modality → fused token outputs ``(B, N_m, dim)`` (zeros at padding), when
            asked for with ``return_tokens=True``.
        masks: Modality → ``(B, N_m)`` bool masks of ``tokens``.
        attentions: With ``return_attention=True``: per layer, the attention probabilities
            ``(B, heads, L, L)`` over the concatenated sequence (summary tokens included).
        spans: Modality → ``(start, end)`` of its positions in that sequence; position
            ``start`` holds the modality's summary token.
    """

    summaries: dict[str, Tensor]
    present: dict[str, Tensor]
    tokens: dict[str, Tensor] | None = None
    masks: dict[str, Tensor] | None = None
    attentions: list[Tensor] | None = None
    spans: dict[str, tuple[int, int]] | None = None


def check_dims(dim: int, heads: int, layers: int) -> None:
    """Validate the shared sequence-fusion hyper-parameters.

    Raises:
        ValueError: A size is not positive, or ``heads`` does not divide ``dim``.
    """
    for name, value in (("dim", dim), ("heads", heads), ("layers", layers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if dim % heads:
        raise ValueError(f"heads ({heads}) must divide dim ({dim}); dim / heads is the head size")


def check_input_dims(input_dims: Mapping[str, int]) -> dict[str, int]:
    """Validate ``input_dims`` (modality → token width).

    Raises:
        ValueError: Empty, or a width that is not a positive int.
    """
    if not isinstance(input_dims, Mapping) or not input_dims:
        raise ValueError(f"input_dims must map modality name to token width, got {input_dims!r}")
    for name, width in input_dims.items():
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"input_dims[{name!r}] must be a positive int, got {width!r}")
    return dict(input_dims)


def check_token_inputs(
    tokens: Mapping[str, Tensor],
    masks: Mapping[str, Tensor] | None,
    input_dims: Mapping[str, int],
) -> tuple[int, dict[str, Tensor]]:
    """Validate per-modality token tensors and masks.

    Args:
        tokens: Modality → ``(B, N_m, C_m)`` with ``C_m == input_dims[m]``; modalities may be
            left out (absent for the whole batch), but not all of them.
        masks: Modality → ``(B, N_m)`` bool, True = real token; missing entries mean all real.
        input_dims: The widths the component was built for.

    Returns:
        The batch size and a complete dict of masks for the given modalities.

    Raises:
        ShapeError: An unknown modality, wrong rank or width, mismatched batch, or a mask of
            the wrong shape or dtype (a ``ValueError`` naming the argument).
    """
    if not isinstance(tokens, Mapping) or not tokens:
        raise ShapeError("tokens must be a non-empty dict of modality -> (B, N, C) tensor")
    masks = dict(masks or {})
    unknown = (set(tokens) | set(masks)) - set(input_dims)
    if unknown:
        raise ShapeError(
            f"unknown modality {sorted(unknown)}; this component was built for {list(input_dims)}"
        )
    batch = None
    complete: dict[str, Tensor] = {}
    for name, x in tokens.items():
        if not isinstance(x, Tensor) or x.dim() != 3:
            got = f"rank {x.dim()}" if isinstance(x, Tensor) else type(x).__name__
            raise ShapeError(f"tokens[{name!r}] must have shape (B, N, C), got {got}")
        if x.shape[-1] != input_dims[name]:
            raise ShapeError(
                f"tokens[{name!r}] must have width C = {input_dims[name]}, "
                f"got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ShapeError(f"tokens[{name!r}] must be floating point, got {x.dtype}")
        if batch is None:
            batch = x.shape[0]
        elif x.shape[0] != batch:
            raise ShapeError(
                f"tokens[{name!r}] has batch size {x.shape[0]}, but an earlier modality has {batch}"
            )
        mask = masks.get(name)
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        elif not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise ShapeError(f"masks[{name!r}] must be a bool tensor (True = real token)")
        elif tuple(mask.shape) != tuple(x.shape[:2]):
            raise ShapeError(
                f"masks[{name!r}] must have shape (B, N) = {tuple(x.shape[:2])}, "
                f"got {tuple(mask.shape)}"
            )
        complete[name] = mask
    extra = set(masks) - set(tokens)
    if extra:
        raise ShapeError(f"masks given for modalities without tokens: {sorted(extra)}")
    assert batch is not None
    return batch, complete


def check_modality_inputs(
    embeddings: Mapping[str, Tensor],
    present: Mapping[str, Tensor] | None,
    modalities: Sequence[str],
    dim: int,
) -> tuple[Tensor, Tensor]:
    """Stack per-modality embeddings into ``(B, M, dim)`` with a ``(B, M)`` presence matrix.

    A modality missing from ``embeddings`` is absent for the whole batch; its row is zeros.

    Raises:
        ShapeError: Unknown modality, wrong shape, mismatched batch, bad ``present``, or a
            sample with no modality present.
    """
    if not isinstance(embeddings, Mapping) or not embeddings:
        raise ShapeError("embeddings must be a non-empty dict of modality -> (B, dim) tensor")
    present = dict(present or {})
    unknown = (set(embeddings) | set(present)) - set(modalities)
    if unknown:
        raise ShapeError(f"unknown modality {sorted(unknown)}; expected some of {list(modalities)}")
    reference = next(iter(embeddings.values()))
    batch = reference.shape[0] if isinstance(reference, Tensor) and reference.dim() else None
    rows, flags = [], []
    for name in modalities:
        x = embeddings.get(name)
        if x is None:
            rows.append(None)
            flags.append(None)
            continue
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ShapeError(f"embeddings[{name!r}] must have shape (B, {dim}), got {shape}")
        if x.shape[0] != batch:
            raise ShapeError(f"embeddings[{name!r}] has batch size {x.shape[0]}, expected {batch}")
        flag = present.get(name)
        if flag is None:
            flag = torch.ones(batch, dtype=torch.bool, device=x.device)
        elif (
            not isinstance(flag, Tensor)
            or flag.dtype != torch.bool
            or tuple(flag.shape) != (batch,)
        ):
            raise ShapeError(f"present[{name!r}] must be a (B,) = ({batch},) bool tensor")
        rows.append(x)
        flags.append(flag)
    extra = set(present) - set(embeddings)
    if extra:
        raise ShapeError(f"present given for modalities without embeddings: {sorted(extra)}")
    like = next(x for x in rows if x is not None)
    stacked = torch.stack([like.new_zeros(like.shape) if x is None else x for x in rows], dim=1)
    mask = torch.stack(
        [
            torch.zeros(batch, dtype=torch.bool, device=like.device) if f is None else f
            for f in flags
        ],
        dim=1,
    )
    if not bool(mask.any(dim=1).all()):
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        raise ShapeError(f"samples {empty[:10]} have no modality present; nothing to fuse")
    # Absent rows may hold anything (even NaN); zero them so they cannot leak into the sum.
    stacked = stacked.masked_fill(~mask[..., None], 0.0)
    return stacked, mask


def check_records_attention(fusion: nn.Module) -> None:
    """Fail clearly when a sequence fusion cannot record its attention probabilities.

    Every sequence fusion takes ``forward(tokens, masks, *, return_tokens=False,
    return_attention=False)``; one that cannot record attention raises `ConfigError` itself
    when asked to. A plugin written without the keyword is caught here, before the call,
    instead of failing with a ``TypeError`` inside it.

    Args:
        fusion: A sequence-fusion module.

    Raises:
        ConfigError: ``fusion.forward`` takes no ``return_attention`` keyword.

    Examples:
        >>> try:
        ...     check_records_attention(nn.Identity())
        ... except ConfigError as error:
        ...     print(str(error).split(":")[0])
        sequence fusion Identity cannot record attention probabilities
    """
    parameters = inspect.signature(fusion.forward).parameters
    if "return_attention" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    ):
        return
    raise ConfigError(
        f"sequence fusion {type(fusion).__name__} cannot record attention probabilities: its "
        "forward takes no return_attention keyword (every sequence fusion should take "
        "forward(tokens, masks, *, return_tokens=False, return_attention=False))"
    )
