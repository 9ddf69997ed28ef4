"""Datasets for HySAC training and evaluation: ViSU, generic quadruplet datasets and the bundled mini-ViSU.

Every loader returns a `datasets.Dataset` with the canonical columns `safe_image`, `unsafe_image`,
`safe_text`, `unsafe_text`; `QuadrupletCollator` decodes and preprocesses them in DataLoader workers.
"""

from __future__ import annotations

from .collate import QuadrupletCollator, load_image
from .mini_visu import load_mini_visu
from .quadruplets import load_quadruplets
from .visu import load_visu

__all__ = ["QuadrupletCollator", "load_dataset_split", "load_image", "load_mini_visu", "load_quadruplets", "load_visu"]


def load_dataset_split(
    dataset: str = "mini-visu",
    split: str = "train",
    columns: dict[str, str] | None = None,
    coco_root: str | None = None,
    visu_unsafe_images: str | None = None,
    max_samples: int | None = None,
):
    """Dispatch on `dataset`: ``"mini-visu"`` (bundled), ``"visu:<text source>"`` (ViSU with `coco_root` and
    `visu_unsafe_images`) or anything `load_quadruplets` reads (file, folder, Hub id)."""
    if dataset == "mini-visu":
        return load_mini_visu(split, max_samples=max_samples)
    if dataset.startswith("visu:") or dataset == "aimagelab/ViSU-Text":
        if coco_root is None or visu_unsafe_images is None:
            raise ValueError("ViSU needs --coco_root and --visu_unsafe_images (ViSU's unsafe images are not public)")
        source = dataset.split(":", 1)[1] if dataset.startswith("visu:") else dataset
        return load_visu(source, split, coco_root, visu_unsafe_images, max_samples=max_samples)
    return load_quadruplets(dataset, split, columns=columns, max_samples=max_samples)
