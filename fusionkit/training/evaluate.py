"""Evaluation: run a model over a data set and report per-task metrics and modality weights.

The report (``report.json``) holds, per task: accuracy, macro-F1, recall at each asked
precision (90% by default, the CMA-CLIP paper's retail metric), the majority-class rate for
comparison and the mean modality weights (which modality the task trusted). See
:mod:`fusionkit.training.metrics` for the exact metric definitions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from fusionkit.config import DataConfig
from fusionkit.data import ManifestDataset, build_image_transform, input_image_configs, make_collate
from fusionkit.data.loading import loader_options
from fusionkit.device import autocast, inference_dtype, resolve_device
from fusionkit.errors import ConfigError, DataError
from fusionkit.io import read_yaml, write_json
from fusionkit.models import CMACLIP
from fusionkit.models.members import MemberBlend, members_run
from fusionkit.models.unimodal import FUSED
from fusionkit.runs import (
    CONFIG_FILE,
    report_path,
    resolve_run_dir,
    run_config_path,
    run_precision,
)
from fusionkit.tasks import TaskSpec
from fusionkit.training import metrics
from fusionkit.training.accelerator import apply_channels_last, to_device
from fusionkit.training.cache import batch_tokens

__all__ = [
    "EvalOutputs",
    "blend_member_outputs",
    "checkpoint_outputs",
    "collect_outputs",
    "compute_report",
    "evaluate_checkpoint",
    "format_report",
    "forward_batch",
    "fusion_warnings",
    "member_sources",
]

def forward_batch(model: Any, batch: Any, device: torch.device | str) -> Any:
    """Run the model on a data batch or a cached-feature batch.

    Args:
        model: A :class:`~fusionkit.models.CMACLIP`.
        batch: A :class:`~fusionkit.data.Batch` (encoders run) or a
            :class:`~fusionkit.training.cache.FeatureBatch` (only the live encoders and
            ``forward_head`` run).
        device: Where the model lives.

    Returns:
        The model's :class:`~fusionkit.models.CMACLIPOutput`.

    Examples:
        >>> output = forward_batch(model, batch, "cpu")  # doctest: +SKIP
    """
    return model.forward_head(*batch_tokens(model, batch, device))


@dataclass
class EvalOutputs:
    """Everything a report is computed from, concatenated over a data set.

    Attributes:
        scores: Task → ``(N, C)`` probabilities (softmax, or sigmoid for multi-label tasks).
        targets: Task → targets as in :class:`~fusionkit.data.Batch`.
        weights: Task → ``(N, M)`` modality weights.
        loss: Mean loss over batches.
        ids: Sample ids in order.
        sources: For a model with unimodal heads, source (``fused`` and each modality) →
            task → ``(N, C)`` probabilities of that head alone; empty otherwise.
        blend: Task → the model's blend weights per source and its ``scale`` (empty
            without unimodal heads).
        present: Modality → ``(N,)`` bool, whether each sample had that modality.
    """

    scores: dict[str, Tensor] = field(default_factory=dict)
    targets: dict[str, Tensor] = field(default_factory=dict)
    weights: dict[str, Tensor] = field(default_factory=dict)
    loss: float = float("nan")
    ids: list[str] = field(default_factory=list)
    sources: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    blend: dict[str, dict[str, float]] = field(default_factory=dict)
    present: dict[str, Tensor] = field(default_factory=dict)


def _amp_dtype(amp: torch.dtype | bool | None, device: torch.device) -> torch.dtype | None:
    if amp is True:  # the flag of earlier versions: bfloat16 on CUDA
        return torch.bfloat16 if device.type == "cuda" else None
    return amp or None


@torch.no_grad()
def collect_outputs(
    model: Any,
    batches: Iterable[Any],
    device: torch.device | str,
    *,
    amp: torch.dtype | bool | None = None,
) -> EvalOutputs:
    """Run the model in eval mode over ``batches`` and gather scores, targets and weights.

    Args:
        model: The model.
        batches: Data batches or cached-feature batches.
        device: Where the model lives.
        amp: The autocast dtype (the run's precision, see :func:`inference_dtype`);
            ``None`` or ``False`` for float32; ``True`` means bfloat16 on CUDA only.

    Returns:
        The concatenated :class:`EvalOutputs`.

    Examples:
        >>> outputs = collect_outputs(model, loader, "cpu")  # doctest: +SKIP
    """
    device = torch.device(device)
    dtype = _amp_dtype(amp, device)
    was_training = model.training
    model.eval()
    parts: dict[str, dict[str, list[Tensor]]] = {"scores": {}, "targets": {}, "weights": {}}
    source_parts: dict[str, dict[str, list[Tensor]]] = {}
    present: dict[str, list[Tensor]] = {}
    losses: list[float] = []
    ids: list[str] = []
    try:
        for batch in batches:
            batch = to_device(batch, device)
            with autocast(device, dtype):
                output = forward_batch(model, batch, device)
                losses.append(float(model.loss(output, batch.targets)))
            ids.extend(batch.ids)
            for modality in model.modalities:
                flags = output.present.get(modality)
                if flags is None:
                    flags = torch.zeros(len(batch.ids), dtype=torch.bool)
                present.setdefault(modality, []).append(flags.cpu())
            for task, logits in output.logits.items():
                parts["scores"].setdefault(task, []).append(_probabilities(logits, model, task))
                parts["targets"].setdefault(task, []).append(batch.targets[task].cpu())
                weights = output.modality_weights[task].float().cpu()
                parts["weights"].setdefault(task, []).append(weights)
            for source, logits_by_task in output.source_logits().items():
                for task, logits in logits_by_task.items():
                    probs = _probabilities(logits, model, task)
                    source_parts.setdefault(source, {}).setdefault(task, []).append(probs)
    finally:
        model.train(was_training)
    joined = {kind: {t: torch.cat(v) for t, v in d.items()} for kind, d in parts.items()}
    blend = getattr(model, "blend", None)
    return EvalOutputs(
        joined["scores"],
        joined["targets"],
        joined["weights"],
        sum(losses) / len(losses) if losses else float("nan"),
        ids,
        {s: {t: torch.cat(v) for t, v in d.items()} for s, d in source_parts.items()},
        {} if blend is None else {t: _blend_row(blend, t) for t in model.tasks},
        {m: torch.cat(v) for m, v in present.items()},
    )


def _blend_row(blend: Any, task: str) -> dict[str, float]:
    return {**blend.task_weights(task), "scale": blend.task_scale(task)}


def _probabilities(logits: Tensor, model: Any, task: str) -> Tensor:
    logits = logits.float()
    return model.tasks[task].probabilities(logits).cpu()


def _clean(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 6)


def _precision_key(precision: float) -> str:
    return f"{precision:g}"


def compute_report(
    outputs: EvalOutputs,
    tasks: Mapping[str, TaskSpec],
    modalities: Sequence[str],
    precisions: Sequence[float] = (0.9,),
) -> dict[str, Any]:
    """Per-task metrics and their means over tasks.

    Args:
        outputs: From :func:`collect_outputs`.
        tasks: The model's tasks.
        modalities: Column names of the modality weights (``model.modalities``).
        precisions: Precisions for recall-at-precision.

    Returns:
        ``{"loss", "precisions", "tasks": {task: {"accuracy", "log_loss", "macro_f1",
        "recall_at_precision": {"0.9": ...}, "majority_rate", "modality_weights", "labelled",
        "multi_label"}}, "mean": {...}}``; undefined values (no labelled sample) are ``None``.

    Raises:
        ConfigError: A precision is not in (0, 1].

    Examples:
        >>> report = compute_report(outputs, model.tasks, model.modalities)  # doctest: +SKIP
        >>> report["tasks"]["color"]["recall_at_precision"]["0.9"]  # doctest: +SKIP
        0.84
    """
    for precision in precisions:
        if not 0.0 < precision <= 1.0:
            raise ConfigError(f"precision must be in (0, 1], got {precision}")
    per_task: dict[str, dict[str, Any]] = {}
    for task, spec in tasks.items():
        scores, targets = outputs.scores[task], outputs.targets[task]
        multi = spec.multi_label
        weights = outputs.weights[task]
        per_task[task] = {
            "multi_label": multi,
            "labelled": int(metrics.valid_rows(targets).sum()),
            "accuracy": _clean(metrics.accuracy(scores, targets, multi)),
            "log_loss": _clean(metrics.log_loss(scores, targets, multi)),
            "macro_f1": _clean(metrics.macro_f1(scores, targets, multi)),
            "recall_at_precision": {
                _precision_key(p): _clean(metrics.recall_at_precision(scores, targets, p)[0])
                for p in precisions
            },
            "majority_rate": _clean(metrics.majority_rate(targets, multi)),
            "modality_weights": {
                m: round(float(weights[:, k].mean()), 6) for k, m in enumerate(modalities)
            },
        }
        if outputs.sources:
            per_task[task]["sources"] = {
                source: _clean(metrics.accuracy(by_task[task], targets, multi))
                for source, by_task in outputs.sources.items()
            }
            per_task[task]["blend"] = dict(outputs.blend.get(task, {}))

    def mean(values: Iterable[float | None]) -> float | None:
        kept = [v for v in values if v is not None]
        return round(sum(kept) / len(kept), 6) if kept else None

    rows = per_task.values()
    return {
        "loss": _clean(outputs.loss),
        "num_samples": len(outputs.ids),
        "precisions": list(precisions),
        "tasks": per_task,
        "warnings": fusion_warnings(per_task),
        "mean": {
            "accuracy": mean(r["accuracy"] for r in rows),
            "log_loss": mean(r["log_loss"] for r in rows),
            "macro_f1": mean(r["macro_f1"] for r in rows),
            "recall_at_precision": {
                _precision_key(p): mean(r["recall_at_precision"][_precision_key(p)] for r in rows)
                for p in precisions
            },
            "majority_rate": mean(r["majority_rate"] for r in rows),
            "modality_weights": {
                m: mean(r["modality_weights"][m] for r in rows) for m in modalities
            },
        },
    }


def fusion_warnings(tasks: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Plain-words warnings for every task whose model scores below one of its modalities alone.

    Args:
        tasks: The ``tasks`` section of a report (see :func:`compute_report`); tasks without
            ``sources`` (models without unimodal heads) are not compared.

    Returns:
        One sentence per such task, e.g. ``"color: the model (0.812) is below text alone
        (0.845); ..."``; empty when fusion paid off everywhere.

    Examples:
        >>> row = {"accuracy": 0.8, "sources": {"fused": 0.8, "text": 0.9}}
        >>> print(fusion_warnings({"color": row})[0])  # doctest: +NORMALIZE_WHITESPACE
        color: the model (0.800) is below text alone (0.900): fusing the modalities did not
        pay off on this data; consider the text-only model
    """
    warnings = []
    for task, row in tasks.items():
        model = row.get("accuracy")
        alone = {
            source: value
            for source, value in (row.get("sources") or {}).items()
            if source != "fused" and value is not None
        }
        if model is None or not alone:
            continue
        best, value = max(alone.items(), key=lambda item: item[1])
        if value > model:
            warnings.append(
                f"{task}: the model ({model:.3f}) is below {best} alone ({value:.3f}): fusing "
                f"the modalities did not pay off on this data; consider the {best}-only model"
            )
    return warnings


def format_report(report: Mapping[str, Any]) -> str:
    """The report as a plain-text table, one row per task and a mean row.

    Args:
        report: From :func:`compute_report`.

    Returns:
        The table.

    Examples:
        >>> print(format_report(report))  # doctest: +SKIP
        task      accuracy  macro-F1  R@P0.9  majority  weights
    """
    keys = [_precision_key(p) for p in report["precisions"]]
    header = ["task", "accuracy", "macro-F1", *[f"R@P{k}" for k in keys], "majority", "weights"]

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = []
    for name, row in [*report["tasks"].items(), ("mean", report["mean"])]:
        shares = row["modality_weights"].items()
        weights = " ".join(f"{m}={w:.2f}" for m, w in shares if w is not None)
        lines.append(
            [
                name,
                cell(row["accuracy"]),
                cell(row["macro_f1"]),
                *[cell(row["recall_at_precision"][k]) for k in keys],
                cell(row["majority_rate"]),
                weights,
            ]
        )
    render = _table(header, lines)
    sourced = {t: r for t, r in report["tasks"].items() if r.get("sources")}
    if sourced:
        names = list(next(iter(sourced.values()))["sources"])
        kind = "model" if report.get("members") else "head"
        header = ["task", "model", *[f"{n} {kind}" for n in names], "blend"]
        lines = []
        for task, row in sourced.items():
            weights = {n: w for n, w in row.get("blend", {}).items() if n != "scale"}
            blend = " ".join(f"{n}={w:.1f}" for n, w in weights.items())
            cells = [cell(row["sources"].get(n)) for n in names]
            lines.append([task, cell(row["accuracy"]), *cells, blend])
        render += ["", f"accuracy of the model against each of its {kind}s alone:"]
        render += _table(header, lines)
    render += [f"warning: {w}" for w in report.get("warnings", [])]
    return "\n".join(render)


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in [header, *lines]]


