"""Embed ViSU-style quadruplet datasets once into an on-disk cache that every evaluation reuses.

A quadruplet dataset has four columns: a safe image, an unsafe image, a safe text and an unsafe text (names
configurable), plus an optional `tag` (the NSFW category). Images may be decoded `PIL.Image`s (a datasets
`Image()` feature) or file paths (resolved against `image_root`). Missing columns are allowed: a text-only
dataset such as ViSU-Text gives a cache with the two text matrices only, and the evaluations that need the
images say so.

Cache layout (a folder):
- `embeddings.safetensors`: float32 `(N, D)` hyperboloid space components under the bounds keys
  `S` (safe text), `V` (safe image), `U` (unsafe text), `G` (unsafe image).
- `cache.json`: `curv` (curvature magnitude), `bounds`, `traversal_alpha`, `unsafe_thresholds` (from the
  model config), `tags` (or null), `num_rows`, `source` (model and dataset description).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..data import load_image

logger = logging.getLogger(__name__)

# Default column names of a quadruplet dataset -> bounds key of the content type.
DEFAULT_COLUMNS = {"safe_text": "S", "safe_image": "V", "unsafe_text": "U", "unsafe_image": "G"}
CONTENT_NAMES = {"S": "safe text (T)", "V": "safe image (I)", "U": "unsafe text (T*)", "G": "unsafe image (I*)"}
IMAGE_KEYS = ("V", "G")
CACHE_FILE = "embeddings.safetensors"
META_FILE = "cache.json"
TABULAR_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class EmbeddingCache:
    """Embeddings of a quadruplet dataset plus what the evaluations need from the model.

    Attributes:
        embeds: `{"S"|"V"|"U"|"G": (N, D) float32}` space components (a subset of the keys is allowed).
        curv: curvature magnitude `c` of the model that embedded them.
        bounds: the model's `config.bounds` (None if it had none).
        traversal_alpha: the model's `config.traversal_alpha`.
        unsafe_thresholds: the model's `config.unsafe_thresholds`.
        tags: `N` category tags, or None.
        source: free-form description (model path, dataset).
    """

    embeds: dict[str, Tensor]
    curv: float
    bounds: dict[str, dict[str, float]] | None = None
    traversal_alpha: float = 0.8
    unsafe_thresholds: dict[str, float] | None = None
    tags: list[str] | None = None
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.embeds) - set(CONTENT_NAMES))
        if unknown:
            raise ValueError(f"unknown embedding keys {unknown}; expected a subset of {list(CONTENT_NAMES)}")
        if not self.embeds:
            raise ValueError("an EmbeddingCache needs at least one embedding matrix")
        sizes = {k: tuple(v.shape) for k, v in self.embeds.items()}
        rows = {s[0] for s in sizes.values()}
        if any(len(s) != 2 for s in sizes.values()) or len(rows) != 1 or len({s[1] for s in sizes.values()}) != 1:
            raise ValueError(f"embedding matrices must all be (N, D) with the same N and D, got {sizes}")
        if self.tags is not None and len(self.tags) != self.num_rows:
            raise ValueError(f"{len(self.tags)} tags for {self.num_rows} rows")
        if not self.curv > 0:
            raise ValueError(f"curv must be a positive curvature magnitude, got {self.curv}")

    @property
    def num_rows(self) -> int:
        return next(iter(self.embeds.values())).shape[0]

    def require(self, *keys: str) -> None:
        """Raise a clear error when the cache lacks a content type that an evaluation needs."""
        missing = [k for k in keys if k not in self.embeds]
        if missing:
            names = ", ".join(f"{k} = {CONTENT_NAMES[k]}" for k in missing)
            raise ValueError(
                f"the embedding cache has no {names} (it holds {sorted(self.embeds)}); re-run 'hysac-eval embed' on "
                "a dataset that has those columns, or pick tasks that do not need them"
            )

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().contiguous().cpu() for k, v in self.embeds.items()}, directory / CACHE_FILE)
        meta = {
            "curv": self.curv,
            "bounds": self.bounds,
            "traversal_alpha": self.traversal_alpha,
            "unsafe_thresholds": self.unsafe_thresholds,
            "tags": self.tags,
            "num_rows": self.num_rows,
            "source": self.source,
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=1))
        logger.info("Saved %d embedded rows (%s) to %s", self.num_rows, sorted(self.embeds), directory)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> EmbeddingCache:
        directory = Path(directory)
        if not (directory / CACHE_FILE).is_file() or not (directory / META_FILE).is_file():
            raise FileNotFoundError(
                f"{directory} is not an embedding cache (expected {CACHE_FILE} and {META_FILE}); "
                "create one with 'hysac-eval embed --model MODEL --dataset DATA --output DIR'"
            )
        meta = json.loads((directory / META_FILE).read_text())
        return cls(
            embeds=load_file(directory / CACHE_FILE),
            curv=float(meta["curv"]),
            bounds=meta.get("bounds"),
            traversal_alpha=float(meta.get("traversal_alpha", 0.8)),
            unsafe_thresholds=meta.get("unsafe_thresholds"),
            tags=meta.get("tags"),
            source=meta.get("source", {}),
        )


def open_quadruplets(source: Any, split: str = "test", max_samples: int | None = None):
    """Open a quadruplet dataset from a `datasets.Dataset`, a `DatasetDict`, a local file or folder, or a name.

    Args:
        source: a `datasets.Dataset`; a `DatasetDict` (the `split` is taken); a folder written by
            `Dataset.save_to_disk`; or anything `hysac_hf.data.load_dataset_split` reads: `"mini-visu"` (the
            bundled mini-ViSU), a `.jsonl`/`.json`/`.csv`/`.parquet` file, a folder of per-split files.
        split: the split to evaluate.
        max_samples: keep the first rows only.
    Returns:
        a `datasets.Dataset`.
    """
    import datasets

    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise ValueError(f"the dataset has no split {split!r}; it has {list(source)}")
        source = source[split]
    if isinstance(source, datasets.Dataset):
        return source.select(range(min(max_samples, len(source)))) if max_samples is not None else source
    path = Path(str(source))
    if path.is_dir() and any(
        (path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")
    ):
        return open_quadruplets(datasets.load_from_disk(str(path)), split, max_samples)
    try:
        from ..data import load_dataset_split
    except ImportError:  # pragma: no cover - hysac_hf.data ships with the package
        load_dataset_split = None
    if load_dataset_split is not None:
        return load_dataset_split(str(source), split, max_samples=max_samples)
    if path.is_file() and path.suffix.lower() in TABULAR_SUFFIXES:  # pragma: no cover - fallback
        dataset = datasets.load_dataset(TABULAR_SUFFIXES[path.suffix.lower()], data_files=str(path), split="train")
        return open_quadruplets(dataset, split, max_samples)
    raise ValueError(
        f"cannot read a dataset from {source!r}: expected a datasets.Dataset, 'mini-visu', a folder saved with "
        f"Dataset.save_to_disk, or a file ending in {sorted(TABULAR_SUFFIXES)}"
    )


@torch.no_grad()
def embed_dataset(
    model,
    processor,
    dataset,
    columns: Mapping[str, str] | None = None,
    tag_column: str | None = "tag",
    image_root: str | os.PathLike | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    show_progress: bool = True,
    source: dict[str, Any] | None = None,
) -> EmbeddingCache:
    """Embed the four content types of a quadruplet dataset with `datasets.map` (batched, with progress bars).

    Args:
        model: a `HySACModel` (eval mode is set here).
        processor: its `HySACProcessor`.
        dataset: a `datasets.Dataset` (see :func:`open_quadruplets` for other sources).
        columns: dataset column -> content key (`S`, `V`, `U`, `G`); default :data:`DEFAULT_COLUMNS`. Columns
            absent from the dataset are skipped with a warning.
        tag_column: category column kept for the per-category breakdown (None: no tags).
        image_root: folder that relative image paths are resolved against.
        batch_size: rows per forward pass.
        device: where the model runs (default: its current device).
        show_progress: tqdm bars from `datasets.map`.
        source: description stored in the cache.
    Returns:
        an :class:`EmbeddingCache` (not yet saved).
    """
    import datasets

    columns = dict(DEFAULT_COLUMNS if columns is None else columns)
    bad = sorted(set(columns.values()) - set(CONTENT_NAMES))
    if bad:
        raise ValueError(f"columns map to unknown content keys {bad}; expected {list(CONTENT_NAMES)}")
    present = {col: key for col, key in columns.items() if col in dataset.column_names}
    for col in sorted(set(columns) - set(present)):
        logger.warning(
            "Column %r (%s) is not in the dataset (%s); skipping it",
            col,
            CONTENT_NAMES[columns[col]],
            dataset.column_names,
        )
    if not present:
        raise ValueError(f"none of the columns {sorted(columns)} is in the dataset (columns: {dataset.column_names})")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty; nothing to embed")
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    root = Path(image_root) if image_root is not None else None

    def embed_batch(batch: dict[str, list]) -> dict[str, list]:
        out = {}
        for col, key in present.items():
            if key in IMAGE_KEYS:
                images = [load_image(v, root) for v in batch[col]]
                pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device, model.dtype)
                out[f"__emb_{key}"] = model.get_image_features(pixel_values=pixels).cpu().numpy()
            else:
                texts = processor(text=list(batch[col]), return_tensors="pt")
                emb = model.get_text_features(
                    input_ids=texts["input_ids"].to(device), attention_mask=texts["attention_mask"].to(device)
                )
                out[f"__emb_{key}"] = emb.cpu().numpy()
        return out

    if not show_progress:
        datasets.disable_progress_bars()
    try:
        embedded = dataset.map(
            embed_batch,
            batched=True,
            batch_size=batch_size,
            remove_columns=dataset.column_names,
            desc="Embedding quadruplets",
            load_from_cache_file=False,
            new_fingerprint=None,
        )
    finally:
        if not show_progress:
            datasets.enable_progress_bars()
    columns_out = embedded.with_format("torch")[:]  # slicing gives a dict of (N, D) tensors
    embeds = {key: columns_out[f"__emb_{key}"].float() for key in present.values()}
    tags = None
    if tag_column is not None and tag_column in dataset.column_names:
        tags = [str(t) for t in dataset[tag_column]]
    cfg = model.config
    return EmbeddingCache(
        embeds=embeds,
        curv=float(model.curvature.detach().float()),
        bounds=cfg.bounds,
        traversal_alpha=float(cfg.traversal_alpha),
        unsafe_thresholds=cfg.unsafe_thresholds,
        tags=tags,
        source=dict(source or {}, model=str(getattr(model, "name_or_path", "") or "")),
    )


__all__ = ["CONTENT_NAMES", "DEFAULT_COLUMNS", "EmbeddingCache", "embed_dataset", "open_quadruplets"]


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def list_image_folder(root: str | os.PathLike) -> tuple[list[Path], list[int], list[str]]:
    """Images of a class-per-folder tree (`root/<class>/*.jpg`), sorted; class names are the folder names.

    Returns:
        `(paths, labels, class_names)` with `labels[i]` indexing `class_names` (sorted folder names).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths, labels = [], []
    for label, name in enumerate(class_names):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise ValueError(
            f"no images found under {root}; expected one sub-folder per class, e.g. {root}/safe/*.jpg and "
            f"{root}/unsafe/*.jpg (suffixes {IMAGE_SUFFIXES})"
        )
    return paths, labels, class_names


