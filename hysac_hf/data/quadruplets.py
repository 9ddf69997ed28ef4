"""Any quadruplet dataset (safe image, unsafe image, safe text, unsafe text) through `datasets`.

Sources: a `datasets.Dataset` or `DatasetDict`; a folder written by `save_to_disk`; a local jsonl/json/csv/parquet
file (image columns hold paths, relative to `image_root`); a folder of such files named by split
(`train.jsonl`, `validation.csv`, ...); or a Hub dataset id. Column names are mapped with `columns`
(`{canonical column: source column}`, the form `--columns SOURCE=KIND` parses into) and renamed to the canonical
columns of the vocabulary (`safe_text`, `safe_image`, `unsafe_text`, `unsafe_image`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..modeling.configuration_hysac import CONTENT_BY_COLUMN, CONTENT_KINDS, content_kind

CANONICAL_COLUMNS = tuple(kind.column for kind in CONTENT_KINDS)
IMAGE_COLUMNS = tuple(kind.column for kind in CONTENT_KINDS if kind.modality == "image")
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SAVED_DATASET_FILES = ("dataset_info.json", "dataset_dict.json", "state.json")
SPLIT_ALIASES = {"validation": "val", "val": "validation"}  # either name finds the other


def _read_file(path: Path) -> Any:
    """One data file as a `datasets.Dataset`, with errors that name the file."""
    import datasets

    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise UsageError(f"unsupported data file {path}; expected one of {sorted(FILE_BUILDERS)}")
    if path.stat().st_size == 0:
        raise UsageError(f"{path} is empty: it holds no rows")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except (datasets.exceptions.DatasetGenerationError, StopIteration, ValueError) as error:
        cause = error.__cause__ or error
        raise UsageError(f"cannot read {path} as {builder}: {type(cause).__name__}: {cause}") from error


def _select_split(dataset: Any, split: str, source: Any) -> Any:
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            alias = SPLIT_ALIASES.get(split)
            if alias in dataset:
                return dataset[alias]
            raise UsageError(f"{source} has no split {split!r}; it has {list(dataset)}")
        return dataset[split]
    return dataset


def open_dataset(source: Any, split: str = "train") -> Any:
    """Open the rows of one split from any supported source (see the module docstring), columns unchanged."""
    import datasets

    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        return _select_split(source, split, "the dataset")
    path = Path(str(source)).expanduser()
    if path.is_file():
        dataset = _read_file(path)
        if "split" in dataset.column_names:
            dataset = dataset.filter(lambda row: row["split"] == split)
        return dataset
    if path.is_dir():
        if any((path / name).is_file() for name in SAVED_DATASET_FILES):
            return _select_split(datasets.load_from_disk(str(path)), split, path)
        files = {p.stem: p for p in path.iterdir() if p.suffix.lower() in FILE_BUILDERS}
        name = split if split in files else SPLIT_ALIASES.get(split)
        if name not in files:
            raise UsageError(
                f"{path} has no {split} file; found {sorted(files) or 'no data files'} "
                f"(expected {split}{{{','.join(sorted(FILE_BUILDERS))}}} or a save_to_disk folder)"
            )
        return _read_file(files[name])
    if str(source).startswith((".", "/", "~")) or path.suffix.lower() in FILE_BUILDERS:
        raise UsageError(f"dataset {source} does not exist")
    try:
        return datasets.load_dataset(str(source), split=split)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
        raise UsageError(
            f"cannot load the dataset {source!r} (split {split!r}): {error}. Pass 'mini-visu', a local file or "
            "folder, or a Hub dataset id you can access (offline, only cached Hub datasets load)."
        ) from error


def parse_columns(spec: str | None) -> dict[str, str] | None:
    """`"caption=S,path=V,nsfw=unsafe_text"` -> `{canonical column: source column}`.

    Each item is `SOURCE=KIND`, where KIND is a key (S, V, U, G), a canonical column (`safe_text`, ...) or a paper
    notation (T, I, T*, I*). The result maps the canonical column to the source column, the form every dataset
    loader takes.

    Raises:
        UsageError: a malformed item, an unknown kind, or a kind mapped twice.
    """
    if not spec:
        return None
    mapping: dict[str, str] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise UsageError(
                f"--columns items look like SOURCE_COLUMN=KIND (KIND one of {[k.key for k in CONTENT_KINDS]}), "
                f"got {item!r}"
            )
        source, kind_name = (part.strip() for part in item.split("=", 1))
        try:
            kind = content_kind(kind_name)
        except ValueError as error:
            raise UsageError(f"--columns {item!r}: {error}") from None
        if kind.column in mapping:
            raise UsageError(f"--columns maps {kind.key} ({kind.name}) twice: {mapping[kind.column]!r} and {source!r}")
        mapping[kind.column] = source
    return mapping


def map_columns(dataset: Any, columns: dict[str, str] | None, source: Any, split: str) -> Any:
    """Rename source columns to the canonical ones.

    Args:
        columns: `{canonical column: source column}`; canonical columns not named keep their own name.
    Raises:
        UsageError: an unknown canonical name, or a named source column the dataset lacks.
    """
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(CANONICAL_COLUMNS))
    if unknown:
        raise UsageError(f"unknown canonical column(s) {unknown}; expected {list(CANONICAL_COLUMNS)}")
    missing = [src for src in columns.values() if src not in dataset.column_names]
    if missing:
        raise UsageError(
            f"{source} ({split}) has no column {missing}; it has {dataset.column_names}. "
            "Fix --columns (SOURCE=KIND, e.g. caption=safe_text,path=safe_image)"
        )
    renames = {src: dst for dst, src in columns.items() if src != dst}
    # A canonical-named column that a rename would collide with is replaced by the mapped one.
    collisions = [c for c in renames.values() if c in dataset.column_names and c not in renames]
    if collisions:
        dataset = dataset.remove_columns(collisions)
    return dataset.rename_columns(renames) if renames else dataset


def require_columns(dataset: Any, required: tuple[str, ...], source: Any, split: str) -> None:
    """Raise a clear error when canonical columns are missing after mapping."""
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        names = ", ".join(f"{c} ({CONTENT_BY_COLUMN[c].name})" for c in missing)
        raise UsageError(
            f"{source} ({split}) lacks {names}; it has {dataset.column_names}. Map them with "
            "--columns SOURCE=KIND, e.g. --columns caption=safe_text,nsfw=unsafe_text"
        )


def has_split(source: Any, split: str) -> bool:
    """Whether `source` has a split named `split` (or its alias `val`/`validation`). A single table without a
    `split` column (a data file, a `datasets.Dataset`) has no named splits: False for every name.

    For a Hub id the split names are asked of the Hub (or its cache); when that fails, True (loading then says what
    is wrong).
    """
    import datasets

    names = {split, SPLIT_ALIASES.get(split, split)}
    if isinstance(source, datasets.DatasetDict):
        return bool(names & set(source))
    if isinstance(source, datasets.Dataset):
        return "split" in source.column_names and bool(names & set(source.unique("split")))
    path = Path(str(source)).expanduser()
    if path.is_file():
        table = _read_file(path)
        return "split" in table.column_names and bool(names & set(table.unique("split")))
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            return bool(names & set(datasets.load_from_disk(str(path))))
        if any((path / name).is_file() for name in SAVED_DATASET_FILES):
            return False  # one saved Dataset
        return any(p.stem in names for p in path.iterdir() if p.suffix.lower() in FILE_BUILDERS)
    try:
        return bool(names & set(datasets.get_dataset_split_names(str(source))))
    except Exception:  # noqa: BLE001 - offline, private or unknown: let loading report it
        return True


def load_quadruplets(
    source: Any,
    split: str = "train",
    columns: dict[str, str] | None = None,
    max_samples: int | None = None,
    required: tuple[str, ...] = CANONICAL_COLUMNS,
) -> Any:
    """Load a quadruplet dataset and rename its columns to the canonical schema.

    Args:
        source: see the module docstring.
        split: split to load; for a single file every row belongs to every split unless it has a `split`
            column, which then selects the rows.
        columns: `{canonical column: source column}`, e.g. `{"safe_image": "coco_path", "unsafe_text": "nsfw"}`.
        max_samples: keep the first rows only.
        required: canonical columns that must be present (default: all four; a text-only evaluation passes
            the text columns only).
    Returns:
        `datasets.Dataset` with the canonical columns it has (at least `required`).
    Raises:
        UsageError: an unreadable or empty source, a missing split or column.
    """
    dataset = map_columns(open_dataset(source, split), columns, source, split)
    require_columns(dataset, required, source, split)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    if len(dataset) == 0:
        raise UsageError(f"{source} ({split}) has no rows")
    return dataset
