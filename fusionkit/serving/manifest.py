"""Predicting a whole manifest into a ``.csv`` or ``.jsonl`` file, one output row per input row.

A row that cannot be predicted is not dropped: a missing image file, a row without any input,
or an image that cannot be decoded gives an output row with the sample's ``id`` and an
``error`` field, in the manifest's order, so that predictions join back to the catalogue by id
without losing products.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fusionkit.data import ManifestDataset
from fusionkit.errors import DataError
from fusionkit.io import atomic_write

__all__ = ["ManifestPredictions", "predict_manifest"]

_LOG = logging.getLogger("fusionkit.serving")


@dataclass(frozen=True)
class ManifestPredictions:
    """What :func:`predict_manifest` wrote.

    Attributes:
        path: The output file.
        rows: Output rows, one per data row of the manifest.
        errors: Rows with an ``error`` field instead of predictions.

    Examples:
        >>> ManifestPredictions(Path("p.csv"), rows=10, errors=1).errors
        1
    """

    path: Path
    rows: int
    errors: int


def _predict_rows(predictor: Any, records: list[Any]) -> list[dict[str, Any]]:
    """Predictions of some records; a batch with an unreadable image is redone sample by
    sample, so that only that sample gets an error."""
    names = predictor.model.modalities

    def values(chunk: list[Any]) -> dict[str, list[Any]]:
        return {name: [record.values[name] for record in chunk] for name in names}

    try:
        return predictor.predict(inputs=values(records))
    except DataError:
        rows: list[dict[str, Any]] = []
        for record in records:
            try:
                rows.extend(predictor.predict(inputs=values([record])))
            except DataError as error:
                rows.append({"error": str(error)})
        return rows


def _write_csv(out: Path, rows: list[dict[str, Any]], tasks: Any, names: Any) -> None:
    header = ["id"]
    for task in tasks:
        header += [task, *(f"{task}_{name}_weight" for name in names)]
    header.append("error")

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(header)
            for row in rows:
                cells: list[Any] = [row["id"]]
                for task in tasks:
                    entry = row.get(task)
                    if entry is None:
                        cells += [""] * (1 + len(names))
                        continue
                    cells.append(entry.get("label") or "|".join(entry.get("labels", [])))
                    cells += [entry["modality_weights"][name] for name in names]
                writer.writerow([*cells, row.get("error", "")])

    atomic_write(out, write)


def predict_manifest(
    predictor: Any,
    manifest: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    progress: bool = False,
) -> ManifestPredictions:
    """Predict every row of a manifest and write ``.csv`` or ``.jsonl`` results.

    The CSV has ``id``, per task the label(s) (``|``-joined for multi-label) and the modality
    weight of every input, and an ``error`` column (empty for a predicted row); the JSONL holds
    the full :meth:`~fusionkit.serving.Predictor.predict` output per sample, or ``id`` and
    ``error``. Rows come in the manifest's order.

    Args:
        predictor: A :class:`~fusionkit.serving.Predictor`.
        manifest: A ``.csv``/``.jsonl`` manifest with the columns of the model's inputs
            (``image`` and/or ``text`` for the shorthand, each named input's ``column``
            otherwise; label columns are not needed), or a named source.
        out: Output path ending in ``.csv`` or ``.jsonl``.
        progress: Show a progress bar over batches.

    Returns:
        The :class:`ManifestPredictions` (path and counts); rows with an error are also
        logged as one warning.

    Raises:
        DataError: An unreadable manifest (or one with none of the model's input columns),
            or an unknown output format.

    Examples:
        >>> done = predict_manifest(predictor, "test.csv", "predictions.csv")  # doctest: +SKIP
        >>> done.rows, done.errors  # doctest: +SKIP
        (300, 1)
    """
    out = Path(out)
    if out.suffix not in (".csv", ".jsonl"):
        raise DataError(f"{out}: output must end in .csv or .jsonl")
    model = predictor.model
    dataset = ManifestDataset(manifest, {}, inputs=model.config.inputs)
    by_line: dict[int, dict[str, Any]] = {
        row.line: {"id": row.id, "error": row.message} for row in dataset.skipped_rows
    }
    records = dataset.records
    starts = range(0, len(records), predictor.batch_size)
    for start in tqdm(starts, desc="predict", unit="batch", disable=not progress):
        chunk = records[start : start + predictor.batch_size]
        for record, row in zip(chunk, _predict_rows(predictor, chunk), strict=True):
            by_line[record.line] = {"id": record.id, **row}
    rows = [by_line[line] for line in sorted(by_line)]
    if out.suffix == ".jsonl":
        text = "".join(json.dumps(row) + "\n" for row in rows)
        atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    else:
        _write_csv(out, rows, list(model.tasks), list(model.modalities))
    errors = sum("error" in row for row in rows)
    if errors:
        _LOG.warning("%s: %d of %d rows could not be predicted; their rows in %s carry an "
                     "error field", dataset.path, errors, len(rows), out)
    return ManifestPredictions(out, len(rows), errors)
