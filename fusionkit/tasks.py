"""Task specifications: what a classification task predicts.

A leaf module (imports nothing of fusionkit but `fusionkit.errors`), shared by the heads,
the data sets and the configs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fusionkit.errors import ConfigError

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["MISSING_LABEL", "MULTI_LABEL_THRESHOLD", "TaskSpec", "parse_tasks"]

#: A multi-label class is predicted when its sigmoid probability reaches this.
MULTI_LABEL_THRESHOLD = 0.5
#: The target value of a missing single-label target (as in ``torch.nn.CrossEntropyLoss``).
MISSING_LABEL = -100


@dataclass(frozen=True)
class TaskSpec:
    """One classification task.

    Args:
        num_classes: Number of classes (at least 2 for single-label, 1 for multi-label).
        multi_label: Several classes may hold at once (sigmoid + BCE) instead of exactly one
            (softmax + cross-entropy).
        classes: Optional class names, ``len(classes) == num_classes``.
        weight: Weight of this task's loss in the total loss.

    Raises:
        ConfigError: The class count or names are inconsistent.

    Examples:
        >>> TaskSpec.from_classes(["black", "blue", "red"])
        TaskSpec(num_classes=3, multi_label=False, classes=('black', 'blue', 'red'), weight=1.0)
    """

    num_classes: int
    multi_label: bool = False
    classes: tuple[str, ...] | None = field(default=None)
    weight: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
            raise ConfigError(f"num_classes must be an int, got {self.num_classes!r}")
        smallest = 1 if self.multi_label else 2
        if self.num_classes < smallest:
            kind = "a multi-label" if self.multi_label else "a single-label"
            raise ConfigError(
                f"{kind} task needs num_classes >= {smallest}, got {self.num_classes}"
            )
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
            if len(self.classes) != self.num_classes:
                raise ConfigError(
                    f"classes has {len(self.classes)} names but num_classes is {self.num_classes}"
                )
            if len(set(self.classes)) != len(self.classes):
                raise ConfigError(f"classes contains duplicates: {list(self.classes)}")
        if not self.weight >= 0:
            raise ConfigError(f"weight must be >= 0, got {self.weight!r}")

    @classmethod
    def from_classes(
        cls, classes: Sequence[str], multi_label: bool = False, weight: float = 1.0
    ) -> TaskSpec:
        """Build a task from its class names."""
        return cls(len(classes), multi_label, tuple(classes), weight)

    def class_names(self) -> tuple[str, ...]:
        """The class names, or ``("0", "1", ...)`` when none were given."""
        return (
            self.classes if self.classes is not None else tuple(map(str, range(self.num_classes)))
        )

    def probabilities(self, logits: Tensor) -> Tensor:
        """The class probabilities of ``(N, C)`` logits: a sigmoid per class for a multi-label
        task, a softmax over the classes otherwise.

        Examples:
            >>> import torch
            >>> TaskSpec(2, multi_label=True).probabilities(torch.zeros(1, 2))
            tensor([[0.5000, 0.5000]])
        """
        return logits.sigmoid() if self.multi_label else logits.softmax(dim=-1)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that `parse_tasks` reads back."""
        out: dict[str, Any] = {"multi_label": self.multi_label}
        if self.classes is not None:
            out["classes"] = list(self.classes)
        else:
            out["num_classes"] = self.num_classes
        if self.weight != 1.0:
            out["weight"] = self.weight
        return out


_TASK_KEYS = {"classes", "num_classes", "multi_label", "weight"}


def parse_tasks(tasks: Mapping[str, Any], path: str = "tasks") -> dict[str, TaskSpec]:
    """Read a ``tasks`` config section: name → ``{classes: [...]}`` or ``{num_classes: N}``.

    Args:
        tasks: Mapping of task name to a `TaskSpec`, a dict with ``classes`` or
            ``num_classes`` (and optionally ``multi_label`` and ``weight``).
        path: The key path used in error messages.

    Returns:
        Task name → `TaskSpec`, in the given order.

    Raises:
        ConfigError: A task is malformed; the message names its key path.
    """
    if not isinstance(tasks, Mapping) or not tasks:
        raise ConfigError(
            f"{path}: expected a non-empty mapping of task name to task, got {tasks!r}"
        )
    parsed: dict[str, TaskSpec] = {}
    for name, spec in tasks.items():
        where = f"{path}.{name}"
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"{where}: task names must be identifiers, got {name!r}")
        if isinstance(spec, TaskSpec):
            parsed[name] = spec
            continue
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{where}: expected a mapping with 'classes' or 'num_classes'")
        unknown = set(spec) - _TASK_KEYS
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {sorted(map(str, unknown))}; "
                f"accepted: {sorted(_TASK_KEYS)}"
            )
        multi_label = spec.get("multi_label", False)
        if not isinstance(multi_label, bool):
            raise ConfigError(f"{where}.multi_label: expected true or false, got {multi_label!r}")
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"{where}.weight: expected a number, got {weight!r}")
        try:
            if "classes" in spec:
                classes = spec["classes"]
                if not isinstance(classes, Sequence) or isinstance(classes, str):
                    raise ConfigError(f"{where}.classes: expected a list of names, got {classes!r}")
                if "num_classes" in spec and spec["num_classes"] != len(classes):
                    raise ConfigError(
                        f"{where}: num_classes {spec['num_classes']} != len(classes) {len(classes)}"
                    )
                parsed[name] = TaskSpec.from_classes(classes, multi_label, float(weight))
            elif "num_classes" in spec:
                parsed[name] = TaskSpec(spec["num_classes"], multi_label, None, float(weight))
            else:
                raise ConfigError(f"{where}: give 'classes' or 'num_classes'")
        except ConfigError as error:
            message = str(error)
            raise ConfigError(
                message if message.startswith(where) else f"{where}: {message}"
            ) from None
    return parsed
