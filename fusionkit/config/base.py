"""What every config section shares: strict typed fields, and errors that name the key path.

Fixed sections (``data``, ``train``, ``unimodal_heads``) are pydantic models derived from
`Section`; `Section.parse` turns pydantic's validation errors into one
:class:`~fusionkit.errors.ConfigError` whose message starts with the offending key path
(``train.lr: ...``) and, for an unknown key, suggests the closest accepted one with
:func:`~fusionkit.errors.did_you_mean`, the one such helper of fusionkit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import pydantic
from pydantic import ConfigDict

from fusionkit.errors import ConfigError, did_you_mean

__all__ = ["Section", "did_you_mean", "key_path"]

S = TypeVar("S", bound="Section")


def key_path(*parts: Any) -> str:
    """Join key-path parts with dots, skipping empty ones.

    Examples:
        >>> key_path("train", "lr"), key_path("", "tasks", "color")
        ('train.lr', 'tasks.color')
    """
    return ".".join(str(p) for p in parts if p not in ("", None))


class Section(pydantic.BaseModel):
    """A config section: strict types (a YAML ``true`` is not an ``int``, ``1`` is a valid
    ``float``), unknown keys refused, defaults for what is left out.

    Examples:
        >>> class Demo(Section):
        ...     epochs: int = 1
        >>> Demo.parse({"epoch": 2}, "train")
        Traceback (most recent call last):
        fusionkit.errors.ConfigError: train.epoch: unknown key; did you mean 'epochs'? ...
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=False)

    @classmethod
    def parse(cls: type[S], raw: Mapping[str, Any] | None, path: str) -> S:
        """Validate a raw section (as read from YAML) into this type.

        Args:
            raw: The section; ``None`` means every default.
            path: The section's key path, for messages (e.g. ``"train"``).

        Returns:
            The section with defaults filled in.

        Raises:
            ConfigError: Not a mapping, an unknown key (with a "did you mean"), a wrong type
                or an out-of-range value; the message starts with the key path.
        """
        if raw is None:
            raw = {}
        if isinstance(raw, cls):
            return raw
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {raw!r}")
        odd = [key for key in raw if not isinstance(key, str)]
        if odd:
            raise ConfigError(f"{path}: keys must be strings, got {odd[0]!r}")
        try:
            return cls.model_validate(dict(raw))
        except pydantic.ValidationError as error:
            raise cls._config_error(error, path) from None

    @classmethod
    def _config_error(cls, error: pydantic.ValidationError, path: str) -> ConfigError:
        errors = error.errors(include_url=False)
        first = errors[0]
        if first["type"] == "extra_forbidden":
            key = first["loc"][-1]
            where = key_path(path, *first["loc"])
            return ConfigError(f"{where}: unknown key; {did_you_mean(key, cls.model_fields)}")
        # A union field fails once per member type, each with the member in its location:
        # report the field once, with every accepted form.
        field_errors = [e for e in errors if e["loc"][:1] == first["loc"][:1]]
        if len(field_errors) > 1:
            where = key_path(path, first["loc"][0])
            forms = [_lower(e["msg"]).removeprefix("input should be ") for e in field_errors]
            message = f"input should be {' or '.join(dict.fromkeys(forms))}"
        else:
            where = key_path(path, *first["loc"])
            message = _lower(first["msg"].removeprefix("Value error, "))
        return ConfigError(f"{where}: {message}, got {first['input']!r}")

    def to_dict(self) -> dict[str, Any]:
        """The section as a plain mapping, every field written out."""
        return self.model_dump(mode="python")


def _lower(message: str) -> str:
    return message[:1].lower() + message[1:]
