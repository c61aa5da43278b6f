"""Text adapters: sentence-transformers and Hugging Face models as sequences of word tokens.

Both adapters return the transformer's last hidden state as tokens and the attention mask as
the token mask. A missing text (``None``) is encoded as the empty string and gets an all-False
mask row, so the fusion can leave the text modality out for that sample.

The heavy libraries (``transformers``, ``sentence_transformers``) are imported when an
adapter is built, so importing `fusionkit.encoders` stays fast.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from fusionkit.encoders.base import EncoderOutput, FreezableEncoder
from fusionkit.encoders.hf_clip import TEXT_POOLING, encode_text_tower, load_hf_model, text_tower
from fusionkit.encoders.weights import enforce_offline_mode, resolve_text_model_path
from fusionkit.errors import CheckpointError, ConfigError, ShapeError
from fusionkit.registry import register

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = [
    "PRESENT_KEY",
    "BaseTextEncoder",
    "HuggingFaceTextEncoder",
    "SentenceTransformersTextEncoder",
    "check_text_inputs",
    "check_texts",
]

#: Key of the ``(B,)`` bool tensor in `BaseTextEncoder.tokenize` output that marks
#: which samples have a text; it is not passed to the transformer.
PRESENT_KEY = "present"


def check_texts(texts: Sequence[str | None]) -> list[str | None]:
    """Validate a batch of texts: a sequence of ``str`` or ``None``, valid Unicode.

    Args:
        texts: One text per sample.

    Returns:
        The texts as a list.

    Raises:
        ShapeError: ``texts`` is a single string, empty, or holds a non-string or a string
            that is not valid Unicode.

    Examples:
        >>> check_texts(("red tee", None))
        ['red tee', None]
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ShapeError(
            f"texts: expected a sequence with one text (or None) per sample, "
            f"got {type(texts).__name__}"
        )
    if len(texts) == 0:
        raise ShapeError("texts: expected at least one text, got an empty sequence")
    for index, text in enumerate(texts):
        if text is None:
            continue
        if not isinstance(text, str):
            raise ShapeError(f"texts[{index}]: expected str or None, got {type(text).__name__}")
        if not text.isascii():
            # A lone surrogate (from a bad decode) makes the tokenizers fail with a TypeError.
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:
                raise ShapeError(
                    f"texts[{index}]: not valid Unicode text ({error.reason} at position "
                    f"{error.start}); decode the source as UTF-8"
                ) from None
    return list(texts)


def check_text_inputs(
    text_inputs: Mapping[str, Tensor], required: Sequence[str] = ("input_ids", "attention_mask")
) -> dict[str, Tensor]:
    """Validate pre-tokenised texts: ``(B, T)`` tensors (``(B,)`` for `PRESENT_KEY`).

    Args:
        text_inputs: A text encoder's ``tokenize`` output.
        required: Keys that must be present (``input_ids`` always is).

    Returns:
        A copy of ``text_inputs`` as a dict.

    Raises:
        ShapeError: Not a mapping, a required key missing, or a value of another shape.
    """
    if not isinstance(text_inputs, Mapping):
        raise ShapeError(
            f"text_inputs: expected a mapping of tensors, got {type(text_inputs).__name__}"
        )
    for key in required:
        if key not in text_inputs:
            raise ShapeError(f"text_inputs: missing {key!r}; use tokenize() to build it")
    shape = getattr(text_inputs["input_ids"], "shape", ())
    if len(shape) != 2:
        raise ShapeError(f"text_inputs['input_ids']: expected shape (B, T), got {tuple(shape)}")
    for key, value in text_inputs.items():
        expected = shape[:1] if key == PRESENT_KEY else shape
        if not isinstance(value, Tensor):
            raise ShapeError(
                f"text_inputs[{key!r}]: expected a tensor, got {type(value).__name__}"
            )
        if value.shape != expected:
            raise ShapeError(
                f"text_inputs[{key!r}]: expected shape {tuple(expected)}, "
                f"got {tuple(value.shape)}"
            )
    return dict(text_inputs)


