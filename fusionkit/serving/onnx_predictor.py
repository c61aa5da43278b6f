"""Prediction and evaluation with an ONNX export (see `fusionkit.serving.export`), on onnxruntime.

`OnnxPredictor` is a `fusionkit.serving.Predictor` whose model is an `OnnxModel`: the export's
graph on onnxruntime's CPU provider, with the tokenizers and image transforms that
``export.json`` names. ``Predictor.from_pretrained`` returns one for an export folder, so
``fusionkit predict --checkpoint EXPORT`` and ``fusionkit evaluate --checkpoint EXPORT --data M``
work as with a checkpoint; torch runs only the image transforms.

Examples:
    >>> predictor = OnnxPredictor.from_pretrained("exports/quickstart")  # doctest: +SKIP
    >>> predictor.predict(texts=["red striped tee"], images=["tee.png"])[0]["color"]["label"]
    ... # doctest: +SKIP
    'red'
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fusionkit.data import InputColumn, build_image_transform
from fusionkit.encoders.text import check_texts
from fusionkit.errors import CheckpointError, ConfigError, DataError, ShapeError
from fusionkit.io import write_json
from fusionkit.serving.export import EXPORT_FILE, is_export_dir, require_export_dependencies
from fusionkit.serving.predictor import Predictor
from fusionkit.tasks import TaskSpec, parse_tasks

__all__ = ["ExportOutput", "OnnxModel", "OnnxPredictor", "evaluate_export"]


@dataclass(frozen=True)
class _ExportConfig:
    """The part of a model config that prediction reads: the inputs and the shorthand flag."""

    inputs: dict[str, InputColumn]
    shorthand: bool
    image_size: int | None = None


@dataclass
class ExportOutput:
    """What `OnnxModel` returns: the fields of `fusionkit.models.CMACLIPOutput` it computes.

    Attributes:
        logits: Task → ``(B, C)``.
        modality_weights: Task → ``(B, M)``.
        present: Input name → ``(B,)`` bool.
    """

    logits: dict[str, Tensor]
    modality_weights: dict[str, Tensor]
    present: dict[str, Tensor] = field(default_factory=dict)


class _NotInExport(ConfigError, AttributeError):
    """A model attribute an ONNX export does not have (explain, training)."""


class OnnxModel:
    """An export's graph on onnxruntime, with the surface of `fusionkit.models.CMACLIP` that
    prediction uses: ``modalities``, ``tasks``, ``config.inputs``, ``inputs_of_kind`` and
    ``model(inputs=..., present=...)``.

    Args:
        directory: The export folder.

    Attributes:
        description: The content of ``export.json``.
        session: The ``onnxruntime.InferenceSession`` (CPU).
        tokenizers: Text input name → its Hugging Face tokenizer.

    Raises:
        CheckpointError: ``directory`` is not an export folder, or a file of it is unreadable.
        MissingDependencyError: onnxruntime is not installed.

    Examples:
        >>> model = OnnxModel("exports/quickstart")  # doctest: +SKIP
        >>> model(inputs={"text": ["red tee"]}).logits["color"].shape  # doctest: +SKIP
        torch.Size([1, 2])
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        directory = Path(directory)
        if not is_export_dir(directory):
            raise CheckpointError(f"{directory} has no {EXPORT_FILE}; is it an ONNX export?")
        require_export_dependencies("onnxruntime")
        import onnxruntime
        from transformers import AutoTokenizer

        try:
            description = json.loads((directory / EXPORT_FILE).read_text(encoding="utf-8"))
            self._entries = {entry["name"]: entry for entry in description["inputs"]}
            self.session = onnxruntime.InferenceSession(
                str(directory / description["model"]), providers=["CPUExecutionProvider"]
            )
            self.tokenizers = {
                name: AutoTokenizer.from_pretrained(
                    str(directory / entry["tokenizer"]), local_files_only=True
                )
                for name, entry in self._entries.items()
                if entry["kind"] == "text"
            }
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{directory}: unreadable ONNX export ({error})") from None
        except Exception as error:  # onnxruntime's own errors derive from Exception only
            raise CheckpointError(
                f"{directory}: onnxruntime cannot load the graph ({error})"
            ) from None
        self.directory = directory
        self.description = description
        self.modalities = tuple(description["modalities"])
        self.tasks: dict[str, TaskSpec] = parse_tasks(description["tasks"])
        self.config = _ExportConfig(
            {n: InputColumn(e["kind"], e["column"]) for n, e in self._entries.items()},
            bool(description.get("shorthand", False)),
        )
        shorthand = self.config.shorthand
        # What the CLI reads of the shorthand's encoders: whether the model has them.
        self.vision = shorthand and "image" in self._entries
        self.text = shorthand and "text" in self._entries

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise _NotInExport(
            f"an ONNX export has no {name!r}: it predicts and evaluates only; use the checkpoint "
            "it was exported from for this"
        )

    def image_config(self, name: str) -> dict[str, Any]:
        """The data config of image input ``name``, for `fusionkit.data.build_image_transform`."""
        return dict(self._entries[name]["data_config"])

    def inputs_of_kind(self, kind: str) -> list[str]:
        """The names of the ``"image"`` or ``"text"`` inputs, in order."""
        return [n for n, entry in self._entries.items() if entry["kind"] == kind]

    def to(self, device: torch.device | str) -> OnnxModel:
        """Stay on the CPU (the only place it runs); anything else is refused."""
        if torch.device(device).type != "cpu":
            raise ConfigError(f"an ONNX export runs on the CPU (onnxruntime), not on {device}")
        return self

    def eval(self) -> OnnxModel:
        """No-op: the graph is in evaluation mode."""
        return self

    def _text_feeds(
        self, name: str, texts: Sequence[str | None], flags: np.ndarray
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        entry = self._entries[name]
        checked = check_texts(texts)
        here = flags & np.array([text is not None for text in checked])
        encoded = self.tokenizers[name](
            ["" if text is None else text for text in checked],
            padding=entry.get("padding", "longest"),
            truncation=True,
            max_length=entry["max_length"],
            return_attention_mask=True,
            return_tensors="np",
        )
        encoded["attention_mask"] = encoded["attention_mask"] * here[:, None]
        feeds = {}
        for onnx_name in entry["onnx_inputs"]:
            key = onnx_name[len(name) + 1 :]
            if key not in encoded:
                raise CheckpointError(f"the tokenizer of {name!r} gives no {key!r}")
            feeds[onnx_name] = np.ascontiguousarray(encoded[key], dtype=np.int64)
        return feeds, here

    def __call__(
        self, inputs: Mapping[str, Any], present: Mapping[str, Tensor] | None = None
    ) -> ExportOutput:
        """Run the graph on a batch.

        Args:
            inputs: Input name → ``(B, 3, H, W)`` preprocessed images, or ``B`` texts (``None``
                for a missing one). Inputs left out are absent for the whole batch.
            present: Input name → ``(B,)`` bool, False where a sample lacks that input.

        Returns:
            The logits, modality weights and presence flags.

        Raises:
            ShapeError: No input, an unknown input, inputs of different batch sizes, images of
                the wrong shape, bad texts, or a sample with no input at all.
        """
        unknown = [name for name in inputs if name not in self._entries]
        if unknown or not inputs:
            raise ShapeError(f"give inputs among {list(self.modalities)}; got {list(inputs)}")
        sizes = {name: len(value) for name, value in inputs.items()}
        if len(set(sizes.values())) > 1:
            raise ShapeError(f"the inputs disagree on the batch size: {sizes}")
        batch = next(iter(sizes.values()))
        feeds: dict[str, np.ndarray] = {}
        flags: dict[str, np.ndarray] = {}
        for name in self.modalities:
            entry, value = self._entries[name], inputs.get(name)
            given = np.full(batch, value is not None)
            if present is not None and name in present:
                flags_given = np.asarray(present[name].cpu(), dtype=bool)
                if flags_given.shape != (batch,):
                    raise ShapeError(f"present[{name!r}] must be a (B,) = ({batch},) bool tensor")
                given &= flags_given
            if entry["kind"] == "text":
                texts = [None] * batch if value is None else value
                text_feeds, flags[name] = self._text_feeds(name, texts, given)
                feeds.update(text_feeds)
                continue
            shape = (batch, *self.image_config(name)["input_size"])
            pixels = torch.zeros(shape) if value is None else value
            if not isinstance(pixels, Tensor) or tuple(pixels.shape) != shape:
                found = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels)
                raise ShapeError(f"inputs[{name!r}]: expected images of shape {shape}, got {found}")
            feeds[f"{name}.pixels"] = pixels.detach().cpu().float().numpy()
            feeds[f"{name}.present"] = flags[name] = given
        empty = np.flatnonzero(~np.any(np.stack(list(flags.values())), axis=0)).tolist()
        if empty:
            raise ShapeError(f"samples {empty[:10]} have no modality present; nothing to fuse")
        names = [output.name for output in self.session.get_outputs()]
        outputs = dict(zip(names, self.session.run(None, feeds), strict=True))
        return ExportOutput(
            logits={t: torch.from_numpy(outputs[f"{t}.logits"]) for t in self.tasks},
            modality_weights={
                t: torch.from_numpy(outputs[f"{t}.modality_weights"]) for t in self.tasks
            },
            present={name: torch.from_numpy(flag) for name, flag in flags.items()},
        )


