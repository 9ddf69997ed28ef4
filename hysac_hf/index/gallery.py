"""`GalleryIndex`: a persistent, searchable gallery of HySAC embeddings with the safe-retrieval policies.

Build it once from a folder of images, a list of texts, a `datasets.Dataset` column or precomputed embeddings,
through the library's one embedding path (`hysac_hf.encode`); save it as a folder and load it again; search it many
times. A `GalleryIndex` is the search engine's :class:`~hysac_hf.modeling.gallery_hysac.Gallery` (the folder in
memory) with what an application needs around it: the sources it is built from, the FAISS structure it builds
(exact `flat`, or an approximate `ivf`/`ivfpq` tuned for a target recall: `ivf.py`, `tuning.py`), growing, and atomic
saves that one writer at a time makes (`hysac_hf.files`). The folder format, the
ranking, the float64 re-rank, the tie rule and the redirect step are the engine's (`modeling/gallery_hysac.py`):
the `safe-retrieval` pipeline gives the same results on the same folder.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import UsageError, require, usage_errors
from ..files import folder_lock, write_folder_atomically
from ..modeling.configuration_hysac import BOUND_STATS, MODALITIES, SAFE_KIND, validate_bounds
from ..modeling.gallery_hysac import (
    CURVATURE_TOLERANCE,
    INDEX_KINDS,
    POLICIES,
    Gallery,
    add_to_structure,
    all_finite,
    check_gallery_model,
    describe_results,
    flat_structure,
    is_gallery_index,
    memory_map_embeddings,
    metadata_lines,
    model_probe,
    read_gallery,
    read_structure,
    redirect,
    round_probe,
    search,
    search_safely,
    write_gallery,
)
from ..modeling.processing_hysac import input_modality
from ..modeling.traversal import METHODS, traversal_threshold
from .tuning import DEFAULT_TARGET_RECALL, build_approximate

logger = logging.getLogger(__name__)

HNSW_REFUSAL = (
    "kind='hnsw' is not offered: HNSW graphs on the Lorentz inner-product vectors recall poorly (0.0003 recall@10 "
    "with inner product, 0.68 with the MIPS-to-L2 augmentation at efSearch 128, on 100,000 benchmark points); use "
    "kind='ivf' or 'ivfpq' (approximate) or kind='flat' (exact)"
)


def _faiss_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("faiss") is not None


def _model_fields(model, processor) -> dict[str, Any]:
    """What an index records of the model that embedded it."""
    if processor is None:
        raise UsageError("a model needs its processor here (to compute the model probe): pass processor=")
    from ..encode import unwrap_hysac

    hysac = unwrap_hysac(model)
    config = hysac.config
    return {
        "curvature": float(hysac.curvature.detach()),
        "model_name": str(getattr(hysac, "name_or_path", "") or getattr(config, "_name_or_path", "") or ""),
        "model_probe": round_probe(model_probe(hysac, processor.tokenizer)),
        "bounds": config.bounds,
        "traversal_offset": float(config.traversal_offset),
    }


def _check_model(gallery: Gallery, model, processor, call: str):
    """The HySAC inside `model`, checked against the gallery's curvature and model probe (UsageError otherwise)."""
    from ..encode import unwrap_hysac

    if processor is None:
        raise UsageError(f"{call} also needs the model's processor= (to check the model probe)")
    hysac = unwrap_hysac(model)
    with usage_errors():
        check_gallery_model(gallery, hysac, lambda: model_probe(hysac, processor.tokenizer))
    return hysac


def _check_embeddings(embeddings: Any, what: str, dim: int | None = None) -> Tensor:
    if not torch.is_tensor(embeddings):
        if isinstance(embeddings, np.ndarray):
            embeddings = torch.from_numpy(embeddings)
        else:
            raise UsageError(
                f"{what} must be a (N, D) tensor of hyperboloid space components, got {type(embeddings).__name__}"
            )
    if embeddings.ndim != 2 or not embeddings.is_floating_point():
        raise UsageError(
            f"{what} must be a (N, D) float tensor of hyperboloid space components, got {tuple(embeddings.shape)} {embeddings.dtype}"
        )
    if dim is not None and embeddings.shape[1] != dim:
        raise UsageError(
            f"{what} have dimension {embeddings.shape[1]}, the index holds {dim}-dimensional embeddings; embed them with the index's model"
        )
    embeddings = embeddings.detach().to("cpu")
    if embeddings.numel() and not all_finite(embeddings):
        raise UsageError(f"{what} contain NaN or infinite values")
    return embeddings


def _jsonable(value: Any) -> Any:
    """A dataset value as plain JSON (numpy scalars to Python, non-finite floats to None); TypeError otherwise."""
    if isinstance(value, (np.generic,)):
        value = value.item()
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _jsonable(v) for k, v in value.items()}
    raise TypeError(type(value).__name__)


MODALITY_SAMPLE = 1000  # values of a string column read to tell image paths from texts


