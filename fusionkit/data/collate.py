"""Batching samples whose image, text or labels may be missing.

A sample (as :class:`~fusionkit.data.ManifestDataset` returns it) is a dict with ``id``,
``image`` (a ``(3, H, W)`` tensor or None), ``text`` (a string or None) and ``targets``
(task → class index, list of class indices, or None). A :class:`Batch` keeps the texts as
strings, because tokenisation belongs to the text encoder, and marks missing images with a
boolean mask instead of dropping them, because the fusion masks a missing modality out of its
attention rather than seeing zeros.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fusionkit.errors import DataError, ShapeError
from fusionkit.tasks import MISSING_LABEL, TaskSpec

__all__ = ["Batch", "SampleCollator", "collate_samples", "make_collate"]


@dataclass
class Batch:
    """A batch of image+text samples with their multi-task targets.

    Args:
        ids: Sample ids, length ``B``.
        images: Float ``(B, 3, H, W)``, zeros where the image is missing; None when every image
            of the batch is missing and no image shape was given to the collate function.
        image_present: Bool ``(B,)``, True where the sample has an image.
        texts: The texts, None where the text is missing.
        targets: Task name → single-label: long ``(B,)`` with
            :data:`~fusionkit.tasks.MISSING_LABEL` (-100) for a missing label; multi-label:
            float ``(B, C)`` multi-hot with a row of NaN for a missing label.

    Examples:
        >>> batch = Batch(["a"], None, torch.tensor([False]), ["red tee"], {})
        >>> len(batch), batch.text_present.tolist()
        (1, [True])
    """

    ids: list[str]
    images: torch.Tensor | None
    image_present: torch.Tensor
    texts: list[str | None]
    targets: dict[str, torch.Tensor]

    def __len__(self) -> int:
        """The batch size ``B``."""
        return len(self.ids)

    @property
    def text_present(self) -> torch.Tensor:
        """Bool ``(B,)``, True where the sample has a text (on the device of ``image_present``)."""
        return torch.tensor(
            [text is not None for text in self.texts], device=self.image_present.device
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
        def move(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(device, non_blocking=non_blocking)

        return Batch(
            ids=self.ids,
            images=None if self.images is None else move(self.images),
            image_present=move(self.image_present),
            texts=self.texts,
            targets={name: move(target) for name, target in self.targets.items()},
        )

    def pin_memory(self) -> Batch:
        """Pin the tensors' memory; ``DataLoader(pin_memory=True)`` calls it on each batch.

        Returns:
            A new batch with pinned tensors.
        """
        return Batch(
            ids=self.ids,
            images=None if self.images is None else self.images.pin_memory(),
            image_present=self.image_present.pin_memory(),
            texts=self.texts,
            targets={name: target.pin_memory() for name, target in self.targets.items()},
        )


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
        raise ShapeError(f"images of a batch must all be (C, H, W) of one size, got {listing}")
    stacked = torch.zeros((len(images), *first.shape), dtype=first.dtype)
    index = torch.tensor([k for k, _ in present])
    stacked[index] = torch.stack([image for _, image in present])
    return stacked


def collate_samples(
    samples: Sequence[Mapping[str, Any]],
    tasks: Mapping[str, TaskSpec],
    image_shape: Sequence[int] | None = None,
) -> Batch:
    """Collate samples into a :class:`Batch`.

    Args:
        samples: Dicts with ``id``, ``image`` (tensor ``(3, H, W)`` or None), ``text`` (str or
            None) and ``targets`` (task → int, list of ints, or None; an absent task is missing).
        tasks: The tasks to collate targets for, in order.
        image_shape: ``(3, H, W)`` of the images; only used when every image of the batch is
            missing, to return zeros instead of ``images=None``.

    Returns:
        The batch. Where every image is missing and ``image_shape`` is None, ``images`` is None
        (``image_present`` is then all False).

    Raises:
        DataError: ``samples`` is empty, or a target is not a valid class index for its task.
        ShapeError: The images of the batch differ in shape.

    Examples:
        >>> spec = {"color": TaskSpec.from_classes(["blue", "red"])}
        >>> sample = {"id": "a", "image": None, "text": "red tee", "targets": {"color": None}}
        >>> collate_samples([sample], spec).targets["color"].tolist()
        [-100]
    """
    if not samples:
        raise DataError("cannot collate an empty list of samples")
    ids = [str(sample["id"]) for sample in samples]
    images = [sample.get("image") for sample in samples]
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
    return Batch(
        ids=ids,
        images=_stack_images(images, image_shape, ids),
        image_present=torch.tensor([image is not None for image in images], dtype=torch.bool),
        texts=[sample.get("text") for sample in samples],
        targets=targets,
    )


class SampleCollator:
    """A picklable ``collate_fn`` for :class:`torch.utils.data.DataLoader` (workers included).

    Args:
        tasks: The tasks to collate targets for.
        image_shape: Optional ``(3, H, W)``, see :func:`collate_samples`.

    Examples:
        >>> collate = SampleCollator({"color": TaskSpec.from_classes(["blue", "red"])})
        >>> loader = torch.utils.data.DataLoader(dataset, collate_fn=collate)  # doctest: +SKIP
    """

    def __init__(
        self, tasks: Mapping[str, TaskSpec], image_shape: Sequence[int] | None = None
    ) -> None:
        self.tasks = dict(tasks)
        self.image_shape = None if image_shape is None else tuple(image_shape)

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> Batch:
        """Collate ``samples`` with :func:`collate_samples`."""
        return collate_samples(samples, self.tasks, self.image_shape)

    def __repr__(self) -> str:
        return f"SampleCollator(tasks={list(self.tasks)}, image_shape={self.image_shape})"


def make_collate(
    tasks: Mapping[str, TaskSpec], image_shape: Sequence[int] | None = None
) -> SampleCollator:
    """A picklable collate function for a DataLoader.

    Args:
        tasks: The tasks to collate targets for.
        image_shape: Optional ``(3, H, W)`` used when every image of a batch is missing.

    Returns:
        A :class:`SampleCollator`.

    Examples:
        >>> collate = make_collate({"color": TaskSpec.from_classes(["blue", "red"])})
        >>> loader = torch.utils.data.DataLoader(dataset, collate_fn=collate)  # doctest: +SKIP
    """
    return SampleCollator(tasks, image_shape)