class BaseTextEncoder(FreezableEncoder):
    """Shared behaviour of the text adapters: tokenizing, masking, freezing.

    Subclasses build a Hugging Face transformer and its tokenizer, register the module that
    owns the transformer, expose the transformer through `transformer`, and then call
    `_finish_init`.

    Args:
        tokenizer: A Hugging Face tokenizer.
        max_length: Longest token sequence, special tokens included; longer texts are
            truncated.
        freeze: Stop gradients to every parameter and keep the model in eval mode even
            after ``.train()``.

    Attributes:
        tokenizer: The tokenizer.
        max_length: The truncation length.
        width: Channels ``C`` of every token (the transformer's hidden size); set by
            `_finish_init`.
        frozen: Whether the model is frozen.
        padding: How `tokenize` pads: ``"longest"`` (the batch's longest text), or
            ``"max_length"`` for a model that pools the last position (SigLIP).

    Raises:
        ConfigError: ``max_length`` is not an int of at least 2.

    Examples:
        >>> encoder = HuggingFaceTextEncoder("path/to/bert")
        >>> encoder(["a red dress"]).tokens.shape[-1] == encoder.width
        True
    """

    width: int

    def __init__(self, tokenizer: Any, max_length: int, freeze: bool) -> None:
        super().__init__()
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ConfigError(f"max_length must be an int >= 2, got {max_length!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.frozen = freeze
        self.padding = "longest"

    @property
    def transformer(self) -> nn.Module:
        """The Hugging Face transformer whose last hidden state gives the tokens."""
        raise NotImplementedError

    def _finish_init(self) -> None:
        config = self.transformer.config
        hidden_size = getattr(config, "hidden_size", None)
        if not isinstance(hidden_size, int):
            raise ConfigError(
                f"{type(self.transformer).__name__} has no integer hidden_size in its config; "
                "it is not a text encoder model"
            )
        self.width = hidden_size
        limit = getattr(config, "max_position_embeddings", None)
        if isinstance(limit, int) and self.max_length > limit:
            raise ConfigError(
                f"max_length={self.max_length} exceeds the model's {limit} position embeddings"
            )
        self._set_frozen(self.frozen)

    def tokenize(self, texts: Sequence[str | None]) -> dict[str, Tensor]:
        """Tokenize a batch, padding as `padding` says and truncating at ``max_length``.

        Args:
            texts: One text per sample; ``None`` marks a missing text.

        Returns:
            The tokenizer's tensors (``input_ids``, ``attention_mask``, and
            ``token_type_ids`` where the model uses them), each ``(B, T)``, plus
            `PRESENT_KEY`: a ``(B,)`` bool tensor, ``False`` for missing texts.

        Raises:
            ShapeError: ``texts`` is a single string, empty, or holds a non-string.

        Examples:
            >>> encoder.tokenize(["a cat", None])["present"]
            tensor([ True, False])
        """
        checked = check_texts(texts)
        encoded = self.tokenizer(
            ["" if text is None else text for text in checked],
            padding=self.padding,
            truncation=True,
            max_length=self.max_length,
            return_attention_mask=True,
            return_tensors="pt",
        )
        inputs = dict(encoded.items())
        inputs[PRESENT_KEY] = torch.tensor([text is not None for text in checked])
        return inputs

    def forward(
        self,
        texts: Sequence[str | None] | None = None,
        text_inputs: Mapping[str, Tensor] | None = None,
    ) -> EncoderOutput:
        """Encode raw texts or pre-tokenized inputs into word tokens.

        Args:
            texts: One text per sample (``None`` for a missing text); tokenized here.
            text_inputs: The output of `tokenize`, e.g. built in a data loader worker.
                Without `PRESENT_KEY` every text counts as present.

        Returns:
            Tokens ``(B, T, width)`` (the last hidden state) and mask ``(B, T)``: the attention
            mask, all ``False`` for missing texts; ``summary``, the position the model pools,
            for CLIP and SigLIP (see `fusionkit.encoders.hf_clip`), else None.

        Raises:
            ShapeError: Both or neither of ``texts`` and ``text_inputs`` are given, or they
                are malformed.

        Examples:
            >>> out = encoder(["a red dress", None])
            >>> out.mask[1].any()
            tensor(False)
        """
        if texts is not None and text_inputs is None:
            inputs = self.tokenize(texts)
        elif text_inputs is not None and texts is None:
            inputs = check_text_inputs(text_inputs)
        else:
            given = "both" if texts is not None else "neither"
            raise ShapeError(f"give exactly one of texts or text_inputs; got {given}")
        present = inputs.pop(PRESENT_KEY, None)
        device = next(self.transformer.parameters()).device
        model_inputs = {key: value.to(device) for key, value in inputs.items()}
        tokens, mask, summary = self._encode(model_inputs)
        if present is not None:
            mask = mask & present.to(device=device, dtype=torch.bool)[:, None]
        return EncoderOutput(tokens=tokens, mask=mask, summary=summary)

    def _encode(self, model_inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        """Tokens (the last hidden state), the attention mask as bool, and no summary."""
        tokens = self.transformer(**model_inputs, return_dict=True).last_hidden_state
        return tokens, model_inputs["attention_mask"].bool(), None

    def forward_features(
        self,
        texts: Sequence[str | None] | None = None,
        text_inputs: Mapping[str, Tensor] | None = None,
    ) -> EncoderOutput:
        """Same as `forward`.

        Args:
            texts: One text per sample (``None`` for a missing text).
            text_inputs: The output of `tokenize`.

        Returns:
            The word tokens and their mask.

        Raises:
            ShapeError: Both or neither input is given, or an input is malformed.

        Examples:
            >>> encoder.forward_features(["a cat"]).tokens.ndim
            3
        """
        return self.forward(texts=texts, text_inputs=text_inputs)


def _load_error(path: os.PathLike[str], error: Exception) -> CheckpointError:
    return CheckpointError(f"cannot load a text model from {os.fspath(path)!r}: {error}")


def _require_any_file(path: Path, names: tuple[str, ...]) -> None:
    # The libraries' own errors for a directory of the wrong kind are about tokenizer backends.
    if not any((path / name).is_file() for name in names):
        raise CheckpointError(
            f"{os.fspath(path)!r} holds none of {', '.join(names)}; it is not a model directory "
            "saved with save_pretrained()/save()"
        )


@register("text_encoder", "sentence_transformers")
class SentenceTransformersTextEncoder(BaseTextEncoder):
    """A sentence-transformers model as a text encoder, loaded offline.

    Tokens come from the model's underlying Hugging Face transformer; the full
    sentence-transformers pipeline (pooling, normalization) stays available through
    `sentence_embedding`.

    Args:
        model_name_or_path: A local sentence-transformers directory or a known offline name
            (see `fusionkit.encoders.weights.OFFLINE_TEXT_MODELS`).
        max_length: Longest token sequence of `forward`, special tokens included.
        freeze: Stop gradients and keep eval mode (see `BaseTextEncoder`).

    Attributes:
        sentence_transformer: The loaded ``SentenceTransformer`` (on the CPU until moved).

    Raises:
        ConfigError: The name is unknown or ``max_length`` is invalid.
        CheckpointError: The directory is missing or holds no loadable model.
        MissingDependencyError: The offline package of a known name is not installed.

    Examples:
        >>> encoder = SentenceTransformersTextEncoder("all-MiniLM-L6-v2", max_length=32)
        >>> encoder(["a red dress"]).tokens.shape
        torch.Size([1, 5, 384])
    """

    def __init__(
        self,
        model_name_or_path: str = "all-MiniLM-L6-v2",
        max_length: int = 64,
        freeze: bool = False,
    ) -> None:
        path = resolve_text_model_path(model_name_or_path)
        _require_any_file(path, ("modules.json", "config.json"))
        enforce_offline_mode()
        from sentence_transformers import SentenceTransformer

        try:
            model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        except (OSError, ValueError) as error:
            raise _load_error(path, error) from error
        super().__init__(model.tokenizer, max_length, freeze)
        self.sentence_transformer: SentenceTransformer = model
        self._finish_init()

    @property
    def transformer(self) -> nn.Module:
        """The Hugging Face transformer inside the sentence-transformers pipeline."""
        model = getattr(self.sentence_transformer, "transformers_model", None)
        # sentence-transformers before 5 has no transformers_model; its first module holds it.
        return model if model is not None else self.sentence_transformer[0].auto_model

    def sentence_embedding(self, texts: Sequence[str]) -> Tensor:
        """Embed whole sentences through the full sentence-transformers pipeline.

        Uses the model's own pooling and normalization and its own truncation length
        (not `max_length`). Runs without gradients: for similarity checks and retrieval.

        Args:
            texts: One text per sample; ``None`` is not accepted here.

        Returns:
            Float tensor ``(B, width)`` on the model's device (unit length for models that
            normalize, such as all-MiniLM-L6-v2).

        Raises:
            ShapeError: ``texts`` is a single string, empty, or holds a non-string.

        Examples:
            >>> a, b = encoder.sentence_embedding(["A cat.", "A kitten."])
            >>> float(a @ b) > 0.5
            True
        """
        checked = check_texts(texts)
        if any(text is None for text in checked):
            raise ShapeError("texts: sentence_embedding needs a text for every sample, got None")
        embeddings = self.sentence_transformer.encode(
            checked, convert_to_tensor=True, show_progress_bar=False
        )
        # encode() returns an inference-mode tensor; a clone is an ordinary tensor that later
        # autograd code can use as a constant.
        return embeddings.clone()


@register("text_encoder", "huggingface")
class HuggingFaceTextEncoder(BaseTextEncoder):
    """A Hugging Face encoder model (BERT, RoBERTa, DistilBERT...) from a local directory.

    A dual encoder (``CLIPModel``, ``SiglipModel``) gives its text tower; a ``CLIPTextModel``
    or ``SiglipTextModel`` folder works alone. CLIP and SigLIP mark the token they pool in
    ``summary`` (CLIP: the end-of-text token; SigLIP: the last position, texts padded to
    ``max_length``, so keep ``max_length`` at the model's 64); BERT-style models mark none.

    Args:
        model_name_or_path: A local directory saved with ``save_pretrained`` (model and
            tokenizer), or a known offline name (see
            `fusionkit.encoders.weights.OFFLINE_TEXT_MODELS`). Hub ids are refused.
        max_length: Longest token sequence, special tokens included.
        freeze: Stop gradients and keep eval mode (see `BaseTextEncoder`).

    Attributes:
        model: The ``transformers`` model (``AutoModel``); of a dual encoder, its text tower.
        pooling: Where the model pools its text (a value of
            `fusionkit.encoders.hf_clip.TEXT_POOLING`), or None.

    Raises:
        ConfigError: The name is neither a local directory nor a known offline name, the
            model has no ``hidden_size``, or ``max_length`` is invalid.
        CheckpointError: The directory is missing or holds no loadable model or tokenizer.
        MissingDependencyError: The offline package of a known name is not installed.

    Examples:
        >>> encoder = HuggingFaceTextEncoder("/models/bert-tiny", max_length=16)
        >>> encoder(["a red dress", None]).mask.shape
        torch.Size([2, 5])
    """

    def __init__(
        self,
        model_name_or_path: str,
        max_length: int = 64,
        freeze: bool = False,
    ) -> None:
        path = resolve_text_model_path(model_name_or_path)
        _require_any_file(path, ("config.json",))
        enforce_offline_mode()
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = load_hf_model(path)
        except (OSError, ValueError) as error:
            raise _load_error(path, error) from error
        super().__init__(tokenizer, max_length, freeze)
        self.model = text_tower(model)
        self.pooling = TEXT_POOLING.get(getattr(self.model.config, "model_type", ""))
        if self.pooling == "last":
            self.padding = "max_length"
        self._finish_init()

    @property
    def transformer(self) -> nn.Module:
        """The ``transformers`` model, same as `model`."""
        return self.model

    def _encode(self, model_inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        return encode_text_tower(self.model, self.pooling, model_inputs)
