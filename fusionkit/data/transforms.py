"""Image transforms built from a timm-style data config.

A vision backbone states how it wants its pixels (``input_size``, ``mean``, ``std``,
``interpolation``, ``crop_pct``: the dict timm's ``resolve_data_config`` returns). This module
turns that config into a PIL → tensor transform with timm's own ``create_transform``, so fusionkit
preprocesses exactly as the backbone was trained, plus a stable text key for caching features.

The training recipe is deliberately light for product images: a mild random resized crop that
keeps at least 80% of the picture (the product must stay in view) and horizontal flips. It has
no colour jitter, because colour is often a label.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from timm.data import (
    DEFAULT_CROP_PCT,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    create_transform,
)

from fusionkit.errors import ConfigError

__all__ = ["build_image_transform", "image_data_config", "transform_key"]

# Bump when the meaning of a key changes (a new recipe), so old feature caches are not reused.
_KEY_VERSION = "fusionkit-image-v1"
_TRAIN_SCALE = (0.8, 1.0)
_TRAIN_RATIO = (0.9, 1 / 0.9)
_TRAIN_HFLIP = 0.5
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
_CROP_MODES = ("center", "squash", "border")


@dataclass(frozen=True)
class _Resolved:
    """A validated data config with timm's defaults filled in."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float
    crop_mode: str


def _triple(config: Mapping[str, Any], key: str, default: Sequence[float]) -> tuple[float, ...]:
    value = config.get(key, default)
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, Sequence)
        or len(value) != 3
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise ConfigError(f"data config {key!r}: expected 3 numbers, got {value!r}")
    return tuple(float(v) for v in value)


def _resolve(data_config: Mapping[str, Any]) -> _Resolved:
    if not isinstance(data_config, Mapping):
        raise ConfigError(f"data config must be a mapping, got {type(data_config).__name__}")
    if "input_size" not in data_config:
        raise ConfigError(
            f"data config has no 'input_size' (3, H, W); keys found: {sorted(data_config)}"
        )
    size = data_config["input_size"]
    if (
        isinstance(size, (str, bytes))
        or not isinstance(size, Sequence)
        or len(size) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
        or size[0] != 3
    ):
        raise ConfigError(f"data config 'input_size': expected (3, H, W) > 0, got {size!r}")
    mean = _triple(data_config, "mean", IMAGENET_DEFAULT_MEAN)
    std = _triple(data_config, "std", IMAGENET_DEFAULT_STD)
    if not all(s > 0 for s in std):
        raise ConfigError(f"data config 'std': every value must be > 0, got {std}")
    interpolation = data_config.get("interpolation", "bicubic")
    if interpolation not in _INTERPOLATIONS:
        raise ConfigError(
            f"data config 'interpolation': unknown {interpolation!r}; "
            f"known: {list(_INTERPOLATIONS)}"
        )
    crop_pct = data_config.get("crop_pct", DEFAULT_CROP_PCT)
    if crop_pct is None:
        crop_pct = DEFAULT_CROP_PCT
    number = isinstance(crop_pct, (int, float)) and not isinstance(crop_pct, bool)
    if not number or not 0 < crop_pct <= 1:
        raise ConfigError(f"data config 'crop_pct': expected a number in (0, 1], got {crop_pct!r}")
    crop_mode = data_config.get("crop_mode") or "center"
    if crop_mode not in _CROP_MODES:
        raise ConfigError(
            f"data config 'crop_mode': unknown {crop_mode!r}; known: {list(_CROP_MODES)}"
        )
    return _Resolved((3, size[1], size[2]), mean, std, interpolation, float(crop_pct), crop_mode)


def image_data_config(
    backbone_config: Mapping[str, Any], image_size: int | None = None
) -> dict[str, Any]:
    """A vision backbone's data config, with ``input_size`` set to ``image_size``.

    Args:
        backbone_config: The encoder's timm data config (``encoder.data_config``).
        image_size: Square side in pixels, or ``None`` for the backbone's own.

    Returns:
        A data config for `build_image_transform`.

    Examples:
        >>> image_data_config({"input_size": (3, 224, 224), "crop_pct": 0.9}, 96)["input_size"]
        (3, 96, 96)
    """
    config = dict(backbone_config)
    if image_size is not None:
        config["input_size"] = (3, image_size, image_size)
    return config


