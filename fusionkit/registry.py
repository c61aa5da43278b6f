"""The component registry: name the parts of a model in a config.

Components are grouped by *kind*. Each kind has a constructor contract, so a config (or a
contract test) can build any registered component of that kind with the same arguments:

| kind | constructor contract |
| --- | --- |
| `vision_encoder` | `(model_name, pretrained=False, freeze=False, **options)` |
| `text_encoder` | `(model_name_or_path, max_length=..., freeze=False)` |
| `sequence_fusion` | `(input_dims: dict[str, int], dim, layers=1, heads=8, ...)` |
| `modality_fusion` | `(dim, modalities: Sequence[str], ...)` |
| `head` | `(dim, tasks: Mapping[str, TaskSpec], ...)` |
| `model` | `(config: ModelConfig)` |

A vision encoder read from a model folder (``huggingface``) names it ``model_name_or_path``.
Every sequence fusion is called as ``forward(tokens, masks, *, return_tokens=False,
return_attention=False)``; one that cannot record attention raises ``ConfigError`` when asked.
``tests/test_contract.py`` walks every registered component of every kind through its contract.

Third-party packages add components through the entry-point group ``fusionkit.plugins``: each
entry point names a module (imported) or a callable (called with no arguments) that registers
its components. Plugins are loaded lazily, once, on the first lookup or listing; a plugin that
fails to load produces a warning naming it and never breaks the registry.

Examples:
    >>> import fusionkit
    >>> @fusionkit.register("modality_fusion", name="my_max")
    ... class MaxFusion(torch.nn.Module): ...
    >>> fusionkit.list_components("modality_fusion", "my_*")
    ['my_max']
"""

from __future__ import annotations

import fnmatch
import re
import threading
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any, TypeVar, overload

from fusionkit.errors import RegistryError, did_you_mean

__all__ = [
    "KINDS",
    "PLUGIN_GROUP",
    "Registration",
    "create",
    "get",
    "list_components",
    "load_plugins",
    "register",
]

KINDS: tuple[str, ...] = (
    "vision_encoder",
    "text_encoder",
    "sequence_fusion",
    "modality_fusion",
    "head",
    "model",
)
PLUGIN_GROUP = "fusionkit.plugins"

T = TypeVar("T", bound=Callable[..., Any])


@dataclass(frozen=True)
class Registration:
    """One registered component.

    Attributes:
        kind: The component kind, one of `KINDS`.
        name: The name a config uses.
        factory: The class or function that builds the component.
        source: ``module:qualname`` of the factory, for listings and error messages.
    """

    kind: str
    name: str
    factory: Callable[..., Any]
    source: str


_entries: dict[str, dict[str, Registration]] = {kind: {} for kind in KINDS}
_plugins_loaded = False
_plugin_lock = threading.RLock()


def _snake_case(name: str) -> str:
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()


def _check_kind(kind: str) -> None:
    if kind not in _entries:
        hint = did_you_mean(kind, KINDS, limit=3, cutoff=0.5, what="kinds")
        raise RegistryError(f"unknown component kind {kind!r}; {hint}")


@overload
def register(kind: str, name: str | None = None, *, override: bool = False) -> Callable[[T], T]: ...


@overload
def register(kind: str, name: str | None, factory: T, *, override: bool = False) -> T: ...


