"""open_clip CLIP towers as encoders: the image and the text tower of one checkpoint.

Both take ``model_name`` (an ``open_clip.list_models()`` name such as ``"ViT-B-32"``) and
``pretrained`` (``False`` or a local checkpoint file). Nothing is downloaded: hub tags
(``"openai"``) are refused, and so are models whose towers or tokenizer come from Hugging Face.

One checkpoint feeds both towers and is read once (see `fusionkit.encoders.open_clip_loading`):
the first encoder loads the whole CLIP model, keeps its tower and leaves the other in a
one-entry cache for the second encoder. The cache never holds a tower an encoder owns, so no
weight is held twice; call `clear_cache` after building a model that uses one tower only, to
free the other.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fusionkit.encoders.base import EncoderOutput, FreezableEncoder, check_images
from fusionkit.encoders.open_clip_loading import (
    TEXT_PARTS,
    clear_cache,
    import_open_clip,
    take_tower,
)
from fusionkit.encoders.text import PRESENT_KEY, check_text_inputs, check_texts
from fusionkit.errors import ConfigError, ShapeError
from fusionkit.registry import register

__all__ = ["OpenCLIPTextEncoder", "OpenCLIPTokenizer", "OpenCLIPVisionEncoder", "clear_cache"]

# open_clip's default preprocessing, the one of a checkpoint file (which records none).
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# open_clip's resize_mode -> timm's crop_mode. shortest: resize the short side, centre crop
# ("center" at crop_pct 1); squash: resize both sides; longest: resize the long side and pad
# ("border", which pads with the mean colour where open_clip pads with black).
_CROP_MODES = {"shortest": "center", "squash": "squash", "longest": "border"}
class _Tower(FreezableEncoder):
    """What both towers share: freezing, and ``embed_dim`` from the head."""

    width: int

    def _finish(self, freeze: bool) -> None:
        with torch.no_grad():
            self.embed_dim = int(self.project(torch.zeros(1, self.width)).shape[-1])
        self._set_frozen(freeze)

    def project(self, pooled: Tensor) -> Tensor:
        raise NotImplementedError


def _data_config(preprocess: Mapping[str, Any], image_size: tuple[int, ...]) -> dict[str, Any]:
    """open_clip's preprocessing config as a timm-style data config."""
    interpolation = preprocess.get("interpolation", "bicubic")
    return {
        "input_size": (3, *image_size),
        "mean": tuple(float(v) for v in preprocess.get("mean", _OPENAI_MEAN)),
        "std": tuple(float(v) for v in preprocess.get("std", _OPENAI_STD)),
        "interpolation": interpolation if interpolation in ("bilinear", "nearest") else "bicubic",
        "crop_pct": 1.0,
        "crop_mode": _CROP_MODES.get(preprocess.get("resize_mode", "shortest"), "center"),
    }


