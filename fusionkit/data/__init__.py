"""Data for fusionkit: the synthetic default catalogue, manifest data sets, transforms, collate.

This layer imports nothing of ``fusionkit.models`` or ``fusionkit.training``; it only produces
samples (``id``, ``targets`` and a value per input name) and batches of them.

Examples:
    >>> from fusionkit.data import ManifestDataset, generate_catalogue, infer_tasks, make_collate
    >>> paths = generate_catalogue("/tmp/catalogue", train=40, val=8, test=8, progress=False)
    >>> tasks = infer_tasks(paths["train"])
    >>> batch = make_collate(tasks)([ManifestDataset(paths["train"], tasks)[0]])
    >>> batch.images.shape
    torch.Size([1, 3, 96, 96])
"""

from __future__ import annotations

from fusionkit.data.collate import Batch, SampleCollator, collate_samples, make_collate
from fusionkit.data.columns import MODALITY_COLUMNS, InputColumn
from fusionkit.data.manifest import (
    ManifestDataset,
    ManifestRecord,
    Sample,
    open_image,
    write_manifest,
)
from fusionkit.data.reading import RESERVED_COLUMNS, check_manifest, infer_tasks
from fusionkit.data.synthetic import (
    CATALOGUE_TASKS,
    CATALOGUE_VOCABULARY,
    SPLITS,
    generate_catalogue,
)
from fusionkit.data.transforms import (
    build_image_transform,
    image_data_config,
    input_image_configs,
    transform_key,
)

__all__ = [
    "CATALOGUE_TASKS",
    "CATALOGUE_VOCABULARY",
    "MODALITY_COLUMNS",
    "RESERVED_COLUMNS",
    "SPLITS",
    "Batch",
    "InputColumn",
    "ManifestDataset",
    "ManifestRecord",
    "Sample",
    "SampleCollator",
    "build_image_transform",
    "check_manifest",
    "collate_samples",
    "generate_catalogue",
    "image_data_config",
    "infer_tasks",
    "input_image_configs",
    "make_collate",
    "open_image",
    "transform_key",
    "write_manifest",
]