def register(
    kind: str,
    name: str | None = None,
    factory: Callable[..., Any] | None = None,
    *,
    override: bool = False,
) -> Any:
    """Register a class or factory function under ``kind`` and ``name``.

    Use as a decorator (``@register("head")``) or call with the factory directly.

    Args:
        kind: One of `KINDS`.
        name: The name to register; defaults to the factory's name in snake_case
            (``SequenceWiseAttention`` becomes ``sequence_wise_attention``).
        factory: The class or function; omit it to get a decorator.
        override: Replace an existing entry of the same name (with a warning) instead of
            raising.

    Returns:
        The factory itself (so the decorated class stays usable), or a decorator.

    Raises:
        RegistryError: ``kind`` is unknown, or ``name`` is taken and ``override`` is false.

    Examples:
        >>> @register("modality_fusion", name="first")
        ... class First(torch.nn.Module): ...
    """
    _check_kind(kind)

    def decorate(obj: T) -> T:
        if not callable(obj):
            raise RegistryError(f"cannot register {obj!r} as {kind!r}: it is not callable")
        key = name or _snake_case(obj.__name__)
        source = f"{obj.__module__}:{getattr(obj, '__qualname__', obj.__name__)}"
        with _plugin_lock:
            taken = _entries[kind].get(key)
            if taken is not None and taken.factory is not obj:
                if not override:
                    raise RegistryError(
                        f"{kind} {key!r} is already registered by {taken.source}; "
                        "pass override=True to replace it"
                    )
                warnings.warn(
                    f"{kind} {key!r} from {taken.source} is replaced by {source}",
                    stacklevel=3,
                )
            _entries[kind][key] = Registration(kind, key, obj, source)
        return obj

    if factory is not None:
        return decorate(factory)  # type: ignore[arg-type]
    return decorate


def load_plugins(*, force: bool = False) -> list[str]:
    """Load the third-party plugins of the entry-point group ``fusionkit.plugins``.

    Called for you on the first lookup or listing; call it with ``force=True`` to load
    plugins installed after that.

    Args:
        force: Load again even if plugins were loaded already.

    Returns:
        The names of the entry points that loaded without error.
    """
    global _plugins_loaded
    with _plugin_lock:
        if _plugins_loaded and not force:
            return []
        _plugins_loaded = True
        loaded = []
        for entry_point in metadata.entry_points(group=PLUGIN_GROUP):
            try:
                target = entry_point.load()
                if not isinstance(target, types.ModuleType) and callable(target):
                    target()
            except Exception as error:  # a broken plugin must never break the registry
                warnings.warn(
                    f"fusionkit plugin {entry_point.name!r} ({entry_point.value}) failed to "
                    f"load and was skipped: {type(error).__name__}: {error}",
                    RuntimeWarning,
                    stacklevel=2,
                )
            else:
                loaded.append(entry_point.name)
        return loaded


def get(kind: str, name: str) -> Registration:
    """Look up one registered component.

    Args:
        kind: One of `KINDS`.
        name: A registered name (no wildcards).

    Returns:
        The `Registration` holding the factory.

    Raises:
        RegistryError: The kind or the name is unknown; the message lists the closest names.
    """
    _check_kind(kind)
    load_plugins()
    try:
        return _entries[kind][name]
    except KeyError:
        names = sorted(_entries[kind])
        hint = did_you_mean(name, names, limit=3, cutoff=0.5, what="registered")
        raise RegistryError(f"unknown {kind} {name!r}; {hint}") from None


def create(kind: str, name: str, **kwargs: Any) -> Any:
    """Build a registered component.

    Args:
        kind: One of `KINDS`.
        name: The registered name.
        **kwargs: Passed to the component's constructor (see the kind's contract above).

    Returns:
        The built component, usually an ``nn.Module``.

    Raises:
        RegistryError: The kind or the name is unknown.

    Examples:
        >>> fusion = create("modality_fusion", "keyless", dim=256, modalities=("text", "image"))
    """
    return get(kind, name).factory(**kwargs)


@overload
def list_components(kind: str, pattern: str = "*") -> list[str]: ...


@overload
def list_components(kind: None = None, pattern: str = "*") -> dict[str, list[str]]: ...


def list_components(
    kind: str | None = None, pattern: str = "*"
) -> list[str] | dict[str, list[str]]:
    """List registered names, filtered with ``fnmatch`` wildcards.

    Args:
        kind: One of `KINDS`; ``None`` lists every kind.
        pattern: A shell-style wildcard such as ``"co_*"``; ``"*"`` lists everything.

    Returns:
        Sorted names for one kind, or a dict kind → sorted names when ``kind`` is ``None``.

    Raises:
        RegistryError: ``kind`` is unknown.

    Examples:
        >>> list_components("sequence_fusion")
        ['co_attention', 'transformer']
    """
    load_plugins()
    if kind is None:
        return {k: sorted(fnmatch.filter(_entries[k], pattern)) for k in KINDS}
    _check_kind(kind)
    return sorted(fnmatch.filter(_entries[kind], pattern))