@register("vision_encoder", "open_clip")
class OpenCLIPVisionEncoder(_Tower):
    """The image tower (a ViT) of an open_clip CLIP model as a sequence of image tokens.

    Tokens are the transformer's outputs for the class token and every patch after
    ``ln_post`` (open_clip's own token output), before the pooling and ``proj``: the class
    token is the summary, and `project` (``@ proj``) of it is ``model.encode_image``. For a
    model with ``final_ln_after_pool`` the tokens are taken before ``ln_post``, which
    `project` then applies, so `project` always reproduces ``encode_image``.

    Args:
        model_name: An ``open_clip.list_models()`` name, e.g. ``"ViT-B-32"``.
        pretrained: ``False`` for random init, or a local open_clip checkpoint file (``.pt``,
            ``.pth``, ``.bin``, ``.safetensors``; read with ``weights_only``).
        freeze: Stop gradients to the tower and keep it in eval mode after ``.train()``.

    Attributes:
        visual: open_clip's ``VisionTransformer`` (its parameters keep open_clip's names).
        width: Channels ``C`` of every token; ``embed_dim``: size of `project`'s output.
        num_prefix_tokens: 1, the class token before the patch tokens.
        image_size: ``(H, W)``, the only input size the tower takes (``in_chans``: 3).
        data_config: timm-style preprocessing (``input_size``, ``mean``, ``std``,
            ``interpolation``, ``crop_pct``, ``crop_mode``) from open_clip's config.
        frozen: Whether the tower is frozen.

    Raises:
        ConfigError: Unknown or unsupported model, ``pretrained`` is ``True`` or a hub tag.
        CheckpointError: The file is missing or does not fit the model.
        MissingDependencyError: open_clip is not installed.

    Examples:
        >>> encoder = OpenCLIPVisionEncoder("ViT-B-32")
        >>> out = encoder(torch.randn(2, 3, 224, 224))
        >>> out.tokens.shape, out.summary
        (torch.Size([2, 50, 768]), tensor([0, 0]))
    """

    def __init__(
        self, model_name: str, pretrained: bool | str | os.PathLike[str] = False,
        freeze: bool = False,
    ) -> None:
        super().__init__()
        self.visual, _ = take_tower(model_name, pretrained, "vision")
        self.model_name = model_name
        self.width = int(self.visual.conv1.out_channels)
        self.num_prefix_tokens = 1
        self.in_chans = 3
        self.image_size = tuple(int(side) for side in self.visual.image_size)
        self.data_config = _data_config(self.visual.preprocess_cfg, self.image_size)
        self._finish(freeze)

    def forward(self, images: Tensor) -> EncoderOutput:
        """Encode images into the class token and the patch tokens.

        Args:
            images: Float tensor ``(B, 3, H, W)`` at `image_size`, preprocessed as
                `data_config` says.

        Returns:
            Tokens ``(B, 1 + patches, width)`` (patch dropout, in training, may leave out
            patches), an all-True mask, and ``summary`` 0, the class token (``None`` for a
            model that pools by averaging the patches).

        Raises:
            ShapeError: ``images`` is not finite, not at `image_size`, or on another
                device or of another dtype than the tower.
        """
        visual = self.visual
        expected = f"(B, 3, {self.image_size[0]}, {self.image_size[1]})"
        check_images(images, shape=expected)
        if tuple(images.shape[1:]) != (3, *self.image_size):
            raise ShapeError(
                f"images: open_clip {self.model_name!r} takes shape {expected}, got "
                f"{tuple(images.shape)}; resize to data_config['input_size']"
            )
        weight = visual.conv1.weight
        autocast = torch.is_autocast_enabled(images.device.type)
        if images.device != weight.device or (images.dtype != weight.dtype and not autocast):
            raise ShapeError(f"images: {images.dtype} on {images.device}; the tower: "
                             f"{weight.dtype} on {weight.device}")
        x = visual.conv1(images).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.transformer(visual.ln_pre(visual.patch_dropout(x)))
        tokens = x if visual.final_ln_after_pool else visual.ln_post(x)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        summary = None
        if visual.pool_type == "tok":
            summary = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        return EncoderOutput(tokens=tokens, mask=mask, summary=summary)

    def project(self, pooled: Tensor) -> Tensor:
        """The checkpoint's own head: a pooled token ``(B, width)`` to the CLIP embedding.

        Args:
            pooled: E.g. ``forward(images).summary_tokens()``.

        Returns:
            ``(B, embed_dim)``: open_clip's ``encode_image`` for the summary token.
        """
        if self.visual.final_ln_after_pool:
            pooled = self.visual.ln_post(pooled)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled


