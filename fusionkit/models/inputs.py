"""A model's named inputs: which encoder reads each, and encoding them with shared encoders.

Inputs that share an encoder (``share:`` in the config) run through it together: raw texts
are tokenised and encoded in one call, images of one size in one batch, and the tokens are
split back per input. Pre-tokenised texts (``text_inputs``, padded per input) run one call per
input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fusionkit.config import ModelConfig
from fusionkit.encoders.base import check_images
from fusionkit.errors import ShapeError

__all__ = ["TextInputs", "build_encoders", "encode_inputs", "owner_of"]

#: A text input given pre-tokenised: the text encoder's ``tokenize`` output.
TextInputs = Mapping[str, Tensor]
#: The legacy attributes of the ``vision:`` / ``text:`` shorthand, by input name.
SHORTHAND_ATTRIBUTES = {"image": "vision", "text": "text"}


def owner_of(config: ModelConfig, name: str) -> str:
    """The input whose encoder ``name`` uses (itself unless it shares one)."""
    return config.inputs[name].share or name


def build_encoders(config: ModelConfig) -> dict[str, nn.Module]:
    """One encoder per input that owns one (shared inputs reuse their owner's).

    Args:
        config: The model config.

    Returns:
        Owning input name → its encoder module, built from the registry.
    """
    from fusionkit import registry
    from fusionkit.config.inputs import ENCODER_KINDS

    return {
        name: registry.create(ENCODER_KINDS[spec.kind], spec.encoder.name, **spec.encoder.options)
        for name, spec in config.inputs.items()
        if spec.encoder is not None
    }


def _split(out: Any, sizes: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
    tokens = out.tokens.split(list(sizes))
    masks = out.mask.split(list(sizes))
    return list(zip(tokens, masks, strict=True))


def encode_inputs(
    config: ModelConfig,
    encoder_of: Callable[[str], nn.Module],
    run: Callable[..., Any],
    given: Mapping[str, Any],
    labels: Mapping[str, str] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Encode every given input, running each encoder once on all the inputs that share it.

    Args:
        config: The model config (the inputs' kinds and owners).
        encoder_of: Input name → its encoder module.
        run: Calls an encoder (``run(encoder, *args, **kwargs)``), e.g. without gradients for
            a frozen one.
        given: Input name → ``(B, 3, H, W)`` images, a list of ``B`` texts (``None`` for a
            missing one), or pre-tokenised `TextInputs`.
        labels: Input name → the name the caller gave it by (e.g. ``images``), for messages;
            by default ``inputs['name']``.

    Returns:
        ``(tokens, masks)``: input name → ``(B, N, C)`` and ``(B, N)`` bool, in the order of
        ``config.inputs``.

    Raises:
        ShapeError: An input the model lacks, or images that are not a finite float
            ``(B, C, H, W)`` tensor.
    """
    groups: dict[str, list[str]] = {}
    for name in given:
        if name not in config.inputs:
            raise ShapeError(f"no input {name!r}: the model's inputs are {list(config.inputs)}")
        groups.setdefault(owner_of(config, name), []).append(name)
    encoded: dict[str, tuple[Tensor, Tensor]] = {}
    for owner, names in groups.items():
        encoder = encoder_of(owner)
        if config.inputs[owner].kind == "image":
            for name in names:
                check_images(given[name], (labels or {}).get(name, f"inputs[{name!r}]"))
            shapes = {tuple(given[name].shape[1:]) for name in names}
            if len(shapes) == 1:
                batch = torch.cat([given[name] for name in names])
                parts = _split(run(encoder, batch), [len(given[name]) for name in names])
                encoded.update(zip(names, parts, strict=True))
            else:
                for name in names:
                    out = run(encoder, given[name])
                    encoded[name] = (out.tokens, out.mask)
            continue
        raw = [name for name in names if not isinstance(given[name], Mapping)]
        if len(raw) == 1:  # the encoder checks the texts itself
            out = run(encoder, texts=given[raw[0]])
            encoded[raw[0]] = (out.tokens, out.mask)
        elif raw:
            for name in raw:
                if isinstance(given[name], (str, bytes)) or not isinstance(given[name], Sequence):
                    raise ShapeError(
                        f"inputs[{name!r}]: expected a list of texts, got {type(given[name])}"
                    )
            texts = [text for name in raw for text in given[name]]
            parts = _split(run(encoder, texts=texts), [len(given[name]) for name in raw])
            encoded.update(zip(raw, parts, strict=True))
        for name in names:
            if name not in raw:
                out = run(encoder, text_inputs=given[name])
                encoded[name] = (out.tokens, out.mask)
    order = [name for name in config.inputs if name in encoded]
    return {n: encoded[n][0] for n in order}, {n: encoded[n][1] for n in order}