def folder_images(root: str | os.PathLike) -> tuple[list[Path], list[dict[str, str]]]:
    """Every image under `root` (sorted) and its metadata `{"path": path relative to root}`, as an image gallery
    built from a folder holds them.

    Raises:
        UsageError: a missing folder or one without images.
    """
    from ..data.folders import list_images

    root = Path(root).expanduser()
    paths = list_images(root)
    return paths, [{"path": p.relative_to(root).as_posix()} for p in paths]


def _string_column_modality(dataset, column: str, image_root: str | os.PathLike | None) -> str:
    """`"image"` when the first non-empty values of a string column all name image files or URLs, `"text"` when none
    does (`processing_hysac.input_modality`).

    Raises:
        UsageError: a column that mixes both (naming one value of each), or whose values all look like image file
            names that do not exist (a forgotten image_root).
    """
    from ..data.folders import IMAGE_SUFFIXES

    values = [v for v in dataset.select(range(min(len(dataset), MODALITY_SAMPLE)))[column] if v]
    kinds = [input_modality(v, image_root) for v in values]
    if "image" not in kinds:
        if values and all(Path(v).suffix.lower() in IMAGE_SUFFIXES for v in values):
            raise UsageError(
                f"column {column!r} holds image file names (e.g. {values[0]!r}) but none names an existing file"
                + (f" under {image_root}" if image_root else "")
                + "; pass the folder they are relative to (image_root= / --image_root), or modality='text' / "
                "--modality text to index the names as texts"
            )
        return "text"
    if "text" not in kinds:
        logger.info("Column %r holds image paths or URLs (e.g. %r): indexing images", column, values[0])
        return "image"
    raise UsageError(
        f"column {column!r} mixes image paths ({values[kinds.index('image')]!r}) and other strings "
        f"({values[kinds.index('text')]!r}; missing files?); say what it holds with modality= / --modality image or "
        "text (relative paths are resolved under image_root / --image_root)"
    )


