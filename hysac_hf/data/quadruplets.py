"""Any quadruplet dataset (safe image, unsafe image, safe text, unsafe text) through `datasets`.

Sources: a local jsonl/json/csv/parquet file (image columns hold paths, relative to `image_root` or to the
file's folder), a local folder or Hub dataset id readable by `datasets.load_dataset` (image columns may be
`datasets.Image` features). Column names are configurable and renamed to the canonical
`safe_image`, `unsafe_image`, `safe_text`, `unsafe_text`.
"""

from __future__ import annotations

from pathlib import Path

from .collate import IMAGE_COLUMNS, TEXT_COLUMNS

CANONICAL_COLUMNS = IMAGE_COLUMNS + TEXT_COLUMNS
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_quadruplets(
    source: str,
    split: str = "train",
    columns: dict[str, str] | None = None,
    max_samples: int | None = None,
):
    """Load a quadruplet dataset and rename its columns to the canonical schema.

    Args:
        source: a data file (`.jsonl`, `.json`, `.csv`, `.parquet`), a folder of such files named by split
            (`train.jsonl`, `validation.jsonl`, ...) or a Hub dataset id.
        split: split to load; for a single file every row belongs to every split unless it has a `split`
            column, which then selects the rows.
        columns: canonical name -> column name in the source, for example
            `{"safe_image": "coco_path", "unsafe_text": "nsfw"}`; missing keys keep the canonical name.
        max_samples: keep the first rows only.
    Returns:
        `datasets.Dataset` with at least the four canonical columns.
    """
    import datasets

    path = Path(source)
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(f"unsupported data file {path}; expected one of {sorted(FILE_BUILDERS)}")
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
        if "split" in dataset.column_names:
            dataset = dataset.filter(lambda row: row["split"] == split)
    elif path.is_dir():
        files = {p.stem: str(p) for p in path.iterdir() if p.suffix in FILE_BUILDERS}
        if split not in files:
            if split == "validation" and "val" in files:
                split = "val"
            else:
                raise FileNotFoundError(f"{path} has no {split} file; found {sorted(files)} ({sorted(FILE_BUILDERS)})")
        dataset = datasets.load_dataset(
            FILE_BUILDERS[Path(files[split]).suffix], data_files=files[split], split="train"
        )
    else:
        dataset = datasets.load_dataset(source, split=split)
    mapping = {**{name: name for name in CANONICAL_COLUMNS}, **(columns or {})}
    unknown = set(mapping) - set(CANONICAL_COLUMNS)
    if unknown:
        raise ValueError(f"unknown canonical column(s) {sorted(unknown)}; expected {list(CANONICAL_COLUMNS)}")
    missing = [src for src in mapping.values() if src not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{source} ({split}) lacks column(s) {missing}; it has {dataset.column_names}. Map them with "
            "--safe_image_column/--unsafe_image_column/--safe_text_column/--unsafe_text_column"
        )
    renames = {src: dst for dst, src in mapping.items() if src != dst}
    # Drop canonical-named columns that a rename would otherwise collide with.
    dataset = dataset.remove_columns([c for c in renames.values() if c in dataset.column_names and c not in renames])
    dataset = dataset.rename_columns(renames)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"{source} ({split}) has no rows")
    return dataset
