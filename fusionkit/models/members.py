"""A run's fused model blended with its unimodal models: ``members.json``.

A run trained with ``train.unimodal_models`` (see :mod:`fusionkit.training.members`) holds
three models and the blend of them::

    run/best/, run/last/, ...       the fused model, as in any run
    run/unimodal/text/              the text-only model's run
    run/unimodal/image/             the image-only model's run
    run/members.json                the blend (:class:`MemberBlend`)
    run/members_val_report.json     its validation report, beside each model alone

Per task, the blend mixes the models' probabilities as
:func:`~fusionkit.models.blending.blend_probabilities` mixes sources, with the weights and
scale fit on validation data; a model whose input a sample lacks is left out of that sample's
mixture. The run folder evaluates, predicts and serves as the blend; ``run/best`` is the fused
model alone, and each member's folder is a run like any other.

Examples:
    >>> blend = MemberBlend.load("runs/x")  # doctest: +SKIP
    >>> blend.weights["group"]  # doctest: +SKIP
    {'fused': 0.2, 'text': 0.4, 'image': 0.4}
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from fusionkit.errors import CheckpointError
from fusionkit.io import write_json
from fusionkit.models.blending import blend_logits
from fusionkit.models.unimodal import FUSED

__all__ = ["MEMBERS_DIR", "MEMBERS_FILE", "MemberBlend", "members_run"]

#: The file of a run folder that holds the blend of its members.
MEMBERS_FILE = "members.json"
#: The folder of a run folder that holds its unimodal models' runs.
MEMBERS_DIR = "unimodal"
_FORMAT = 1


@dataclass(frozen=True)
class MemberBlend:
    """The blend of a run's fused model and its unimodal models (``members.json``).

    Attributes:
        members: Source (``fused``, ``text``, ``image``) → its checkpoint folder, relative to
            the run folder.
        weights: Task → source → weight (non-negative, summing to 1).
        scales: Task → the inverse temperature of its mixture.
    """

    members: dict[str, str]
    weights: dict[str, dict[str, float]]
    scales: dict[str, float]

    def save(self, run: str | os.PathLike[str]) -> Path:
        """Write ``members.json`` into the run folder ``run``; returns its path."""
        path = Path(run) / MEMBERS_FILE
        write_json(path, {"format": _FORMAT, "members": self.members,
                          "tasks": {t: {"weights": w, "scale": self.scales[t]}
                                    for t, w in self.weights.items()}})
        return path

    @classmethod
    def load(cls, run: str | os.PathLike[str]) -> MemberBlend:
        """Read ``run/members.json``.

        Raises:
            CheckpointError: The file is missing, unreadable, of another format, or names a
                member folder that does not exist.
        """
        path = Path(run) / MEMBERS_FILE
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != _FORMAT:
                raise ValueError(f"format {raw.get('format')!r}, expected {_FORMAT}")
            members = {str(k): str(v) for k, v in raw["members"].items()}
            weights = {t: {s: float(w) for s, w in row["weights"].items()}
                       for t, row in raw["tasks"].items()}
            scales = {t: float(row["scale"]) for t, row in raw["tasks"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{path}: not a readable member blend ({error})") from error
        if FUSED not in members:
            raise CheckpointError(f"{path}: no {FUSED!r} member")
        for name, folder in members.items():
            if not (Path(run) / folder).is_dir():
                raise CheckpointError(f"{path}: member {name!r}: no folder {Path(run) / folder}")
        return cls(members, weights, scales)

    def folders(self, run: str | os.PathLike[str]) -> dict[str, Path]:
        """Source → its checkpoint folder under the run folder ``run``."""
        return {name: Path(run) / folder for name, folder in self.members.items()}

    def logits(
        self,
        task: str,
        scores: Mapping[str, Tensor],
        multi_label: bool,
        available: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """The blended ``(N, C)`` logits of one task: its probabilities are their softmax (a
        sigmoid for a multi-label task), as for a model's logits.

        Args:
            task: The task.
            scores: Source → ``(N, C)`` probabilities of that model.
            multi_label: A sigmoid task.
            available: Source → ``(N,)`` bool, False where a sample lacks the source's
                modality (left out of its mixture).
        """
        return blend_logits(scores, self.weights[task], multi_label, self.scales[task],
                            available).float()


def members_run(path: str | os.PathLike[str]) -> Path | None:
    """The run folder ``path`` if it holds a member blend (``members.json``), else ``None``.

    A checkpoint folder (``run/best``) is never a member blend: it is the fused model alone.

    Examples:
        >>> members_run("runs/x") is None  # doctest: +SKIP
        False
    """
    folder = Path(path)
    return folder if (folder / MEMBERS_FILE).is_file() else None
