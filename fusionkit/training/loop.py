"""The trainer: AdamW with warm-up + cosine, checkpoints, exact resume and the feature cache.

`fit` reads as the loop it runs: set up, then per epoch the steps (`_train_epoch`) and the
validation with early stopping (`_end_epoch`), then `best/` reloaded and reported. Outputs in the
run folder (laid out by :mod:`fusionkit.runs`):

- ``config.yaml``: the resolved config (tasks inferred from the data are written out);
- ``metrics.jsonl``: one JSON line per finished epoch. The file is rewritten whole with
  :func:`~fusionkit.io.atomic_write` from the history kept in the trainer state, so after a kill
  it never holds half a line nor an epoch the ``last/`` checkpoint does not know about;
- ``val_report.json``: the validation report of ``best/``;
- ``tensorboard/``: TensorBoard events of every epoch (see :mod:`fusionkit.training.tracking`);
- ``curves.png``: loss, accuracy and modality weights over the epochs (needs matplotlib);
- with ``train.unimodal_models``: ``unimodal/text/`` and ``unimodal/image/``, the runs of the
  unimodal models, ``members.json``, their blend with the fused model, and
  ``members_val_report.json``, its validation report (see :mod:`fusionkit.training.members`);
- ``best/`` (the best epoch by ``train.best_metric``) and ``last/``: checkpoints loadable
  with :meth:`~fusionkit.models.CMACLIP.from_pretrained`; ``last/`` also holds the optimizer,
  scheduler and RNG states for ``resume``. Without a validation set (``data.val`` not given: a
  final fit on all labelled data for a schedule chosen before) no epoch is validated, no
  ``best/`` is written and ``last/`` holds the final weights.

Determinism: the order of epoch ``e`` is a permutation drawn from a generator seeded with
``(seed, e)``, so a resumed run (also from a mid-epoch ``save_every_steps`` checkpoint) replays
exactly the batches an uninterrupted run would; dropout draws from the global torch RNG, whose
state is checkpointed. On CPU a resumed run ends bit-for-bit where an uninterrupted one does.

Under ``torchrun`` (see :mod:`fusionkit.training.distributed`) ``data.batch_size`` is the global
batch: every rank draws the same permutation and trains on its share of each batch, gradients are
averaged by DDP with a loss scaling that makes them equal the single-process gradient, and only
rank 0 writes to the run folder; it also writes ``replicas.json``, a digest of every rank's
parameters at the end (a mismatch raises :class:`TrainingError`). ``last/`` keeps every rank's
RNG state, so a resumed run with the same number of processes replays the same random draws.
With ``train.strategy: fsdp`` the model is sharded instead of replicated (see
:mod:`fusionkit.training.sharding`); checkpoints hold the full weights, gathered on rank 0.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusionkit.config import RunConfig
from fusionkit.device import autocast, resolve_device, resolve_precision
from fusionkit.errors import TrainingError
from fusionkit.io import atomic_write_text, write_json, write_yaml
from fusionkit.models import build_model
from fusionkit.models.members import MEMBERS_DIR
from fusionkit.models.unimodal import FUSED
from fusionkit.runs import (
    BEST,
    CONFIG_FILE,
    CURVES_FILE,
    LAST,
    METRICS_FILE,
    REPLICAS_FILE,
    VAL_REPORT_FILE,
    find_checkpoint,
    read_trainer_state,
)
from fusionkit.training import tracking
from fusionkit.training.accelerator import apply_channels_last
from fusionkit.training.averaging import WeightAverage, weight_average
from fusionkit.training.cache import CacheStats
from fusionkit.training.checkpoints import restore_last, save_best, save_last
from fusionkit.training.curves import write_curves
from fusionkit.training.distributed import (
    DistContext,
    check_replicas,
    init_distributed,
    sharded_loss,
    shutdown,
)
from fusionkit.training.evaluate import (
    blend_member_outputs,
    checkpoint_outputs,
    compute_report,
    member_sources,
)
from fusionkit.training.members import MEMBERS_REPORT_FILE, fit_member_blend, member_configs
from fusionkit.training.optim import build_optimizer, build_scheduler
from fusionkit.training.refit import HeadRefit, refit_model_heads
from fusionkit.training.run_config import build_run_config, check_run_config
from fusionkit.training.sharding import is_sharded, load_weights
from fusionkit.training.sources import (
    EpochLoader,
    Sources,
    balanced_class_weights,
    build_sources,
    epoch_batches,
)
from fusionkit.training.state import fresh_state, seed_everything
from fusionkit.training.step import training_module
from fusionkit.training.validation import gather_outputs, validation_report

__all__ = ["TrainResult", "Trainer", "TrainingError", "train"]

_LOG = logging.getLogger("fusionkit.training")


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        output_dir: The run folder.
        history: One metrics record per epoch.
        best_score: Mean validation accuracy of the final ``best/`` model (with its fitted
            blend, for a model with unimodal heads); ``-inf`` without a validation set.
        cache_stats: Feature cache counters (``None`` without the cache).
    """

    output_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = float("-inf")
    cache_stats: CacheStats | None = None

    @property
    def best_dir(self) -> Path:
        """The best checkpoint (absent for a run without a validation set)."""
        return self.output_dir / BEST

    @property
    def last_dir(self) -> Path:
        """The last checkpoint."""
        return self.output_dir / LAST


