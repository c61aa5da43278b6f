"""A registered component in a config: its ``name`` and its constructor's options, checked.

A component section's schema is its constructor, known only once the component is registered
(plugins included): every key beyond ``name`` is an argument of that constructor, checked
against its signature and type hints, with the key path and a "did you mean" in every error.
"""

from __future__ import annotations

import collections.abc
import copy
import difflib
import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fusionkit import registry
from fusionkit.errors import ConfigError, RegistryError, did_you_mean

__all__ = ["ComponentConfig", "matches_type"]


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
