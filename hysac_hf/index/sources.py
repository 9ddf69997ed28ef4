"""Where the items of a gallery come from, embedded a slice at a time: the sources of `hysac-index build` and `add`.

A :class:`GallerySource` knows how many items it has and gives any slice of them as `((n, D) embeddings, n metadata
dicts)`: images of a folder, lines of a text file and a dataset column are embedded by the library's one embedding
path (`hysac_hf.encode`) when the slice is asked for; shards of precomputed embeddings are read from disk. So an
index can be built whole (`source.slice(0, len(source))`) or chunk by chunk (`streaming.build_streaming`), and a
resumed build never embeds a committed chunk again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import UsageError

EMBEDDINGS_SUFFIXES = (".safetensors", ".npy")


@dataclass
class EmbedOptions:
    """How slices of images or texts are embedded (see `hysac_hf.encode.encode_images`)."""

    model: Any = None
    processor: Any = None
    batch_size: int | None = None
    num_workers: int = 0
    accelerator: Any = None
    show_progress: bool = False


@dataclass
class GallerySource:
    """Items of one modality, embedded (or read) a slice at a time.

    Attributes:
        modality: `"image"` or `"text"`.
        count: number of items.
        fingerprint: what identifies the items (JSON), so that a resumed build can tell it is the same source.
        needs_model: whether slicing embeds (needs `EmbedOptions.model`).
    """

    modality: str
    count: int
    fingerprint: dict[str, Any]
    needs_model: bool = True
    _items: Any = field(default=None, repr=False)
    _metadata: Any = field(default=None, repr=False)
    _column: str | None = None
    _image_root: str | None = None
    _shards: list[tuple[Path, int]] = field(default_factory=list, repr=False)
    dim: int | None = None

    def __len__(self) -> int:
        return self.count

    def slice(self, start: int, stop: int, options: EmbedOptions) -> tuple[Tensor, list[dict[str, Any]]]:
        """Items `[start, stop)`: their `(n, D)` float32 embeddings and metadata dicts."""
        from ..encode import encode_images, encode_texts

        if self._shards:
            return self._read_shards(start, stop), [{} for _ in range(stop - start)]
        items = self._items
        if self._column is not None:  # a dataset
            from .gallery import GalleryIndex

            part = items.select(range(start, stop))
            metadata = GalleryIndex._dataset_metadata(part, self._column, self.modality)
            kwargs = {"column": self._column}
        else:
            part, metadata, kwargs = items[start:stop], self._metadata[start:stop], {}
        common = {
            "num_workers": options.num_workers,
            "accelerator": options.accelerator,
            "show_progress": options.show_progress,
            **kwargs,
        }
        if self.modality == "image":
            embeddings = encode_images(
                options.model,
                options.processor,
                part,
                batch_size=options.batch_size or 32,
                image_root=self._image_root,
                **common,
            )
        else:
            embeddings = encode_texts(options.model, options.processor, part, batch_size=options.batch_size or 256, **common)
        return embeddings, list(metadata)

    def without_bad_images(self, skip: bool, show_progress: bool = True) -> tuple[GallerySource, int]:
        """This source checked for unusable images in one pass (threads), before any model loads.

        Returns:
            `(source, skipped)`: the source itself when every image is usable, else (with `skip`) a copy without the
            bad ones and how many were left out.

        Raises:
            UsageError: when there are bad images and `skip` is False (how many, the first few, and the two fixes).
        """
        if self.modality != "image" or self._shards:
            return self, 0
        from ..data import bad_image_rows, bad_images_or_skip, find_bad_images

        if self._column is not None:  # a dataset column
            bad = bad_image_rows(self._items, [self._column], self._image_root, show_progress=show_progress)
            what = f"column {self._column!r}"
        else:
            bad = find_bad_images(self._items, show_progress=show_progress)
            what = self.fingerprint.get("images", "the images")
        keep = bad_images_or_skip(bad, self.count, what, skip)
        if len(keep) == self.count:
            return self, 0
        fingerprint = {**self.fingerprint, "skipped_bad_images": self.count - len(keep)}
        if self._column is not None:
            items, metadata = self._items.select(keep), None
        else:
            items, metadata = [self._items[i] for i in keep], [self._metadata[i] for i in keep]
        kept = GallerySource(
            self.modality,
            len(keep),
            fingerprint,
            self.needs_model,
            _items=items,
            _metadata=metadata,
            _column=self._column,
            _image_root=self._image_root,
        )
        return kept, self.count - len(keep)

    def _read_shards(self, start: int, stop: int) -> Tensor:
        parts, offset = [], 0
        for path, rows in self._shards:
            lo, hi = max(start, offset), min(stop, offset + rows)
            if lo < hi:
                parts.append(_read_rows(path, lo - offset, hi - offset))
            offset += rows
        return torch.cat(parts) if parts else torch.zeros(0, self.dim or 0)


def _read_rows(path: Path, start: int, stop: int) -> Tensor:
    """Rows `[start, stop)` of one embeddings shard, read without loading the rest."""
    if path.suffix == ".npy":
        return torch.from_numpy(np.array(np.load(path, mmap_mode="r")[start:stop], dtype=np.float32))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        (key,) = list(handle.keys())
        return handle.get_slice(key)[start:stop].float()


def _shard_shape(path: Path) -> tuple[int, int]:
    """`(rows, dim)` of an embeddings shard, from its header; refuses anything but one 2-D float tensor."""
    if not path.is_file():
        raise UsageError(f"--embeddings {path} does not exist")
    if path.suffix not in EMBEDDINGS_SUFFIXES:
        raise UsageError(f"--embeddings {path}: expected a {' or '.join(EMBEDDINGS_SUFFIXES)} file")
    try:
        if path.suffix == ".npy":
            array = np.load(path, mmap_mode="r")
            shape, floating = array.shape, np.issubdtype(array.dtype, np.floating)
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
                if len(keys) != 1:
                    raise UsageError(f"--embeddings {path} holds tensors {keys}; expected exactly one (n, D) tensor")
                piece = handle.get_slice(keys[0])
                shape, floating = tuple(piece.get_shape()), piece.get_dtype() in ("F16", "BF16", "F32", "F64")
    except UsageError:
        raise
    except Exception as error:  # noqa: BLE001 - numpy and safetensors raise their own errors for unreadable files
        raise UsageError(f"--embeddings {path} is not readable ({type(error).__name__}: {error})") from None
    if len(shape) != 2 or not floating:
        raise UsageError(f"--embeddings {path} holds a {tuple(shape)} tensor; expected (n, D) floats")
    return int(shape[0]), int(shape[1])


def images_source(folder: str | os.PathLike) -> GallerySource:
    """Every image under `folder` (sorted), with metadata `{"path": path relative to the folder}`."""
    from ..data.folders import list_images

    root = Path(folder).expanduser()
    paths = list_images(root)
    relative = [p.relative_to(root).as_posix() for p in paths]
    return GallerySource(
        "image",
        len(paths),
        {"images": str(root.resolve()), "files": len(paths), "first": relative[0], "last": relative[-1]},
        _items=paths,
        _metadata=[{"path": r} for r in relative],
    )


def texts_source(texts: list[str], description: str) -> GallerySource:
    """Texts, with metadata `{"text": text}`."""
    import hashlib

    digest = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
    return GallerySource(
        "text", len(texts), {"texts": description, "sha256": digest}, _items=list(texts), _metadata=[{"text": t} for t in texts]
    )


def dataset_source(dataset, column: str, modality: str, image_root: str | None, description: str) -> GallerySource:
    """One column of a `datasets.Dataset`; the other columns (those JSON holds) become the metadata."""
    return GallerySource(
        modality,
        len(dataset),
        {"dataset": description, "column": column, "rows": len(dataset), "fingerprint": getattr(dataset, "_fingerprint", None)},
        _items=dataset,
        _column=column,
        _image_root=image_root,
    )


def embeddings_source(paths: list[str], modality: str) -> GallerySource:
    """Shards of precomputed embeddings, in order (metadata: empty dicts)."""
    shards, dims = [], set()
    for name in paths:
        path = Path(name).expanduser()
        rows, dim = _shard_shape(path)
        shards.append((path, rows))
        dims.add(dim)
    if len(dims) != 1:
        raise UsageError(f"the --embeddings shards have different dimensions {sorted(dims)}; embed them with one model")
    count = sum(rows for _, rows in shards)
    if count == 0:
        raise UsageError("the --embeddings shards hold no rows; an index needs at least one item")
    stats = [(str(p.resolve()), rows, p.stat().st_size, p.stat().st_mtime_ns) for p, rows in shards]
    return GallerySource(
        modality, count, {"embeddings": json.loads(json.dumps(stats))}, needs_model=False, _shards=shards, dim=dims.pop()
    )


__all__ = [
    "EmbedOptions",
    "GallerySource",
    "dataset_source",
    "embeddings_source",
    "images_source",
    "texts_source",
]
