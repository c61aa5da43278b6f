"""Reading an open_clip checkpoint once for both towers of `fusionkit.encoders.open_clip`.

The first encoder built from a checkpoint loads the whole CLIP model, keeps its tower and
leaves the other in a one-entry cache for the second encoder; the entry is dropped once both
towers are taken, when another checkpoint is loaded, or by `clear_cache`. Models that open_clip
cannot build offline (towers or tokenizer from Hugging Face) are refused before anything loads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from fusionkit.encoders.weights import looks_like_path
from fusionkit.errors import CheckpointError, ConfigError, MissingDependencyError, did_you_mean

__all__ = ["TEXT_PARTS", "clear_cache", "import_open_clip", "take_tower"]

_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
TEXT_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final")
# Towers of the last checkpoint loaded that no encoder has taken yet ("vision", "text").
_PENDING: dict[tuple[str, str, int, int], dict[str, Any]] = {}
_LOCK = threading.Lock()


def import_open_clip() -> Any:
    """The ``open_clip`` module.

    Raises:
        MissingDependencyError: open_clip is not installed.
    """
    try:
        import open_clip
    except ImportError as error:
        raise MissingDependencyError(
            "the open_clip encoders need open_clip; install it with: pip install open_clip_torch"
        ) from error
    return open_clip


def clear_cache() -> None:
    """Drop the tower a checkpoint load left for an encoder not built yet.

    Examples:
        >>> clear_cache()
    """
    with _LOCK:
        _PENDING.clear()


def _model_config(open_clip: Any, model_name: str, tower: str) -> dict[str, Any]:
    """The model's open_clip config; refused if ``tower`` cannot be built offline and read."""
    if not isinstance(model_name, str) or model_name not in open_clip.list_models():
        hint = did_you_mean(str(model_name), open_clip.list_models(), limit=3, list_choices=False)
        raise ConfigError(
            f"unknown open_clip model {model_name!r}; {hint or 'see open_clip.list_models()'}"
        )
    config = open_clip.get_model_config(model_name)
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    reason = ""
    if text.get("hf_model_name"):
        reason = "its text tower is a Hugging Face model"
    elif tower == "vision" and (
        vision.get("timm_model_name")
        or vision.get("attentional_pool")
        or not isinstance(vision.get("layers", 12), int)
    ):
        reason = "its image tower is not open_clip's class-token ViT"
    elif tower == "text" and text.get("hf_tokenizer_name"):
        reason = "it uses a Hugging Face tokenizer"
    elif tower == "text" and (
        text.get("embed_cls")
        or text.get("no_causal_mask")
        or text.get("pool_type", "argmax") not in ("argmax", "eos", "first")
    ):
        reason = "its text tower is not CLIP's causal transformer pooled at the end of text"
    if reason:
        raise ConfigError(f"open_clip model {model_name!r} is not supported: {reason}")
    return config


def _resolve_pretrained(open_clip: Any, model_name: str, pretrained: Any) -> Path | None:
    if pretrained is None or pretrained is False:
        return None
    if pretrained is True or not isinstance(pretrained, (str, os.PathLike)):
        raise ConfigError(
            f"pretrained={pretrained!r}: fusionkit never downloads from a model hub; pass "
            f"False or the path of a local open_clip checkpoint file ({', '.join(_SUFFIXES)})"
        )
    text = os.fspath(pretrained)
    path = Path(text).expanduser()
    if path.is_file():
        return path.resolve()
    if path.is_dir():
        raise CheckpointError(f"open_clip checkpoint {text!r} is a directory; pass the file")
    if isinstance(pretrained, os.PathLike) or looks_like_path(text) or text.endswith(_SUFFIXES):
        raise CheckpointError(f"open_clip checkpoint file {text!r} does not exist")
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    known = f" (a hub tag of {model_name!r})" if text in tags else ""
    raise ConfigError(
        f"pretrained={text!r}{known} is not an existing file; open_clip tags download from a "
        "hub, which fusionkit never does: pass the path of a local checkpoint file"
    )


class _NoRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init() -> Iterator[None]:
    """Drop open_clip's root-logger warning about a randomly initialised model."""
    quiet = _NoRandomInitWarning()
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)


def _create(open_clip: Any, model_name: str, path: Path | None) -> dict[str, Any]:
    """Build the CLIP model (weights from ``path``) and split it into its two towers."""
    kwargs = {"pretrained_image": False, "pretrained_text": False, "weights_only": True}
    try:
        # An absolute path is never an open_clip tag: create_model only reads the file. Random
        # init is asked for (pretrained: false, or a fusionkit checkpoint about to load its
        # weights), so open_clip's warning that no weights were loaded is dropped.
        with _quiet_random_init():
            model = open_clip.create_model(model_name, pretrained=path and str(path), **kwargs)
    except Exception as error:  # torch.load, safetensors and load_state_dict all differ
        if path is None:
            raise
        message = f"cannot load {str(path)!r} into {model_name!r}: {type(error).__name__}"
        raise CheckpointError(f"{message}: {error}") from error
    # CLIP keeps the text tower's parts on the model itself, CustomTextCLIP in ``model.text``.
    source = model.text if isinstance(getattr(model, "text", None), nn.Module) else model
    text = {name: getattr(source, name) for name in (*TEXT_PARTS, "text_projection")}
    text["attn_mask"] = source.attn_mask
    text["pool_type"] = getattr(source, "pool_type", getattr(model, "text_pool_type", "argmax"))
    text["eos_id"] = getattr(source, "eos_id", getattr(model, "text_eos_id", None))
    text["context_length"] = int(model.context_length)
    return {"vision": model.visual, "text": text}


def take_tower(model_name: str, pretrained: Any, tower: str) -> tuple[Any, dict[str, Any]]:
    """Check the config and hand out ``tower`` of the checkpoint, loading it if needed.

    Args:
        model_name: An ``open_clip.list_models()`` name.
        pretrained: ``False`` (random init) or the path of a local checkpoint file.
        tower: ``"vision"`` (the ``visual`` module) or ``"text"`` (a mapping of the text
            tower's parts).

    Returns:
        ``(tower, model config)``.

    Raises:
        ConfigError: An unknown model name, a model open_clip cannot build offline, or a
            ``pretrained`` that is neither False nor a file (a hub tag).
        CheckpointError: The file is missing or does not fit the model.
    """
    open_clip = import_open_clip()
    config = _model_config(open_clip, model_name, tower)
    path = _resolve_pretrained(open_clip, model_name, pretrained)
    if path is None:
        return _create(open_clip, model_name, None)[tower], config
    stat = path.stat()
    key = (model_name, str(path), stat.st_mtime_ns, stat.st_size)
    with _LOCK:
        towers = _PENDING.pop(key, None)
        if towers is None or tower not in towers:  # a tower is never handed out twice
            towers = _create(open_clip, model_name, path)
        part = towers.pop(tower)
        _PENDING.clear()  # one checkpoint at most: a new load drops an older leftover
        if towers:
            _PENDING[key] = towers
    return part, config
