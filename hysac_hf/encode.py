"""The one embedding path of the library: data -> model inputs -> hyperboloid embeddings -> consumers.

Everything that embeds data goes through here: training validation, bounds calibration, `hysac-eval`, the main
job and the gallery index. Batches are built by the collators of `hysac_hf.data` (images decoded and
preprocessed in DataLoader workers, text padded to the longest caption of the batch), a tqdm bar shows
progress, and under `accelerate launch` every process embeds its share of the batches and the results are
gathered back in dataset order: batches hold the same rows whatever the number of processes, so a
multi-process run equals a one-process run bit for bit.

- :class:`QuadrupletEncoder`: the module that turns one collated batch into the four kinds of embeddings
  (`S`, `V`, `U`, `G`); training wraps it with Accelerate, so DDP/FSDP hooks and autocast apply.
- :func:`encode_quadruplets`: a quadruplet dataset -> :class:`EmbeddingCache`.
- :func:`encode_images`, :func:`encode_texts`: a list (or dataset column) of images or texts -> `(N, D)`.
- :class:`EmbeddingCache`: the S/V/U/G matrices, the curvature and the tags, with atomic `save`/`load`.

Cache layout (a folder): `embeddings.safetensors` (float32 `(N, D)` matrices under the keys `S`, `V`, `U`, `G`)
and `cache.json` (curvature, bounds, traversal offset, unsafe thresholds, tags, the number of rows, the
safetensors file's SHA-256, and a free-form source description).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import UsageError
from .files import sha256_file, write_folder_atomically
from .data.collate import ItemCollator, QuadrupletCollator
from .modeling.configuration_hysac import CONTENT, CONTENT_KINDS, content_kind

logger = logging.getLogger(__name__)

CACHE_FILE = "embeddings.safetensors"
META_FILE = "cache.json"
CACHE_FORMAT = 2  # 1: the first cache.json (keys "curv", "traversal_alpha"; no checksum), still readable


# --------------------------------------------------------------------------------------------------------
# The result type
@dataclass
class EmbeddingCache:
    """Embeddings of a quadruplet dataset plus what the consumers need from the model.

    Attributes:
        embeds: `{"S"|"V"|"U"|"G": (N, D) float32}` hyperboloid space components (a subset of the keys is allowed).
        curvature: curvature magnitude `c` of the model that embedded them.
        bounds: the model's `config.bounds` (None if it had none).
        traversal_offset: the model's `config.traversal_offset`.
        unsafe_thresholds: the model's `config.unsafe_thresholds`.
        tags: `N` category tags, or None.
        source: free-form description (model, dataset, split).
        logit_scale: the model's log contrastive scale (for losses on the cached embeddings), if known.
        logit_bias: the model's logit bias (SigLIP's sigmoid loss), if it has one.
    """

    embeds: dict[str, Tensor]
    curvature: float
    bounds: dict[str, dict[str, float]] | None = None
    traversal_offset: float = 0.8
    unsafe_thresholds: dict[str, float] | None = None
    tags: list[str] | None = None
    source: dict[str, Any] = field(default_factory=dict)
    logit_scale: float | None = None
    logit_bias: float | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.embeds) - set(CONTENT))
        if unknown:
            raise ValueError(f"unknown embedding keys {unknown}; expected a subset of {list(CONTENT)}")
        if not self.embeds:
            raise ValueError("an EmbeddingCache needs at least one embedding matrix")
        sizes = {k: tuple(v.shape) for k, v in self.embeds.items()}
        rows = {s[0] for s in sizes.values()}
        if any(len(s) != 2 for s in sizes.values()) or len(rows) != 1 or len({s[1] for s in sizes.values()}) != 1:
            raise ValueError(f"embedding matrices must all be (N, D) with the same N and D, got {sizes}")
        if self.tags is not None and len(self.tags) != self.num_rows:
            raise ValueError(f"{len(self.tags)} tags for {self.num_rows} rows")
        if not self.curvature > 0:
            raise ValueError(f"curvature must be a positive magnitude, got {self.curvature}")

    @property
    def num_rows(self) -> int:
        return next(iter(self.embeds.values())).shape[0]

    @property
    def dim(self) -> int:
        return next(iter(self.embeds.values())).shape[1]

    def require(self, *keys: str) -> None:
        """Raise a clear error when the cache lacks a kind of content that a consumer needs."""
        missing = [k for k in keys if k not in self.embeds]
        if missing:
            names = ", ".join(f"{k} = {CONTENT[k].name} ({CONTENT[k].notation})" for k in missing)
            raise UsageError(
                f"the embedding cache has no {names} (it holds {sorted(self.embeds)}); re-run 'hysac-eval embed' on "
                "a dataset that has those columns, or pick tasks that do not need them"
            )

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the cache atomically: a crash leaves the previous cache (or none), never a mix of two."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise UsageError(f"{directory} exists and is not a folder; pass a folder for the embedding cache")
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.embeds.items()}

        def write(folder: Path) -> None:
            save_file(tensors, folder / CACHE_FILE)
            meta = {
                "format": CACHE_FORMAT,
                "curvature": self.curvature,
                "bounds": self.bounds,
                "traversal_offset": self.traversal_offset,
                "unsafe_thresholds": self.unsafe_thresholds,
                "tags": self.tags,
                "logit_scale": self.logit_scale,
                "logit_bias": self.logit_bias,
                "num_rows": self.num_rows,
                "dim": self.dim,
                "kinds": sorted(tensors),
                "sha256": sha256_file(folder / CACHE_FILE),
                "source": self.source,
            }
            (folder / META_FILE).write_text(json.dumps(meta, indent=1))

        write_folder_atomically(directory, write)
        logger.info("Saved %d embedded rows (%s) to %s", self.num_rows, ", ".join(sorted(tensors)), directory)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> EmbeddingCache:
        """Read a cache written by :meth:`save`, refusing one whose parts do not match.

        Raises:
            UsageError: not a cache folder, a corrupt or foreign embeddings file, or metadata that disagrees with
                the matrices (row count, dimension, kinds, checksum, tags).
        """
        directory = Path(directory)
        if not (directory / CACHE_FILE).is_file() or not (directory / META_FILE).is_file():
            raise UsageError(
                f"{directory} is not an embedding cache (expected {CACHE_FILE} and {META_FILE}); "
                "create one with 'hysac-eval embed --model MODEL --dataset DATA --output DIR'"
            )
        try:
            meta = json.loads((directory / META_FILE).read_text())
        except json.JSONDecodeError as error:
            raise UsageError(f"{directory / META_FILE} is not valid JSON ({error}); re-create the cache") from None
        expected_sha = meta.get("sha256")
        if expected_sha is not None and sha256_file(directory / CACHE_FILE) != expected_sha:
            raise UsageError(
                f"{directory / CACHE_FILE} does not match its {META_FILE} (checksum differs): the folder mixes two "
                "caches or the file is corrupt; re-create it with 'hysac-eval embed'"
            )
        try:
            embeds = load_file(directory / CACHE_FILE)
        except Exception as error:  # safetensors raises its own error types for corrupt files
            raise UsageError(f"cannot read {directory / CACHE_FILE}: {error}; re-create the cache") from None
        for name, expected in (("num_rows", "rows"), ("dim", "dimension")):
            if name in meta and embeds:
                actual = next(iter(embeds.values())).shape[0 if name == "num_rows" else 1]
                if actual != meta[name]:
                    raise UsageError(
                        f"{directory}: {META_FILE} says {meta[name]} {expected} but {CACHE_FILE} has {actual}; "
                        "the parts do not belong together, re-create the cache"
                    )
        if "kinds" in meta and sorted(embeds) != sorted(meta["kinds"]):
            raise UsageError(
                f"{directory}: {META_FILE} lists {meta['kinds']} but {CACHE_FILE} holds {sorted(embeds)}; "
                "re-create the cache"
            )
        try:
            return cls(
                embeds=embeds,
                curvature=float(meta["curvature"] if "curvature" in meta else meta["curv"]),
                bounds=meta.get("bounds"),
                traversal_offset=float(meta.get("traversal_offset", meta.get("traversal_alpha", 0.8))),
                unsafe_thresholds=meta.get("unsafe_thresholds"),
                tags=meta.get("tags"),
                source=meta.get("source", {}),
                logit_scale=meta.get("logit_scale"),
                logit_bias=meta.get("logit_bias"),
            )
        except (KeyError, ValueError) as error:
            raise UsageError(f"{directory} is not a valid embedding cache: {error}") from None


# --------------------------------------------------------------------------------------------------------
# The encoder module
class QuadrupletEncoder(nn.Module):
    """One collated batch -> embeddings of each kind of content. What Accelerate wraps for training.

    Args:
        model: a `HySACModel`, or a `PeftModel` around one.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def hysac(self) -> nn.Module:
        """The `HySACModel` inside (through a `PeftModel` if there is one)."""
        return unwrap_hysac(self.model)

    def forward(
        self,
        pixel_values: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_kinds: Sequence[str] = ("V", "G"),
        text_kinds: Sequence[str] = ("S", "U"),
        check_inputs: bool = False,
        pixel_attention_mask: Tensor | None = None,
        spatial_shapes: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Encode `(k*B, 3, H, W)` images and `(m*B, L)` texts, stacked by kind (see `QuadrupletCollator`).

        SigLIP 2 NaFlex images come as `(k*B, N, 3 * p * p)` patches with their `pixel_attention_mask` and
        `spatial_shapes`, passed through.

        Returns:
            `{key: (B, D) float32}` for every key of `image_kinds` and `text_kinds`, plus the `()` tensors
            `curvature` (`c`, not its log), `logit_scale` (log) and, where the model has one, `logit_bias`, so that
            their gradients flow through `forward`.
        """
        hysac = self.hysac
        out: dict[str, Tensor] = {}
        if pixel_values is not None and image_kinds:
            embeddings = hysac.vision_model.embeddings  # CLIP's class embedding; SigLIP has none
            dtype = getattr(embeddings, "class_embedding", embeddings.patch_embedding.weight).dtype
            image = hysac.encode_image(
                pixel_values.to(dtype),
                pixel_attention_mask=pixel_attention_mask,
                spatial_shapes=spatial_shapes,
                check_inputs=check_inputs,
            )
            out.update(zip(image_kinds, image.chunk(len(image_kinds))))
        if input_ids is not None and text_kinds:
            text = hysac.encode_text(input_ids, attention_mask, check_inputs=check_inputs)
            out.update(zip(text_kinds, text.chunk(len(text_kinds))))
        out["curvature"] = hysac.curv.float().exp()
        out["logit_scale"] = hysac.logit_scale.float()
        if hysac.has_logit_bias:
            out["logit_bias"] = hysac.logit_bias.float()
        return out


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run in eval mode (LoRA dropout off) and give every submodule back its previous mode afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _unwrap(module: nn.Module) -> nn.Module:
    while hasattr(module, "module") and isinstance(module.module, nn.Module):  # DDP, FSDP, compile wrappers
        module = module.module
    return getattr(module, "_orig_mod", module)


def unwrap_hysac(model: nn.Module) -> nn.Module:
    """The `HySACModel` inside DDP/FSDP/compile wrappers and a `PeftModel`."""
    inner = _unwrap(model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def _as_encoder(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """`(callable encoder, HySACModel)` for a HySACModel, PeftModel, QuadrupletEncoder or a wrapped encoder."""
    inner = _unwrap(model)
    if isinstance(inner, QuadrupletEncoder):
        return model, inner.hysac
    encoder = QuadrupletEncoder(model)
    if not hasattr(encoder.hysac, "encode_image"):
        raise TypeError(
            f"expected a HySACModel (or a PeftModel/QuadrupletEncoder around one), got {type(model).__name__}"
        )
    return encoder, encoder.hysac


def _batches(n: int, batch_size: int) -> list[list[int]]:
    """Consecutive batches of row indices, the same whatever the number of processes."""
    return [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]


@torch.no_grad()
def _run(
    encoder: nn.Module,
    hysac: nn.Module,
    dataset,
    collate_fn,
    batch_size: int,
    num_workers: int,
    keys: Sequence[str],
    accelerator,
    desc: str,
    show_progress: bool,
    **forward_kwargs,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Encode `dataset` in consecutive batches; under `accelerator`, process `p` encodes batches `p, p + n, ...`.

    Every batch holds the same rows (and its texts the same padding) whatever the number of processes, so the
    gathered result equals a one-process run bit for bit; no row is duplicated or dropped.

    Returns:
        `({key: (N, D)}, {"curvature": c, "logit_scale": log scale[, "logit_bias": b]})`, the scalars as the forward
        passes used them.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    world = 1 if accelerator is None else accelerator.num_processes
    rank = 0 if accelerator is None else accelerator.process_index
    batches = _batches(len(dataset), batch_size)
    mine = batches[rank::world]
    # Every process runs the same number of forward passes (FSDP gathers weights inside each one): a process with
    # fewer batches repeats its last one and drops the result.
    calls = -(-len(batches) // world)
    padded = mine + [mine[-1] if mine else batches[0]] * (calls - len(mine))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=padded, collate_fn=collate_fn, num_workers=num_workers)
    device = next(hysac.parameters()).device
    parts: dict[str, list[Tensor]] = {key: [] for key in keys}
    scalars: dict[str, float] = {}
    is_main = accelerator is None or accelerator.is_local_main_process
    with eval_mode(encoder):
        # The bar shows on a terminal only (disable=None): in a log file its redraws would glue onto the next line.
        bar = tqdm(loader, desc=desc, disable=None if show_progress and is_main else True, leave=False)
        for step, batch in enumerate(bar):
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            out = encoder(**batch, **forward_kwargs)
            if step < len(mine):
                for key in keys:
                    parts[key].append(out[key].float())
            if not scalars:  # the values the forward pass used (whole, even when parameters are sharded)
                names = [name for name in ("curvature", "logit_scale", "logit_bias") if name in out]
                scalars = {name: float(out[name].detach().reshape(-1)[0]) for name in names}
    dim = hysac.config.projection_dim
    local = {key: torch.cat(v) if v else torch.zeros(0, dim, device=device) for key, v in parts.items()}
    if world > 1:
        local = _gather_in_order(local, batches, world, accelerator)
    result = {key: value.cpu() for key, value in local.items()}
    bad = {key: int((~torch.isfinite(v).all(dim=-1)).sum()) for key, v in result.items()}
    bad = {k: n for k, n in bad.items() if n}
    if bad:
        raise ValueError(
            "the model produced NaN/Inf embeddings for "
            + ", ".join(f"{n} {CONTENT[k].name} rows" for k, n in bad.items())
            + "; check the weights (a diverged training run?) and the inputs"
        )
    return result, scalars


def _gather_in_order(local: dict[str, Tensor], batches: list[list[int]], world: int, accelerator) -> dict[str, Tensor]:
    """All processes' rows in dataset order (process `p` holds batches `p, p + world, ...`, concatenated)."""
    counts = [sum(len(b) for b in batches[p::world]) for p in range(world)]
    most = max(counts)
    out = {}
    for key, rows in local.items():
        padded = torch.cat([rows, rows.new_zeros(most - rows.shape[0], rows.shape[1])])
        gathered = accelerator.gather(padded.contiguous()).reshape(world, most, -1)
        per_process = [gathered[p, : counts[p]].split([len(b) for b in batches[p::world]]) for p in range(world)]
        out[key] = torch.cat([per_process[k % world][k // world] for k in range(len(batches))])
    return out


# --------------------------------------------------------------------------------------------------------
# Public entry points
def encode_quadruplets(
    model: nn.Module,
    processor,
    dataset,
    kinds: Sequence[str] | None = None,
    tag_column: str | None = "tag",
    image_root: str | os.PathLike | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    accelerator=None,
    show_progress: bool = True,
    source: Mapping[str, Any] | None = None,
) -> EmbeddingCache:
    """Embed the kinds of content of a quadruplet dataset (canonical columns, see `hysac_hf.data`).

    Args:
        model: a `HySACModel`, a `PeftModel` around one, or a `QuadrupletEncoder` (possibly wrapped by
            Accelerate, as in training). Its training mode is restored afterwards; it is not moved.
        processor: its `HySACProcessor`.
        dataset: a `datasets.Dataset` (or any indexable of row dicts) with canonical columns.
        kinds: the kinds to embed (keys, columns or notations); default: every kind whose column is present.
        tag_column: category column kept for per-category breakdowns (None: no tags).
        image_root: folder that relative image paths are resolved against.
        batch_size: quadruplets per forward pass (per process).
        num_workers: DataLoader workers that decode and preprocess.
        accelerator: an `accelerate.Accelerator`; with several processes each embeds its share.
        show_progress: tqdm bar (main process only).
        source: description stored in the cache.
    Returns:
        an :class:`EmbeddingCache` (on every process), rows in dataset order.
    """
    if len(dataset) == 0:
        raise UsageError("the dataset is empty; nothing to embed")
    columns = getattr(dataset, "column_names", None) or list(dataset[0])
    if kinds is None:
        chosen = [k for k in CONTENT_KINDS if k.column in columns]
        if not chosen:
            raise UsageError(
                f"the dataset has none of the columns {[k.column for k in CONTENT_KINDS]} (it has {columns}); "
                "map yours with --columns SOURCE=KIND"
            )
    else:
        chosen = [content_kind(k) for k in kinds]
        missing = [k.column for k in chosen if k.column not in columns]
        if missing:
            raise UsageError(f"the dataset lacks column(s) {missing}; it has {columns}")
    encoder, hysac = _as_encoder(model)
    collator = QuadrupletCollator(processor, [k.key for k in chosen], image_root=image_root)
    embeds, scalars = _run(
        encoder,
        hysac,
        dataset,
        collator,
        batch_size,
        num_workers,
        [k.key for k in collator.kinds],
        accelerator,
        "Embedding quadruplets",
        show_progress,
        image_kinds=collator.image_kinds,
        text_kinds=collator.text_kinds,
    )
    tags = None
    if tag_column is not None and tag_column in columns:
        tags = [str(t) for t in dataset[tag_column]]
    config = hysac.config
    return EmbeddingCache(
        embeds=embeds,
        curvature=scalars["curvature"],
        logit_scale=scalars["logit_scale"],
        logit_bias=scalars.get("logit_bias"),
        bounds=config.bounds,
        traversal_offset=float(config.traversal_offset),
        unsafe_thresholds=config.unsafe_thresholds,
        tags=tags,
        source=dict(source or {}, model=str(getattr(hysac, "name_or_path", "") or "")),
    )


class _Column(torch.utils.data.Dataset):
    """One column of a `datasets.Dataset` as items (decoded lazily, row by row)."""

    def __init__(self, dataset, column: str):
        if column not in dataset.column_names:
            raise UsageError(f"the dataset has no column {column!r}; it has {dataset.column_names}")
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index][self.column]


def _encode_items(
    model, processor, items, modality: str, column, batch_size, num_workers, image_root, accelerator, show_progress
) -> Tensor:
    if column is not None:
        items = _Column(items, column)
    elif isinstance(items, (str, bytes)) or not hasattr(items, "__len__"):
        raise UsageError(f"expected a list of {modality}s, got {type(items).__name__}")
    if len(items) == 0:
        raise UsageError(f"no {modality}s to embed")
    encoder, hysac = _as_encoder(model)
    collator = ItemCollator(processor, modality, image_root=image_root)
    key = "V" if modality == "image" else "S"  # the encoder names one batch of a single modality by its safe kind
    kinds = (
        {"image_kinds": (key,), "text_kinds": ()} if modality == "image" else {"image_kinds": (), "text_kinds": (key,)}
    )
    embeds, _ = _run(
        encoder,
        hysac,
        items,
        collator,
        batch_size,
        num_workers,
        [key],
        accelerator,
        f"Embedding {modality}s",
        show_progress,
        **kinds,
    )
    return embeds[key]


def encode_images(
    model: nn.Module,
    processor,
    images,
    column: str | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    image_root: str | os.PathLike | None = None,
    accelerator=None,
    show_progress: bool = True,
) -> Tensor:
    """Embed images: PIL images, numpy arrays, paths or `datasets.Image` values.

    Args:
        images: a sequence of images, or a `datasets.Dataset` with `column` naming the image column.
        column: the image column when `images` is a dataset.
        batch_size, num_workers, image_root, accelerator, show_progress: as in :func:`encode_quadruplets`.
    Returns:
        `(N, D)` float32 hyperboloid space components on the CPU, in input order.
    """
    return _encode_items(
        model, processor, images, "image", column, batch_size, num_workers, image_root, accelerator, show_progress
    )


def encode_texts(
    model: nn.Module,
    processor,
    texts,
    column: str | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    accelerator=None,
    show_progress: bool = True,
) -> Tensor:
    """Embed texts, padded to the longest text of each batch.

    Args:
        texts: a sequence of strings, or a `datasets.Dataset` with `column` naming the text column.
    Returns:
        `(N, D)` float32 hyperboloid space components on the CPU, in input order.
    """
    return _encode_items(
        model, processor, texts, "text", column, batch_size, num_workers, None, accelerator, show_progress
    )


__all__ = [
    "EmbeddingCache",
    "QuadrupletEncoder",
    "encode_images",
    "encode_quadruplets",
    "encode_texts",
    "eval_mode",
    "unwrap_hysac",
]
