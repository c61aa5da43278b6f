"""Typed model configuration, read from a dict or YAML with errors that name the key path.

```yaml
model: cma_clip
vision: {name: timm, model_name: tf_efficientnet_lite0, pretrained: efficientnet_lite0}
text:   {name: sentence_transformers, model_name_or_path: all-MiniLM-L6-v2, freeze: true}
fusion:
  sequence: {name: transformer, dim: 256, layers: 1, heads: 4, attention_backend: auto}
  modality: {name: keyless}
head: {name: mlp, hidden_dim: 256, dropout: 0.1}
unimodal_heads: {loss_weight: 1.0}    # optional: a head per modality, trained beside the fused one
tasks:
  color:   {classes: [black, blue, red]}
  pattern: {classes: [plain, striped, floral], multi_label: true}
```

``vision`` / ``text`` left out take the offline pretrained defaults (EfficientNet-Lite0 and
all-MiniLM-L6-v2, frozen); ``null`` leaves that modality out (single-modality baselines).
``fusion.sequence: null`` is the paper's "without sequence-wise attention" ablation. The width
of the fused tokens is ``fusion.dim``, its one place. ``image_size`` (from ``data.image_size``
of a run config) is the side of the model's input images, kept with the model because
inference needs it.

Fixed sections (``unimodal_heads``; ``data`` and ``train`` of a run config) are pydantic
models (see `fusionkit.config.base`). A component section's schema is its constructor, known
only once the component is registered (plugins included): every key beyond ``name`` is an
argument of that constructor, checked against its signature and type hints here. Either way
an error names the key path and suggests the closest accepted key.

A model config carries no training data: the ``data`` and ``train`` sections belong to the
run config (`fusionkit.config.run.RunConfig`). Configs saved by earlier versions (checkpoints
included) still load: their ``data.image_size`` is read, the rest of those sections ignored,
and a width given as ``fusion.sequence.dim`` is read as ``fusion.dim``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from fusionkit import registry
from fusionkit.config.base import Section
from fusionkit.config.component import ComponentConfig, matches_type
from fusionkit.config.inputs import InputConfig, parse_inputs, shorthand_inputs
from fusionkit.errors import ConfigError, RegistryError, did_you_mean
from fusionkit.io import read_yaml
from fusionkit.tasks import TaskSpec, parse_tasks

__all__ = [
    "DEFAULT_TEXT",
    "DEFAULT_VISION",
    "ComponentConfig",
    "FusionConfig",
    "ModelConfig",
    "matches_type",
]

DEFAULT_VISION: dict[str, Any] = {
    "name": "timm",
    "model_name": "tf_efficientnet_lite0",
    "pretrained": "efficientnet_lite0",
    "freeze": True,
}
DEFAULT_TEXT: dict[str, Any] = {
    "name": "sentence_transformers",
    "model_name_or_path": "all-MiniLM-L6-v2",
    "freeze": True,
    "max_length": 64,
}
DEFAULT_DIM = 256
TOP_LEVEL_KEYS = (
    "model", "inputs", "vision", "text", "fusion", "head", "unimodal_heads", "tasks",
    "image_size",
)
#: Sections of a run config; in a model config (old checkpoints) only ``data.image_size`` is read.
RUN_KEYS = ("data", "train")

_MISSING = object()


def _string_keyed_tasks(tasks: Any) -> Any:
    """Refuse non-string option names in task sections, which `parse_tasks` cannot sort."""
    if isinstance(tasks, Mapping):
        for name, spec in tasks.items():
            if isinstance(spec, Mapping):
                odd = [key for key in spec if not isinstance(key, str)]
                if odd:
                    raise ConfigError(
                        f"tasks.{name}: option names must be strings, got {odd[0]!r}; "
                        "accepted: classes, multi_label, num_classes, weight"
                    )
    return tasks


class UnimodalHeadsConfig(Section):
    """The ``unimodal_heads`` section: a head per modality, trained beside the fused one.

    Attributes:
        loss_weight: Weight of the unimodal heads' losses (> 0).
    """

    loss_weight: float = Field(default=1.0, gt=0.0)


def _unimodal_loss_weight(section: Any) -> float | None:
    """Read ``unimodal_heads``: null (no unimodal heads) or ``{loss_weight: w}`` (default 1)."""
    if section is None:
        return None
    return UnimodalHeadsConfig.parse(section, "unimodal_heads").loss_weight


def _image_size(config: Mapping[str, Any]) -> int | None:
    """``image_size``, or (a config of an earlier version) ``data.image_size``."""
    for key in RUN_KEYS:
        if key in config and not isinstance(config[key], Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {config[key]!r}")
    size = config.get("image_size")
    legacy = config.get("data")
    if isinstance(legacy, Mapping) and legacy.get("image_size") is not None:
        if size is not None and size != legacy["image_size"]:
            raise ConfigError(
                f"image_size ({size}) and data.image_size ({legacy['image_size']}) disagree"
            )
        size = legacy["image_size"]
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ConfigError(f"image_size: expected a positive integer, got {size!r}")
    return size


@dataclass
class FusionConfig:
    """The ``fusion`` section.

    Attributes:
        dim: Width of the fused embeddings.
        sequence: The sequence fusion, or ``None`` for the "without sequence-wise attention"
            ablation.
        modality: The modality fusion, one instance per task.
    """

    dim: int
    sequence: ComponentConfig | None
    modality: ComponentConfig

    @classmethod
    def parse(cls, section: Any, path: str = "fusion") -> FusionConfig:
        """Read the ``fusion`` section.

        Raises:
            ConfigError: Unknown keys, a bad ``dim``, or a bad component section.
        """
        section = {} if section is None else section
        if not isinstance(section, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {section!r}")
        unknown = set(section) - {"dim", "sequence", "modality"}
        if unknown:
            key = sorted(map(str, unknown))[0]
            raise ConfigError(
                f"{path}.{key}: unknown key; {did_you_mean(key, ['dim', 'sequence', 'modality'])}"
            )
        raw_sequence = section.get("sequence", {"name": "transformer"})
        sequence = None
        dim = section.get("dim", _MISSING)
        if raw_sequence is not None:
            if not isinstance(raw_sequence, Mapping):
                raise ConfigError(
                    f"{path}.sequence: expected a mapping or null, got {raw_sequence!r}"
                )
            raw_sequence = dict(raw_sequence)
            seq_dim = raw_sequence.pop("dim", _MISSING)
            if seq_dim is not _MISSING:
                if dim is not _MISSING and dim != seq_dim:
                    raise ConfigError(
                        f"{path}.dim ({dim}) and {path}.sequence.dim ({seq_dim}) disagree; "
                        f"give {path}.dim only"
                    )
                if dim is _MISSING:
                    warnings.warn(
                        f"{path}.sequence.dim is read as {path}.dim, the one place of the "
                        "width; write fusion.dim (saving the model again updates a checkpoint)",
                        FutureWarning,
                        stacklevel=4,
                    )
                dim = seq_dim
            sequence = ComponentConfig.parse(
                "sequence_fusion",
                raw_sequence,
                f"{path}.sequence",
                default_name="transformer",
                reserved=("input_dims", "dim"),
            )
        dim = DEFAULT_DIM if dim is _MISSING else dim
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ConfigError(f"{path}.dim: expected a positive integer, got {dim!r}")
        modality = ComponentConfig.parse(
            "modality_fusion",
            section.get("modality", {"name": "keyless"}),
            f"{path}.modality",
            default_name="keyless",
            reserved=("dim", "modalities"),
        )
        return cls(dim, sequence, modality)

    def to_dict(self) -> dict[str, Any]:
        """The section as written in a config."""
        sequence = None if self.sequence is None else self.sequence.to_dict()
        return {"dim": self.dim, "sequence": sequence, "modality": self.modality.to_dict()}


@dataclass
class ModelConfig:
    """A whole model configuration.

    Build it with `from_dict` or `from_yaml`; `to_dict` writes it back
    (resolved: defaults filled in).

    Attributes:
        model: Registered model name (``"cma_clip"``).
        inputs: Input name → `fusionkit.config.inputs.InputConfig`, in the column order of
            the modality weights; from ``inputs:``, or the ``vision:`` / ``text:`` shorthand.
        vision: The shorthand's vision encoder, or ``None`` (text-only, or ``inputs:``).
        text: The shorthand's text encoder, or ``None`` (image-only, or ``inputs:``).
        fusion: The fusion section.
        head: The head (``mlp`` by default).
        unimodal_loss_weight: With ``unimodal_heads: {loss_weight: w}``, every modality also
            gets heads of its own over its pooled encoder tokens, trained with weight ``w``
            beside the fused head and blended with it after training (see
            `fusionkit.models.unimodal`); ``None`` (the key left out or null): no such heads.
        tasks: Task name → `fusionkit.tasks.TaskSpec`.
        image_size: Side of the square input images in pixels; ``None``: the vision
            backbone's own.

    Examples:
        >>> config = ModelConfig.from_dict({"vision": None, "tasks": {"color": {"num_classes": 3}}})
        >>> config.text.name
        'sentence_transformers'
    """

    model: str
    inputs: dict[str, InputConfig]
    vision: ComponentConfig | None
    text: ComponentConfig | None
    fusion: FusionConfig
    head: ComponentConfig
    tasks: dict[str, TaskSpec]
    unimodal_loss_weight: float | None = None
    image_size: int | None = None

    @property
    def modalities(self) -> tuple[str, ...]:
        """The input names, in the column order of the modality weights."""
        return tuple(self.inputs)

    @property
    def shorthand(self) -> bool:
        """True for a config written with ``vision:`` / ``text:`` rather than ``inputs:``."""
        return self.inputs == shorthand_inputs(self.vision, self.text)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> ModelConfig:
        """Read and validate a config mapping.

        Raises:
            ConfigError: Any problem, with the key path (e.g. ``fusion.sequence.heads``).
        """
        if isinstance(config, ModelConfig):
            return config
        if not isinstance(config, Mapping):
            raise ConfigError(f"a config must be a mapping, got {type(config).__name__}")
        unknown = [k for k in config if k not in (*TOP_LEVEL_KEYS, *RUN_KEYS)]
        if unknown:
            key = str(unknown[0])
            hint = did_you_mean(key, list(TOP_LEVEL_KEYS))
            raise ConfigError(f"{key}: unknown top-level key; {hint}")
        model = config.get("model", "cma_clip")
        if not isinstance(model, str):
            raise ConfigError(f"model: expected a registered model name, got {model!r}")
        try:
            registry.get("model", model)
        except RegistryError as error:
            raise ConfigError(f"model: {error}") from None
        if "inputs" in config:
            both = [key for key in ("vision", "text") if key in config]
            if both:
                raise ConfigError(
                    f"{both[0]}: give the inputs either in inputs or as vision/text, not both"
                )
            vision = text = None
            inputs = parse_inputs(config["inputs"])
        else:
            raw_vision = config.get("vision", DEFAULT_VISION)
            raw_text = config.get("text", DEFAULT_TEXT)
            if raw_vision is None and raw_text is None:
                raise ConfigError(
                    "vision and text are both null: a model needs at least one modality"
                )
            vision = None if raw_vision is None else ComponentConfig.parse(
                "vision_encoder", raw_vision, "vision", default_name="timm"
            )
            text = None if raw_text is None else ComponentConfig.parse(
                "text_encoder", raw_text, "text", default_name="sentence_transformers"
            )
            inputs = shorthand_inputs(vision, text)
        if "tasks" not in config:
            raise ConfigError(
                "tasks: missing; give at least one task, e.g. {color: {classes: [a, b]}}"
            )
        return cls(
            model=model,
            inputs=inputs,
            vision=vision,
            text=text,
            fusion=FusionConfig.parse(config.get("fusion")),
            head=ComponentConfig.parse(
                "head",
                config.get("head", {"name": "mlp"}),
                "head",
                default_name="mlp",
                reserved=("dim", "tasks"),
            ),
            tasks=parse_tasks(_string_keyed_tasks(config["tasks"])),
            unimodal_loss_weight=_unimodal_loss_weight(config.get("unimodal_heads")),
            image_size=_image_size(config),
        )

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> ModelConfig:
        """Read a YAML file (with ``yaml.safe_load``) and validate it."""
        return cls.from_dict(read_yaml(path))

    @classmethod
    def load(cls, config: ModelConfig | Mapping[str, Any] | str | os.PathLike[str]) -> ModelConfig:
        """Accept a `ModelConfig`, a run config (its model), a mapping, or a YAML path."""
        if isinstance(config, ModelConfig):
            return config
        if isinstance(getattr(config, "model", None), ModelConfig):
            return config.model
        if isinstance(config, (str, os.PathLike)):
            return cls.from_yaml(Path(config))
        return cls.from_dict(config)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as a plain mapping that `from_dict` reads back."""
        out: dict[str, Any] = {"model": self.model}
        if self.shorthand:
            out["vision"] = None if self.vision is None else self.vision.to_dict()
            out["text"] = None if self.text is None else self.text.to_dict()
        else:
            out["inputs"] = {name: spec.to_dict() for name, spec in self.inputs.items()}
        out |= {
            "fusion": self.fusion.to_dict(),
            "head": self.head.to_dict(),
            "tasks": {name: spec.to_dict() for name, spec in self.tasks.items()},
        }
        if self.unimodal_loss_weight is not None:
            out["unimodal_heads"] = {"loss_weight": self.unimodal_loss_weight}
        if self.image_size is not None:
            out["image_size"] = self.image_size
        return out
