"""The ``inputs`` section: a model's inputs by name, each with its encoder and manifest column.

```yaml
inputs:
  title:       {encoder: {name: sentence_transformers, model_name_or_path: all-MiniLM-L6-v2},
                column: title}
  description: {share: title, column: description}      # the title's encoder weights
  front:       {encoder: {name: timm, model_name: tf_efficientnet_lite0,
                          pretrained: efficientnet_lite0}, column: image}
  back:        {share: front, column: image_back}
```

An input is an image or a text, as its encoder is a registered ``vision_encoder`` or
``text_encoder``; ``kind: image|text`` settles a name registered as both (``open_clip``;
``huggingface`` without ``kind`` is the text encoder, as it was before its vision encoder).
``share`` reuses another input's encoder: the weights are the same module, run once per batch
on every input that shares it. ``column`` defaults to the input's name. The shorthand
``vision:`` / ``text:`` is the two inputs ``text`` (column ``text``) and ``image`` (column
``image``), in that order.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fusionkit import registry
from fusionkit.config.component import ComponentConfig
from fusionkit.errors import ConfigError, did_you_mean

__all__ = ["ENCODER_KINDS", "InputConfig", "parse_inputs", "shorthand_inputs"]

#: Input kind → the registry kind of its encoders.
ENCODER_KINDS = {"image": "vision_encoder", "text": "text_encoder"}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_KEYS = ("encoder", "share", "column", "kind")
#: Names registered in both kinds that meant one kind before: without ``kind`` they keep it
#: (``huggingface`` was a text encoder only), so configs written then read the same.
_EARLIER_KIND = {"huggingface": "text"}
#: Keys a sample holds beside its inputs' values.
_RESERVED = ("id", "targets")


@dataclass
class InputConfig:
    """One named input of a model.

    Attributes:
        kind: ``"image"`` or ``"text"``.
        column: The manifest column it reads.
        encoder: Its encoder; ``None`` for an input that shares another's.
        share: The input whose encoder it uses, or ``None``.

    Examples:
        >>> spec = parse_inputs({"title": {"encoder": {"name": "huggingface",
        ...     "model_name_or_path": "bert"}}, "body": {"share": "title"}})
        >>> spec["body"].kind, spec["body"].column, spec["body"].share
        ('text', 'body', 'title')
    """

    kind: Literal["image", "text"]
    column: str
    encoder: ComponentConfig | None = None
    share: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The section as written in a config."""
        out: dict[str, Any] = {}
        if self.encoder is not None:
            out["encoder"] = self.encoder.to_dict()
        else:
            out["share"] = self.share
        return {**out, "column": self.column, "kind": self.kind}


def _encoder_kind(name: Any, kind: Any, path: str) -> str:
    """The input kind of an encoder section, from the registries it is found in."""
    if kind is not None:
        if kind not in ENCODER_KINDS:
            raise ConfigError(f"{path}.kind: expected 'image' or 'text', got {kind!r}")
        return kind
    if not isinstance(name, str):
        raise ConfigError(f"{path}.encoder.name: expected a registered encoder name, got {name!r}")
    found = [k for k, registry_kind in ENCODER_KINDS.items()
             if name in registry.list_components(registry_kind)]
    if len(found) == 1:
        return found[0]
    if len(found) > 1 and name in _EARLIER_KIND:
        return _EARLIER_KIND[name]
    if not found:
        names = [n for k in ENCODER_KINDS.values() for n in registry.list_components(k)]
        raise ConfigError(
            f"{path}.encoder.name: no vision or text encoder {name!r}; "
            f"{did_you_mean(name, names, what='registered')}"
        )
    raise ConfigError(
        f"{path}: encoder {name!r} is both an image and a text encoder; add kind: image or "
        "kind: text"
    )


def parse_inputs(section: Any, path: str = "inputs") -> dict[str, InputConfig]:
    """Read and validate an ``inputs`` section.

    Args:
        section: Input name → ``{encoder: {...}, column: ...}`` or ``{share: name, ...}``.
        path: The key path, for messages.

    Returns:
        Input name → `InputConfig`, in the order given.

    Raises:
        ConfigError: Not a mapping, no input, a bad or reserved name (``id``, ``targets``),
            an unknown key, two inputs reading one column, neither or both of
            ``encoder`` and ``share``, a ``share`` of an unknown input or of an input that
            shares itself, or a bad encoder section; the message names the key path.
    """
    if not isinstance(section, Mapping) or not section:
        raise ConfigError(f"{path}: expected a mapping of input names to inputs, got {section!r}")
    raw: dict[str, Mapping[str, Any]] = {}
    readers: dict[str, str] = {}
    for name, spec in section.items():
        where = f"{path}.{name}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"{where}: an input name is a Python identifier, got {name!r}")
        if name in _RESERVED:
            raise ConfigError(f"{where}: {name!r} is reserved (a sample's {name}); rename it")
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{where}: expected a mapping with encoder or share, got {spec!r}")
        for key in spec:
            if key not in _KEYS:
                raise ConfigError(f"{where}.{key}: unknown key; {did_you_mean(key, _KEYS)}")
        if ("encoder" in spec) == ("share" in spec):
            raise ConfigError(f"{where}: give exactly one of encoder or share")
        column = spec.get("column", name)
        if not isinstance(column, str) or not column:
            raise ConfigError(f"{where}.column: expected a column name, got {column!r}")
        if column in readers:
            raise ConfigError(f"{where}.column: {column!r} is already read by {readers[column]!r}")
        readers[column] = name
        raw[name] = spec
    inputs: dict[str, InputConfig] = {}
    for name, spec in raw.items():
        where = f"{path}.{name}"
        column = spec.get("column", name)
        if "encoder" in spec:
            encoder = spec["encoder"]
            if not isinstance(encoder, Mapping):
                raise ConfigError(f"{where}.encoder: expected a mapping with a name")
            kind = _encoder_kind(encoder.get("name"), spec.get("kind"), where)
            component = ComponentConfig.parse(ENCODER_KINDS[kind], encoder, f"{where}.encoder")
            inputs[name] = InputConfig(kind, column, encoder=component)
            continue
        owner = spec["share"]
        if owner not in raw:
            hint = did_you_mean(str(owner), list(raw), what="inputs")
            raise ConfigError(f"{where}.share: no input {owner!r}; {hint}")
        if "encoder" not in raw[owner]:
            raise ConfigError(
                f"{where}.share: {owner!r} shares an encoder itself; name the input that owns it"
            )
        owner_kind = _encoder_kind(raw[owner]["encoder"].get("name"), raw[owner].get("kind"),
                                   f"{path}.{owner}")
        if spec.get("kind", owner_kind) != owner_kind:
            raise ConfigError(f"{where}.kind: {owner!r} is an {owner_kind} input")
        inputs[name] = InputConfig(owner_kind, column, share=owner)
    return inputs


def shorthand_inputs(
    vision: ComponentConfig | None, text: ComponentConfig | None
) -> dict[str, InputConfig]:
    """The inputs of the ``vision:`` / ``text:`` shorthand: ``text``, then ``image``.

    Examples:
        >>> list(shorthand_inputs(None, ComponentConfig("text_encoder", "huggingface")))
        ['text']
    """
    inputs: dict[str, InputConfig] = {}
    if text is not None:
        inputs["text"] = InputConfig("text", "text", encoder=text)
    if vision is not None:
        inputs["image"] = InputConfig("image", "image", encoder=vision)
    return inputs
