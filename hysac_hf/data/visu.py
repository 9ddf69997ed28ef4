"""ViSU (Safe-CLIP's Visual Safe and Unsafe quadruplets) from its public text part plus local images.

Only the text side, `aimagelab/ViSU-Text` (gated; fields `safe`, `nsfw`, `tag`, `coco_id`, ...), is public. The
safe images are COCO 2017 images found by `coco_id` under `--coco_root` (`train2017/`, `val2017/`, ...). ViSU's
generated unsafe images were **never released**: you must provide them yourself, as a folder (files named by
the row's `nsfw_im_path` or `id`, or `<coco_id>.jpg`/`.png`) or a mapping file (json `{key: path}` or a csv with
columns `key,path`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..modeling.configuration_hysac import CONTENT

COCO_SUBDIRS = ("train2017", "val2017", "test2017", "")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def coco_image_path(coco_root: str | Path, coco_id: int | str) -> Path:
    """Find a COCO 2017 image by id under `coco_root` (any of train2017/val2017/test2017 or the root itself)."""
    name = f"{int(coco_id):012d}.jpg"
    for sub in COCO_SUBDIRS:
        candidate = Path(coco_root) / sub / name
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"COCO image {name} not found under {coco_root}/{{{','.join(COCO_SUBDIRS[:3])}}}")


def load_unsafe_mapping(unsafe_images: str | Path) -> dict[str, str] | Path:
    """A folder (returned as a Path) or a json/csv mapping file `{key: image path}`."""
    path = Path(unsafe_images)
    if path.is_dir():
        return path
    if path.suffix == ".json":
        return {str(k): str(v) for k, v in json.loads(path.read_text()).items()}
    if path.suffix == ".csv":
        with open(path, newline="") as handle:
            return {row["key"]: row["path"] for row in csv.DictReader(handle)}
    raise ValueError(f"--visu_unsafe_images must be a folder, a .json or a .csv mapping; got {path}")


def _unsafe_path(row: dict, mapping: dict[str, str] | Path) -> str:
    keys = [row.get("nsfw_im_path"), row.get("id"), row.get("coco_id")]
    keys = [str(k) for k in keys if k not in (None, "")]
    if isinstance(mapping, dict):
        for key in keys:
            if key in mapping:
                return mapping[key]
    else:
        for key in keys:
            candidates = [mapping / key] + [mapping / f"{key}{suffix}" for suffix in IMAGE_SUFFIXES]
            for candidate in candidates:
                if candidate.is_file():
                    return str(candidate)
    raise FileNotFoundError(
        f"no unsafe image for ViSU row {keys}: ViSU's unsafe images are not public, provide them via "
        "--visu_unsafe_images (folder named by nsfw_im_path/id/coco_id, or a json/csv mapping)"
    )


def load_visu(
    text_source: str,
    split: str,
    coco_root: str | Path,
    unsafe_images: str | Path,
    max_samples: int | None = None,
):
    """ViSU quadruplets in the canonical schema.

    Args:
        text_source: `aimagelab/ViSU-Text` (needs access to the gated repo) or a local json/jsonl file or folder.
        split: `train`, `validation` or `test`.
        coco_root: COCO 2017 root.
        unsafe_images: folder or mapping file of your unsafe images (see the module docstring).
        max_samples: keep the first rows only.
    Returns:
        `datasets.Dataset` with `safe_image`/`unsafe_image` as absolute paths, `safe_text`, `unsafe_text`, `tag`.
    """
    import datasets

    from .quadruplets import load_quadruplets  # noqa: F401  (same loader rules for local files)

    path = Path(text_source)
    if path.is_file():
        dataset = datasets.load_dataset("json", data_files=str(path), split="train")
        if "split" in dataset.column_names:
            dataset = dataset.filter(lambda row: row["split"] == split)
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl") and split in p.stem)
        if not files:
            raise FileNotFoundError(f"no {split} json/jsonl file in {path}")
        dataset = datasets.load_dataset("json", data_files=[str(f) for f in files], split="train")
    else:
        dataset = datasets.load_dataset(text_source, split=split)
    for column in ("safe", "nsfw", "coco_id"):
        if column not in dataset.column_names:
            raise ValueError(f"ViSU text data needs a {column!r} column; got {dataset.column_names}")
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    mapping = load_unsafe_mapping(unsafe_images)

    def join(row: dict) -> dict:
        return {
            CONTENT["V"].column: str(coco_image_path(coco_root, row["coco_id"])),
            CONTENT["G"].column: _unsafe_path(row, mapping),
            CONTENT["S"].column: row["safe"],
            CONTENT["U"].column: row["nsfw"],
            "tag": row.get("tag") or "",
        }

    return dataset.map(join, remove_columns=dataset.column_names, desc=f"Joining ViSU {split} with images")