class OpenCLIPTokenizer:
    """open_clip's BPE tokenizer with the parts of a Hugging Face tokenizer fusionkit uses.

    A piece ending in ``"</w>"`` ends a word; one without it continues into the next piece
    (``"fu"``, ``"sion"``, ``"kit</w>"``).

    Args:
        tokenizer: An ``open_clip.tokenizer.SimpleTokenizer``.

    Attributes:
        all_special_ids: ``[sot_token_id, eot_token_id]``, the start- and end-of-text ids.

    Examples:
        >>> encoder.tokenizer.convert_ids_to_tokens([320, 736, 2595])  # doctest: +SKIP
        ['a</w>', 'red</w>', 'dress</w>']
    """

    pad_token_id = 0

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.sot_token_id = int(tokenizer.sot_token_id)
        self.eot_token_id = int(tokenizer.eot_token_id)
        self.all_special_ids = [self.sot_token_id, self.eot_token_id]

    def encode(self, text: str) -> list[int]:
        """The piece ids of ``text``, without the start and end ids."""
        return list(self.tokenizer.encode(text))

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        """The BPE piece of one id, or the pieces of a list of ids."""
        if isinstance(ids, (list, tuple)):
            return [self.tokenizer.decoder[int(i)] for i in ids]
        return self.tokenizer.decoder[int(ids)]


@functools.lru_cache(maxsize=4)
def _tokenizer(clean: str) -> OpenCLIPTokenizer:
    return OpenCLIPTokenizer(import_open_clip().SimpleTokenizer(clean=clean))