def evaluate_checkpoint(
    checkpoint: str | os.PathLike[str],
    data: str | os.PathLike[str] | None = None,
    *,
    precisions: Sequence[float] = (0.9,),
    batch_size: int | None = None,
    device: str = "auto",
    output: str | os.PathLike[str] | None = None,
    precision: str | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint on a manifest and write ``report.json``.

    The model runs in its run's precision (``train.precision``, see :func:`inference_dtype`),
    CNN backbones in ``channels_last`` on CUDA, batches from pinned memory on CUDA. A run
    folder trained with ``train.unimodal_models`` is evaluated as the blend of its fused and
    unimodal models (see :mod:`fusionkit.training.members`); the report then gives each
    model alone beside the blend, and no loss.

    Args:
        checkpoint: A checkpoint folder (``run/best``) or a run folder (its ``best/`` is used,
            or its member blend).
        data: Manifest to evaluate on; default the config's ``data.test`` (else ``data.val``).
        precisions: Precisions for recall-at-precision.
        batch_size: Batch size (default the config's ``data.eval_batch_size``).
        device: ``auto``, ``cpu`` or ``cuda``.
        output: Where to write the report (default ``<run folder>/report.json``).
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` instead of the run's.

    Returns:
        The report, with ``checkpoint``, ``data``, ``precision`` and ``report_path`` added.

    Raises:
        CheckpointError: The checkpoint (or a member of its blend) cannot be loaded.
        ConfigError: No data set given and none in the config.
        DataError: The manifest cannot be read or has no usable sample.

    Examples:
        >>> report = evaluate_checkpoint("runs/quickstart")  # doctest: +SKIP
    """
    run = members_run(checkpoint)
    blend = MemberBlend.load(run) if run is not None else None
    folders = {FUSED: resolve_run_dir(checkpoint)} if blend is None else blend.folders(run)
    folder = folders[FUSED]
    dev = resolve_device(device)
    models = {name: _load(member, dev) for name, member in folders.items()}
    precision = precision or run_precision(folder)
    data_cfg = _run_data_config(folder)
    manifest = data if data is not None else (data_cfg.test or data_cfg.val)
    if manifest is None:
        raise ConfigError("no data to evaluate on: pass --data or set data.test in the config")
    results = {
        name: _outputs(models[name], member, manifest, batch_size, dev, precision)
        for name, member in folders.items()
    }
    model = models[FUSED]
    outputs, skipped = results[FUSED]
    if blend is not None:
        outputs = blend_member_outputs(blend, {n: r[0] for n, r in results.items()}, model.tasks)
    report = compute_report(outputs, model.tasks, model.modalities, precisions)
    if blend is not None:
        report["members"] = {name: str(member) for name, member in folders.items()}
    report = {"checkpoint": str(folder if blend is None else run), "data": str(manifest),
              "precision": precision, **report}
    report["skipped_rows"] = skipped
    target = Path(output) if output is not None else report_path(folder)
    write_json(target, report)
    report["report_path"] = str(target)
    return report


def checkpoint_outputs(
    checkpoint: str | os.PathLike[str],
    manifest: str | os.PathLike[str],
    *,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    precision: str | None = None,
) -> tuple[Any, EvalOutputs, dict[str, int]]:
    """Load a checkpoint and run it over a manifest.

    Args:
        checkpoint: A checkpoint folder or a run folder (its ``best/``).
        manifest: The data.
        batch_size: Batch size (default the run's ``data.eval_batch_size``).
        device: Where to run.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16``; default the run's.

    Returns:
        ``(model, outputs, skipped)``: the loaded model, its :class:`EvalOutputs`, and the
        manifest rows skipped per reason.

    Raises:
        CheckpointError: The checkpoint cannot be loaded.
        DataError: The manifest cannot be read or has no usable sample.

    Examples:
        >>> model, outputs, _ = checkpoint_outputs("runs/x/best", "val.csv")  # doctest: +SKIP
    """
    folder = resolve_run_dir(checkpoint)
    dev = torch.device(device)
    model = _load(folder, dev)
    outputs, skipped = _outputs(model, folder, manifest, batch_size, dev, precision)
    return model, outputs, skipped


def _load(folder: Path, device: torch.device) -> Any:
    model = CMACLIP.from_pretrained(folder, map_location=device)
    apply_channels_last(model, "auto", device)
    return model


def _outputs(
    model: Any,
    folder: Path,
    manifest: str | os.PathLike[str],
    batch_size: int | None,
    dev: torch.device,
    precision: str | None,
) -> tuple[EvalOutputs, dict[str, int]]:
    """``model`` (loaded from ``folder``) over ``manifest``: its outputs and the rows skipped."""
    dtype = inference_dtype(precision or run_precision(folder), dev)
    data_cfg = _run_data_config(folder)
    image_configs = input_image_configs(model)
    transforms = {name: build_image_transform(c) for name, c in image_configs.items()}
    image_shape = {name: tuple(c["input_size"]) for name, c in image_configs.items()}
    dataset = ManifestDataset(
        manifest, model.tasks, transforms, on_error=data_cfg.on_error, inputs=model.config.inputs
    )
    if len(dataset) == 0:
        raise DataError(f"{manifest}: no usable sample to evaluate (skipped: {dataset.skipped})")
    loader = DataLoader(
        dataset,
        batch_size=batch_size or data_cfg.eval_batch_size,
        collate_fn=make_collate(model.tasks, image_shape, inputs=model.config.inputs),
        **loader_options(data_cfg.num_workers, dev.type == "cuda"),
    )
    return collect_outputs(model, loader, dev, amp=dtype), dict(dataset.skipped)


def member_sources(
    outputs: Mapping[str, EvalOutputs],
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """The members' scores in the fused model's sample order, and where each is available.

    Args:
        outputs: Source (``fused``, then each unimodal model's modality) → its outputs on
            one data set. A sample that a member skipped (or whose modality the fused model
            saw missing) is unavailable to that member.

    Returns:
        ``(scores, available)``: source → task → ``(N, C)``, and source → ``(N,)`` bool.
    """
    main = outputs[FUSED]
    scores = {FUSED: main.scores}
    available = {FUSED: torch.ones(len(main.ids), dtype=torch.bool)}
    for name, other in outputs.items():
        if name == FUSED:
            continue
        rows = {sample: k for k, sample in enumerate(other.ids)}
        index = torch.tensor([rows.get(sample, -1) for sample in main.ids], dtype=torch.long)
        found = index >= 0
        scores[name] = {
            task: torch.where(found[:, None], values[index.clamp(min=0)], 0.0)
            for task, values in other.scores.items()
        }
        present = main.present.get(name)
        available[name] = found if present is None else found & present.bool()
    return scores, available


def blend_member_outputs(
    blend: MemberBlend, outputs: Mapping[str, EvalOutputs], tasks: Mapping[str, TaskSpec]
) -> EvalOutputs:
    """The outputs of a member blend: the fused model's, with the blended scores.

    ``sources`` holds each model's own scores and ``blend`` the weights, so the report shows
    the blend beside every model alone; the loss is not defined (NaN).

    Args:
        blend: The blend.
        outputs: Source → that model's outputs on the same data.
        tasks: Task name → :class:`~fusionkit.tasks.TaskSpec`.

    Returns:
        The blended :class:`EvalOutputs`.
    """
    main = outputs[FUSED]
    scores, available = member_sources(outputs)
    blended = {}
    for task, spec in tasks.items():
        logits = blend.logits(task, {s: by_task[task] for s, by_task in scores.items()},
                              spec.multi_label, available)
        blended[task] = spec.probabilities(logits)
    return EvalOutputs(
        blended, main.targets, main.weights, float("nan"), list(main.ids), scores,
        {t: {**blend.weights[t], "scale": blend.scales[t]} for t in tasks}, main.present,
    )


def _run_data_config(checkpoint: Path) -> DataConfig:
    """The ``data`` section of the run that wrote ``checkpoint`` (its ``test``/``val``, batch
    sizes); a checkpoint of an earlier version carries it itself; defaults without either."""
    for path in (run_config_path(checkpoint), checkpoint / CONFIG_FILE):
        if path.is_file():
            section = read_yaml(path).get("data")
            if isinstance(section, Mapping):
                return DataConfig.parse(section, "data")
    return DataConfig()

