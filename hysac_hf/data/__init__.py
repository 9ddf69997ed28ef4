"""Datasets for HySAC training and evaluation: ViSU, generic quadruplet datasets and the bundled mini-ViSU.

Every loader returns a `datasets.Dataset` whose content columns carry the canonical names of the vocabulary
(`safe_text`, `safe_image`, `unsafe_text`, `unsafe_image`; `modeling/configuration_hysac.py`). The collators in
`collate.py` decode and preprocess rows in DataLoader workers.
"""

from __future__ import annotations

from typing import Any

from ..errors import UsageError
from .collate import ItemCollator, QuadrupletCollator
from .images import bad_image_rows, bad_images_or_skip, find_bad_images, load_image
from .mini_visu import SPLITS as MINI_VISU_SPLITS
from .mini_visu import load_mini_visu
from .quadruplets import (
    CANONICAL_COLUMNS,
    IMAGE_COLUMNS,
    has_split,
    load_quadruplets,
    map_columns,
    parse_columns,
    require_columns,
)
from .visu import load_visu

__all__ = [
    "CANONICAL_COLUMNS",
    "IMAGE_COLUMNS",
    "bad_image_rows",
    "bad_images_or_skip",
    "find_bad_images",
    "ItemCollator",
    "QuadrupletCollator",
    "dataset_has_split",
    "load_dataset_split",
    "load_image",
    "load_mini_visu",
    "load_quadruplets",
    "load_visu",
    "parse_columns",
]


def load_dataset_split(
    dataset: Any = "mini-visu",
    split: str = "train",
    columns: str | dict[str, str] | None = None,
    coco_root: str | None = None,
    visu_unsafe_images: str | None = None,
    max_samples: int | None = None,
    required: tuple[str, ...] = CANONICAL_COLUMNS,
):
    """One split of any supported dataset, with canonical column names.

    Args:
        dataset: ``"mini-visu"`` (bundled), ``"visu:<text source>"`` (ViSU with `coco_root` and
            `visu_unsafe_images`), or anything :func:`load_quadruplets` reads (a `datasets.Dataset`/`DatasetDict`,
            a save_to_disk folder, a jsonl/json/csv/parquet file, a folder of per-split files, a Hub id).
        split: the split.
        columns: `{canonical column: source column}`, or its `SOURCE=KIND,...` spelling (`--columns`,
            :func:`parse_columns`); every source accepts it.
        max_samples: keep the first rows only.
        required: canonical columns that must be present.
    Raises:
        UsageError: with what is wrong and how to fix it.
    """
    if isinstance(columns, str):
        columns = parse_columns(columns)
    if isinstance(dataset, str) and dataset == "mini-visu":
        data = load_mini_visu(split, max_samples=max_samples)
    elif isinstance(dataset, str) and (dataset.startswith("visu:") or dataset == "aimagelab/ViSU-Text"):
        if coco_root is None or visu_unsafe_images is None:
            raise UsageError("ViSU needs --coco_root and --visu_unsafe_images (ViSU's unsafe images are not public)")
        source = dataset.split(":", 1)[1] if dataset.startswith("visu:") else dataset
        data = load_visu(source, split, coco_root, visu_unsafe_images, max_samples=max_samples)
    else:
        return load_quadruplets(dataset, split, columns=columns, max_samples=max_samples, required=required)
    data = map_columns(data, columns, dataset, split)
    require_columns(data, required, dataset, split)
    return data


def dataset_has_split(dataset: Any, split: str) -> bool:
    """Whether the dataset :func:`load_dataset_split` reads has a split named `split` (mini-ViSU and ViSU have train,
    validation and test; a single table without a `split` column has none)."""
    if isinstance(dataset, str) and dataset == "mini-visu":
        return split in MINI_VISU_SPLITS
    if isinstance(dataset, str) and (dataset.startswith("visu:") or dataset == "aimagelab/ViSU-Text"):
        return True
    return has_split(dataset, split)