@dataclass
class _Run:
    """Everything one `Trainer.fit` works on, built by `Trainer._setup`."""

    model: Any
    sources: Sources
    step_module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    state: dict[str, Any]
    steps_per_epoch: int
    loggers: tracking.LoggerGroup = field(default_factory=tracking.LoggerGroup)
    loader: EpochLoader | None = None  # built at the first epoch; its workers may persist
    average: WeightAverage | None = None  # train.ema_decay

    def averaged(self) -> contextlib.AbstractContextManager[None]:
        """Within the block the model holds its averaged weights (its own without an EMA)."""
        return contextlib.nullcontext() if self.average is None else self.average.swapped()


def _heads(model: Any) -> list[Any]:
    """Every classification head of ``model``: the fused one and any unimodal ones."""
    unimodal = getattr(model, "unimodal", None)
    return [model.head, *([] if unimodal is None else unimodal.heads.values())]


class Trainer:
    """Trains a model from a run config (model + ``data`` + ``train`` sections).

    Started by ``torchrun``, every process runs the same ``fit``: the processes join one
    process group, split every global batch (``data.batch_size``) and average gradients with
    DDP, or with FSDP over a sharded model (``train.strategy``); rank 0 alone writes the run
    folder. See :mod:`fusionkit.training.distributed` and :mod:`fusionkit.training.sharding`.

    Args:
        config: The run config (see :func:`build_run_config`).
        output_dir: The run folder.
        resume: Continue from ``output_dir/last`` when it exists.
        progress: Show tqdm progress bars (rank 0 only).
        loggers: Loggers of your own (:class:`~fusionkit.training.tracking.MetricLogger`),
            handed every epoch's record after the TensorBoard logger (rank 0 only).

    Raises:
        ConfigError: Invalid ``data``/``train`` sections or ``train.precision: fp16`` without
            CUDA; the checks of :func:`~fusionkit.training.run_config.check_run_config`.
        DataError: ``data.train`` or ``data.val`` is missing, unreadable or lacks the columns
            the model needs (checked here, before the model is built).
        TypeError: A logger lacks ``log_epoch`` or ``close``.

    Examples:
        >>> result = Trainer(build_run_config("configs/quickstart.yaml"), "runs/q").fit()
        ... # doctest: +SKIP
    """

    def __init__(
        self,
        config: RunConfig,
        output_dir: str | os.PathLike[str],
        *,
        resume: bool = False,
        progress: bool = True,
        loggers: Iterable[tracking.MetricLogger] = (),
    ) -> None:
        self.config = config
        self.output_dir = Path(output_dir)
        self.resume = resume
        self.progress = progress
        self.loggers = tracking.check_loggers(loggers)
        self.data, self.train_config = config.data, config.train
        check_run_config(config)
        self.device = resolve_device(self.train_config.device)
        self.autocast_dtype = resolve_precision(self.train_config.precision, self.device)
        self.ctx = DistContext(0, 1, 0, self.device)
        self.cache_stats: CacheStats | None = None
        self.model: Any = None
        self.val_report: dict[str, Any] | None = None
        self._head_template: Any = None
        self._class_weight_tensors: dict[str, torch.Tensor] = {}

    # ----------------------------------------------------------------------------------------
    # The loop
    # ----------------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train for ``train.epochs`` epochs (from the last checkpoint with ``resume``).

        Under ``torchrun`` this joins the process group first and leaves it at the end.

        Returns:
            The :class:`TrainResult` (the same on every rank).

        Raises:
            TrainingError: The loss became NaN or infinite (the message names the step and
                the batch; ``last/`` keeps the last good checkpoint), or distributed replicas
                ended with different weights.
            DataError: A manifest cannot be read or has no usable sample.
            CheckpointError: ``resume`` found a checkpoint that cannot be loaded.

        Examples:
            >>> Trainer(config, "runs/x").fit().best_score  # doctest: +SKIP
        """
        self.ctx = init_distributed(self.device)
        self.device = self.ctx.device
        try:
            result = self._fit()
        finally:
            shutdown(self.ctx)
        members = member_configs(self.config)
        if members and result.best_dir.is_dir():
            self._fit_members(members)
        return result

    def _fit(self) -> TrainResult:
        run = self._setup()
        run.loggers = tracking.open_loggers(self.train_config, self.output_dir, self.loggers,
                                            start_epoch=run.state["epoch"], main=self.ctx.is_main)
        with run.loggers:
            for epoch in range(run.state["epoch"], self.train_config.epochs):
                if run.state["stopped_early"]:
                    break
                self._train_epoch(run, epoch)
                self._end_epoch(run, epoch)
        self._write_metrics(run.state["history"])
        if self.ctx.is_main:
            write_curves(run.state["history"], self.output_dir / CURVES_FILE)
        best_score = float("-inf")
        if run.sources.val is not None and run.state["best_epoch"]:
            self.val_report = self._finish_best(run)
            best_score = self.val_report["mean"]["accuracy"] or 0.0
        if self.ctx.distributed and not is_sharded(run.model):  # shards differ by design
            check_replicas(run.model, self.ctx, self.output_dir / REPLICAS_FILE)
        return TrainResult(
            self.output_dir, run.state["history"], best_score, run.sources.cache_stats
        )

    def _fit_members(self, configs: dict[str, RunConfig]) -> None:
        """Train the unimodal models of ``train.unimodal_models`` (each a run of its own under
        ``unimodal/``), fit their blend with ``best/`` on val and report it."""
        for name, config in configs.items():
            _LOG.info("train.unimodal_models: training the %s-only model", name)
            Trainer(config, self.output_dir / MEMBERS_DIR / name, resume=self.resume,
                    progress=self.progress).fit()
        if not self.ctx.is_main:
            return
        folders = {FUSED: BEST, **{n: f"{MEMBERS_DIR}/{n}/{BEST}" for n in configs}}
        assert self.data.val is not None  # member_configs asks for it
        outputs = {
            name: checkpoint_outputs(self.output_dir / folder, self.data.val,
                                     device=self.device)[1]
            for name, folder in folders.items()
        }
        scores, available = member_sources(outputs)
        tasks = self.config.tasks
        blend = fit_member_blend(scores, outputs[FUSED].targets, available, tasks, folders)
        blend.save(self.output_dir)
        report = compute_report(blend_member_outputs(blend, outputs, tasks), tasks,
                                self.config.modalities)
        report["members"] = folders
        write_json(self.output_dir / MEMBERS_REPORT_FILE, report)
        self.val_report = report

    def _train_epoch(self, run: _Run, epoch: int) -> None:
        """The optimizer steps of one epoch (from ``state["batch_in_epoch"]`` on a resume)."""
        from tqdm.auto import tqdm

        cfg, state, model = self.train_config, run.state, run.model
        model.train()
        start_batch = state["batch_in_epoch"]
        started = time.perf_counter()
        bar = tqdm(
            total=run.steps_per_epoch,
            initial=start_batch,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not (self.progress and self.ctx.is_main),
            leave=False,
        )
        if run.loader is None:
            run.loader = EpochLoader(
                run.sources.train, run.sources.collate, self.ctx,
                batch_size=self.data.batch_size, num_workers=self.data.num_workers,
                pin_memory=self.device.type == "cuda",
            )
        batches = epoch_batches(
            run.sources.train,
            run.sources.collate,
            self.ctx,
            seed=self.train_config.seed * 1_000_003 + epoch,
            batch_size=self.data.batch_size,
            start_batch=start_batch,
            loader=run.loader,
        )
        for batch_index, batch in enumerate(batches, start=start_batch):
            loss = self._step(run, batch, epoch, batch_index)
            state["step"] += 1
            state["epoch_loss_sum"] += loss
            state["batch_in_epoch"] = batch_index + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            mid_epoch = batch_index + 1 < run.steps_per_epoch
            if cfg.save_every_steps and state["step"] % cfg.save_every_steps == 0 and mid_epoch:
                state["epoch_seconds"] += time.perf_counter() - started
                started = time.perf_counter()
                self._save_last(run)
        bar.close()
        state["epoch_seconds"] += time.perf_counter() - started

    def _step(self, run: _Run, batch: Any, epoch: int, batch_index: int) -> float:
        """One optimizer step on ``batch``; returns the global batch's loss."""
        cfg = self.train_config
        with autocast(self.device, self.autocast_dtype):
            output = run.step_module(batch)
            loss, global_loss = self._loss(output, batch.targets)
        # The global loss is the same on every rank, so all ranks stop together.
        if not torch.isfinite(global_loss):
            raise TrainingError(
                f"loss is {global_loss.item()} at step {run.state['step'] + 1} (epoch "
                f"{epoch + 1}, batch {batch_index + 1}/{run.steps_per_epoch}, first ids "
                f"{batch.ids[:3]}); stopped, the last good checkpoint in "
                f"{self.output_dir / LAST} is kept"
            )
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            run.scaler.unscale_(run.optimizer)
            trainable = [p for p in run.model.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
        if run.average is not None:
            run.average.update()
        return global_loss.item()

    def _end_epoch(self, run: _Run, epoch: int) -> None:
        """Validate, keep ``best/``, decide on early stopping, save ``last/`` and the metrics."""
        cfg, state, model = self.train_config, run.state, run.model
        report, score = None, None
        if run.sources.val is not None:
            with run.averaged():
                report = validation_report(model, self._val_outputs(run), refit_blend=True)
            score = report["mean"]["accuracy"] or 0.0
            if cfg.best_metric == "loss":
                log_loss = report["mean"]["log_loss"]
                score = -log_loss if log_loss is not None else float("-inf")
        lr = run.scheduler.get_last_lr()[-1]
        record = tracking.epoch_record(epoch + 1, state, run.steps_per_epoch, lr, report)
        _LOG.info("epoch %d: %s", epoch + 1, record)
        state.update(epoch=epoch + 1, batch_in_epoch=0, epoch_loss_sum=0.0, epoch_seconds=0.0)
        state["history"].append(record)
        run.loggers.log_epoch(epoch + 1, record)  # flushed before last/ holds the epoch
        if score is not None and (state["best_score"] is None or score > state["best_score"]):
            state["best_score"] = score
            state["best_epoch"] = epoch + 1
            with run.averaged():
                save_best(model, self.output_dir / BEST, self.ctx)
        patience = cfg.early_stopping
        if score is not None and patience and epoch + 1 - state["best_epoch"] >= patience:
            _LOG.info(
                "early stopping after epoch %d: no better val %s since epoch %d",
                epoch + 1, cfg.best_metric, state["best_epoch"],
            )
            state["stopped_early"] = True
        self._save_last(run)
        self._write_metrics(state["history"])

    # ----------------------------------------------------------------------------------------
    # Setup
    # ----------------------------------------------------------------------------------------

    def _setup(self) -> _Run:
        """Build the model, sources and optimizer; restore them from ``last/`` on a resume."""
        cfg = self.train_config
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        model = self.model = self._build_model()
        sources = build_sources(model, self.data, cfg, self.ctx, self.device)
        self.cache_stats = sources.cache_stats
        if cfg.class_weight == "balanced":
            weights = balanced_class_weights(sources.train_set.records, model.tasks)
            for task, weight in weights.items():
                weight = weight.to(self.device)
                for head in _heads(model):
                    head.set_class_weight(task, weight)
                self._class_weight_tensors[task] = weight
        for head in _heads(model):
            head.set_label_smoothing(cfg.label_smoothing)
        # A plain copy of the unimodal heads (with their class weights and smoothing), for the
        # refit after the epochs: the model's own may be sharded by then.
        unimodal = getattr(model, "unimodal", None)
        if unimodal is not None and cfg.refit_heads:
            self._head_template = copy.deepcopy(unimodal)
        state, tensors = fresh_state(), {}
        # Every rank reads the same checkpoint (a shared folder on several nodes); the weights
        # load before FSDP shards them, the optimizer is built on the sharded parameters.
        checkpoint = find_checkpoint(self.output_dir / LAST) if self.resume else None
        if checkpoint is not None:
            state, tensors = read_trainer_state(checkpoint)
            load_weights(model, checkpoint)
        # DDP's optimizer sees the parameters the probe then freezes (its checkpoints' layout);
        # FSDP's is built after sharding, which replaces the parameters.
        fsdp = self.ctx.distributed and cfg.strategy == "fsdp"
        optimizer = None if fsdp else build_optimizer(model, cfg)
        step_module = training_module(
            model, sources, self.ctx, self.device, self.train_config, self.data.batch_size,
            self.autocast_dtype,
        )
        optimizer = optimizer or build_optimizer(model, cfg)
        average = weight_average(model, cfg.ema_decay)
        steps_per_epoch = math.ceil(len(sources.train) / self.data.batch_size)
        scheduler = build_scheduler(optimizer, steps_per_epoch * cfg.epochs, cfg)
        scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.autocast_dtype == torch.float16
        )
        if checkpoint is not None:
            restore_last(tensors, self.ctx, model, optimizer, scheduler, scaler, cfg.seed,
                         average)
            _LOG.info("resuming from %s at epoch %d, step %d", checkpoint, state["epoch"] + 1,
                      state["step"])
        elif self.resume:
            _LOG.warning("--resume: no checkpoint in %s; starting from scratch", self.output_dir)
        for key, value in fresh_state().items():  # checkpoints of older versions lack some
            state.setdefault(key, value)
        if self.ctx.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_yaml(self.output_dir / CONFIG_FILE, self.config.to_dict())
        return _Run(model, sources, step_module, optimizer, scheduler, scaler, state,
                    steps_per_epoch, average=average)

    def _build_model(self) -> Any:
        # The same seed on every rank: replicas start identical.
        seed_everything(self.train_config.seed)
        model = build_model(self.config).to(self.device)
        apply_channels_last(model, self.train_config.channels_last, self.device)
        if self.ctx.distributed:
            # Per-rank streams for dropout and augmentation, so ranks do not draw alike.
            seed_everything(self.train_config.seed + self.ctx.rank)
        return model

    # ----------------------------------------------------------------------------------------
    # Steps, checkpoints and validation
    # ----------------------------------------------------------------------------------------

    def _loss(self, output: Any, targets: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss to backpropagate and the global batch's loss (detached)."""
        if not self.ctx.distributed:
            loss = self.model.loss(output, targets)
            return loss, loss.detach()
        losses, totals = [], []
        for head, logits, kept, weight in self.model.loss_terms(output, targets):
            loss, total = sharded_loss(head, logits, kept, self.ctx, self._class_weight_tensors)
            losses.append(weight * loss)
            totals.append(weight * total)
        return torch.stack(losses).sum(), torch.stack(totals).sum()

    def _save_last(self, run: _Run) -> None:
        save_last(self.output_dir / LAST, self.ctx, run.model, run.optimizer, run.scheduler,
                  run.scaler, run.state, run.average)

    def _write_metrics(self, history: list[dict[str, Any]]) -> None:
        if self.ctx.is_main:
            text = "".join(json.dumps(record) + "\n" for record in history)
            atomic_write_text(self.output_dir / METRICS_FILE, text)

    def _val_outputs(self, run: _Run) -> Any:
        return gather_outputs(
            run.model,
            run.sources.val,
            run.sources.collate,
            self.ctx,
            self.device,
            batch_size=self.data.eval_batch_size,
            num_workers=self.data.num_workers,
            amp=self.autocast_dtype,
            lockstep=is_sharded(run.model),
        )

    def _refit_heads(self, run: _Run) -> list[HeadRefit]:
        """Refit the unimodal heads of ``best/`` (``train.refit_heads``); ``[]`` if not done."""
        if self._head_template is None:
            return []
        return refit_model_heads(
            run.model, self._head_template, run.sources, self.ctx, self.device,
            batch_size=self.data.eval_batch_size, num_workers=self.data.num_workers,
            amp=self.autocast_dtype, lockstep=is_sharded(run.model), seed=self.train_config.seed,
        )

    def _finish_best(self, run: _Run) -> dict[str, Any]:
        """Reload ``best/`` (with the blend fit at its epoch), refit its unimodal heads and
        blend (``train.refit_heads``, saved into ``best/``) and write its validation report.

        Returns:
            The validation report of ``best/``, with each head's accuracy.
        """
        load_weights(run.model, self.output_dir / BEST)
        refits = self._refit_heads(run)
        report = validation_report(run.model, self._val_outputs(run), refit_blend=bool(refits))
        if refits:
            report["head_refit"] = [dataclasses.asdict(r) for r in refits]
            save_best(run.model, self.output_dir / BEST, self.ctx)
        if self.ctx.is_main:
            write_json(self.output_dir / VAL_REPORT_FILE, report)
        for warning in report["warnings"]:
            _LOG.warning("%s", warning)
        return report


def train(
    config: Any,
    output_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    progress: bool = True,
    loggers: Iterable[tracking.MetricLogger] = (),
) -> TrainResult:
    """Train a run config into ``output_dir``; see :class:`Trainer`.

    Args:
        config: A run config, mapping or YAML path (see :func:`build_run_config`).
        output_dir: The run folder.
        resume: Continue from ``output_dir/last``.
        progress: Show progress bars.
        loggers: More loggers of every epoch (see :class:`Trainer`).

    Returns:
        The :class:`TrainResult`.

    Raises:
        TrainingError: Non-finite loss.
        ConfigError: Invalid config.
        DataError: Unreadable data.

    Examples:
        >>> result = train("configs/quickstart.yaml", "runs/quickstart")  # doctest: +SKIP
    """
    if not isinstance(config, RunConfig):
        config = build_run_config(config)
    return Trainer(config, output_dir, resume=resume, progress=progress, loggers=loggers).fit()

