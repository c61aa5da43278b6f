"""Explanations of a CMA-CLIP prediction: where in the image a word looked (the paper's Fig. 2).

The sequence-wise attention lets every text token attend to every image token. The attention
probabilities from one text token to the image's patch tokens, averaged over heads, form a map
over the backbone's feature grid (one token per patch of a ViT, per feature-map position of a
CNN). Upsampled and laid over the image, the map shows which region that word relied on. The
per-task modality weights (which modality each task trusted) and the predictions go into the
caption.

Examples:
    >>> result = explain("runs/emoji/best", "cat.png", "grinning cat", "cat.png.explain.png")
    ... # doctest: +SKIP
    >>> result.grid  # doctest: +SKIP
    (7, 7)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fusionkit.data import input_image_configs
from fusionkit.errors import ConfigError, DataError, MissingDependencyError
from fusionkit.fusion.inputs import check_records_attention
from fusionkit.serving.predictor import Predictor

__all__ = ["Explanation", "attention_map", "explain", "feature_grid"]


@dataclass
class Explanation:
    """What :func:`explain` returns.

    Attributes:
        heatmap: Attention of the chosen token to each image patch, ``(h, w)``, summing to the
            token's total attention on the image's patches.
        grid: ``(h, w)`` of the backbone's feature grid.
        image: The model's input with the normalisation undone, ``(H, W, 3)`` in ``[0, 1]``
            (resized and cropped as the model saw it, so the heatmap lines up with it).
        token: The chosen text token (word pieces joined, ``##`` removed).
        token_scores: Every candidate text token → its total attention on the image patches.
        predictions: Task → ``(label, probability)`` (multi-label tasks: labels joined by
            ``|``, probability of the most probable class).
        modality_weights: Task → modality → weight.
        path: The PNG written, or None.
    """

    heatmap: np.ndarray
    grid: tuple[int, int]
    image: np.ndarray
    token: str
    token_scores: dict[str, float] = field(default_factory=dict)
    predictions: dict[str, tuple[str, float]] = field(default_factory=dict)
    modality_weights: dict[str, dict[str, float]] = field(default_factory=dict)
    path: Path | None = None


def feature_grid(num_tokens: int, height: int, width: int) -> tuple[int, int]:
    """The ``(h, w)`` grid of ``num_tokens`` patch tokens of an ``height × width`` input.

    Backbones flatten their feature map row-major, so ``h * w == num_tokens``; of the factor
    pairs, the one whose aspect ratio is closest to the input's is the grid (exact for ViTs and
    CNNs, whose strides are the same along both axes).

    Args:
        num_tokens: Number of patch tokens (prefix tokens excluded).
        height: Input height in pixels.
        width: Input width in pixels.

    Returns:
        ``(h, w)`` with ``h * w == num_tokens``.

    Raises:
        ConfigError: ``num_tokens`` or a side is not positive.

    Examples:
        >>> feature_grid(49, 224, 224), feature_grid(12, 96, 128)
        ((7, 7), (3, 4))
    """
    if num_tokens < 1 or height < 1 or width < 1:
        raise ConfigError(
            f"need positive token count and sides, got {num_tokens} tokens, {height}x{width}"
        )
    aspect = math.log(height / width)
    pairs = [(h, num_tokens // h) for h in range(1, num_tokens + 1) if num_tokens % h == 0]
    return min(pairs, key=lambda pair: abs(math.log(pair[0] / pair[1]) - aspect))


def attention_map(
    attentions: list[Tensor],
    queries: list[int],
    keys: range,
    layers: Literal["last", "mean"] = "last",
) -> Tensor:
    """Attention from some query positions to a range of key positions, for sample 0.

    Args:
        attentions: Per layer ``(B, heads, L, L)`` probabilities (rows: queries).
        queries: Query positions to average (the word pieces of one word).
        keys: Key positions (the image patches).
        layers: ``"last"`` layer only, or the ``"mean"`` over layers.

    Returns:
        ``(len(keys),)``: averaged over heads, the query positions and (with ``"mean"``) layers.

    Raises:
        ConfigError: ``layers`` is neither ``"last"`` nor ``"mean"``, or nothing to average.

    Examples:
        >>> probs = torch.full((1, 2, 4, 4), 0.25)
        >>> attention_map([probs], [0], range(2, 4))
        tensor([0.2500, 0.2500])
    """
    if layers not in ("last", "mean"):
        raise ConfigError(f"layers must be 'last' or 'mean', got {layers!r}")
    if not attentions or not queries:
        raise ConfigError("no attention layers or no query positions to explain")
    chosen = attentions[-1:] if layers == "last" else attentions
    stacked = torch.stack([layer[0].float() for layer in chosen])  # (layers, heads, L, L)
    rows = stacked.mean(dim=(0, 1))[queries]
    return rows[:, keys.start : keys.stop].mean(dim=0)


#: Marks of the subword schemes: WordPiece continues a word with ``##``; CLIP's BPE ends a
#: word with ``</w>``; SentencePiece and byte-level BPE start a word with ``▁`` / ``Ġ``.
_CONTINUES, _ENDS, _STARTS = "##", "</w>", ("▁", "Ġ")


def _words(tokenizer: Any, ids: list[int], mask: list[bool]) -> list[tuple[str, list[int]]]:
    """The text's words and their token positions: subword pieces merged, special tokens left
    out. WordPiece (``##``), end-marked BPE (``</w>``) and start-marked pieces (``▁``, ``Ġ``)
    are each merged by their own rule."""
    special = set(getattr(tokenizer, "all_special_ids", []))
    pieces = [
        (position, tokenizer.convert_ids_to_tokens(token_id))
        for position, (token_id, real) in enumerate(zip(ids, mask, strict=True))
        if real and token_id not in special
    ]
    end_marked = any(piece.endswith(_ENDS) for _, piece in pieces)
    start_marked = any(piece.startswith(_STARTS) for _, piece in pieces)
    words: list[tuple[str, list[int]]] = []
    word_open = False  # the last piece did not end its word
    for position, piece in pieces:
        if piece.startswith(_CONTINUES) and words:
            joined, piece = True, piece[len(_CONTINUES):]
        elif start_marked:
            joined = not piece.startswith(_STARTS) and bool(words)
            piece = piece.lstrip("".join(_STARTS))
        else:
            joined = word_open and bool(words)
        word_open = end_marked and not piece.endswith(_ENDS)
        piece = piece.removesuffix(_ENDS)
        if joined:
            words[-1] = (words[-1][0] + piece, [*words[-1][1], position])
        elif piece:
            words.append((piece, [position]))
    return words


def _describe_outputs(model: Any, output: Any) -> tuple[dict, dict]:
    predictions: dict[str, tuple[str, float]] = {}
    weights: dict[str, dict[str, float]] = {}
    for task, spec in model.tasks.items():
        logits = output.logits[task][0].float()
        names = spec.class_names()
        if spec.multi_label:
            probs = logits.sigmoid()
            chosen = [name for name, p in zip(names, probs, strict=True) if p >= 0.5]
            predictions[task] = ("|".join(chosen) or "(none)", float(probs.max()))
        else:
            probs = logits.softmax(dim=0)
            predictions[task] = (names[int(probs.argmax())], float(probs.max()))
        weights[task] = {
            modality: float(value)
            for modality, value in zip(model.modalities, output.modality_weights[task][0],
                                       strict=True)
        }
    return predictions, weights


def _display_image(pixels: Tensor, data_config: dict[str, Any]) -> np.ndarray:
    """The model's input undone to ``[0, 1]`` RGB, so the map lines up with what it saw."""
    mean = torch.tensor(data_config.get("mean", (0.485, 0.456, 0.406)))[:, None, None]
    std = torch.tensor(data_config.get("std", (0.229, 0.224, 0.225)))[:, None, None]
    return (pixels.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _plot(
    image: np.ndarray,
    heatmap: np.ndarray,
    title: str,
    caption: str,
    out: Path,
) -> None:
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError(
            "drawing an explanation needs matplotlib: `pip install matplotlib`"
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height, width = image.shape[:2]
    upsampled = torch.nn.functional.interpolate(
        torch.from_numpy(heatmap)[None, None].float(), size=(height, width), mode="bilinear",
        align_corners=False,
    )[0, 0].numpy()
    figure, axes = plt.subplots(1, 2, figsize=(8, 4.6))
    axes[0].imshow(image)
    axes[0].set_title("input")
    axes[1].imshow(image)
    # The colour range spans the map's own minimum to maximum: attention over ~50 patches is
    # spread thin, and a scale from 0 would hide where it concentrates.
    overlay = axes[1].imshow(upsampled, cmap="jet", alpha=0.5)
    axes[1].set_title(title)
    for axis in axes:
        axis.axis("off")
    figure.colorbar(overlay, ax=axes[1], fraction=0.046, pad=0.04, label="attention probability")
    figure.text(0.5, 0.02, caption, ha="center", va="bottom", fontsize=8, wrap=True)
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)


def _pick(model: Any, kind: str, chosen: str | None, argument: str) -> str:
    """The input of ``kind`` to explain: ``chosen``, or the model's only one."""
    names = model.inputs_of_kind(kind)
    if chosen is not None:
        if chosen not in names:
            raise ConfigError(f"{argument}: the model has no {kind} input {chosen!r}; its {kind} "
                              f"inputs are {names}")
        return chosen
    if len(names) != 1:
        encoder = "vision" if kind == "image" else "text"
        need = f"no {encoder} encoder" if not names else f"the {kind} inputs {names}"
        raise ConfigError(
            f"explain maps a text input's attention onto an image input; this model has "
            f"{need}" + (f": name one with {argument}" if names else "")
        )
    return names[0]


@torch.no_grad()
def explain(
    checkpoint: str | os.PathLike[str] | Any,
    image: str | os.PathLike[str] | Image.Image | None = None,
    text: str | None = None,
    out: str | os.PathLike[str] | None = None,
    *,
    token: str | None = None,
    layers: Literal["last", "mean"] = "last",
    device: str = "cpu",
    inputs: Mapping[str, Any] | None = None,
    image_input: str | None = None,
    text_input: str | None = None,
) -> Explanation:
    """Map the attention of one text token onto the image and draw it (the paper's Fig. 2).

    The attention probabilities come from ``model(..., return_attention=True)``, which runs the
    plain ``math`` attention; they are averaged over heads and taken from the last fusion layer
    (``layers="last"``, the one whose output feeds the summaries) or averaged over layers.

    A model with named inputs is explained for one pair of them: the words of ``text_input``
    over the patches of ``image_input`` (each defaults to the model's only input of its kind).
    Their values come from ``inputs`` (or from ``image`` / ``text``); the model's other inputs
    take part in the prediction when ``inputs`` gives them, and are missing otherwise.

    Args:
        checkpoint: A run folder (its ``best/``), a checkpoint folder, or a loaded
            :class:`~fusionkit.serving.Predictor` (to explain many samples, loading once).
        image: The image (path or PIL image) of the model's one image input.
        text: The text of its one text input.
        out: PNG to write (input and overlay side by side, predictions and modality weights
            in the caption); ``None`` writes nothing.
        token: The word to explain; by default the word (punctuation left out) with the most
            attention on the image patches.
        layers: ``"last"`` or ``"mean"`` (see above).
        device: ``auto``, ``cpu`` or ``cuda`` (ignored for a loaded predictor).
        inputs: Input name → one value (a text, or an image path or PIL image), for a model
            with named inputs.
        image_input: The image input whose patches are mapped.
        text_input: The text input whose words are explained.

    Returns:
        The :class:`Explanation`.

    Raises:
        MissingDependencyError: ``out`` is given and matplotlib is not installed.
        ConfigError: The model lacks sequence-wise attention (or one that records it), a
            vision or a text encoder; it has several inputs of a kind and ``image_input`` /
            ``text_input`` does not name one; or ``token`` is not a word of the text.
        DataError: The image cannot be read, the text is empty, or an input is unknown.
        CheckpointError: The checkpoint cannot be loaded.

    Examples:
        >>> explain("runs/emoji", "images/1f600.png", "grinning face", "fig.png").token
        ... # doctest: +SKIP
        'grinning'
        >>> explain("runs/shop", inputs={"title": "red tee", "front": "tee.png"},
        ...         text_input="title").grid  # doctest: +SKIP
        (7, 7)
    """
    predictor = (
        checkpoint
        if isinstance(checkpoint, Predictor)
        else Predictor.from_pretrained(checkpoint, device=device)
    )
    model = predictor.model
    fusion = model.sequence_fusion
    if fusion is None:
        raise ConfigError(
            "explain needs a model with sequence-wise attention (fusion.sequence is null)"
        )
    check_records_attention(fusion)
    image_name = _pick(model, "image", image_input, "image_input")
    text_name = _pick(model, "text", text_input, "text_input")
    named = predictor._named(
        None if image is None else [image], None if text is None else [text],
        {name: [value] for name, value in (inputs or {}).items()},
    )
    text = named.get(text_name, [None])[0]
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"explain needs a non-empty text for input {text_name!r}")
    if named.get(image_name, [None])[0] is None:
        raise DataError(f"explain needs an image for input {image_name!r}")
    values, present = predictor._tensors(named, 0, 1)
    text_encoder = model.encoder_of(text_name)
    tokens = text_encoder.tokenize([text])
    ids = tokens["input_ids"][0].tolist()
    mask = tokens["attention_mask"][0].bool().tolist()
    values[text_name] = {key: value.to(predictor.device) for key, value in tokens.items()}
    output = model(inputs=values, present=present, return_attention=True)

    if not output.attentions or not output.spans or not {image_name, text_name} <= set(
        output.spans
    ):
        raise ConfigError(
            f"sequence fusion {type(fusion).__name__} returned no attention over one sequence "
            "of image and text tokens (attentions and spans), so there is nothing to draw"
        )
    pixels = values[image_name][0]
    # A learned summary token sits before each input's tokens; "first" reuses token 0.
    skip = 1 if getattr(fusion, "summary_tokens", None) is not None else 0
    image_start, image_end = output.spans[image_name]
    text_start = output.spans[text_name][0] + skip
    prefix = model.encoder_of(image_name).num_prefix_tokens
    patches = range(image_start + skip + prefix, image_end)
    grid = feature_grid(len(patches), pixels.shape[1], pixels.shape[2])

    words = _words(text_encoder.tokenizer, ids, mask)
    if not words:
        raise DataError(f"the text {text!r} has no word token after tokenization")
    scores = {
        word: float(attention_map(output.attentions, [text_start + p for p in positions],
                                  patches, layers).sum())
        for word, positions in reversed(words)  # the first occurrence of a word wins
    }
    if token is None:
        # Punctuation carries no meaning to ground in the image; prefer real words.
        candidates = [item for item in words if any(c.isalnum() for c in item[0])] or words
        chosen = max(candidates, key=lambda item: scores[item[0]])
    else:
        wanted = token.strip().lower()
        matches = [item for item in words if item[0].lower() == wanted]
        if not matches:
            raise ConfigError(
                f"token {token!r} is not a word of the text; its words are "
                f"{[word for word, _ in words]}"
            )
        chosen = matches[0]
    weights = attention_map(
        output.attentions, [text_start + p for p in chosen[1]], patches, layers
    )
    heatmap = weights.reshape(grid).cpu().numpy()
    predictions, modality_weights = _describe_outputs(model, output)
    result = Explanation(
        heatmap=heatmap,
        grid=grid,
        image=_display_image(pixels, input_image_configs(model)[image_name]),
        token=chosen[0],
        token_scores=scores,
        predictions=predictions,
        modality_weights=modality_weights,
    )
    if out is not None:
        caption = "\n".join(
            f"{task}: {label} ({probability:.2f})   weights "
            + " ".join(f"{m}={w:.2f}" for m, w in modality_weights[task].items())
            for task, (label, probability) in predictions.items()
        )
        title = f"attention of {chosen[0]!r} ({layers} layer{'s' if layers == 'mean' else ''})"
        result.path = Path(out)
        _plot(result.image, heatmap, title, f"text: {text}\n{caption}", result.path)
    return result