class OnnxPredictor(Predictor):
    """A `Predictor` on an ONNX export: same ``predict`` and ``predict_manifest`` output.

    Args:
        model: The `OnnxModel`.
        batch_size: Samples per onnxruntime call.
        image_transforms: Image input name → its PIL → tensor transform.

    Examples:
        >>> predictor = OnnxPredictor.from_pretrained("exports/shop")  # doctest: +SKIP
        >>> predictor.predict(inputs={"title": ["red tee"], "front": ["tee.png"]})
        ... # doctest: +SKIP
    """

    def __init__(
        self, model: OnnxModel, batch_size: int = 32, image_transforms: dict[str, Any] | None = None
    ) -> None:
        transforms = dict(image_transforms or {})
        first = next(iter(transforms.values()), None)
        super().__init__(model, first, "cpu", batch_size, image_transforms=transforms)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], device: str = "auto", batch_size: int = 32
    ) -> OnnxPredictor:
        """Load an export folder written by `fusionkit.serving.export_onnx`.

        Args:
            directory: The export folder.
            device: ``auto`` or ``cpu`` (onnxruntime runs on the CPU).
            batch_size: Samples per onnxruntime call.

        Returns:
            The predictor, with the evaluation transform of each image input.

        Raises:
            CheckpointError: Not an export folder, or an unreadable one.
            ConfigError: ``device`` is ``cuda``.
            MissingDependencyError: onnxruntime is not installed.

        Examples:
            >>> predictor = OnnxPredictor.from_pretrained("exports/quickstart")  # doctest: +SKIP
        """
        if device not in ("auto", "cpu"):
            raise ConfigError(f"an ONNX export runs on the CPU (onnxruntime); got device={device}")
        model = OnnxModel(directory)
        transforms = {
            name: build_image_transform(model.image_config(name))
            for name in model.inputs_of_kind("image")
        }
        return cls(model, batch_size, transforms)


