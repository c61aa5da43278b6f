"""Prediction with a trained checkpoint: labels, scores and modality weights per task.

Examples:
    >>> predictor = Predictor.from_pretrained("runs/quickstart/best")  # doctest: +SKIP
    >>> predictor.predict(images=["shirt.png"], texts=["red striped tee"])[0]["color"]["label"]
    ... # doctest: +SKIP
    'red'
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from fusionkit.data import build_image_transform, image_data_config, open_image
from fusionkit.device import autocast, inference_dtype, resolve_device
from fusionkit.errors import DataError
from fusionkit.models import CMACLIP
from fusionkit.models.members import MemberBlend, members_run
from fusionkit.models.unimodal import FUSED
from fusionkit.runs import resolve_run_dir, run_precision
from fusionkit.serving.export import is_export_dir
from fusionkit.tasks import MULTI_LABEL_THRESHOLD

if TYPE_CHECKING:
    from fusionkit.serving.manifest import ManifestPredictions

__all__ = ["MemberPredictor", "Predictor"]


class Predictor:
    """Classify samples with a trained model: one image and one text, or named inputs.

    Args:
        model: A trained :class:`~fusionkit.models.CMACLIP`.
        image_transform: PIL → tensor transform of the model's vision backbone (of every
            image input without one of its own in ``image_transforms``).
        device: Where to run.
        batch_size: Samples per forward pass.
        image_transforms: Image input name → its transform, for a model with several image
            inputs whose encoders differ.
        precision: The autocast dtype of every forward (``torch.bfloat16`` or
            ``torch.float16``); ``None`` runs in float32.

    Examples:
        >>> predictor = Predictor.from_pretrained("runs/quickstart")  # doctest: +SKIP
        >>> predictor.predict(texts=["navy polka dot dress"])  # doctest: +SKIP
        [{'color': {'label': 'blue', 'score': 0.97, ...}, ...}]
    """

    def __init__(
        self,
        model: Any,
        image_transform: Any = None,
        device: torch.device | str = "cpu",
        batch_size: int = 32,
        image_transforms: dict[str, Any] | None = None,
        precision: torch.dtype | None = None,
    ) -> None:
        self.model = model.to(device).eval()
        self.precision = precision
        self.image_transform = image_transform
        self.image_transforms = dict(image_transforms or {})
        self.device = torch.device(device)
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike[str],
        device: str = "auto",
        batch_size: int = 32,
        precision: str | None = None,
    ) -> Predictor:
        """Load a checkpoint folder (or a run folder: its ``best/``), or an ONNX export.

        A run folder trained with ``train.unimodal_models`` gives a :class:`MemberPredictor`:
        the blend of its fused and unimodal models, as ``fusionkit evaluate`` scores it.

        An export folder (one with ``export.json``, written by
        :func:`~fusionkit.serving.export_onnx`) gives an
        :class:`~fusionkit.serving.OnnxPredictor`, with the same ``predict`` and
        ``predict_manifest``: ``fusionkit predict --checkpoint EXPORT`` works unchanged.

        Args:
            directory: ``run/best``, ``run/last``, ``run``, or an export folder.
            device: ``auto``, ``cpu`` or ``cuda`` (an export: ``auto`` or ``cpu``).
            batch_size: Samples per forward pass.
            precision: ``auto``, ``fp32``, ``bf16`` or ``fp16``; default the run's
                ``train.precision`` (``auto`` when the checkpoint has left its run folder):
                bfloat16 autocast on CUDA, float32 on CPU unless the run trained in ``bf16``
                (see :func:`~fusionkit.device.inference_dtype`). Not used
                by an export.

        Returns:
            The predictor, using the checkpoint's evaluation image transform.

        Raises:
            CheckpointError: The checkpoint (or export) cannot be loaded.

        Examples:
            >>> predictor = Predictor.from_pretrained("runs/quickstart/best")  # doctest: +SKIP
            >>> type(Predictor.from_pretrained("exports/quickstart")).__name__  # doctest: +SKIP
            'OnnxPredictor'
        """
        run = members_run(directory)
        if run is not None:
            return MemberPredictor.from_run(run, device=device, batch_size=batch_size,
                                            precision=precision)
        if is_export_dir(directory):
            # From the package: onnx_predictor imports this module for the base class.
            from fusionkit.serving import OnnxPredictor

            return OnnxPredictor.from_pretrained(directory, device=device, batch_size=batch_size)
        dev = resolve_device(device)
        folder = resolve_run_dir(directory)
        model = CMACLIP.from_pretrained(folder, map_location=dev)
        dtype = inference_dtype(precision or run_precision(folder), dev)
        transforms = {
            name: build_image_transform(
                image_data_config(model.encoder_of(name).data_config, model.config.image_size)
            )
            for name in model.inputs_of_kind("image")
        }
        first = next(iter(transforms.values()), None)
        return cls(model, first, dev, batch_size, image_transforms=transforms, precision=dtype)

    def _image(
        self, image: Image.Image | str | os.PathLike[str] | None, name: str | None = None
    ) -> torch.Tensor | None:
        if image is None:
            return None
        if not isinstance(image, Image.Image):
            image = open_image(image)
        transform = self.image_transforms.get(name, self.image_transform)
        return transform(image.convert("RGB"))

    def _named(
        self,
        images: Sequence[Any] | None,
        texts: Sequence[str | None] | None,
        inputs: dict[str, Sequence[Any]] | None,
    ) -> dict[str, Sequence[Any]]:
        """Input name → values, with ``images`` / ``texts`` given to the one such input."""
        named = dict(inputs or {})
        for kind, values, argument in (("image", images, "images"), ("text", texts, "texts")):
            if values is None:
                continue
            names = self.model.inputs_of_kind(kind)
            if not names:
                other = "texts" if kind == "image" else "images"
                encoder = "vision" if kind == "image" else "text"
                raise DataError(f"this model has no {encoder} encoder; give {other} only")
            if len(names) > 1:
                raise DataError(
                    f"{argument}: this model has the {kind} inputs {names}; give inputs={{...}}"
                )
            named[names[0]] = values
        unknown = [name for name in named if name not in self.model.config.inputs]
        if unknown:
            raise DataError(
                f"no input {unknown[0]!r}: the model's inputs are {list(self.model.modalities)}"
            )
        if not named:
            raise DataError("give images, texts or both (or inputs={name: values})")
        counts = {name: len(values) for name, values in named.items()}
        if len(set(counts.values())) > 1:
            if set(counts) == {"image", "text"} and self.model.config.shorthand:
                raise DataError(f"{counts['image']} images but {counts['text']} texts")
            raise DataError(f"the inputs have different numbers of samples: {counts}")
        return named

    def _forward(
        self, values: dict[str, Any], present: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Task → logits and task → modality weights of one batch."""
        output = self.model(inputs=values, present=present)
        return output.logits, output.modality_weights

    def _describe(
        self, logits: dict[str, torch.Tensor], modality_weights: dict[str, torch.Tensor],
        row: int,
    ) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for task, spec in self.model.tasks.items():
            task_logits = logits[task][row].float()
            names = spec.class_names()
            weights = {
                m: round(float(w), 6)
                for m, w in zip(self.model.modalities, modality_weights[task][row],
                                strict=True)
            }
            if spec.multi_label:
                probs = task_logits.sigmoid()
                labels = [n for n, p in zip(names, probs, strict=True)
                          if p >= MULTI_LABEL_THRESHOLD]
                entry: dict[str, Any] = {"labels": labels}
            else:
                probs = task_logits.softmax(dim=0)
                best = int(probs.argmax())
                entry = {"label": names[best], "score": round(float(probs[best]), 6)}
            entry["scores"] = {n: round(float(p), 6) for n, p in zip(names, probs, strict=True)}
            entry["modality_weights"] = weights
            result[task] = entry
        return result

    def _tensors(
        self, named: dict[str, Sequence[Any]], start: int, stop: int
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Model inputs for samples ``start:stop``: texts as lists (empty → None), images
        transformed and stacked on the device with zeros and ``present`` flags where missing."""
        values: dict[str, Any] = {}
        present: dict[str, torch.Tensor] = {}
        for name, column in named.items():
            if self.model.config.inputs[name].kind == "text":
                values[name] = [t if t else None for t in column[start:stop]]
                continue
            loaded = [self._image(image, name) for image in column[start:stop]]
            shape = next((t.shape for t in loaded if t is not None), None)
            if shape is None:
                shape = self._image(Image.new("RGB", (8, 8)), name).shape
            values[name] = torch.stack(
                [t if t is not None else torch.zeros(shape) for t in loaded]
            ).to(self.device)
            present[name] = torch.tensor([t is not None for t in loaded]).to(self.device)
        return values, present

    @torch.inference_mode()
    def predict(
        self,
        images: Sequence[Image.Image | str | os.PathLike[str] | None] | None = None,
        texts: Sequence[str | None] | None = None,
        *,
        inputs: dict[str, Sequence[Any]] | None = None,
    ) -> list[dict[str, Any]]:
        """Predict every task for each sample.

        Args:
            images: PIL images or paths (``None`` for a sample without image), for the
                model's one image input.
            texts: Texts (``None`` or empty for a sample without text), for its one text
                input.
            inputs: Input name → one value per sample (images or paths for an image input,
                texts for a text input), for a model with named inputs.

        Returns:
            Per sample, task → ``{"label", "score"}`` (single-label) or ``{"labels"}``
            (multi-label, probability >= 0.5), plus ``"scores"`` per class and
            ``"modality_weights"``.

        Raises:
            DataError: No input, lists of different lengths, an unreadable image, an input
                the model does not have, or ``images`` / ``texts`` for a model with several
                inputs of that kind.

        Examples:
            >>> predictor.predict(texts=["red tee"], images=["tee.png"])  # doctest: +SKIP
            >>> predictor.predict(inputs={"title": ["red tee"], "front": ["tee.png"]})
            ... # doctest: +SKIP
        """
        named = self._named(images, texts, inputs)
        count = len(next(iter(named.values())))
        results: list[dict[str, Any]] = []
        for start in range(0, count, self.batch_size):
            stop = min(count, start + self.batch_size)
            values, present = self._tensors(named, start, stop)
            with autocast(self.device, self.precision):
                logits, weights = self._forward(values, present)
            results.extend(self._describe(logits, weights, row) for row in range(stop - start))
        return results

    def predict_manifest(
        self,
        manifest: str | os.PathLike[str],
        out: str | os.PathLike[str],
        *,
        progress: bool = False,
    ) -> ManifestPredictions:
        """Predict every row of a manifest into ``.csv`` or ``.jsonl``; see
        :func:`~fusionkit.serving.manifest.predict_manifest` (a row that cannot be predicted
        gets an ``error`` field, never dropped).

        Returns:
            The output path and its row and error counts.

        Raises:
            DataError: Unreadable manifest, or an unknown output format.

        Examples:
            >>> predictor.predict_manifest("test.csv", "predictions.csv").errors
            ... # doctest: +SKIP
            0
        """
        from fusionkit.serving.manifest import predict_manifest

        return predict_manifest(self, manifest, out, progress=progress)


class MemberPredictor(Predictor):
    """The blend of a run's fused model and its unimodal models (``train.unimodal_models``).

    Each batch runs the fused model and every unimodal model on its own input, and mixes
    their probabilities with the run's ``members.json`` (see
    :mod:`fusionkit.training.members`): the predictions ``fusionkit evaluate`` scores for the
    run folder. A model whose input a sample lacks is left out of that sample's mixture. The
    modality weights are the fused model's. ``model`` is the fused model.

    Args:
        fused: The predictor of the fused model (``run/best``).
        members: Input name (``text``, ``image``) → the predictor of that unimodal model.
        blend: The run's blend.

    Examples:
        >>> predictor = Predictor.from_pretrained("runs/x")  # doctest: +SKIP
        >>> type(predictor).__name__, sorted(predictor.members)  # doctest: +SKIP
        ('MemberPredictor', ['image', 'text'])
    """

    def __init__(
        self, fused: Predictor, members: dict[str, Predictor], blend: MemberBlend
    ) -> None:
        super().__init__(fused.model, fused.image_transform, fused.device, fused.batch_size,
                         image_transforms=fused.image_transforms, precision=fused.precision)
        self.members = dict(members)
        self.blend = blend

    @classmethod
    def from_run(
        cls,
        run: str | os.PathLike[str],
        device: str = "auto",
        batch_size: int = 32,
        precision: str | None = None,
    ) -> MemberPredictor:
        """Load a run folder with ``members.json``; arguments as in
        :meth:`Predictor.from_pretrained`.

        Raises:
            CheckpointError: ``members.json`` or a member's checkpoint cannot be loaded.
        """
        blend = MemberBlend.load(run)
        loaded = {
            name: Predictor.from_pretrained(folder, device=device, batch_size=batch_size,
                                            precision=precision)
            for name, folder in blend.folders(run).items()
        }
        fused = loaded.pop(FUSED)
        return cls(fused, loaded, blend)

    def _forward(
        self, values: dict[str, Any], present: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        output = self.model(inputs=values, present=present)
        count = next(iter(output.logits.values())).shape[0]
        scores = {FUSED: self._probabilities(output.logits)}
        available = {FUSED: torch.ones(count, dtype=torch.bool)}
        for name, member in self.members.items():
            seen = output.present.get(name)
            if name not in values or seen is None:
                scores[name] = {t: torch.zeros_like(p) for t, p in scores[FUSED].items()}
                available[name] = torch.zeros(count, dtype=torch.bool)
                continue
            flags = {name: present[name]} if name in present else None
            logits = member.model(inputs={name: values[name]}, present=flags).logits
            scores[name] = self._probabilities(logits)
            available[name] = seen.cpu()
        blended = {
            task: self.blend.logits(task, {s: by_task[task] for s, by_task in scores.items()},
                                    spec.multi_label, available)
            for task, spec in self.model.tasks.items()
        }
        return blended, output.modality_weights

    def _probabilities(self, logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Task → class probabilities (float32, on the CPU) of task → logits."""
        return {t: self.model.tasks[t].probabilities(x.float().cpu()) for t, x in logits.items()}
