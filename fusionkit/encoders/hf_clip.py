"""Hugging Face CLIP-family checkpoints (CLIP, SigLIP) as fusionkit encoders.

A folder saved with ``save_pretrained`` holding a dual encoder (``CLIPModel``, ``SiglipModel``)
or one tower alone serves as the ``vision_encoder`` ``"huggingface"``
(`HuggingFaceVisionEncoder`) and as the ``text_encoder`` ``"huggingface"`` (whose CLIP helpers
live here). Each encoder keeps only its tower; projections and the other tower are dropped.
Both mark the token their backbone pools in `EncoderOutput.summary`:

| tower | tokens | summary |
| --- | --- | --- |
| CLIP text | last hidden state (after the final layer norm) | the end-of-text token |
| SigLIP text | last hidden state (after the final layer norm) | the last position |
| CLIP vision | last hidden state (before ``post_layernorm``), class token first | 0 |
| SigLIP vision | last hidden state (after ``post_layernorm``), patches only | none |

So ``text_projection(summary token)`` is CLIP's text embedding and
``visual_projection(post_layernorm(summary token))`` its image embedding; SigLIP pools its
image tokens with an attention head (``head``), not a token. ``transformers`` is imported
when an encoder is built, never at import.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from fusionkit.encoders.base import EncoderOutput, FreezableEncoder, check_images
from fusionkit.encoders.weights import enforce_offline_mode, looks_like_path
from fusionkit.errors import CheckpointError, ConfigError, FusionkitError, ShapeError
from fusionkit.registry import register

__all__ = [
    "PREPROCESSOR_FILE",
    "TEXT_POOLING",
    "HuggingFaceVisionEncoder",
    "encode_text_tower",
    "eos_positions",
    "load_hf_model",
    "resolve_model_dir",
    "text_tower",
    "vision_data_config",
]

#: The image processor's settings in a model folder, read for `vision_data_config`.
PREPROCESSOR_FILE = "preprocessor_config.json"

#: ``model_type`` of a text tower → where it pools: ``"eos"`` (CLIP: the end-of-text token)
#: or ``"last"`` (SigLIP and SigLIP 2: the last position, after padding to ``max_length``).
TEXT_POOLING: Mapping[str, str] = MappingProxyType(
    {"clip_text_model": "eos", "siglip_text_model": "last", "siglip2_text_model": "last"}
)

# model_type of a vision tower → its family.
_VISION_FAMILY = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
# Classes loaded as config.json's ``architectures`` names them (others go through AutoModel).
_KNOWN_CLASSES = {
    f"{family}{tower}Model" for family in ("CLIP", "Siglip") for tower in ("", "Text", "Vision")
}
_KNOWN_CLASSES |= {"CLIPTextModelWithProjection", "CLIPVisionModelWithProjection"}
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# Preprocessing of each family when the folder has no preprocessor_config.json.
_DEFAULT_PREPROCESSING: dict[str, dict[str, Any]] = {
    "clip": dict(mean=_OPENAI_MEAN, std=_OPENAI_STD, interpolation="bicubic", crop_mode="center"),
    "siglip": dict(mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic", crop_mode="squash"),
}
# PIL's resampling filters by number, as the image processors save them.
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def resolve_model_dir(name_or_path: str | os.PathLike[str]) -> Path:
    """The local folder of a Hugging Face model; hub ids are refused, nothing is downloaded.

    Args:
        name_or_path: A folder saved with ``save_pretrained``.

    Returns:
        The folder.

    Raises:
        CheckpointError: The path is missing, is a file, or holds no ``config.json``.
        ConfigError: The name is no local path (e.g. a hub id such as ``"org/model"``).

    Examples:
        >>> resolve_model_dir("openai/clip-vit-base-patch32")  # doctest: +SKIP
        ConfigError: 'openai/clip-vit-base-patch32' is not a local folder; ...
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ConfigError(f"model_name_or_path must be a folder path, got {name_or_path!r}")
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"{text!r} holds no config.json; it is not a model folder saved with "
                "save_pretrained()"
            )
        return path
    if path.exists():
        raise CheckpointError(f"{text!r} is a file; expected a model folder")
    if looks_like_path(text):
        raise CheckpointError(f"model folder {text!r} does not exist")
    raise ConfigError(
        f"{text!r} is not a local folder; fusionkit never downloads from a model hub. Save the "
        "model with save_pretrained() where it is available and pass that folder's path"
    )


