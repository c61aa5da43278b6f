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

import collections.abc
import copy
import difflib
import inspect
import os
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from fusionkit import registry
from fusionkit.config.base import Section
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
    "model", "vision", "text", "fusion", "head", "unimodal_heads", "tasks", "image_size"
)
#: Sections of a run config; in a model config (old checkpoints) only ``data.image_size`` is read.
RUN_KEYS = ("data", "train")

_MISSING = object()


def matches_type(value: Any, hint: Any) -> bool:
    """Whether a config value (YAML scalars, lists, mappings) fits a type hint.

    ``bool`` is not an ``int`` here, an ``int`` is a ``float``, ``Literal`` values must match
    in type too, and ``list[X]`` checks its items. Hints of other objects (paths, modules)
    accept anything: the component that takes them validates them.

    Args:
        value: The value as read from YAML.
        hint: A resolved type hint.

    Returns:
        True if the value fits.

    Examples:
        >>> matches_type(3, int | None), matches_type(True, int)
        (True, False)
    """
    origin = typing.get_origin(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    container = origin or hint
    if container in (dict, Mapping, collections.abc.Mapping):
        return isinstance(value, Mapping)
    if container is list:
        items = typing.get_args(hint)
        return isinstance(value, list) and all(matches_type(v, items[0]) for v in value if items)
    if container in (tuple, Sequence, collections.abc.Sequence):
        return isinstance(value, (list, tuple))
    return True


def _type_hints(factory: Any) -> dict[str, Any]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        return typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: skip type checks, the component validates
        return {}


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
class ComponentConfig:
    """One registered component: its ``name`` and constructor options.

    Attributes:
        kind: The registry kind.
        name: The registered name.
        options: Keyword arguments for the constructor (beyond those the model fills in).
    """

    kind: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(
        cls,
        kind: str,
        section: Any,
        path: str,
        *,
        default_name: str | None = None,
        reserved: tuple[str, ...] = (),
    ) -> ComponentConfig:
        """Read a ``{name: ..., option: value, ...}`` section and check it against the
        component's constructor.

        Args:
            kind: Registry kind of the component.
            section: The raw section (a mapping).
            path: Key path for error messages (e.g. ``"fusion.sequence"``).
            default_name: Used when the section has no ``name``.
            reserved: Constructor arguments the model fills in; setting them is an error.

        Raises:
            ConfigError: Unknown component name, unknown option, wrong value type, or an
                option the model sets itself.
        """
        if not isinstance(section, Mapping):
            raise ConfigError(f"{path}: expected a mapping with a 'name', got {section!r}")
        options = dict(section)
        name = options.pop("name", default_name)
        if not isinstance(name, str):
            raise ConfigError(f"{path}.name: expected a registered {kind} name, got {name!r}")
        try:
            factory = registry.get(kind, name).factory
        except RegistryError as error:
            raise ConfigError(f"{path}.name: {error}") from None
        parameters = inspect.signature(factory).parameters
        hints = _type_hints(factory)
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        named = [
            n
            for n, p in parameters.items()
            if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
            and n not in reserved
            and n != "self"
        ]
        for key, value in options.items():
            where = f"{path}.{key}"
            if not isinstance(key, str):
                raise ConfigError(f"{path}: option names must be strings, got {key!r}")
            if key in reserved:
                raise ConfigError(f"{where}: set by the model, not in the config")
            if key not in parameters:
                # Extra options go to the component's **kwargs (e.g. timm's); one a letter or
                # two off a named argument is a typo, not an extra.
                if takes_any and not difflib.get_close_matches(key, named, n=1, cutoff=0.85):
                    continue
                raise ConfigError(
                    f"{where}: unknown option for {kind} {name!r}; {did_you_mean(key, named)}"
                )
            hint = hints.get(key, inspect.Parameter.empty)
            if not matches_type(value, hint):
                shown = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
                raise ConfigError(f"{where}: expected {shown}, got {value!r}")
        missing = [
            n
            for n in named
            if parameters[n].default is inspect.Parameter.empty and n not in options
        ]
        if missing:
            raise ConfigError(f"{path}: missing required option(s) {missing} for {kind} {name!r}")
        return cls(kind, name, options)

    def to_dict(self) -> dict[str, Any]:
        """The section as written in a config."""
        return {"name": self.name, **copy.deepcopy(self.options)}


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
        vision: The vision encoder, or ``None`` for a text-only model.
        text: The text encoder, or ``None`` for an image-only model.
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
    vision: ComponentConfig | None
    text: ComponentConfig | None
    fusion: FusionConfig
    head: ComponentConfig
    tasks: dict[str, TaskSpec]
    unimodal_loss_weight: float | None = None
    image_size: int | None = None

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities the model uses, in the column order of its modality weights."""
        return tuple(m for m, c in (("text", self.text), ("image", self.vision)) if c is not None)

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
        vision = config.get("vision", DEFAULT_VISION)
        text = config.get("text", DEFAULT_TEXT)
        if vision is None and text is None:
            raise ConfigError("vision and text are both null: a model needs at least one modality")
        if "tasks" not in config:
            raise ConfigError(
                "tasks: missing; give at least one task, e.g. {color: {classes: [a, b]}}"
            )
        return cls(
            model=model,
            vision=None
            if vision is None
            else ComponentConfig.parse("vision_encoder", vision, "vision", default_name="timm"),
            text=None
            if text is None
            else ComponentConfig.parse(
                "text_encoder", text, "text", default_name="sentence_transformers"
            ),
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
        out: dict[str, Any] = {
            "model": self.model,
            "vision": None if self.vision is None else self.vision.to_dict(),
            "text": None if self.text is None else self.text.to_dict(),
            "fusion": self.fusion.to_dict(),
            "head": self.head.to_dict(),
            "tasks": {name: spec.to_dict() for name, spec in self.tasks.items()},
        }
        if self.unimodal_loss_weight is not None:
            out["unimodal_heads"] = {"loss_weight": self.unimodal_loss_weight}
        if self.image_size is not None:
            out["image_size"] = self.image_size
        return out
