"""Watching a run: the epoch record, the loggers it goes to, and TensorBoard events.

After every epoch the trainer builds one metrics record (:func:`epoch_record`, a line of
``metrics.jsonl``) and hands it to its loggers, on rank 0 only. A logger is any object with
``log_epoch(epoch, record)`` and ``close()`` (the :class:`MetricLogger` protocol): the built-in
:class:`TensorBoardLogger` (``train.tensorboard``, on by default) writes the record's numbers as
TensorBoard scalars into the run folder's ``tensorboard/``; pass your own to
:class:`~fusionkit.training.Trainer` (``loggers=[...]``) to send them elsewhere.
:func:`epoch_scalars` flattens a record into the tags TensorBoard shows.

The x axis of every scalar is the epoch (1, 2, ...). A run logs the epochs it trains: its writer
starts with ``purge_step`` at its first epoch, so TensorBoard discards whatever an earlier run
in the folder logged for that epoch or later (an interrupted run's unfinished epoch, or all of
an old run a fresh one replaces) and no epoch appears twice. Each epoch is flushed to disk
before its ``last/`` checkpoint is written, so every epoch a resume starts after is kept.

Examples:
    >>> class PrintLogger:
    ...     def log_epoch(self, epoch, record):
    ...         print(epoch, epoch_scalars(record)["train/loss"])
    ...     def close(self):
    ...         pass
    >>> Trainer(config, "runs/x", loggers=[PrintLogger()]).fit()  # doctest: +SKIP
    1 1.0986
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from fusionkit.config import TrainConfig
from fusionkit.runs import TENSORBOARD_DIR

__all__ = [
    "SCALAR_TAGS",
    "LoggerGroup",
    "MetricLogger",
    "TensorBoardLogger",
    "check_loggers",
    "epoch_record",
    "epoch_scalars",
    "open_loggers",
]

_LOG = logging.getLogger("fusionkit.training")

#: Record key → TensorBoard tag; a mapping value adds one ``/<key>`` level per nesting, e.g.
#: ``val_modality_weights: {task: {input: w}}`` → ``val/modality_weight/<task>/<input>``.
SCALAR_TAGS: dict[str, str] = {
    "train_loss": "train/loss",
    "val_loss": "val/loss",
    "val_log_loss": "val/log_loss",
    "val_accuracy": "val/accuracy",
    "val_mean_accuracy": "val/mean_accuracy",
    "val_head_accuracy": "val/head_accuracy",
    "val_modality_weights": "val/modality_weight",
    "lr": "lr",
    "epoch_seconds": "time/epoch_seconds",
}


def epoch_record(
    epoch: int,
    state: Mapping[str, Any],
    steps_per_epoch: int,
    lr: float,
    report: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The metrics record of a finished epoch: one line of ``metrics.jsonl``.

    Args:
        epoch: The epoch, from 1.
        state: The trainer state at the epoch's end (``step``, ``epoch_loss_sum``,
            ``epoch_seconds``).
        steps_per_epoch: Optimizer steps per epoch (the mean loss divides by it).
        lr: The learning rate after the epoch's last step.
        report: The epoch's validation report (see
            :func:`~fusionkit.training.validation.validation_report`); ``None`` without a
            validation set.

    Returns:
        ``epoch``, ``step``, ``train_loss``; with a report ``val_loss``, ``val_log_loss`` (mean
        over tasks), ``val_accuracy`` (task → accuracy), ``val_mean_accuracy``,
        ``val_modality_weights`` (task → input → mean weight on the validation set) and, for a
        model with unimodal heads, ``val_head_accuracy`` (task → head → accuracy); then ``lr``
        and ``epoch_seconds``.

    Examples:
        >>> epoch_record(1, {"step": 5, "epoch_loss_sum": 5.5, "epoch_seconds": 2.0}, 5, 1e-3)
        {'epoch': 1, 'step': 5, 'train_loss': 1.1, 'lr': 0.001, 'epoch_seconds': 2.0}
    """
    record: dict[str, Any] = {
        "epoch": epoch,
        "step": state["step"],
        "train_loss": state["epoch_loss_sum"] / steps_per_epoch,
    }
    if report is not None:
        tasks = report["tasks"]
        record |= {
            "val_loss": report["loss"],
            "val_log_loss": report["mean"]["log_loss"],
            "val_accuracy": {t: r["accuracy"] for t, r in tasks.items()},
            "val_mean_accuracy": report["mean"]["accuracy"] or 0.0,
            "val_modality_weights": {t: dict(r["modality_weights"]) for t, r in tasks.items()},
        }
        if any("sources" in r for r in tasks.values()):
            record["val_head_accuracy"] = {t: r["sources"] for t, r in tasks.items()}
    return record | {"lr": lr, "epoch_seconds": round(state["epoch_seconds"], 3)}