def load_hf_model(path: Path, *, pretrained: bool = True) -> nn.Module:
    """Load a model folder: CLIP and SigLIP as the class ``config.json`` names (so a
    ``CLIPVisionModelWithProjection`` or ``SiglipTextModel`` folder, which ``AutoModel`` loads
    as another class or not at all, keeps every weight), any other with ``AutoModel``.

    Args:
        path: A local folder saved with ``save_pretrained``.
        pretrained: ``False`` builds the architecture from ``config.json`` with random
            weights (for a fusionkit checkpoint that holds the weights itself).

    Returns:
        The ``transformers`` model, on the CPU.

    Raises:
        CheckpointError: The checkpoint lacks weights of the model, or names a class this
            ``transformers`` version does not have.
        OSError, ValueError: ``transformers`` cannot read the folder.

    Examples:
        >>> type(load_hf_model(Path("models/clip"))).__name__  # doctest: +SKIP
        'CLIPModel'
    """
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    architectures = getattr(config, "architectures", None) or []
    name = next((a for a in architectures if a in _KNOWN_CLASSES), None)
    if name is None:
        if not pretrained:
            return transformers.AutoModel.from_config(config)
        return transformers.AutoModel.from_pretrained(path, local_files_only=True)
    model_class = getattr(transformers, name, None)
    if model_class is None:
        raise CheckpointError(
            f"{path} holds a {name}, which transformers {transformers.__version__} does not have"
        )
    if not pretrained:
        return model_class(config)
    model, info = model_class.from_pretrained(path, local_files_only=True, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise CheckpointError(
            f"{path}: the checkpoint lacks {len(missing)} weight(s) of {name} "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})"
        )
    return model


def text_tower(model: nn.Module) -> nn.Module:
    """The text tower of a dual encoder (its ``text_model``), or the model itself.

    Args:
        model: A loaded ``transformers`` model.

    Returns:
        ``model.text_model`` for CLIP, SigLIP and other dual encoders, else ``model``.

    Raises:
        ConfigError: The model is a vision tower.

    Examples:
        >>> type(text_tower(clip_model)).__name__  # doctest: +SKIP
        'CLIPTextModel'
    """
    tower = getattr(model, "text_model", None)
    tower = tower if isinstance(tower, nn.Module) else model
    model_type = getattr(getattr(tower, "config", None), "model_type", None)
    if model_type in _VISION_FAMILY:
        raise ConfigError(
            f"{type(model).__name__} is a vision model; use it as vision: "
            "{name: huggingface, ...}"
        )
    return tower


def eos_positions(tower: nn.Module, input_ids: Tensor) -> Tensor:
    """The position CLIP's text tower pools: its end-of-text token, as transformers finds it.

    Configs written before transformers PR #24773 say ``eos_token_id = 2``; for them the
    end-of-text token is the largest id of each row (``argmax``). Otherwise it is the first
    ``eos_token_id`` of each row (the padding token may be the same id).

    Args:
        tower: The CLIP text tower (it or its config holds ``eos_token_id``).
        input_ids: Long tensor ``(B, T)``.

    Returns:
        Long tensor ``(B,)`` on the device of ``input_ids``.

    Examples:
        >>> eos_positions(tower, torch.tensor([[62, 5, 63, 63]]))  # doctest: +SKIP
        tensor([2])
    """
    eos = getattr(tower, "eos_token_id", None)
    if eos is None:
        eos = tower.config.eos_token_id
    ids = input_ids.to(torch.int)  # what transformers does (for ONNX)
    if eos == 2:
        return ids.argmax(dim=-1)
    return (ids == eos).int().argmax(dim=-1)


