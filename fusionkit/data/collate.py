"""Batching samples whose inputs or labels may be missing.

A sample (as :class:`~fusionkit.data.ManifestDataset` returns it) is a dict with ``id``,
``targets`` (task → class index, list of class indices, or None) and one value per input
name: a ``(3, H, W)`` tensor or None for an image input, a string or None for a text input.
A :class:`Batch` keeps the texts as strings, because tokenisation belongs to the text encoder,
and marks missing images with a boolean mask instead of dropping them, because the fusion
masks a missing input out of its attention rather than seeing zeros.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fusionkit.data.columns import MODALITY_COLUMNS
from fusionkit.errors import ConfigError, DataError, ShapeError
from fusionkit.tasks import MISSING_LABEL, TaskSpec

__all__ = ["Batch", "SampleCollator", "collate_samples", "make_collate"]

#: The inputs of the ``vision:`` / ``text:`` shorthand: name → kind.
SHORTHAND_KINDS = {name: name for name in MODALITY_COLUMNS}
#: ``(3, H, W)``, or input name → ``(3, H, W)``.
ImageShape = Sequence[int] | Mapping[str, Sequence[int]]


@dataclass
class Batch:
    """A batch of samples with inputs keyed by name and their multi-task targets.

    Args:
        ids: Sample ids, length ``B``.
        inputs: Input name → for an image input, float ``(B, 3, H, W)`` with zeros where the
            image is missing (None when every image of the batch is missing and no image
            shape was given to the collate function); for a text input, ``B`` texts, None
            where missing.
        present: Input name → bool ``(B,)``, True where the sample has that input.
        targets: Task name → single-label: long ``(B,)`` with
            :data:`~fusionkit.tasks.MISSING_LABEL` (-100) for a missing label; multi-label:
            float ``(B, C)`` multi-hot with a row of NaN for a missing label.

    Examples:
        >>> batch = Batch(["a"], {"text": ["red tee"]}, {"text": torch.tensor([True])}, {})
        >>> len(batch), batch.texts
        (1, ['red tee'])
    """

    ids: list[str]
    inputs: dict[str, Any]
    present: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]

    def __len__(self) -> int:
        """The batch size ``B``."""
        return len(self.ids)

    @property
    def images(self) -> torch.Tensor | None:
        """The images of the input named ``image`` (the shorthand's), or None."""
        return self.inputs.get("image")

    @property
    def image_present(self) -> torch.Tensor:
        """Bool ``(B,)``: where the input named ``image`` is present (all False without it)."""
        return self.present.get("image", torch.zeros(len(self.ids), dtype=torch.bool))

    @property
    def texts(self) -> list[str | None]:
        """The texts of the input named ``text`` (the shorthand's); all None without it."""
        return self.inputs.get("text", [None] * len(self.ids))

    @property
    def text_present(self) -> torch.Tensor:
        """Bool ``(B,)``: where the input named ``text`` is present (all False without it)."""
        return self.present.get("text", torch.zeros(len(self.ids), dtype=torch.bool))

    def _map(self, fn: Any) -> Batch:
        return Batch(
            ids=self.ids,
            inputs={
                name: fn(value) if isinstance(value, torch.Tensor) else value
                for name, value in self.inputs.items()
            },
            present={name: fn(flags) for name, flags in self.present.items()},
            targets={name: fn(target) for name, target in self.targets.items()},
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Move the tensors to ``device``.

        Args:
            device: Target device.
            non_blocking: Passed to :meth:`torch.Tensor.to` (useful from pinned memory).

        Returns:
            A new batch on ``device``; ids and texts are shared.

        Examples:
            >>> batch = batch.to("cpu")  # doctest: +SKIP
        """
        return self._map(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Pin the tensors' memory; ``DataLoader(pin_memory=True)`` calls it on each batch.

        Returns:
            A new batch with pinned tensors.
        """
        return self._map(lambda tensor: tensor.pin_memory())


def _class_index(value: Any, name: str, spec: TaskSpec, sample_id: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < spec.num_classes:
        raise DataError(
            f"sample {sample_id!r}, task {name!r}: target {value!r} is not a class index in "
            f"[0, {spec.num_classes})"
        )
    return value


def _stack_images(
    images: Sequence[torch.Tensor | None],
    image_shape: Sequence[int] | None,
    ids: Sequence[str],
    name: str,
) -> torch.Tensor | None:
    present = [(k, image) for k, image in enumerate(images) if image is not None]
    if not present:
        if image_shape is None:
            return None
        return torch.zeros((len(images), *image_shape))
    shapes = {tuple(image.shape) for _, image in present}
    first = present[0][1]
    if len(shapes) > 1 or first.dim() != 3:
        listing = ", ".join(f"{ids[k]}: {tuple(image.shape)}" for k, image in present[:5])
        what = "images" if name == "image" else f"images of input {name!r}"
        raise ShapeError(f"{what} of a batch must all be (C, H, W) of one size, got {listing}")
    stacked = torch.zeros((len(images), *first.shape), dtype=first.dtype)
    index = torch.tensor([k for k, _ in present])
    stacked[index] = torch.stack([image for _, image in present])
    return stacked


def _collate_targets(
    samples: Sequence[Mapping[str, Any]], tasks: Mapping[str, TaskSpec], ids: list[str]
) -> dict[str, torch.Tensor]:
    targets: dict[str, torch.Tensor] = {}
    for name, spec in tasks.items():
        values = [sample.get("targets", {}).get(name) for sample in samples]
        if spec.multi_label:
            hot = torch.zeros((len(samples), spec.num_classes))
            for row, (value, sample_id) in enumerate(zip(values, ids, strict=True)):
                if value is None:
                    hot[row] = float("nan")
                    continue
                indices = [value] if isinstance(value, int) else value
                if not isinstance(indices, (list, tuple)):
                    raise DataError(
                        f"sample {sample_id!r}, task {name!r}: expected a list of class "
                        f"indices, got {value!r}"
                    )
                for index in indices:
                    hot[row, _class_index(index, name, spec, sample_id)] = 1.0
            targets[name] = hot
        else:
            targets[name] = torch.tensor(
                [
                    MISSING_LABEL if value is None else _class_index(value, name, spec, sample_id)
                    for value, sample_id in zip(values, ids, strict=True)
                ],
                dtype=torch.long,
            )
    return targets


def _input_kinds(inputs: Mapping[str, str] | None) -> dict[str, str]:
    if inputs is None:
        return dict(SHORTHAND_KINDS)
    kinds = {name: getattr(kind, "kind", kind) for name, kind in inputs.items()}
    bad = {name: kind for name, kind in kinds.items() if kind not in MODALITY_COLUMNS}
    if bad:
        raise ConfigError(f"inputs: kinds must be 'image' or 'text', got {bad}")
    return kinds


def _shape_of(image_shape: ImageShape | None, name: str) -> Sequence[int] | None:
    if isinstance(image_shape, Mapping):
        return image_shape.get(name)
    return image_shape


def collate_samples(
    samples: Sequence[Mapping[str, Any]],
    tasks: Mapping[str, TaskSpec],
    image_shape: ImageShape | None = None,
    inputs: Mapping[str, Any] | None = None,
) -> Batch:
    """Collate samples into a :class:`Batch`.

    Args:
        samples: Dicts with ``id``, ``targets`` (task → int, list of ints, or None; an absent
            task is missing) and a value per input name (an image tensor ``(3, H, W)`` or a
            string; None or absent when missing).
        tasks: The tasks to collate targets for, in order.
        image_shape: ``(3, H, W)`` of the images, or input name → shape; only used when every
            image of an input is missing from the batch, to give zeros instead of None.
        inputs: Input name → its kind (``"image"`` or ``"text"``, or an object with a
            ``kind``); by default the shorthand's ``image`` and ``text``.

    Returns:
        The batch. Where every image of an input is missing and its shape is not given, its
        value is None (and its ``present`` flags all False).

    Raises:
        DataError: ``samples`` is empty, or a target is not a valid class index for its task.
        ShapeError: The images of an input differ in shape within the batch.
        ConfigError: ``inputs`` names a kind other than image or text.

    Examples:
        >>> spec = {"color": TaskSpec.from_classes(["blue", "red"])}
        >>> sample = {"id": "a", "image": None, "text": "red tee", "targets": {"color": None}}
        >>> collate_samples([sample], spec).targets["color"].tolist()
        [-100]
    """
    if not samples:
        raise DataError("cannot collate an empty list of samples")
    ids = [str(sample["id"]) for sample in samples]
    values: dict[str, Any] = {}
    present: dict[str, torch.Tensor] = {}
    for name, kind in _input_kinds(inputs).items():
        column = [sample.get(name) for sample in samples]
        present[name] = torch.tensor([value is not None for value in column], dtype=torch.bool)
        if kind == "image":
            values[name] = _stack_images(column, _shape_of(image_shape, name), ids, name)
        else:
            values[name] = column
    return Batch(ids, values, present, _collate_targets(samples, tasks, ids))


class SampleCollator:
    """A picklable ``collate_fn`` for :class:`torch.utils.data.DataLoader` (workers included).

    Args:
        tasks: The tasks to collate targets for.
        image_shape: Optional ``(3, H, W)`` or input name → shape, see
            :func:`collate_samples`.
        inputs: Input name → kind, see :func:`collate_samples`.

    Examples:
        >>> collate = SampleCollator({"color": TaskSpec.from_classes(["blue", "red"])})
        >>> loader = torch.utils.data.DataLoader(dataset, collate_fn=collate)  # doctest: +SKIP
    """

    def __init__(
        self,
        tasks: Mapping[str, TaskSpec],
        image_shape: ImageShape | None = None,
        inputs: Mapping[str, Any] | None = None,
    ) -> None:
        self.tasks = dict(tasks)
        self.inputs = _input_kinds(inputs)
        if isinstance(image_shape, Mapping):
            self.image_shape: Any = {n: tuple(shape) for n, shape in image_shape.items()}
        else:
            self.image_shape = None if image_shape is None else tuple(image_shape)

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> Batch:
        """Collate ``samples`` with :func:`collate_samples`."""
        return collate_samples(samples, self.tasks, self.image_shape, self.inputs)

    def __repr__(self) -> str:
        return (
            f"SampleCollator(tasks={list(self.tasks)}, image_shape={self.image_shape}, "
            f"inputs={self.inputs})"
        )


def make_collate(
    tasks: Mapping[str, TaskSpec],
    image_shape: ImageShape | None = None,
    inputs: Mapping[str, Any] | None = None,
) -> SampleCollator:
    """A picklable collate function for a DataLoader.

    Args:
        tasks: The tasks to collate targets for.
        image_shape: Optional ``(3, H, W)`` (or input name → shape) used when every image of
            an input is missing from a batch.
        inputs: Input name → kind (``"image"`` / ``"text"``, or a data set's ``inputs``); by
            default the shorthand's ``image`` and ``text``.

    Returns:
        A :class:`SampleCollator`.

    Examples:
        >>> collate = make_collate({"color": TaskSpec.from_classes(["blue", "red"])})
        >>> loader = torch.utils.data.DataLoader(dataset, collate_fn=collate)  # doctest: +SKIP
    """
    return SampleCollator(tasks, image_shape, inputs)
