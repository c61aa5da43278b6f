"""Multi-task classification heads and their losses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusionkit.errors import ShapeError
from fusionkit.registry import register
from fusionkit.tasks import MISSING_LABEL, TaskSpec, parse_tasks

__all__ = ["MultiTaskHead", "hide_labels", "task_loss"]


def _check_smoothing(value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {value}")
    return float(value)


def task_loss(
    logits: Tensor,
    target: Tensor,
    spec: TaskSpec,
    class_weight: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """The loss of one task over a batch, ignoring samples whose label is missing.

    Single-label tasks use softmax cross-entropy (missing label = ``-100``); multi-label tasks
    use sigmoid binary cross-entropy (missing label = a row containing NaN). A batch in which
    every label is missing gives a zero loss that still depends on ``logits`` (so it can be
    backpropagated and summed).

    Args:
        logits: ``(B, C)``.
        target: ``(B,)`` int class indices, or ``(B, C)`` float multi-hot for multi-label.
        spec: The task.
        class_weight: Optional ``(C,)`` weights (CE class weights / BCE positive weights).
        label_smoothing: ``ε`` in ``[0, 1)``: the single-label target becomes ``1 - ε`` on
            the class plus ``ε / C`` spread over all classes (as
            ``torch.nn.functional.cross_entropy``); a multi-label target ``y`` becomes
            ``y (1 - ε) + ε / 2``.

    Returns:
        A scalar tensor.

    Raises:
        ShapeError: The target has the wrong shape, dtype or an out-of-range class index.
        ValueError: ``label_smoothing`` outside ``[0, 1)``.

    Examples:
        >>> spec = TaskSpec(2)
        >>> logits, target = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
        >>> task_loss(logits, target, spec) < task_loss(logits, target, spec, label_smoothing=0.2)
        tensor(True)
    """
    _check_smoothing(label_smoothing)
    if spec.multi_label:
        if target.shape != logits.shape or not target.is_floating_point():
            raise ShapeError(
                f"multi-label target must be a float (B, C) = {tuple(logits.shape)} multi-hot "
                f"tensor, got {target.dtype} {tuple(target.shape)}"
            )
        keep = ~target.isnan().any(dim=1)
        if not bool(keep.any()):
            return logits.sum() * 0.0
        smoothed = target[keep] * (1.0 - label_smoothing) + label_smoothing / 2
        return F.binary_cross_entropy_with_logits(logits[keep], smoothed, pos_weight=class_weight)
    if target.shape != logits.shape[:1] or target.is_floating_point() or target.dtype == torch.bool:
        raise ShapeError(
            f"single-label target must be an integer (B,) = ({logits.shape[0]},) tensor of class "
            f"indices, got {target.dtype} {tuple(target.shape)}"
        )
    keep = target != MISSING_LABEL
    if bool(((target[keep] < 0) | (target[keep] >= spec.num_classes)).any()):
        raise ShapeError(
            f"class indices must lie in [0, {spec.num_classes}) or be {MISSING_LABEL} (missing)"
        )
    if not bool(keep.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(
        logits[keep], target[keep], weight=class_weight, label_smoothing=label_smoothing
    )


def hide_labels(targets: Mapping[str, Tensor], keep: Tensor | None = None) -> dict[str, Tensor]:
    """The targets with the labels of some samples marked missing (ignored by the losses).

    Args:
        targets: Task → ``(B,)`` class indices or ``(B, C)`` float multi-hot.
        keep: ``(B,)`` bool, False = hide that sample's labels; ``None`` hides every label.

    Returns:
        Task → targets with hidden rows set to ``-100`` (single-label) or NaN (multi-label).

    Examples:
        >>> hide_labels({"color": torch.tensor([1, 2])}, torch.tensor([True, False]))
        {'color': tensor([   1, -100])}
    """
    out = {}
    for task, target in targets.items():
        hide = (
            torch.ones(target.shape[0], dtype=torch.bool, device=target.device)
            if keep is None
            else ~keep.to(target.device)
        )
        if target.is_floating_point():
            out[task] = target.masked_fill(hide[:, None], float("nan"))
        else:
            out[task] = target.masked_fill(hide, MISSING_LABEL)
    return out


@register("head", "mlp")
class MultiTaskHead(nn.Module):
    """One MLP classifier per task, over a shared or a per-task fused embedding.

    Args:
        dim: Width of the input embedding(s).
        tasks: Task name → `fusionkit.tasks.TaskSpec` (or its config dict).
        hidden_dim: Hidden width of each MLP (default ``dim``); 0 gives a linear classifier.
        dropout: Dropout before each classifier layer.

    Raises:
        ConfigError: The tasks are malformed.
        ValueError: ``dim`` is not positive.

    Examples:
        >>> head = MultiTaskHead(16, {"color": {"num_classes": 3},
        ...                           "pattern": {"num_classes": 4, "multi_label": True}})
        >>> logits = head(torch.randn(2, 16))
        >>> {k: tuple(v.shape) for k, v in logits.items()}
        {'color': (2, 3), 'pattern': (2, 4)}
    """

    def __init__(
        self,
        dim: int,
        tasks: Mapping[str, TaskSpec | Mapping[str, Any]],
        hidden_dim: int | None = None,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim = dim
        self.tasks = parse_tasks(tasks)
        hidden = dim if hidden_dim is None else hidden_dim
        self.heads = nn.ModuleDict()
        for name, spec in self.tasks.items():
            if hidden:
                self.heads[name] = nn.Sequential(
                    nn.LayerNorm(dim),
                    nn.Dropout(dropout),
                    nn.Linear(dim, hidden),
                    nn.GELU(),
                    nn.Dropout(dropout),
                    nn.Linear(hidden, spec.num_classes),
                )
            else:
                self.heads[name] = nn.Sequential(
                    nn.LayerNorm(dim), nn.Dropout(dropout), nn.Linear(dim, spec.num_classes)
                )
        self._class_weights: dict[str, str] = {}
        self.label_smoothing = 0.0

    def set_class_weight(self, task: str, weight: Tensor | None) -> None:
        """Weight the classes of ``task`` in its loss (e.g. inverse frequency); ``None`` clears.

        Raises:
            KeyError: Unknown task.
            ShapeError: ``weight`` is not ``(num_classes,)``.
        """
        spec = self.tasks[task]
        buffer = f"class_weight_{task}"
        if weight is None:
            self._class_weights.pop(task, None)
            if hasattr(self, buffer):
                delattr(self, buffer)
            return
        if tuple(weight.shape) != (spec.num_classes,):
            raise ShapeError(f"class weight of {task!r} must have shape ({spec.num_classes},)")
        # Not persistent: a training choice, not part of the model weights.
        self.register_buffer(buffer, weight.detach().float().clone(), persistent=False)
        self._class_weights[task] = buffer

    def set_label_smoothing(self, value: float) -> None:
        """Smooth the targets of every task in the loss by ``value`` (see `task_loss`); 0
        turns it off. Like the class weights, a training choice that is not saved.

        Raises:
            ValueError: ``value`` outside ``[0, 1)``.
        """
        self.label_smoothing = _check_smoothing(value)

    def forward(self, features: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Classify.

        Args:
            features: ``(B, dim)`` shared by every task, or task → ``(B, dim)``.

        Returns:
            Task → logits ``(B, num_classes)``.

        Raises:
            ShapeError: Wrong shape, or a task missing from a per-task mapping.
        """
        per_task = (
            features if isinstance(features, Mapping) else dict.fromkeys(self.tasks, features)
        )
        missing = set(self.tasks) - set(per_task)
        if missing:
            raise ShapeError(f"features are missing for tasks {sorted(missing)}")
        logits = {}
        for name, head in self.heads.items():
            x = per_task[name]
            if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.dim:
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ShapeError(
                    f"features for {name!r} must have shape (B, {self.dim}), got {shape}"
                )
            logits[name] = head(x)
        return logits

    def task_losses(
        self, logits: Mapping[str, Tensor], targets: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Per-task losses; tasks absent from ``targets`` are skipped.

        Raises:
            ShapeError: Unknown task in ``targets`` or malformed targets.
        """
        unknown = set(targets) - set(self.tasks)
        if unknown:
            raise ShapeError(
                f"targets for unknown tasks {sorted(unknown)}; tasks: {list(self.tasks)}"
            )
        losses = {}
        for name, target in targets.items():
            buffer = self._class_weights.get(name)
            weight = getattr(self, buffer) if buffer else None
            losses[name] = task_loss(
                logits[name], target.to(logits[name].device), self.tasks[name], weight,
                self.label_smoothing,
            )
        return losses

    def loss(self, logits: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Tensor:
        """The multi-task loss: the task-weighted sum of `task_losses`.

        Args:
            logits: Task → ``(B, C)`` from `forward`.
            targets: Task → ``(B,)`` class indices (``-100`` = missing) for single-label tasks,
                ``(B, C)`` float multi-hot (a NaN row = missing) for multi-label tasks.

        Returns:
            A scalar tensor.
        """
        losses = self.task_losses(logits, targets)
        if not losses:
            raise ShapeError("targets is empty: no task to compute a loss for")
        return torch.stack([self.tasks[n].weight * v for n, v in losses.items()]).sum()
