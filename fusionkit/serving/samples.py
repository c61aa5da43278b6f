"""The samples of a prediction request: validated, decoded, predicted in batches.

The parts of `fusionkit.serving.server` that need no web framework: `prepare_sample` turns
the fields of a request into the inputs of `Predictor.predict` (images decoded with
`fusionkit.data.open_image`, so Pillow's decompression-bomb limit holds; never a path on the
server), `predict_samples` runs a micro-batch of them, `warm_up` runs the model on synthetic
samples, `tune_forward_batch` picks the forward batch size that costs least per sample and
`model_metadata` describes the model to clients.

Examples:
    >>> from types import SimpleNamespace
    >>> prepare_sample({"text": "red tee"}, {"text": SimpleNamespace(kind="text")}, 100)
    {'text': 'red tee'}
"""

from __future__ import annotations

import base64
import binascii
import importlib
import io
import random
import statistics
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from PIL import Image

from fusionkit.data import open_image
from fusionkit.errors import DataError, FusionkitError, did_you_mean

if TYPE_CHECKING:
    from fusionkit.serving.predictor import Predictor

__all__ = [
    "forward_batch_sizes",
    "model_metadata",
    "predict_samples",
    "prepare_sample",
    "tune_forward_batch",
    "warm_up",
]

_WARM_UP_TEXT = "a red striped cotton shirt with short sleeves"


class _Upload(io.BytesIO):
    """Uploaded bytes that name their field in Pillow's and `open_image`'s messages."""

    def __init__(self, data: bytes, label: str) -> None:
        super().__init__(data)
        self.label = label

    def __repr__(self) -> str:
        return self.label

    __str__ = __repr__


def _image_value(name: str, value: Any) -> Image.Image:
    """An image input's value (bytes, or base64 text / a ``data:`` URL) decoded safely."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("data:") and "," in text:
            text = text.split(",", 1)[1]
        try:
            value = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise DataError(
                f"{name}: expected an image file upload or base64 text, got "
                f"{value[:40]!r}{'...' if len(value) > 40 else ''}"
            ) from None
    if not isinstance(value, bytes):
        raise DataError(f"{name}: expected an image (base64 text), got {type(value).__name__}")
    return open_image(_Upload(value, repr(name)))


def _text_value(name: str, value: Any, max_chars: int) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{name}: the uploaded text is not UTF-8") from None
    if not isinstance(value, str):
        raise DataError(f"{name}: expected a text, got {type(value).__name__}")
    if len(value) > max_chars:
        raise DataError(
            f"{name}: the text has {len(value)} characters, over the limit of {max_chars}"
        )
    return value


def prepare_sample(raw: Any, inputs: Mapping[str, Any], max_text_chars: int) -> dict[str, Any]:
    """Validate one request sample and decode its images.

    Args:
        raw: Input name → value: bytes or base64 text for an image input, text (or UTF-8
            bytes) for a text input; ``None`` (or an empty image) for a missing one.
        inputs: The model's inputs (``model.config.inputs``: name → kind and column).
        max_text_chars: Longest text allowed.

    Returns:
        Input name → PIL image or text, in the model's input order (missing inputs left out).

    Raises:
        DataError: Not a mapping, an unknown input, an unreadable image (also a truncated one
            or one over Pillow's decompression-bomb limit), a text over the limit, or no
            input at all.

    Examples:
        >>> from types import SimpleNamespace
        >>> prepare_sample({"text": "red tee"}, {"text": SimpleNamespace(kind="text")}, 100)
        {'text': 'red tee'}
    """
    if not isinstance(raw, Mapping):
        raise DataError(f"a sample is an object of input name → value, got {type(raw).__name__}")
    sample: dict[str, Any] = {}
    for name, value in raw.items():
        spec = inputs.get(name)
        if spec is None:
            hint = did_you_mean(str(name), list(inputs), what="the model's inputs")
            raise DataError(f"unknown field {name!r}; {hint}")
        if value is None or (spec.kind == "image" and value in (b"", "")):
            continue  # missing (a form's empty file field: no file chosen)
        if spec.kind == "image":
            sample[name] = _image_value(name, value)
        else:
            sample[name] = _text_value(name, value, max_text_chars)
    if not any(value != "" for value in sample.values()):
        raise DataError(f"no input: give at least one of the model's inputs ({', '.join(inputs)})")
    return {name: sample[name] for name in inputs if name in sample}


def predict_samples(predictor: Predictor, samples: list[dict[str, Any]]) -> list[Any]:
    """Predict prepared samples in one call; a sample that fails gets its error alone.

    Inputs some samples lack are given as ``None`` (masked, as a missing modality).

    Args:
        predictor: The predictor.
        samples: Samples from `prepare_sample`.

    Returns:
        Per sample, its `Predictor.predict` answer or the `FusionkitError` it raised.

    Examples:
        >>> predict_samples(predictor, [{"text": "red tee"}])  # doctest: +SKIP
        [{'color': {'label': 'red', ...}}]
    """
    names = [n for n in predictor.model.modalities if any(n in s for s in samples)]
    try:
        return list(predictor.predict(inputs={n: [s.get(n) for s in samples] for n in names}))
    except FusionkitError as error:
        if len(samples) == 1:
            return [error]
        return [predict_samples(predictor, [sample])[0] for sample in samples]


def _warm_up_sample(predictor: Predictor) -> dict[str, Any]:
    """A synthetic sample with every input: a noise image at the model's size, a sentence."""
    rng = random.Random(0)
    side = getattr(predictor.model.config, "image_size", None) or 224
    image = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
    return {
        name: image if spec.kind == "image" else _WARM_UP_TEXT
        for name, spec in predictor.model.config.inputs.items()
    }


def warm_up(predictor: Predictor, batch_sizes: tuple[int, ...] = (1, 1)) -> None:
    """Run the model on a synthetic sample of every input, once per batch size.

    The first forward passes allocate memory and pick kernels; afterwards a request's latency
    is the model's own.

    Args:
        predictor: The predictor.
        batch_sizes: Samples per warm-up pass.

    Examples:
        >>> warm_up(predictor, (1, 1, 32))  # doctest: +SKIP
    """
    sample = _warm_up_sample(predictor)
    for size in batch_sizes:
        predictor.predict(inputs={name: [value] * size for name, value in sample.items()})


def forward_batch_sizes(max_batch: int) -> list[int]:
    """The forward batch sizes `tune_forward_batch` tries: powers of two up to ``max_batch``,
    and ``max_batch`` itself.

    Examples:
        >>> forward_batch_sizes(24)
        [1, 2, 4, 8, 16, 24]
    """
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i <= max_batch]
    return sizes if sizes[-1] == max_batch else [*sizes, max_batch]