@torch.no_grad()
def embed_images(
    model,
    processor,
    images: Sequence[Any],
    batch_size: int = 32,
    device: str | torch.device | None = None,
    show_progress: bool = True,
) -> Tensor:
    """Embed images (PIL images or paths) in batches with a progress bar.

    Returns:
        `(N, D)` float32 hyperboloid space components, on the CPU.
    """
    from tqdm.auto import tqdm

    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="Embedding images", disable=not show_progress):
        batch = [load_image(v) for v in images[start : start + batch_size]]
        pixels = processor(images=batch, return_tensors="pt")["pixel_values"].to(device, model.dtype)
        out.append(model.get_image_features(pixel_values=pixels).float().cpu())
    if not out:
        raise ValueError("no images to embed")
    return torch.cat(out)


@torch.no_grad()
def embed_texts(
    model, processor, texts: Sequence[str], batch_size: int = 256, device: str | torch.device | None = None
) -> Tensor:
    """Embed texts in batches. Returns `(N, D)` float32 hyperboloid space components on the CPU."""
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        enc = processor(text=list(texts[start : start + batch_size]), return_tensors="pt")
        out.append(
            model.get_text_features(
                input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)
            )
            .float()
            .cpu()
        )
    if not out:
        raise ValueError("no texts to embed")
    return torch.cat(out)


__all__ += ["embed_images", "embed_texts", "list_image_folder"]