@register("text_encoder", "open_clip")
class OpenCLIPTextEncoder(_Tower):
    """The causal text transformer of an open_clip CLIP model as a sequence of word tokens.

    Tokens are the per-token outputs after ``ln_final``, before the pooling and
    ``text_projection``; the summary is the position the model pools (the end-of-text
    token, by open_clip's ``argmax`` or ``eos`` rule), so `project` of it is
    ``model.encode_text``. Under the causal mask no token sees a later one, so padding to the
    batch's longest text gives the tokens of open_clip's fixed context length.

    Args:
        model_name: An ``open_clip.list_models()`` name, e.g. ``"ViT-B-32"``.
        pretrained: ``False`` or a local checkpoint file (see `OpenCLIPVisionEncoder`).
        max_length: Longest token sequence, start and end ids included; default and
            maximum the model's context length (77 for CLIP).
        freeze: Stop gradients and keep eval mode after ``.train()``.

    Attributes:
        tokenizer: An `OpenCLIPTokenizer`.
        width: Channels ``C`` of every token; ``embed_dim``: size of `project`'s output.
        context_length: The model's context length; ``max_length``: the truncation length.
        frozen: Whether the tower is frozen.

    Raises:
        ConfigError: Unknown or unsupported model, bad ``pretrained`` or ``max_length``.
        CheckpointError: The file is missing or does not fit the model.
        MissingDependencyError: open_clip is not installed.

    Examples:
        >>> encoder = OpenCLIPTextEncoder("ViT-B-32")
        >>> out = encoder(["a red dress", None])
        >>> out.tokens.shape, out.summary, out.mask[1].any()
        (torch.Size([2, 5, 512]), tensor([4, 1]), tensor(False))
    """

    def __init__(
        self, model_name: str, pretrained: bool | str | os.PathLike[str] = False,
        max_length: int | None = None, freeze: bool = False,
    ) -> None:
        super().__init__()
        parts, config = take_tower(model_name, pretrained, "text")
        self.model_name = model_name
        self.context_length = limit = parts["context_length"]
        max_length = limit if max_length is None else max_length
        if type(max_length) is not int or not 2 <= max_length <= limit:
            raise ConfigError(f"max_length must be an int in [2, {limit}], got {max_length!r}")
        self.max_length = max_length
        for name in TEXT_PARTS:
            setattr(self, name, parts[name])
        projection = parts["text_projection"]
        if isinstance(projection, nn.Module):
            self.text_projection = projection
        else:
            self.register_parameter("text_projection", projection)
        self.register_buffer("attn_mask", parts["attn_mask"], persistent=False)
        self.pool_type: str = parts["pool_type"]
        self.eos_id: int | None = parts["eos_id"]
        self.width = int(self.transformer.width)
        clean = (config["text_cfg"].get("tokenizer_kwargs") or {}).get("clean", "lower")
        self.tokenizer = _tokenizer(clean)
        self._finish(freeze)

    def tokenize(self, texts: Sequence[str | None]) -> dict[str, Tensor]:
        """Tokenize a batch, padding with 0 to its longest text, truncating at `max_length`
        (a truncated text ends with the end-of-text id, as in open_clip).

        Args:
            texts: One text per sample; ``None`` marks a missing text (encoded as ``""``).

        Returns:
            ``input_ids`` and ``attention_mask`` ``(B, T)`` (True up to and including the
            end-of-text id), and `PRESENT_KEY` ``(B,)``.

        Raises:
            ShapeError: ``texts`` is a single string, empty, or holds a non-string.
        """
        checked = check_texts(texts)
        sot, eot = self.tokenizer.all_special_ids
        pieces = [[sot, *self.tokenizer.encode(text or "")] for text in checked]
        rows = [[*ids[: self.max_length - 1], eot] for ids in pieces]
        lengths = torch.tensor([len(ids) for ids in rows])
        input_ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
        for row, ids in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids)
        return {
            "input_ids": input_ids,
            "attention_mask": (torch.arange(input_ids.shape[1]) < lengths[:, None]).long(),
            PRESENT_KEY: torch.tensor([text is not None for text in checked]),
        }

    def _inputs(self, texts: Any, text_inputs: Any) -> dict[str, Tensor]:
        if (texts is None) == (text_inputs is None):
            given = "both" if texts is not None else "neither"
            raise ShapeError(f"give exactly one of texts or text_inputs; got {given}")
        if texts is not None:
            return self.tokenize(texts)
        inputs = check_text_inputs(text_inputs, required=("input_ids",))
        ids = inputs["input_ids"]
        if ids.is_floating_point():
            raise ShapeError("text_inputs['input_ids']: expected an integer tensor (B, T)")
        if ids.shape[1] > self.context_length:
            raise ShapeError(f"text_inputs: {ids.shape[1]} tokens exceed {self.context_length}")
        inputs.setdefault("attention_mask", torch.ones_like(ids))
        return inputs

    def forward(
        self,
        texts: Sequence[str | None] | None = None,
        text_inputs: Mapping[str, Tensor] | None = None,
    ) -> EncoderOutput:
        """Encode raw texts or the output of `tokenize` into per-token features.

        Args:
            texts: One text per sample (``None`` for a missing text); tokenized here.
            text_inputs: The output of `tokenize`; without `PRESENT_KEY` every text counts
                as present.

        Returns:
            Tokens ``(B, T, width)``; mask ``(B, T)`` True up to and including the
            end-of-text token, all False for a missing text; ``summary`` the pooled position.

        Raises:
            ShapeError: Both or neither input given, or malformed ``text_inputs``.
        """
        inputs = self._inputs(texts, text_inputs)
        device = self.token_embedding.weight.device
        ids = inputs["input_ids"].to(device=device, dtype=torch.long)
        length, cast = ids.shape[1], self.transformer.get_cast_dtype()
        x = self.token_embedding(ids).to(cast) + self.positional_embedding[:length].to(cast)
        tokens = self.ln_final(self.transformer(x, attn_mask=self.attn_mask[:length, :length]))
        if self.pool_type == "argmax":
            summary = ids.argmax(dim=-1)
        elif self.pool_type == "eos":
            summary = (ids == self.eos_id).int().argmax(dim=-1)
        else:  # "first"
            summary = torch.zeros(ids.shape[0], dtype=torch.long, device=device)
        mask = inputs["attention_mask"].to(device).bool()
        if PRESENT_KEY in inputs:
            mask = mask & inputs[PRESENT_KEY].to(device=device, dtype=torch.bool)[:, None]
        return EncoderOutput(tokens=tokens, mask=mask, summary=summary)

    def project(self, pooled: Tensor) -> Tensor:
        """The checkpoint's own head: a pooled token ``(B, width)`` to the CLIP embedding.

        Args:
            pooled: E.g. ``forward(texts).summary_tokens()``.

        Returns:
            ``(B, embed_dim)``: open_clip's ``encode_text`` for the summary token.
        """
        projection = self.text_projection
        if projection is None:
            return pooled
        return projection(pooled) if isinstance(projection, nn.Module) else pooled @ projection