def encode_text_tower(
    tower: nn.Module, pooling: str | None, model_inputs: Mapping[str, Tensor]
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run a text tower: its tokens, their mask, and the position it pools.

    ``"last"`` (SigLIP) runs without the attention mask, as SigLIP was trained (on ids padded
    to ``max_length``, the padding being the end-of-text id); the pooled last position joins
    the mask even where it is padding.

    Args:
        tower: The ``transformers`` text model.
        pooling: A value of `TEXT_POOLING`, or ``None`` for BERT-style encoders.
        model_inputs: The tokenizer's tensors (``input_ids``, ``attention_mask``...), on the
            tower's device.

    Returns:
        ``(tokens (B, T, C), mask (B, T) bool, summary (B,) long or None)``.

    Examples:
        >>> tokens, mask, summary = encode_text_tower(tower, "eos", inputs)  # doctest: +SKIP
    """
    input_ids = model_inputs["input_ids"]
    mask = model_inputs["attention_mask"].bool()
    if pooling == "last":
        inputs = {key: value for key, value in model_inputs.items() if key != "attention_mask"}
        tokens = tower(**inputs, return_dict=True).last_hidden_state
        last = input_ids.shape[1] - 1
        mask = mask.clone()
        mask[:, last] = True
        summary = torch.full(input_ids.shape[:1], last, dtype=torch.long, device=mask.device)
        return tokens, mask, summary
    tokens = tower(**model_inputs, return_dict=True).last_hidden_state
    summary = eos_positions(tower, input_ids).long() if pooling == "eos" else None
    return tokens, mask, summary


def _side(value: Any, key: str) -> tuple[str, int, int]:
    """``size``/``crop_size`` of an image processor → (kind, height, width)."""
    if isinstance(value, Mapping) and "shortest_edge" in value:
        value = value["shortest_edge"]
    if isinstance(value, int) and not isinstance(value, bool):
        return "shortest", value, value
    if isinstance(value, Mapping) and {"height", "width"} <= set(value):
        return "exact", int(value["height"]), int(value["width"])
    raise ValueError(f"{key}={value!r} is neither an int, {{shortest_edge}} nor {{height, width}}")


def _interpolation(resample: Any) -> str:
    name = _RESAMPLE.get(resample) if isinstance(resample, int) else str(resample).lower()
    if name not in _RESAMPLE.values():
        raise ValueError(f"unknown resample={resample!r}")
    return name


def vision_data_config(path: Path, config: Any, family: str) -> dict[str, Any]:
    """The timm-style data config of a CLIP or SigLIP folder, from its image processor.

    From ``preprocessor_config.json``: ``input_size`` is the crop (or, without a crop, the
    resize), ``mean``/``std`` are ``image_mean``/``image_std``, ``interpolation`` comes from
    ``resample`` (3 bicubic, 2 bilinear), ``crop_pct`` is crop / resize (1.0 when they are
    equal). A shortest-edge resize gives ``crop_mode="center"``; a resize to height × width
    (SigLIP) gives ``"squash"`` (the aspect ratio is not kept). Without the file: the tower's
    ``image_size``, ``crop_pct`` 1.0 and the family's preprocessing (CLIP: OpenAI's mean/std,
    bicubic, center; SigLIP: 0.5 mean/std, bicubic, squash).

    Args:
        path: The model folder.
        config: The vision tower's config (``image_size``, ``num_channels``).
        family: ``"clip"`` or ``"siglip"``.

    Returns:
        ``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``.

    Raises:
        CheckpointError: ``preprocessor_config.json`` is unreadable or of an unknown form.

    Examples:
        >>> vision_data_config(Path("models/clip"), vision_config, "clip")  # doctest: +SKIP
        {'input_size': (3, 224, 224), 'mean': (0.4815, ...), 'crop_pct': 1.0, ...}
    """
    channels = int(getattr(config, "num_channels", 3))
    defaults = _DEFAULT_PREPROCESSING[family]
    file = path / PREPROCESSOR_FILE
    if not file.is_file():
        size = int(config.image_size)
        return {"input_size": (channels, size, size), **defaults, "crop_pct": 1.0}
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(raw, Mapping):
            raise ValueError("expected a JSON object")
        kind, height, width = _side(raw.get("size", config.image_size), "size")
        crop_pct, crop_mode = 1.0, "center" if kind == "shortest" else "squash"
        if raw.get("do_center_crop", "crop_size" in raw) and raw.get("crop_size") is not None:
            _, crop_height, crop_width = _side(raw["crop_size"], "crop_size")
            crop_pct = min(1.0, crop_height / height)
            height, width = crop_height, crop_width
        resample = raw.get("resample")
        interpolation = defaults["interpolation"] if resample is None else _interpolation(resample)
        return {
            "input_size": (channels, height, width),
            "mean": tuple(float(v) for v in raw.get("image_mean", defaults["mean"])),
            "std": tuple(float(v) for v in raw.get("image_std", defaults["std"])),
            "interpolation": interpolation,
            "crop_pct": crop_pct,
            "crop_mode": crop_mode,
        }
    except (OSError, UnicodeDecodeError, TypeError, ValueError) as error:
        raise CheckpointError(f"cannot read the preprocessing of {file}: {error}") from None


@register("vision_encoder", "huggingface")
class HuggingFaceVisionEncoder(FreezableEncoder):
    """The vision tower of a Hugging Face CLIP or SigLIP folder, as image tokens.

    Accepts a folder holding ``CLIPModel`` (its ``vision_model``), ``CLIPVisionModel``,
    ``CLIPVisionModelWithProjection``, ``SiglipModel`` or ``SiglipVisionModel``. Only the
    vision tower is kept.

    Tokens are the tower's last hidden state. CLIP puts its class token first
    (``num_prefix_tokens = 1``, ``summary`` 0): CLIP's image embedding is
    ``visual_projection(post_layernorm(tokens[:, 0]))``. SigLIP has no class token
    (``num_prefix_tokens = 0``, ``summary`` None): it pools every patch token with an
    attention head (the tower's ``head``), so no single token is its summary.

    Args:
        model_name_or_path: A local folder saved with ``save_pretrained``; hub ids are refused.
        pretrained: ``False`` builds the tower from ``config.json`` with random weights (what
            loading a fusionkit checkpoint does: the checkpoint holds the weights).
        freeze: Stop gradients to every tower parameter and keep the tower in eval mode even
            after ``.train()``.
        interpolate_pos_encoding: Interpolate the position embeddings for images of another
            size than the checkpoint's ``image_size``; without it such images are refused.

    Attributes:
        model: The vision tower (e.g. ``CLIPVisionModel``).
        model_name_or_path: The folder, as given.
        family: ``"clip"`` or ``"siglip"``.
        in_chans: Input channels (the config's ``num_channels``, 3).
        width: Channels ``C`` of every token (the tower's ``hidden_size``).
        num_prefix_tokens: 1 for CLIP (the class token), 0 for SigLIP.
        data_config: timm-style preprocessing: ``input_size``, ``mean``, ``std``,
            ``interpolation``, ``crop_pct``, ``crop_mode``, from the folder's
            ``preprocessor_config.json``; without that file, the config's ``image_size`` and
            the family's usual values (see `vision_data_config`).
        frozen: Whether the tower is frozen.

    Raises:
        ConfigError: The name is no local path (a hub id), or the folder holds no CLIP or
            SigLIP vision tower.
        CheckpointError: The folder is missing, lacks weights, or cannot be read.

    Examples:
        >>> encoder = HuggingFaceVisionEncoder("models/clip-vit-b32")  # doctest: +SKIP
        >>> encoder(torch.randn(2, 3, 224, 224)).tokens.shape  # doctest: +SKIP
        torch.Size([2, 50, 768])
    """

    def __init__(
        self,
        model_name_or_path: str,
        pretrained: bool = True,
        freeze: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(pretrained, bool):
            raise ConfigError(
                f"pretrained must be True (the folder's weights) or False, got {pretrained!r}"
            )
        path = resolve_model_dir(model_name_or_path)
        enforce_offline_mode()
        try:
            model = load_hf_model(path, pretrained=pretrained)
        except FusionkitError:
            raise
        except (OSError, ValueError) as error:
            raise CheckpointError(f"cannot load a vision model from {path}: {error}") from error
        tower = getattr(model, "vision_model", None)
        tower = tower if isinstance(tower, nn.Module) else model
        family = _VISION_FAMILY.get(getattr(tower.config, "model_type", ""))
        if family is None:
            raise ConfigError(
                f"{path} holds a {type(model).__name__}, not a CLIP or SigLIP vision model "
                "(CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection, SiglipModel, "
                "SiglipVisionModel)"
            )
        self.model = tower
        self.model_name_or_path = os.fspath(model_name_or_path)
        self.family = family
        self.interpolate_pos_encoding = bool(interpolate_pos_encoding)
        self.in_chans = int(getattr(tower.config, "num_channels", 3))
        self.width = int(tower.config.hidden_size)
        self.num_prefix_tokens = 1 if family == "clip" else 0
        self.data_config = vision_data_config(path, tower.config, family)
        self._set_frozen(freeze)

    def _check_images(self, images: Tensor) -> None:
        expected = f"(B, {self.in_chans}, H, W)"
        check_images(images, shape=expected, channels=self.in_chans)
        size = int(self.model.config.image_size)
        if not self.interpolate_pos_encoding and tuple(images.shape[2:]) != (size, size):
            raise ShapeError(
                f"images: {self.model_name_or_path} encodes {size}x{size} images, got "
                f"{tuple(images.shape)}; resize them or pass interpolate_pos_encoding=True"
            )
        weight = next(self.model.parameters())
        if images.device != weight.device:
            raise ShapeError(
                f"images: on {images.device}, but the backbone is on {weight.device}; "
                f"move them with images.to({str(weight.device)!r})"
            )

    def forward(self, images: Tensor) -> EncoderOutput:
        """Encode images into tokens.

        Args:
            images: Float tensor ``(B, 3, H, W)``, preprocessed as `data_config` says (any
                float dtype: the tower casts to its own).

        Returns:
            Tokens ``(B, N, width)`` (CLIP: the class token, then one per patch; SigLIP: one
            per patch), an all-``True`` mask, ``summary`` (zeros for CLIP, None for SigLIP).

        Raises:
            ShapeError: ``images`` is not a finite float ``(B, 3, H, W)`` tensor on the tower's
                device, or not ``image_size`` square without ``interpolate_pos_encoding``.

        Examples:
            >>> encoder(torch.randn(1, 3, 224, 224)).summary  # doctest: +SKIP
            tensor([0])
        """
        self._check_images(images)
        tokens = self.model(
            pixel_values=images,
            interpolate_pos_encoding=self.interpolate_pos_encoding,
            return_dict=True,
        ).last_hidden_state
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        summary = torch.zeros_like(mask[:, 0], dtype=torch.long) if self.num_prefix_tokens else None
        return EncoderOutput(tokens=tokens, mask=mask, summary=summary)

    def forward_features(self, images: Tensor) -> EncoderOutput:
        """Same as `forward`."""
        return self.forward(images)
