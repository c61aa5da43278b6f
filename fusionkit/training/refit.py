"""Refit a trained model's unimodal heads on its own features, after the epochs.

The epoch a run keeps is the one whose *blend* scores best on validation data, and the fused
head and a fine-tuned encoder usually peak early, while a head over a frozen encoder's features
is still learning: on the icons set a joint model's image head reached 0.72 test accuracy at its
kept epoch, where an image-only model reached 0.77. The refit trains each modality's head
(its projection and classifier, see :class:`~fusionkit.models.unimodal.UnimodalHeads`) alone,
on the kept model's pooled encoder features (computed once, so an epoch of the head costs
milliseconds), stops on its validation loss, and keeps the refit head only where that loss is
lower than the trained head's. The trainer then fits the blend again.

It runs with ``train.refit_heads: true``, off by default: on every zero-config run of the
presets page it raised the icons models and lowered the emoji ones
(``docs/results/refit_heads.md``).

Examples:
    >>> from fusionkit.tasks import parse_tasks
    >>> heads = UnimodalHeads({"text": 4}, 8, parse_tasks({"color": {"num_classes": 2}}))
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(64, 4, generator=g)
    >>> y = {"color": (x[:, 0] > 0).long()}
    >>> pooled = PooledFeatures({"text": x}, {"text": torch.ones(64, dtype=torch.bool)}, y)
    >>> [r.modality for r in refit_unimodal_heads(heads, pooled, pooled, max_epochs=5)]
    ['text']
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fusionkit.device import autocast
from fusionkit.models.unimodal import UnimodalHeads, masked_mean
from fusionkit.training.accelerator import to_device
from fusionkit.training.cache import batch_tokens
from fusionkit.training.distributed import DistContext
from fusionkit.training.sharding import full_module_state, set_full_weights
from fusionkit.training.validation import gather_batches

__all__ = [
    "HeadRefit",
    "PooledFeatures",
    "pool_features",
    "refit_model_heads",
    "refit_unimodal_heads",
]

_LOG = logging.getLogger("fusionkit.training")


@dataclass
class PooledFeatures:
    """Every modality's pooled encoder features over a data set, in order.

    Attributes:
        features: Modality → ``(N, C)`` float32, the masked mean of its encoder tokens (the
            unimodal head's input).
        present: Modality → ``(N,)`` bool, whether the sample has that modality.
        targets: Task → targets as in :class:`~fusionkit.data.Batch`.
    """

    features: dict[str, Tensor] = field(default_factory=dict)
    present: dict[str, Tensor] = field(default_factory=dict)
    targets: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.targets.values()))) if self.targets else 0

    @staticmethod
    def join(parts: Iterable[PooledFeatures]) -> PooledFeatures:
        """Concatenate parts in order."""
        parts = list(parts)
        if not parts:
            return PooledFeatures()

        def cat(name: str) -> dict[str, Tensor]:
            first = getattr(parts[0], name)
            return {k: torch.cat([getattr(p, name)[k] for p in parts]) for k in first}

        return PooledFeatures(cat("features"), cat("present"), cat("targets"))


@torch.no_grad()
def pool_features(
    model: Any,
    batches: Iterable[Any],
    device: torch.device | str,
    *,
    amp: torch.dtype | None = None,
) -> PooledFeatures:
    """The pooled encoder features of every modality over ``batches`` (eval mode).

    Args:
        model: A model with unimodal heads.
        batches: Data batches or cached-feature batches.
        device: Where the model lives.
        amp: The autocast dtype (``None``: float32).

    Returns:
        The :class:`PooledFeatures` (CPU tensors).

    Examples:
        >>> pooled = pool_features(model, loader, "cpu")  # doctest: +SKIP
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    parts = []
    try:
        for batch in batches:
            batch = to_device(batch, device)
            with autocast(device, amp):
                tokens, masks = batch_tokens(model, batch, device)
            parts.append(
                PooledFeatures(
                    {m: masked_mean(tokens[m].float(), masks[m]).cpu() for m in tokens},
                    {m: masks[m].any(dim=1).cpu() for m in tokens},
                    {t: v.cpu() for t, v in batch.targets.items()},
                )
            )
    finally:
        model.train(was_training)
    return PooledFeatures.join(parts)


@dataclass
class HeadRefit:
    """What :func:`refit_unimodal_heads` did to one modality's head.

    Attributes:
        modality: The modality.
        val_loss_before: The trained head's validation loss.
        val_loss: The validation loss of the head kept.
        epochs: Epochs of the refit head kept (0: the trained head was kept).
    """

    modality: str
    val_loss_before: float
    val_loss: float
    epochs: int

    @property
    def kept_refit(self) -> bool:
        """Whether the refit head replaced the trained one."""
        return self.epochs > 0


def _reset(module: nn.Module) -> None:
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()


def _rows(pooled: PooledFeatures, modality: str) -> tuple[Tensor, dict[str, Tensor]]:
    keep = pooled.present[modality]
    return pooled.features[modality][keep], {t: v[keep] for t, v in pooled.targets.items()}


def _val_loss(model: nn.Sequential, head: Any, x: Tensor, y: Mapping[str, Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        loss = head.loss(model(x), y)
    return float(loss)


def refit_unimodal_heads(
    heads: UnimodalHeads,
    train: PooledFeatures,
    val: PooledFeatures,
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    batch_size: int = 64,
    max_epochs: int = 200,
    patience: int = 15,
    seed: int = 0,
    restart: bool = True,
    modalities: Sequence[str] | None = None,
) -> list[HeadRefit]:
    """Train each modality's head anew on pooled features; keep it where val loss drops.

    Each head (projection and classifier) restarts from a fresh initialisation (from its trained
    weights with ``restart=False``) and trains with AdamW on ``train``, one epoch at a time,
    keeping the epoch of lowest loss on ``val``; it stops after ``patience`` epochs without a
    lower one. The refit head replaces the trained one only where its validation loss is lower.
    Samples without the modality are left out. ``heads`` is changed in place; it runs on the
    CPU, deterministically for a seed.

    Args:
        heads: The model's unimodal heads (not sharded).
        train: Pooled features of the training set (:func:`pool_features`).
        val: Pooled features of the validation set.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        batch_size: Samples per step.
        max_epochs: Most epochs per head.
        patience: Epochs without a lower validation loss before stopping.
        seed: Seeds the initialisation, the shuffling and dropout.
        restart: Start from a fresh initialisation (else from the trained head).
        modalities: Refit only these modalities' heads (``None``: every one).

    Returns:
        One :class:`HeadRefit` per modality refit (with features in both sets).

    Raises:
        ValueError: ``max_epochs``, ``patience`` or ``batch_size`` below 1.

    Examples:
        >>> results = refit_unimodal_heads(model.unimodal, train, val)  # doctest: +SKIP
        >>> [(r.modality, r.kept_refit) for r in results]  # doctest: +SKIP
        [('image', True), ('text', False)]
    """
    if min(max_epochs, patience, batch_size) < 1:
        raise ValueError("max_epochs, patience and batch_size must be >= 1")
    results = []
    device = next(heads.parameters()).device
    for index, modality in enumerate(heads.heads):
        if modality not in train.features or modality not in val.features:
            continue
        if modalities is not None and modality not in modalities:
            continue
        x_train, y_train = _rows(train, modality)
        x_val, y_val = _rows(val, modality)
        if len(x_train) == 0 or len(x_val) == 0:
            continue
        head = heads.heads[modality]
        trained = nn.Sequential(heads.proj[modality], head).to("cpu")
        before = _val_loss(trained, head, x_val, y_val)
        generator = torch.Generator().manual_seed(seed + index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + index)
            candidate = copy.deepcopy(trained)
            if restart:
                _reset(candidate)
            optimizer = torch.optim.AdamW(candidate.parameters(), lr=lr,
                                          weight_decay=weight_decay)
            best, best_state, best_epoch, waited = math.inf, None, 0, 0
            for epoch in range(1, max_epochs + 1):
                candidate.train()
                for rows in torch.randperm(len(x_train), generator=generator).split(batch_size):
                    loss = candidate[1].loss(candidate(x_train[rows]),
                                             {t: v[rows] for t, v in y_train.items()})
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                current = _val_loss(candidate, candidate[1], x_val, y_val)
                if current < best - 1e-4:
                    best, best_epoch, waited = current, epoch, 0
                    best_state = copy.deepcopy(candidate.state_dict())
                else:
                    waited += 1
                    if waited >= patience:
                        break
        if best_state is not None and best < before:
            trained.load_state_dict(best_state)
            results.append(HeadRefit(modality, before, best, best_epoch))
        else:
            results.append(HeadRefit(modality, before, before, 0))
        trained.to(device)
    return results


def refit_model_heads(
    model: Any,
    template: UnimodalHeads,
    sources: Any,
    ctx: DistContext,
    device: torch.device,
    *,
    batch_size: int,
    num_workers: int = 0,
    amp: torch.dtype | None = None,
    lockstep: bool = False,
    seed: int = 0,
    **options: Any,
) -> list[HeadRefit]:
    """Refit the unimodal heads of a trained model (see :func:`refit_unimodal_heads`).

    Pools the encoder features of the training and validation sets (ranks split the
    batches), refits the heads on a plain copy, the same on every rank, and loads the heads
    it keeps into the model. Training samples are pooled as the epochs saw them (their
    images augmented where the training images are). Every rank must call it.

    Args:
        model: The trained model (sharded or not), holding the weights to keep.
        template: A plain (never sharded) copy of ``model.unimodal``, with its class weights.
        sources: The run's :class:`~fusionkit.training.sources.Sources` (with ``val``).
        ctx: The distributed context.
        device: Where the model runs.
        batch_size: Samples per pooling batch.
        num_workers: DataLoader workers.
        amp: The autocast dtype of the pooling forwards.
        lockstep: Every rank runs as many forwards (a sharded model).
        seed: Seeds the refit.
        **options: More options of :func:`refit_unimodal_heads` (``lr``, ``restart``, ...).

    Returns:
        One :class:`HeadRefit` per modality refit.

    Examples:
        >>> refit_model_heads(model, template, sources, ctx, device, batch_size=64)
        ... # doctest: +SKIP
    """

    def pooled(source: Any) -> PooledFeatures:
        return PooledFeatures.join(
            gather_batches(
                lambda batch: pool_features(model, [batch], device, amp=amp),
                source, sources.collate, ctx, device,
                batch_size=batch_size, num_workers=num_workers, lockstep=lockstep,
            )
        )

    train, val = pooled(sources.train), pooled(sources.val)
    heads = copy.deepcopy(template).cpu()
    heads.load_state_dict(full_module_state(model, model.unimodal))
    results = refit_unimodal_heads(heads, train, val, seed=seed, **options)
    for r in results:
        _LOG.info(
            "unimodal head %s: %s (val loss %.4f -> %.4f)", r.modality,
            f"refit, {r.epochs} epochs" if r.kept_refit else "kept as trained",
            r.val_loss_before, r.val_loss,
        )
    if any(result.kept_refit for result in results):
        set_full_weights(model, {f"unimodal.{k}": v for k, v in heads.state_dict().items()})
    return results
