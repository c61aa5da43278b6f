"""Training the unimodal models beside a fused one (``train.unimodal_models``) and fitting
their blend.

With ``train.unimodal_models: true``, a run trains its fused model as usual, then a text-only
and an image-only model with the same recipe (the run config with ``vision: null`` /
``text: null``), each a whole run of its own under ``unimodal/``, and blends the three per task
with weights fit on validation data by :func:`~fusionkit.training.blend.fit_blend`: the fused
model's probabilities (itself the blend of its fused and unimodal heads), the text-only model's
and the image-only model's. The run folder then holds ``members.json``
(:class:`~fusionkit.models.members.MemberBlend`, which also says how the run folder predicts)
and ``members_val_report.json``, the blend's validation report beside each model alone. On the
real sets this lifts the result to or above the late fusion of the unimodal models in every
measured cell (``docs/results/member_blend.md``), at the cost of training them.

Examples:
    >>> sorted(member_configs(config))  # doctest: +SKIP
    ['image', 'text']
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from fusionkit.config import RunConfig
from fusionkit.models.members import MemberBlend
from fusionkit.training.blend import fit_blend

__all__ = ["MEMBERS_REPORT_FILE", "fit_member_blend", "member_configs"]

log = logging.getLogger(__name__)

#: The validation report of the blend, in the run folder.
MEMBERS_REPORT_FILE = "members_val_report.json"
#: Member name → the shorthand encoder its config drops.
_DROPPED = {"text": "vision", "image": "text"}


def member_configs(config: RunConfig) -> dict[str, RunConfig]:
    """The run configs of the unimodal models ``train.unimodal_models`` trains.

    Each is ``config`` with the other shorthand encoder set to ``null`` and
    ``train.unimodal_models`` off; data, tasks and the rest of the recipe are the same.

    Args:
        config: The fused model's run config.

    Returns:
        ``{"text": ..., "image": ...}``; empty when ``train.unimodal_models`` is off, when the
        model has one encoder (it is unimodal already), or when it has named ``inputs:`` or
        no validation data (a warning says why no member is trained).

    Examples:
        >>> config = build_run_config(train="train.csv", val="val.csv", preset="fast")
        ... # doctest: +SKIP
        >>> member_configs(config)["text"].model.vision is None  # doctest: +SKIP
        True
    """
    model = config.model
    if not config.train.unimodal_models or model.vision is None or model.text is None:
        return {}
    if not model.shorthand:
        log.warning("train.unimodal_models: not with named inputs (inputs:); no unimodal "
                    "model is trained")
        return {}
    if config.data.val is None:
        log.warning("train.unimodal_models: no validation data to blend on (data.val); no "
                    "unimodal model is trained")
        return {}
    raw = config.to_dict()
    raw["train"]["unimodal_models"] = False
    members = {}
    for name, dropped in _DROPPED.items():
        member = copy.deepcopy(raw)
        member[dropped] = None
        members[name] = RunConfig.from_dict(member)
    return members


def fit_member_blend(
    scores: Mapping[str, Mapping[str, Tensor]],
    targets: Mapping[str, Tensor],
    available: Mapping[str, Tensor],
    tasks: Mapping[str, Any],
    members: Mapping[str, str],
) -> MemberBlend:
    """Fit the blend of the members' validation scores, task by task.

    Args:
        scores: Source (``fused``, then the modality of each unimodal model) → task →
            ``(N, C)`` probabilities on the validation data, samples in one order.
        targets: Task → the validation targets.
        available: Source → ``(N,)`` bool, False where a sample lacks its modality.
        tasks: Task name → :class:`~fusionkit.tasks.TaskSpec`.
        members: Source → its checkpoint folder relative to the run folder.

    Returns:
        The fitted :class:`MemberBlend`.

    Examples:
        >>> blend = fit_member_blend(scores, targets, available, model.tasks,
        ...                          {"fused": "best"})  # doctest: +SKIP
    """
    weights, scales = {}, {}
    for task, spec in tasks.items():
        fitted = fit_blend({s: by_task[task] for s, by_task in scores.items()}, targets[task],
                           spec, available=available)
        weights[task], scales[task] = fitted.weights, fitted.scale
    return MemberBlend(dict(members), weights, scales)