def build_image_transform(
    data_config: Mapping[str, Any], train: bool = False
) -> Callable[[Image.Image], torch.Tensor]:
    """Build the PIL → normalised tensor transform a backbone expects.

    Args:
        data_config: timm-style data config: ``input_size`` ``(3, H, W)`` (required), ``mean``,
            ``std``, ``interpolation``, ``crop_pct`` and ``crop_mode`` (timm's ImageNet defaults
            when absent).
        train: Training transform (mild random resized crop keeping >= 80% of the area, aspect
            0.9-1.11, horizontal flip, no colour jitter) instead of the evaluation one (resize,
            center crop by ``crop_pct``).

    Returns:
        A picklable callable mapping an RGB PIL image to a float tensor ``(3, H, W)``.

    Raises:
        ConfigError: A config value is missing, of the wrong type or out of range.

    Examples:
        >>> from PIL import Image
        >>> transform = build_image_transform({"input_size": (3, 32, 32)})
        >>> transform(Image.new("RGB", (50, 40))).shape
        torch.Size([3, 32, 32])
    """
    config = _resolve(data_config)
    common = {
        "input_size": config.input_size,
        "interpolation": config.interpolation,
        "mean": config.mean,
        "std": config.std,
    }
    if train:
        return create_transform(
            is_training=True,
            scale=_TRAIN_SCALE,
            ratio=_TRAIN_RATIO,
            hflip=_TRAIN_HFLIP,
            color_jitter=None,
            **common,
        )
    return create_transform(
        is_training=False, crop_pct=config.crop_pct, crop_mode=config.crop_mode, **common
    )


def _numbers(values: Sequence[float]) -> str:
    return ",".join(repr(float(v)) for v in values)


def transform_key(data_config: Mapping[str, Any], train: bool = False) -> str:
    """A stable text that names the transform :func:`build_image_transform` would build.

    Two configs give the same key exactly when they give the same transform (defaults are filled
    in first), so the key can name a cache of preprocessed images or image features.

    Args:
        data_config: The same data config as for :func:`build_image_transform`.
        train: Key of the training transform instead of the evaluation one.

    Returns:
        A one-line string: version, ``train`` or ``eval``, input size, interpolation, the crop
        recipe, mean and std, joined by ``/``.

    Raises:
        ConfigError: The config is invalid (as for :func:`build_image_transform`).

    Examples:
        >>> transform_key({"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3})[:54]
        'fusionkit-image-v1/eval/3x32x32/bicubic/crop_pct=0.875'
    """
    config = _resolve(data_config)
    if train:
        recipe = (
            f"train/rrc_scale={_numbers(_TRAIN_SCALE)}/rrc_ratio={_numbers(_TRAIN_RATIO)}"
            f"/hflip={_TRAIN_HFLIP!r}/no_color_jitter"
        )
    else:
        recipe = f"eval/crop_pct={config.crop_pct!r}/crop_mode={config.crop_mode}"
    head, _, tail = recipe.partition("/")
    size = "x".join(map(str, config.input_size))
    return (
        f"{_KEY_VERSION}/{head}/{size}/{config.interpolation}/{tail}"
        f"/mean={_numbers(config.mean)}/std={_numbers(config.std)}"
    )


def input_image_configs(model: Any) -> dict[str, dict[str, Any]]:
    """The data config of each image input of a model, at the model's ``image_size``.

    Args:
        model: A :class:`~fusionkit.models.CMACLIP` (anything with ``inputs_of_kind``,
            ``encoder_of`` and ``config.image_size``).

    Returns:
        Image input name → data config for :func:`build_image_transform`; empty for a model
        without image inputs.

    Examples:
        >>> configs = input_image_configs(model)  # doctest: +SKIP
        >>> {name: build_image_transform(c) for name, c in configs.items()}  # doctest: +SKIP
    """
    return {
        name: image_data_config(model.encoder_of(name).data_config, model.config.image_size)
        for name in model.inputs_of_kind("image")
    }