class GalleryIndex(Gallery):
    """A gallery of `N` hyperboloid embeddings of one modality, searchable by Lorentz distance, with metadata.

    Build it with :meth:`from_images`, :meth:`from_texts`, :meth:`from_dataset` or :meth:`from_embeddings`, and
    reopen it with :meth:`load`. The FAISS structure is built on the first search, :meth:`build` or :meth:`save`
    (so that non-main processes of `accelerate launch` never build one).

    An approximate kind is built for `target_recall` (recall@10 against exact search, measured on held-out gallery
    items, `tuning.py`): the build chooses the cells, `nprobe` and (`ivfpq`) the re-ranking depth, records what it
    measured in :attr:`tuning`, and keeps exact search (kind `"flat"`, with a warning) when the target cannot be met
    at twice the exact speed.

    Args:
        embeddings: `(N, D)` float32 space components (kept by reference when already float32 on the CPU).
        modality: `"image"` or `"text"`: what the gallery holds (its safe region for `redirect`: `V` or `S`).
        curvature: curvature magnitude `c` of the model that embedded it.
        metadata: `N` JSON-serialisable dicts (row `i` describes item `i`); default: empty dicts.
        kind: `"flat"` (exact), `"ivf"` (approximate) or `"ivfpq"` (approximate and compressed: product-quantised
            codes in memory, the embeddings memory-mapped once saved); the approximate kinds need faiss.
        nlist: IVF cells (default: chosen by the tuning among ~2 and ~4 sqrt(N)).
        nprobe: IVF cells probed per query (default: the fewest that reach `target_recall`).
        rerank: `ivfpq` candidates re-ranked exactly per query (default: chosen by the tuning).
        target_recall: recall@10 an approximate kind must reach, in (0, 1]; None builds with the given settings (or
            defaults) without measuring or refusing anything.
        model_name: name or path of the embedding model (recorded in `index.json`).
        model_probe: the model's rounded probe embeddings (`gallery_hysac.model_probe`), or None.
        bounds: the model's `config.bounds` (needed by `policy="redirect"`), or None.
        traversal_offset: the model's `config.traversal_offset`.
        seed: seed of the samples and k-means of an approximate kind.
    """

    def __init__(
        self,
        embeddings: Tensor,
        modality: str,
        curvature: float,
        metadata: Sequence[dict[str, Any]] | None = None,
        *,
        kind: str = "flat",
        nlist: int | None = None,
        nprobe: int | None = None,
        rerank: int | None = None,
        target_recall: float | None = DEFAULT_TARGET_RECALL,
        model_name: str = "",
        model_probe: list[list[float]] | None = None,
        bounds: dict[str, dict[str, float]] | None = None,
        traversal_offset: float | None = None,
        seed: int = 0,
    ):
        if kind == "hnsw":
            raise UsageError(HNSW_REFUSAL)
        if kind not in INDEX_KINDS:
            raise UsageError(f"kind={kind!r} is not one of {list(INDEX_KINDS)}")
        if modality not in MODALITIES:
            raise UsageError(f"modality={modality!r} is not one of {list(MODALITIES)}")
        embeddings = _check_embeddings(embeddings, "the gallery embeddings")
        if embeddings.shape[0] == 0:
            raise UsageError("the gallery is empty; an index needs at least one item")
        if isinstance(curvature, bool) or not isinstance(curvature, (int, float)) or not 0 < curvature < math.inf:
            raise UsageError(f"curvature must be a positive number (the model's c = exp(curv)), got {curvature!r}")
        count = embeddings.shape[0]
        try:
            bounds = validate_bounds(bounds)
        except ValueError as error:
            raise UsageError(str(error)) from None
        if kind == "flat":
            if nlist is not None or nprobe is not None or rerank is not None:
                raise UsageError("nlist, nprobe and rerank are IVF settings; pass them with kind='ivf' or 'ivfpq'")
        else:
            require("faiss", purpose=f"an approximate gallery index (kind={kind!r})")
            if nlist is not None and not 1 <= int(nlist) <= count:
                raise UsageError(f"nlist={nlist} must be between 1 and the gallery size {count}")
            limit = int(nlist) if nlist is not None else count
            if nprobe is not None and not 1 <= int(nprobe) <= limit:
                raise UsageError(f"nprobe={nprobe} must be between 1 and nlist={limit}")
            if rerank is not None and (kind != "ivfpq" or int(rerank) < 1):
                raise UsageError(f"rerank={rerank} applies to kind='ivfpq' and must be >= 1")
        if target_recall is not None and (isinstance(target_recall, bool) or not 0 < target_recall <= 1):
            raise UsageError(f"target_recall={target_recall!r} must be a recall in (0, 1], or None to measure nothing")
        super().__init__(
            embeddings=embeddings.float().contiguous(),
            modality=modality,
            curvature=float(curvature),
            metadata=self._check_metadata(metadata, count),
            kind=kind,
            params={},
            model_name=model_name,
            model_probe=model_probe,
            bounds=bounds,
            traversal_offset=None if traversal_offset is None else float(traversal_offset),
        )
        self.seed = seed
        self.requested = {
            "nlist": None if nlist is None else int(nlist),
            "nprobe": None if nprobe is None else int(nprobe),
            "rerank": None if rerank is None else int(rerank),
            "target_recall": target_recall,
        }

    # --------------------------------------------------------------------------------------------------------
    # Construction
    @classmethod
    def from_embeddings(
        cls,
        embeddings: Tensor,
        modality: str,
        *,
        model=None,
        processor=None,
        curvature: float | None = None,
        metadata: Sequence[dict[str, Any]] | None = None,
        bounds: dict[str, dict[str, float]] | None = None,
        traversal_offset: float | None = None,
        **options,
    ) -> GalleryIndex:
        """An index over precomputed `(N, D)` embeddings.

        Give the `model` (and its `processor`) that embedded them to record its curvature, name, probe, bounds
        and traversal offset; or give `curvature` (and optionally `bounds`, `traversal_offset`) alone, in which
        case a model loading the index can only check the dimension and curvature.

        Args:
            options: `kind`, `nlist`, `nprobe`, `rerank`, `target_recall`, `seed`, `model_name` (see the class).
        """
        if model is not None:
            fields = _model_fields(model, processor)
            if curvature is not None and abs(curvature - fields["curvature"]) > CURVATURE_TOLERANCE * fields["curvature"]:
                raise UsageError(
                    f"curvature={curvature} disagrees with the model's curvature {fields['curvature']}; drop curvature= "
                    "(the model's is used) or pass the model that embedded the gallery"
                )
            if bounds is not None:
                fields["bounds"] = bounds
            if traversal_offset is not None:
                fields["traversal_offset"] = traversal_offset
            options.setdefault("model_name", fields.pop("model_name"))
            return cls(embeddings, modality, metadata=metadata, **fields, **options)
        if curvature is None:
            raise UsageError("pass the model that embedded the gallery (model=, processor=) or its curvature=")
        return cls(
            embeddings, modality, curvature, metadata, bounds=bounds, traversal_offset=traversal_offset, **options
        )

    @classmethod
    def from_images(
        cls,
        model,
        processor,
        images: str | os.PathLike | Sequence[Any],
        *,
        metadata: Sequence[dict[str, Any]] | None = None,
        image_root: str | os.PathLike | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        accelerator=None,
        show_progress: bool = True,
        **options,
    ) -> GalleryIndex:
        """An image gallery: a folder (every image under it, sorted; metadata `{"path": path relative to the
        folder}`) or a sequence of PIL images, numpy arrays, paths or `datasets.Image` dicts (metadata
        `{"path": path}` for paths).

        Args:
            metadata: per-item dicts replacing the default metadata.
            image_root: folder that relative paths in `images` are resolved against.
            batch_size, num_workers, accelerator, show_progress: as in `hysac_hf.encode.encode_images` (under
                `accelerate launch` every process embeds its share and gets the whole index).
            options: `kind`, `nlist`, `nprobe`, `rerank`, `target_recall`, `seed` (see the class).
        """
        from ..encode import encode_images

        if isinstance(images, (str, os.PathLike)):
            items, default_metadata = folder_images(images)
        else:
            items = cls._check_items(images, "image", image_root)
            default_metadata = [{"path": str(v)} if isinstance(v, (str, Path)) else {} for v in items]
        embeddings = encode_images(
            model,
            processor,
            items,
            batch_size=batch_size,
            num_workers=num_workers,
            image_root=image_root,
            accelerator=accelerator,
            show_progress=show_progress,
        )
        return cls.from_embeddings(
            embeddings, "image", model=model, processor=processor, metadata=metadata or default_metadata, **options
        )

    @classmethod
    def from_texts(
        cls,
        model,
        processor,
        texts: Sequence[str],
        *,
        metadata: Sequence[dict[str, Any]] | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
        accelerator=None,
        show_progress: bool = True,
        **options,
    ) -> GalleryIndex:
        """A text gallery from a sequence of strings (metadata `{"text": text}`).

        Args: as in :meth:`from_images`.
        """
        from ..encode import encode_texts

        items = cls._check_items(texts, "text")
        embeddings = encode_texts(
            model,
            processor,
            items,
            batch_size=batch_size,
            num_workers=num_workers,
            accelerator=accelerator,
            show_progress=show_progress,
        )
        default_metadata = [{"text": t} for t in items]
        return cls.from_embeddings(
            embeddings, "text", model=model, processor=processor, metadata=metadata or default_metadata, **options
        )

    @classmethod
    def from_dataset(
        cls,
        model,
        processor,
        dataset,
        column: str | None = None,
        *,
        modality: str | None = None,
        image_root: str | os.PathLike | None = None,
        batch_size: int | None = None,
        num_workers: int = 0,
        accelerator=None,
        show_progress: bool = True,
        **options,
    ) -> GalleryIndex:
        """A gallery from one column of a `datasets.Dataset`; the other columns become the metadata.

        The column: `column`, or the dataset's only `Image` column, or (without one) its only string column. Its
        modality: `Image` feature -> image, string -> text, unless `modality="image"` says that a string (or
        dict) column holds image paths. Metadata: every column that JSON can hold (images, audio and bytes left
        out; the text column of a text gallery kept); non-finite floats become null.

        Args:
            dataset: a `datasets.Dataset` (pick a split of a `DatasetDict` first).
            column: the image or text column.
            modality: `"image"` or `"text"`, to override the feature type.
            batch_size: default 32 for images, 256 for texts.
            image_root, num_workers, accelerator, show_progress, options: as in :meth:`from_images`.
        """
        from ..encode import encode_images, encode_texts

        column, modality = cls._dataset_column(dataset, column, modality, image_root)
        if len(dataset) == 0:
            raise UsageError("the dataset is empty; an index needs at least one item")
        if modality == "text":
            cls._check_items(dataset[column], "text")
        metadata = cls._dataset_metadata(dataset, column, modality)
        kwargs = {
            "column": column,
            "num_workers": num_workers,
            "accelerator": accelerator,
            "show_progress": show_progress,
        }
        if modality == "image":
            embeddings = encode_images(
                model, processor, dataset, batch_size=batch_size or 32, image_root=image_root, **kwargs
            )
        else:
            embeddings = encode_texts(model, processor, dataset, batch_size=batch_size or 256, **kwargs)
        return cls.from_embeddings(embeddings, modality, model=model, processor=processor, metadata=metadata, **options)

    @staticmethod
    def _check_items(items: Any, modality: str, image_root: str | os.PathLike | None = None) -> list[Any]:
        """The items as a list, refusing an empty gallery and one that mixes texts and images."""
        from PIL import Image

        if isinstance(items, (str, bytes)) or not hasattr(items, "__len__"):
            raise UsageError(f"expected a sequence of {modality}s, got a {type(items).__name__}")
        items = list(items)
        if not items:
            raise UsageError(f"the gallery is empty: no {modality}s given; an index needs at least one item")
        for number, item in enumerate(items):
            if modality == "text" and not isinstance(item, str):
                kind = "image" if isinstance(item, (Image.Image, np.ndarray, dict)) else type(item).__name__
                raise UsageError(
                    f"a gallery holds one modality: item {number} is a {kind} ({type(item).__name__}) among texts; "
                    "build an image gallery with GalleryIndex.from_images"
                )
            if modality == "image":
                if isinstance(item, (str, Path)):
                    path = Path(item).expanduser()
                    if not path.is_absolute() and image_root is not None:
                        path = Path(image_root) / path
                    if not path.is_file():
                        raise UsageError(
                            f"a gallery holds one modality: item {number} ({str(item)[:60]!r}) is a string that is not "
                            "an image file; texts belong in GalleryIndex.from_texts, image paths must exist "
                            "(relative ones under image_root)"
                        )
                elif not isinstance(item, (Image.Image, np.ndarray, dict)):
                    raise UsageError(
                        f"item {number} is a {type(item).__name__}; an image gallery takes PIL images, numpy arrays, "
                        "paths or datasets.Image dicts"
                    )
        return items

    @staticmethod
    def _dataset_column(
        dataset, column: str | None, modality: str | None, image_root: str | os.PathLike | None = None
    ) -> tuple[str, str]:
        """The column to index and its modality: `column`, else the only `Image` column, else the only string
        column; an `Image` feature holds images, a string column images when its values name image files or URLs
        (`processing_hysac.input_modality`, relative paths under `image_root`) and texts otherwise, unless
        `modality` says."""
        import datasets

        if isinstance(dataset, datasets.DatasetDict):
            raise UsageError(f"pick one split of the DatasetDict first (it has {list(dataset)}), e.g. dataset['train']")
        if not isinstance(dataset, datasets.Dataset):
            raise UsageError(f"expected a datasets.Dataset, got {type(dataset).__name__}")
        if modality is not None and modality not in MODALITIES:
            raise UsageError(f"modality={modality!r} is not one of {list(MODALITIES)}")
        features = dataset.features

        def is_string(feature) -> bool:
            return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")

        if column is None:
            images = [name for name, f in features.items() if isinstance(f, datasets.Image)]
            texts = [name for name, f in features.items() if is_string(f)]
            candidates = images if images and modality != "text" else texts if modality != "image" else []
            if len(candidates) != 1:
                found = f"image columns {images}, string columns {texts}"
                raise UsageError(f"cannot tell which column to index ({found}); pass the column (column= / --column)")
            column = candidates[0]
        if column not in features:
            raise UsageError(f"the dataset has no column {column!r}; it has {list(features)}")
        feature = features[column]
        if isinstance(feature, datasets.Image):
            if modality == "text":
                raise UsageError(f"column {column!r} holds images (an Image feature); drop modality='text'")
            return column, "image"
        if modality is not None:
            return column, modality
        if is_string(feature):
            return column, _string_column_modality(dataset, column, image_root)
        raise UsageError(
            f"column {column!r} holds {feature}; say what it holds with modality='image' (image paths or dicts) or "
            "modality='text'"
        )

    @staticmethod
    def _dataset_metadata(dataset, column: str, modality: str) -> list[dict[str, Any]]:
        import datasets

        skipped = (datasets.Image, datasets.Audio) + tuple(
            getattr(datasets, name) for name in ("Video", "Pdf") if hasattr(datasets, name)
        )
        kept: dict[str, list[Any]] = {}
        for name, feature in dataset.features.items():
            if isinstance(feature, skipped) or (
                isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary")
            ):
                continue
            if name == column and modality == "image" and not isinstance(feature, datasets.Value):
                continue  # image dicts (e.g. bytes) are the content, not metadata
            try:
                kept[name] = [_jsonable(v) for v in dataset[name]]
            except TypeError as error:
                logger.info("Column %r is left out of the metadata: it holds %s values (not JSON)", name, error)
        return [{name: values[i] for name, values in kept.items()} for i in range(len(dataset))]

    @staticmethod
    def _check_metadata(metadata: Sequence[dict[str, Any]] | None, count: int) -> list[dict[str, Any]]:
        if metadata is None:
            return [{} for _ in range(count)]
        metadata = list(metadata)
        if len(metadata) != count:
            raise UsageError(f"{len(metadata)} metadata rows for {count} items; give one dict per item")
        with usage_errors():
            metadata_lines(metadata)  # refuses non-dicts and values JSON cannot hold, naming the row
        return metadata

    def __repr__(self) -> str:
        return (
            f"GalleryIndex({len(self)} {self.modality}s, dim {self.dim}, curvature {self.curvature:.6g}, "
            f"kind {self.kind!r}{', ' + str(self.params) if self.params else ''})"
        )

    # --------------------------------------------------------------------------------------------------------
    # Search
    def build(self, show_progress: bool = False) -> GalleryIndex:
        """Build the FAISS structure now (else the first search or save does). Returns `self`.

        `ivf`/`ivfpq`: the radial-celled IVF tuned for the target recall (`tuning.build_approximate`; refused: the
        index becomes `flat` and :attr:`tuning` says why); `flat`: an exact FAISS inner-product structure when faiss
        is installed and the embeddings are in memory (otherwise exact search scans them in float64, chunk by chunk).
        """
        if self.structure is not None:
            return self
        if self.kind != "flat":
            requested = self.requested
            structure, params, tuning = build_approximate(
                self.embeddings,
                self.curvature,
                self.kind,
                target=requested["target_recall"],
                nlist=requested["nlist"],
                nprobe=requested["nprobe"],
                rerank_depth=requested["rerank"],
                seed=self.seed,
                show_progress=show_progress,
            )
            self.tuning = tuning
            if structure is None:  # refused: exact search, said in a warning and in index.json
                self.kind, self.params = "flat", {}
            else:
                self.structure, self.params = structure, params
                logger.info("Built a %s index: %s", self.kind, params)
                return self
        if _faiss_available() and not self.memory_mapped:  # a memory-mapped gallery is scanned from disk instead
            self.structure = flat_structure(self.embeddings, self.curvature)
        return self

    def knn(self, queries: Tensor, k: int, *, nprobe: int | None = None, exact: bool = False) -> tuple[Tensor, Tensor]:
        """The `k` nearest gallery items of each query by Lorentz distance (no policy: the queries as given).

        Args:
            queries: `(Q, D)` space components (embedded by the gallery's model).
            k: results per query, `1 <= k <= len(self)`.
            nprobe: IVF cells probed (default: the index's); ignored by flat indexes.
            exact: search every item even in an approximate index.
        Returns:
            `(distances, indices)`, both `(Q, k)`: float64 distances recomputed from the stored embeddings, and
            int64 gallery indices, nearest first, equal distances in gallery order.
        """
        queries = _check_embeddings(queries, "the queries", self.dim)
        k = self._check_k(k)
        structure, probes, candidates = self._search_structure(nprobe, exact)
        indices, distances = search(queries, self.embeddings, self.curvature, k, structure, probes, candidates)
        return distances, indices

    def _search_structure(self, nprobe: int | None, exact: bool) -> tuple[Any, int | None, int | None]:
        """The FAISS structure a search uses (None: exact float64 scan), the cells it probes and the candidates it
        re-ranks (approximate kinds only)."""
        self.build()
        approximate = self.kind != "flat"
        if (
            approximate
            and nprobe is not None
            and (isinstance(nprobe, bool) or not 1 <= int(nprobe) <= self.params["nlist"])
        ):
            raise UsageError(f"nprobe={nprobe} must be between 1 and nlist={self.params['nlist']}")
        if exact and approximate:
            return None, None, None
        return (
            self.structure,
            int(nprobe) if nprobe is not None and approximate else None,
            self.params.get("rerank") if approximate else None,
        )

    def _check_k(self, k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise UsageError(f"top_k must be an integer, got {k!r}")
        if not 1 <= k <= len(self):
            raise UsageError(f"top_k={k} must be between 1 and the gallery size {len(self)}")
        return int(k)

    def traversal_threshold(self, bound: str = "up_95", offset: float | None = None) -> Tensor:
        """The threshold `b'` of the gallery's safe region (`V` for images, `S` for texts) from the stored bounds.

        Raises:
            UsageError: the index has no bounds, or an unknown `bound`.
        """
        bounds, offset = self._redirect_settings(bound, offset)
        return traversal_threshold(bounds[SAFE_KIND[self.modality].key][bound], self.curvature, offset)

    def _redirect_settings(self, bound: str, offset: float | None) -> tuple[dict, float]:
        if bound not in BOUND_STATS:
            raise UsageError(f"bound={bound!r} is not one of {list(BOUND_STATS)}")
        if self.bounds is None:
            raise UsageError(
                "this gallery index has no calibrated bounds (its model had none when it was built), so it cannot "
                "redirect queries: calibrate the model with 'hysac-calibrate --model DIR --dataset ...' and rebuild "
                "the index, load it with the calibrated model (load(dir, model=..., processor=...)), or search with "
                "policy='retain'"
            )
        offset = self.traversal_offset if offset is None else offset
        if offset is None:
            raise UsageError("this gallery index has no traversal_offset; pass offset= or rebuild it with a model")
        return self.bounds, offset

    def redirect(
        self, queries: Tensor, method: str = "reference", bound: str = "up_95", offset: float | None = None
    ) -> tuple[Tensor, Tensor]:
        """Move the queries beyond the traversal threshold of the gallery's safe region onto it (the engine's
        redirect step, with the bounds stored in the index): the same move as
        `HySACModel.traverse_to_safe(queries, target=modality, method, bound, offset)`.

        Returns:
            `(moved, redirected)`: `(Q, D)` queries (rows within the threshold unchanged) and a `(Q,)` bool mask.
        """
        if method not in METHODS:
            raise UsageError(f"method={method!r} is not one of {list(METHODS)}")
        queries = _check_embeddings(queries, "the queries", self.dim)
        bounds, offset = self._redirect_settings(bound, offset)
        return redirect(queries, self.modality, bounds, self.curvature, offset, method, bound)

    def search(
        self,
        queries: Tensor,
        k: int = 5,
        *,
        policy: str = "redirect",
        method: str = "reference",
        bound: str = "up_95",
        offset: float | None = None,
        nprobe: int | None = None,
        exact: bool = False,
    ) -> list[dict[str, Any]]:
        """Safe retrieval: rank the gallery for each query, redirecting unsafe queries first under `"redirect"`.

        Under `policy="redirect"` a query whose distance to the root exceeds the traversal threshold of the
        gallery's safe region (image gallery: `V`, text gallery: `S`; `bounds[key][bound]` with the traversal
        offset) is moved onto it with the model's traversal (`method`) before ranking; `"retain"` ranks the query
        as it is. The engine's `search_safely`, as the `safe-retrieval` pipeline runs it.

        Args:
            queries: `(Q, D)` space components embedded by the gallery's model (`hysac_hf.encode.encode_texts` /
                `encode_images`).
            k: results per query, at most the gallery's size.
            policy: `"redirect"` or `"retain"`.
            method: traversal rule, `"reference"` or `"geodesic"`.
            bound: bound statistic of the threshold, `"up_95"`, `"avg"` or `"low_05"`.
            offset: traversal margin offset (default: the model's, stored in the index).
            nprobe, exact: as in :meth:`knn`.
        Returns:
            per query `{"redirected": bool, "query_distance_to_root": d, "search_distance_to_root": d',
            "results": [{"index": i, "distance": d(query searched, item), **metadata}]}`, nearest first, equal
            distances in gallery order (metadata keys named "index" or "distance" are not copied).
        """
        if policy not in POLICIES:
            raise UsageError(f"policy={policy!r} is not one of {list(POLICIES)}")
        if method not in METHODS:
            raise UsageError(f"method={method!r} is not one of {list(METHODS)}")
        queries = _check_embeddings(queries, "the queries", self.dim)
        k = self._check_k(k)
        bounds, offset = self._redirect_settings(bound, offset) if policy == "redirect" else (None, None)
        structure, probes, candidates = self._search_structure(nprobe, exact)
        outputs = search_safely(
            queries,
            self.embeddings,
            self.modality,
            self.curvature,
            k,
            policy=policy,
            bounds=bounds,
            offset=offset,
            method=method,
            bound=bound,
            structure=structure,
            nprobe=probes,
            candidates=candidates,
        )
        return describe_results(outputs, self.metadata)

    # --------------------------------------------------------------------------------------------------------
    # Growing
    def add(self, embeddings: Tensor, metadata: Sequence[dict[str, Any]] | None = None) -> GalleryIndex:
        """Append items (embedded by the gallery's model; that is not checkable here: `hysac-index add` checks the
        model probe). An approximate index keeps its trained cells (and codes) and files the new items under them;
        a flat index appends them. Returns `self`.

        A memory-mapped gallery (a loaded `ivfpq` index) is read into memory to grow; `hysac-index add` appends to
        the folder without loading it.

        Args:
            embeddings: `(M, D)` space components.
            metadata: `M` dicts (default: empty dicts).
        """
        embeddings = _check_embeddings(embeddings, "the added embeddings", self.dim).float().contiguous()
        if embeddings.shape[0] == 0:
            return self
        rows = self._check_metadata(metadata, embeddings.shape[0])
        if self.structure is not None:
            add_to_structure(self.structure, embeddings, self.curvature, self.params.get("cells"))
        self.embeddings = torch.cat([self.embeddings, embeddings])
        self.memory_mapped = False
        self.metadata = self.metadata + rows
        return self

    # --------------------------------------------------------------------------------------------------------
    # Saving and loading
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the index folder (format 1) atomically: a crash leaves the previous index (or none), never a mix.

        An existing gallery index at `directory` is replaced; any other non-empty folder is refused. Writers of one
        folder take turns (`hysac_hf.files.write_folder_atomically`): a second one waits for the first, and removes
        what a killed writer left beside the folder.

        Raises:
            UsageError: `directory` is a file or a non-empty folder that is not a gallery index, or another process
                kept writing it for longer than the lock's timeout.
        """
        directory = Path(directory).expanduser()
        check_output_folder(directory)
        if self.kind != "flat":  # (a flat index saves no structure: none is built for it)
            self.build()
        with folder_lock(directory):
            check_output_folder(directory)  # again, now that no other writer is half-way
            with usage_errors():
                write_folder_atomically(directory, lambda folder: write_gallery(self, folder))
            if self.memory_mapped:  # read rows from the new file (the old one is deleted)
                self.embeddings = memory_map_embeddings(directory, len(self), self.dim)
        self.source = str(directory)
        logger.info("Saved a %s gallery index of %d %ss to %s", self.kind, len(self), self.modality, directory)
        return directory

    @classmethod
    def from_gallery(cls, stored: Gallery) -> GalleryIndex:
        """A `GalleryIndex` over a gallery read by the engine (`read_gallery`), its checks already done (a
        memory-mapped gallery is not scanned again)."""
        if stored.kind not in INDEX_KINDS:
            raise UsageError(
                f"the gallery index {stored.source} uses a {stored.kind!r} FAISS index, which this hysac_hf does not "
                f"read (it reads {list(INDEX_KINDS)}); rebuild it with 'hysac-index build --kind ivf'"
            )
        index = cls.__new__(cls)
        Gallery.__init__(
            index,
            embeddings=stored.embeddings,
            modality=stored.modality,
            curvature=stored.curvature,
            metadata=stored.metadata if stored.metadata is not None else [{} for _ in range(len(stored))],
            kind=stored.kind,
            params=dict(stored.params),
            model_name=stored.model_name,
            model_probe=stored.model_probe,
            bounds=validate_bounds(stored.bounds),
            traversal_offset=stored.traversal_offset,
            faiss_path=stored.faiss_path,
            faiss_sha256=stored.faiss_sha256,
            tuning=stored.tuning,
            source=stored.source,
            memory_mapped=stored.memory_mapped,
        )
        index.seed = 0
        index.requested = {"nlist": None, "nprobe": None, "rerank": None, "target_recall": None}
        if index.kind != "flat":
            with usage_errors():
                index.structure = read_structure(stored)
        return index

    @classmethod
    def extend_folder(
        cls,
        directory: str | os.PathLike,
        embeddings: Tensor,
        metadata: Sequence[dict[str, Any]] | None = None,
        model=None,
        processor=None,
    ) -> GalleryIndex:
        """Append items to a saved index folder, atomically, holding its writers' lock from reading to writing (no
        concurrent writer's items are lost). The model, when given, is checked against the folder's probe (it must be
        the one that embedded `embeddings`). A memory-mapped gallery (`ivfpq`) is extended without loading it: its
        embeddings are copied into the new folder block by block, and the new items filed into its structure.

        Args:
            directory: the index folder.
            embeddings: `(M, D)` space components of the new items.
            metadata: `M` dicts (default: empty dicts).
            model, processor: the index's model (checked against the folder's probe; recommended).
        Returns:
            the extended index, loaded from the new folder.
        Raises:
            UsageError: no index there, another model, or embeddings or metadata that do not fit it.
        """
        from ..modeling.gallery_hysac import EMBEDDINGS_FILE, METADATA_FILE, EmbeddingsWriter

        directory = Path(directory).expanduser()
        with folder_lock(directory):
            index = cls.load(directory)  # the stored bounds stay (a model's own would replace them)
            if model is not None:
                _check_model(index, model, processor, "extend_folder(..., model=)")
            new = _check_embeddings(embeddings, "the added embeddings", index.dim).float().contiguous()
            rows = index._check_metadata(metadata, new.shape[0])
            if new.shape[0] == 0:
                return index
            if not index.memory_mapped:
                index.add(new, rows)
                index.save(directory)
                return index
            count = len(index) + new.shape[0]
            add_to_structure(index.structure, new, index.curvature, index.params.get("cells"))
            old_metadata = Path(directory) / METADATA_FILE

            def write(folder: Path) -> None:
                writer = EmbeddingsWriter(folder / EMBEDDINGS_FILE, index.dim)
                for start in range(0, len(index), 65_536):
                    writer.write(index.embeddings[start : start + 65_536])
                writer.write(new)
                sha256 = writer.finish()
                part = folder / ".metadata.part"
                with open(old_metadata, "rb") as source, open(part, "wb") as target:
                    shutil.copyfileobj(source, target)
                    target.write("".join(line + "\n" for line in metadata_lines(rows)).encode("utf-8"))
                grown = Gallery(
                    embeddings=memory_map_embeddings(folder, count, index.dim),
                    modality=index.modality,
                    curvature=index.curvature,
                    kind=index.kind,
                    params=index.params,
                    model_name=index.model_name,
                    model_probe=index.model_probe,
                    bounds=index.bounds,
                    traversal_offset=index.traversal_offset,
                    structure=index.structure,
                    tuning=index.tuning,
                )
                write_gallery(grown, folder, embeddings_sha256=sha256, metadata_file=part)
                part.unlink()

            with usage_errors():
                write_folder_atomically(directory, write)
            return cls.load(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, model=None, processor=None) -> GalleryIndex:
        """Read an index folder, checking every part (`gallery_hysac.read_gallery`) and, with a model, that it is the
        model that built it (dimension, curvature, probe). The model's own bounds and traversal offset then replace
        the stored ones when it has bounds (a recalibrated model redirects by its new bounds); the stored ones serve
        otherwise. The embeddings of an `ivfpq` index are memory-mapped, not loaded.

        Args:
            directory: the folder written by :meth:`save`.
            model: the HySAC model that will embed the queries (recommended).
            processor: its processor (needed with `model`, for the probe).
        Raises:
            UsageError: a missing or corrupt folder, an index built with another model or curvature.
        """
        directory = Path(directory).expanduser()
        with usage_errors():
            stored = read_gallery(directory)
        hysac = None if model is None else _check_model(stored, model, processor, "load(dir, model=...)")
        index = cls.from_gallery(stored)
        config = None if hysac is None else hysac.config
        if config is not None and config.bounds is not None:  # the model's calibration is the current one
            if config.bounds != index.bounds or float(config.traversal_offset) != index.traversal_offset:
                logger.info(
                    "Using the model's bounds and traversal offset (they differ from those stored in %s)", directory
                )
            index.bounds = validate_bounds(config.bounds)
            index.traversal_offset = float(config.traversal_offset)
        logger.info("Loaded %r from %s", index, directory)
        return index


def check_output_folder(directory: str | os.PathLike) -> None:
    """Refuse an output path that is a file, or a non-empty folder that is not a gallery index (nothing written).

    Raises:
        UsageError: naming the path and what to do.
    """
    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{directory} exists and is not a folder; choose a folder path for the index")
    if directory.is_dir() and any(directory.iterdir()) and not is_gallery_index(directory):
        raise UsageError(
            f"{directory} is a non-empty folder that is not a gallery index; choose a new or empty folder (an "
            "existing index is replaced)"
        )


__all__ = ["GalleryIndex", "check_output_folder", "folder_images"]