def evaluate_export(
    export: str | os.PathLike[str],
    data: str | os.PathLike[str] | None,
    *,
    precisions: Sequence[float] = (0.9,),
    batch_size: int = 32,
    output: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Evaluate an ONNX export on a manifest and write a report, as
    `fusionkit.training.evaluate_checkpoint` does for a checkpoint.

    The report has the same metrics; its ``loss`` is ``None`` (the graph has no loss; each
    task's ``log_loss`` is there).

    Args:
        export: The export folder.
        data: The manifest (an export carries no data set, so it is required).
        precisions: Precisions for recall-at-precision.
        batch_size: Samples per onnxruntime call.
        output: Where to write the report (default ``<export>/report.json``).

    Returns:
        The report, with ``checkpoint``, ``data``, ``skipped_rows`` and ``report_path``.

    Raises:
        ConfigError: No manifest given.
        DataError: The manifest cannot be read or has no usable sample.
        CheckpointError: The export cannot be loaded.

    Examples:
        >>> evaluate_export("exports/quickstart", "data/test.csv")["mean"]["accuracy"]
        ... # doctest: +SKIP
        0.91
    """
    from torch.utils.data import DataLoader

    from fusionkit.data import ManifestDataset, make_collate
    from fusionkit.training import compute_report
    from fusionkit.training.evaluate import EvalOutputs

    if data is None:
        raise ConfigError("an ONNX export carries no data set: pass --data MANIFEST")
    predictor = OnnxPredictor.from_pretrained(export, batch_size=batch_size)
    model = predictor.model
    dataset = ManifestDataset(
        data, model.tasks, predictor.image_transforms, inputs=model.config.inputs
    )
    if len(dataset) == 0:
        raise DataError(f"{data}: no usable sample to evaluate (skipped: {dataset.skipped})")
    shapes = {
        name: tuple(model.image_config(name)["input_size"])
        for name in model.inputs_of_kind("image")
    }
    collate = make_collate(model.tasks, shapes, inputs=model.config.inputs)
    outputs = EvalOutputs()
    parts: dict[str, dict[str, list[Tensor]]] = {"scores": {}, "targets": {}, "weights": {}}
    present: dict[str, list[Tensor]] = {}
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        result = model(batch.inputs, batch.present)
        outputs.ids.extend(batch.ids)
        for name, flags in result.present.items():
            present.setdefault(name, []).append(flags)
        for task, spec in model.tasks.items():
            logits = result.logits[task].float()
            scores = logits.sigmoid() if spec.multi_label else logits.softmax(dim=1)
            parts["scores"].setdefault(task, []).append(scores)
            parts["targets"].setdefault(task, []).append(batch.targets[task])
            parts["weights"].setdefault(task, []).append(result.modality_weights[task])
    outputs.scores, outputs.targets, outputs.weights = (
        {task: torch.cat(values) for task, values in parts[kind].items()}
        for kind in ("scores", "targets", "weights")
    )
    outputs.present = {name: torch.cat(values) for name, values in present.items()}
    report = compute_report(outputs, model.tasks, model.modalities, precisions)
    report = {"checkpoint": str(export), "data": str(data), **report}
    report["skipped_rows"] = dict(dataset.skipped)
    target = Path(output) if output is not None else Path(export) / "report.json"
    write_json(target, report)
    report["report_path"] = str(target)
    return report
