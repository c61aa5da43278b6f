"""``curves.png``: a run's metrics history drawn as one figure, with matplotlib.

Panels, each over the epochs: train and val loss; val accuracy per task (and their mean,
dashed); one panel per task with the mean modality weight of each input on the validation
set; the learning rate at each epoch's end. A run without validation shows the train loss and
the learning rate only.

matplotlib is an optional dependency (the ``dev`` extra): without it no figure is drawn and one
INFO line says so. The figure is drawn with the Agg canvas directly, so the process's pyplot
backend (in a notebook, say) is left alone.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fusionkit.io import atomic_write

__all__ = ["write_curves"]

_LOG = logging.getLogger("fusionkit.training")

#: One panel: title, y label, and its lines as (label, values per epoch, line style).
_Panel = tuple[str, str, list[tuple[str, list[float], str]]]


def write_curves(
    history: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]
) -> Path | None:
    """Draw the epoch records of a run into a PNG file (written atomically).

    Args:
        history: The epoch records, as in ``metrics.jsonl`` (``train_loss``, ``val_loss``,
            ``val_accuracy``, ``val_mean_accuracy``, ``val_modality_weights``, ``lr``).
        path: The PNG file (the trainer's: ``RUN/curves.png``).

    Returns:
        The written file, or ``None`` when matplotlib is not installed or ``history`` is empty.

    Raises:
        StorageError: The file cannot be written.

    Examples:
        >>> write_curves(result.history, "runs/x/curves.png")  # doctest: +SKIP
        PosixPath('runs/x/curves.png')
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        _LOG.info("matplotlib is not installed: no %s drawn", Path(path).name)
        return None
    if not history:
        return None
    epochs = [int(record["epoch"]) for record in history]
    panels = _panels(history)
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.5 * columns, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    for index, (title, ylabel, lines) in enumerate(panels, start=1):
        axes = figure.add_subplot(rows, columns, index)
        for label, values, style in lines:
            axes.plot(epochs, values, style, label=label, marker="o", markersize=3)
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.set_ylabel(ylabel)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))


def _panels(history: Sequence[Mapping[str, Any]]) -> list[_Panel]:
    """The panels that ``history`` has data for."""

    def series(*keys: str) -> list[float]:
        values = []
        for record in history:
            value: Any = record
            for key in keys:
                value = value.get(key) if isinstance(value, Mapping) else None
            values.append(float(value) if isinstance(value, (int, float)) else math.nan)
        return values

    last = history[-1]
    loss = [("train", series("train_loss"), "-")]
    if "val_loss" in last:
        loss.append(("val", series("val_loss"), "-"))
    panels: list[_Panel] = [("loss", "loss", loss)]
    tasks = list(last.get("val_accuracy", {}))
    if tasks:
        accuracy = [(task, series("val_accuracy", task), "-") for task in tasks]
        accuracy.append(("mean", series("val_mean_accuracy"), "k--"))
        panels.append(("val accuracy", "accuracy", accuracy))
    for task, weights in last.get("val_modality_weights", {}).items():
        lines = [(name, series("val_modality_weights", task, name), "-") for name in weights]
        panels.append((f"modality weights: {task}", "mean weight (val)", lines))
    panels.append(("learning rate", "lr", [("lr", series("lr"), "-")]))
    return panels
