"""Named training recipes: points on the speed/quality curve, as ``--preset NAME``.

A preset is a partial run config (model, ``data`` and ``train`` keys). ``fusionkit train``
without ``--config`` uses :data:`DEFAULT_PRESET`; with a config, ``--preset`` fills in what the
config leaves out (the config wins, key by key). Every preset trains CMA-CLIP with unimodal
heads (a head per modality beside the fused one, see `fusionkit.models.unimodal`), blends the
fused and unimodal heads on validation data after every epoch, keeps the epoch whose blended
model has the highest validation accuracy and stops when it has not improved for 3 epochs.
Then it trains a text-only and an image-only model with the same recipe and blends the three
on validation data (``train.unimodal_models``, see `fusionkit.training.members`), so that the
result does not end below its best single modality nor below their late fusion. The presets
differ in what they fine-tune:

| preset | encoders | cost |
|---|---|---|
| ``fast`` | both frozen: tokens encoded once into the feature cache | minutes on a CPU |
| ``medium`` (default) | text encoder fine-tuned, image tokens cached | about 3-4x ``fast`` |
| ``best`` | both encoders fine-tuned, images augmented | a GPU is advised |

Their accuracy and time on the real sets are in ``docs/results/presets.md``.

Examples:
    >>> sorted(PRESETS)
    ['best', 'fast', 'medium']
    >>> apply_preset({"train": {"epochs": 3}}, "fast")["train"]["epochs"]
    3
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from fusionkit.config import DEFAULT_TEXT, DEFAULT_VISION
from fusionkit.errors import ConfigError

__all__ = ["DEFAULT_PRESET", "PRESETS", "apply_preset"]

_SHARED: dict[str, Any] = {
    "model": "cma_clip",
    "vision": DEFAULT_VISION,
    "text": DEFAULT_TEXT,
    "fusion": {
        "dim": 256, "sequence": {"name": "transformer", "layers": 1, "heads": 4,
                     "summary": "mean"},
        "modality": {"name": "keyless"},
    },
    "head": {"name": "mlp", "hidden_dim": 256, "dropout": 0.1},
    "unimodal_heads": {"loss_weight": 1.0},
    "train": {
        "epochs": 10,
        "lr": 1.0e-3,
        "lr_backbone": 5.0e-5,
        "best_metric": "accuracy",
        "early_stopping": 3,
        "unimodal_models": True,
    },
}


#: Keys that say which component a section builds: a section naming another one replaces the
#: preset's instead of merging into it (a ``resnet18`` must not inherit EfficientNet weights).
_IDENTITY_KEYS = ("name", "model_name", "model_name_or_path")


def _merge(base: Any, override: Any) -> Any:
    """``override`` over ``base``, recursively for mappings; ``override`` wins elsewhere."""
    if not isinstance(base, Mapping) or not isinstance(override, Mapping):
        return copy.deepcopy(override)
    if any(k in override and k in base and override[k] != base[k] for k in _IDENTITY_KEYS):
        return copy.deepcopy(dict(override))
    merged = dict(copy.deepcopy(base))
    for key, value in override.items():
        merged[key] = _merge(merged.get(key), value) if key in merged else copy.deepcopy(value)
    return merged


def _variant(**changes: Any) -> dict[str, Any]:
    preset = copy.deepcopy(_SHARED)
    for key, value in changes.items():
        preset[key] = _merge(preset.get(key), value) if isinstance(value, Mapping) else value
    return preset


#: Preset name → partial run config.
PRESETS: dict[str, dict[str, Any]] = {
    "fast": _variant(),
    "medium": _variant(text={"freeze": False}),
    "best": _variant(vision={"freeze": False}, text={"freeze": False}),
}
#: The preset of ``fusionkit train`` without ``--config``.
DEFAULT_PRESET = "medium"


def apply_preset(config: Mapping[str, Any], preset: str) -> dict[str, Any]:
    """A run config with a preset's keys filled in wherever ``config`` does not set them.

    Mappings merge key by key, except a component section that names another component
    (``name``, ``model_name`` or ``model_name_or_path``), which replaces the preset's. A key set
    to ``null`` in ``config`` stays ``null`` (``vision: null`` gives a text-only model with the
    preset's recipe).

    Args:
        config: The raw run config (as read from YAML).
        preset: A name in :data:`PRESETS`.

    Returns:
        The merged config (a new mapping).

    Raises:
        ConfigError: An unknown preset name.

    Examples:
        >>> apply_preset({"vision": None}, "medium")["vision"] is None
        True
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(sorted(PRESETS))}")
    return _merge(PRESETS[preset], config)