def epoch_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of an epoch record under their TensorBoard tags (see `SCALAR_TAGS`).

    Undefined values (``None``, e.g. the accuracy of a task without labelled samples) and
    keys outside `SCALAR_TAGS` (``epoch``, ``step``) are left out.

    Args:
        record: One epoch record (a line of ``metrics.jsonl``).

    Returns:
        Tag → value, e.g. ``{"train/loss": 0.71, "val/accuracy/color": 0.5, ...}``.

    Examples:
        >>> epoch_scalars({"epoch": 1, "train_loss": 0.5, "val_accuracy": {"c": 0.75, "d": None}})
        {'train/loss': 0.5, 'val/accuracy/c': 0.75}
    """
    scalars: dict[str, float] = {}

    def add(tag: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                add(f"{tag}/{key}", inner)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            scalars[tag] = float(value)

    for key, tag in SCALAR_TAGS.items():
        if key in record:
            add(tag, record[key])
    return scalars


@runtime_checkable
class MetricLogger(Protocol):
    """What the trainer hands every epoch's metrics to (on rank 0 only).

    Any object with these two methods is a logger; subclass this protocol to inherit a
    ``close`` that does nothing.

    Examples:
        >>> class Collect(MetricLogger):
        ...     def __init__(self):
        ...         self.records = []
        ...     def log_epoch(self, epoch, record):
        ...         self.records.append((epoch, dict(record)))
        >>> isinstance(Collect(), MetricLogger)
        True
    """

    def log_epoch(self, epoch: int, record: Mapping[str, Any]) -> None:
        """Take the record of a finished epoch.

        Args:
            epoch: The epoch, from 1.
            record: Its metrics record, as written to ``metrics.jsonl`` (flatten it with
                :func:`epoch_scalars`); do not modify it.
        """

    def close(self) -> None:
        """Flush and release what the logger holds; called once, when ``fit`` ends or fails."""


class TensorBoardLogger:
    """Writes each epoch record as TensorBoard scalars (see :func:`epoch_scalars`).

    Charts: one per tag, grouped by their first part (``train``, ``val``, ``lr``, ``time``),
    with the epoch on the x axis; the "Custom Scalars" tab also overlays train and val loss,
    the tasks' accuracies, and each task's modality weights.

    Args:
        log_dir: The event folder (the trainer's: ``RUN/tensorboard``).
        start_epoch: Epochs already finished before this writer (on a resume); TensorBoard
            drops any event an earlier writer logged at a later epoch (``purge_step``).

    Raises:
        ImportError: The ``tensorboard`` package is not installed.

    Examples:
        >>> logger = TensorBoardLogger("runs/x/tensorboard")  # doctest: +SKIP
        >>> logger.log_epoch(1, {"train_loss": 0.7, "lr": 1e-3})  # doctest: +SKIP
        >>> logger.close()  # doctest: +SKIP
    """

    def __init__(self, log_dir: str | os.PathLike[str], *, start_epoch: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(str(self.log_dir), purge_step=start_epoch + 1)
        self._layout_written = False

    def log_epoch(self, epoch: int, record: Mapping[str, Any]) -> None:
        """Add the record's scalars at step ``epoch`` and flush them to disk."""
        if not self._layout_written:
            self._writer.add_custom_scalars(_layout(record))
            self._layout_written = True
        for tag, value in epoch_scalars(record).items():
            self._writer.add_scalar(tag, value, epoch)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()


def _layout(record: Mapping[str, Any]) -> dict[str, Any]:
    """The "Custom Scalars" layout: multi-line charts over the tags of ``record``."""
    charts = {
        "loss": ["Multiline", [r"^train/loss$", r"^val/loss$"]],
        "accuracy": ["Multiline", [r"^val/accuracy/", r"^val/mean_accuracy$"]],
    }
    for task in record.get("val_modality_weights", {}):
        pattern = f"^val/modality_weight/{re.escape(task)}/"
        charts[f"modality weights: {task}"] = ["Multiline", [pattern]]
    return {"fusionkit": charts}


class LoggerGroup:
    """Several loggers as one: each call goes to every logger, in order.

    Used as a context manager, it closes every logger on leaving (also on an error).

    Args:
        loggers: The loggers.

    Examples:
        >>> group = LoggerGroup([TensorBoardLogger("runs/x/tensorboard")])  # doctest: +SKIP
        >>> with group:  # doctest: +SKIP
        ...     group.log_epoch(1, {"train_loss": 0.7})
    """

    def __init__(self, loggers: Iterable[MetricLogger] = ()) -> None:
        self.loggers = list(loggers)

    def log_epoch(self, epoch: int, record: Mapping[str, Any]) -> None:
        """Hand the record to every logger."""
        for logger in self.loggers:
            logger.log_epoch(epoch, record)

    def close(self) -> None:
        """Close every logger, even when one fails (the first error is raised after)."""
        errors = []
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as error:  # every logger gets its close
                errors.append(error)
        if errors:
            raise errors[0]

    def __enter__(self) -> LoggerGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def check_loggers(loggers: Iterable[Any]) -> list[MetricLogger]:
    """The loggers as a list, each checked to have ``log_epoch`` and ``close``.

    Args:
        loggers: Objects meant as :class:`MetricLogger`.

    Returns:
        The loggers.

    Raises:
        TypeError: One lacks ``log_epoch`` or ``close``.

    Examples:
        >>> check_loggers([object()])
        Traceback (most recent call last):
        TypeError: a logger needs log_epoch(epoch, record) and close() methods; got object
    """
    checked = list(loggers)
    for logger in checked:
        if not isinstance(logger, MetricLogger):
            raise TypeError(
                "a logger needs log_epoch(epoch, record) and close() methods; got "
                f"{type(logger).__name__}"
            )
    return checked


def open_loggers(
    config: TrainConfig,
    output_dir: str | os.PathLike[str],
    extra: Iterable[MetricLogger] = (),
    *,
    start_epoch: int = 0,
    main: bool = True,
) -> LoggerGroup:
    """The loggers of one ``fit``: TensorBoard (``train.tensorboard``), then ``extra``.

    Args:
        config: The ``train`` section.
        output_dir: The run folder; events go to its ``tensorboard/``.
        extra: The loggers passed to the trainer.
        start_epoch: Epochs finished before this ``fit`` (a resume).
        main: Whether this process is rank 0; other ranks get an empty group.

    Returns:
        The loggers as one :class:`LoggerGroup`. Without the ``tensorboard`` package the
        built-in logger is left out with a warning.

    Examples:
        >>> with open_loggers(TrainConfig(), "runs/x") as loggers:  # doctest: +SKIP
        ...     loggers.log_epoch(1, {"train_loss": 0.7})
    """
    if not main:
        return LoggerGroup()
    loggers: list[MetricLogger] = []
    if config.tensorboard:
        folder = Path(output_dir) / TENSORBOARD_DIR
        try:
            loggers.append(TensorBoardLogger(folder, start_epoch=start_epoch))
        except ImportError as error:
            _LOG.warning("no TensorBoard events in %s: %s (pip install tensorboard)",
                         folder, error)
    return LoggerGroup([*loggers, *extra])