def tune_forward_batch(
    predictor: Predictor, max_batch: int, repeats: int = 2
) -> dict[int, float]:
    """Set ``predictor.batch_size`` to the forward batch with the lowest time per sample.

    A micro-batch of ``max_batch`` samples need not run as one forward: on a CPU, eager
    PyTorch often runs a batch of 4 at half the cost per sample of a batch of 32, whose
    activations no longer fit the caches. This times each size of `forward_batch_sizes` on
    synthetic samples (the median of ``repeats`` runs over ``max_batch`` samples) and keeps the
    fastest per sample; `Predictor.predict` then cuts every micro-batch into forwards of that
    size.

    Args:
        predictor: The predictor (eager or ONNX).
        max_batch: The server's largest micro-batch.
        repeats: Timed runs per size.

    Returns:
        Forward batch size → measured milliseconds per sample.

    Examples:
        >>> tune_forward_batch(predictor, 32)  # doctest: +SKIP
        {1: 21.0, 2: 15.3, 4: 12.4, 8: 17.5, 16: 21.9, 32: 29.7}
    """
    sample = _warm_up_sample(predictor)
    inputs = {name: [value] * max_batch for name, value in sample.items()}
    timings: dict[int, float] = {}
    for size in forward_batch_sizes(max_batch):
        predictor.batch_size = size
        predictor.predict(inputs={name: values[:size] for name, values in inputs.items()})
        runs = []
        for _ in range(repeats):
            began = time.perf_counter()
            predictor.predict(inputs=inputs)
            runs.append((time.perf_counter() - began) / max_batch)
        timings[size] = round(statistics.median(runs) * 1000, 3)
    predictor.batch_size = min(timings, key=timings.__getitem__)
    return timings


def model_metadata(predictor: Predictor) -> dict[str, Any]:
    """What a client needs to know of the served model.

    Args:
        predictor: The predictor.

    Returns:
        ``fusionkit_version``, ``model``, ``device``, ``image_size``, ``inputs`` (name →
        ``kind``, ``column`` and ``share`` for an input using another's encoder),
        ``backbones`` (input name → its encoder section) and ``tasks`` (name → ``classes``
        and ``multi_label``).

    Examples:
        >>> model_metadata(predictor)["tasks"]  # doctest: +SKIP
        {'color': {'classes': ['blue', 'red'], 'multi_label': False}}
    """
    config = predictor.model.config
    inputs: dict[str, Any] = {}
    for name, spec in config.inputs.items():
        inputs[name] = {"kind": spec.kind, "column": spec.column}
        if getattr(spec, "share", None) is not None:
            inputs[name]["share"] = spec.share
    return {
        "fusionkit_version": getattr(importlib.import_module("fusionkit"), "__version__", None),
        "model": getattr(config, "model", None),  # an ONNX export's config has none
        "device": str(predictor.device),
        "image_size": getattr(config, "image_size", None),
        "inputs": inputs,
        "backbones": {
            name: spec.encoder.to_dict()
            for name, spec in config.inputs.items()
            if getattr(spec, "encoder", None) is not None
        },
        "tasks": {
            task: {"classes": list(spec.class_names()), "multi_label": spec.multi_label}
            for task, spec in predictor.model.tasks.items()
        },
    }
