"""The saved gallery index folder, format 1: writing it, reading it back, and checking it against a model.

```
index_dir/
  index.json              {"format": 1, "modality": "image"|"text", "count": N, "dim": D, "curvature": c,
                           "model": name_or_path, "model_probe": [[...], [...]],
                           "faiss": {"type": "ivf", "params": {...}, "sha256": ...} or null,
                           "embeddings_sha256": ..., "metadata": "metadata.jsonl",
                           "bounds": {"S"|"V"|"U"|"G": {"avg", "up_95", "low_05"}} or null,
                           "traversal_offset": float or null}
  embeddings.safetensors  {"embeddings": (N, D) float32 hyperboloid space components, row i = item i}
  metadata.jsonl          one JSON object per item, row i = item i
  faiss.index             only when "faiss" is not null: faiss.write_index of the search structure over
                          mips_pool_vectors(embeddings, curvature) (queries: mips_query_vectors)
```

`"faiss": null` means exact search (a flat inner-product index is cheap to rebuild from the embeddings, so it is
not stored). `"bounds"` and `"traversal_offset"` are the embedding model's `config.bounds` and
`config.traversal_offset` at build time (what the `redirect` policy needs when no model is at hand);
`faiss.sha256` guards the FAISS file as `embeddings_sha256` guards the embeddings.

`model_probe` fingerprints the embedding model: `encode_text` of :data:`PROBE_TEXTS` (rounded to 6 decimals). A
reader holding a model recomputes it and refuses an index built with another model (max abs difference above
`PROBE_TOLERANCE * (1 + max abs stored value)`) or another curvature (relative difference above
`CURVATURE_TOLERANCE`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..cli import UsageError
from ..modeling.configuration_hysac import MODALITIES, validate_bounds

logger = logging.getLogger(__name__)

INDEX_FORMAT = 1
INDEX_FILE = "index.json"
EMBEDDINGS_FILE = "embeddings.safetensors"
EMBEDDINGS_KEY = "embeddings"
METADATA_FILE = "metadata.jsonl"
FAISS_FILE = "faiss.index"
PROBE_TEXTS = ("a photo of a cat", "an empty street at night")
PROBE_DECIMALS = 6
PROBE_TOLERANCE = 1e-3  # max abs difference allowed: PROBE_TOLERANCE * (1 + max abs value); device/dtype noise
CURVATURE_TOLERANCE = 1e-5  # relative
REBUILD_HINT = (
    "rebuild the index with this model ('hysac-index build --model MODEL ...'), or load the model that built it"
)
REQUIRED_FIELDS = ("format", "modality", "count", "dim", "curvature", "model_probe", "embeddings_sha256")


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _corrupt(folder: Path, problem: str) -> UsageError:
    return UsageError(
        f"the gallery index {folder} is corrupt: {problem}; rebuild it with 'hysac-index build' or restore a copy"
    )


def _number(value: Any, name: str, folder: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _corrupt(folder, f"{INDEX_FILE} field {name!r} = {value!r} is not a finite number")
    return float(value)


def read_index_json(folder: str | os.PathLike) -> dict[str, Any]:
    """`index.json` of a gallery index folder, with its fields checked (types and ranges, not the other files).

    Raises:
        UsageError: not an index folder, unreadable JSON, another format, or a missing or malformed field.
    """
    folder = Path(folder)
    path = folder / INDEX_FILE
    if not path.is_file():
        raise UsageError(
            f"{folder} is not a gallery index (no {INDEX_FILE}); build one with "
            "'hysac-index build --model MODEL --images DIR --output INDEX_DIR'"
        )
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _corrupt(folder, f"{INDEX_FILE} is not readable JSON ({error})") from None
    if not isinstance(info, dict):
        raise _corrupt(folder, f"{INDEX_FILE} holds a {type(info).__name__}, not an object")
    missing = [key for key in REQUIRED_FIELDS if key not in info]
    if missing:
        raise _corrupt(folder, f"{INDEX_FILE} lacks {missing}")
    if info["format"] != INDEX_FORMAT:
        raise UsageError(
            f"the gallery index {folder} has format {info['format']!r}; this hysac_hf reads format {INDEX_FORMAT}: "
            "rebuild it with 'hysac-index build', or install the hysac_hf that wrote it"
        )
    if info["modality"] not in MODALITIES:
        raise _corrupt(folder, f"modality {info['modality']!r} is not one of {list(MODALITIES)}")
    for name in ("count", "dim"):
        value = info[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _corrupt(folder, f"{INDEX_FILE} field {name!r} = {value!r} is not a non-negative integer")
    if _number(info["curvature"], "curvature", folder) <= 0:
        raise _corrupt(folder, f"curvature {info['curvature']} is not positive")
    probe = info["model_probe"]
    if probe is not None:
        try:
            probe_tensor = torch.as_tensor(probe, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise _corrupt(folder, "model_probe is not a list of lists of numbers") from None
        if probe_tensor.shape != (len(PROBE_TEXTS), info["dim"]) or not bool(torch.isfinite(probe_tensor).all()):
            raise _corrupt(
                folder,
                f"model_probe has shape {tuple(probe_tensor.shape)}, expected ({len(PROBE_TEXTS)}, {info['dim']}) "
                "finite numbers",
            )
    faiss_info = info.get("faiss")
    if faiss_info is not None and (
        not isinstance(faiss_info, dict)
        or not isinstance(faiss_info.get("type"), str)
        or not isinstance(faiss_info.get("params", {}), dict)
    ):
        raise _corrupt(folder, f"{INDEX_FILE} field 'faiss' = {faiss_info!r} is not {{'type': str, 'params': {{}}}}")
    if info.get("metadata") is not None and (
        not isinstance(info["metadata"], str) or Path(info["metadata"]).name != info["metadata"]
    ):
        raise _corrupt(folder, f"{INDEX_FILE} field 'metadata' = {info['metadata']!r} is not a file name")
    try:
        info["bounds"] = validate_bounds(info.get("bounds"))
    except ValueError as error:
        raise _corrupt(folder, f"its bounds are invalid: {error}") from None
    if info.get("traversal_offset") is not None:
        info["traversal_offset"] = _number(info["traversal_offset"], "traversal_offset", folder)
    return info


def load_index_folder(folder: str | os.PathLike) -> tuple[Tensor, dict[str, Any], list[dict[str, Any]]]:
    """Read a gallery index folder (format 1) and check that its parts belong together. Needs no FAISS, no model.

    Checks, in order: `index.json` (:func:`read_index_json`: format 1, every required field well-typed, bounds
    valid), `embeddings.safetensors` present with the SHA-256 recorded in `embeddings_sha256`, holding one
    float32 tensor `"embeddings"` of shape `(count, dim)` with finite values, `count >= 1`, and the metadata
    file (`metadata.jsonl`, named by the `"metadata"` field) holding exactly `count` lines, each a JSON object.
    A missing `"metadata"` field (or null) gives `count` empty objects. `faiss.index` is not read here: a reader
    that uses it checks `faiss.sha256` and that `faiss.read_index(...)` has `ntotal == count` and `d == dim + 1`.

    Args:
        folder: the index folder.
    Returns:
        `(embeddings, info, metadata_rows)`: the `(count, dim)` float32 embeddings, the parsed `index.json`, and
        `count` metadata dicts (row `i` describes item `i`).
    Raises:
        UsageError: not an index folder, or a corrupt one (what is wrong, and to rebuild it).
    """
    from safetensors import safe_open

    folder = Path(folder)
    info = read_index_json(folder)
    path = folder / EMBEDDINGS_FILE
    if not path.is_file():
        raise _corrupt(folder, f"{EMBEDDINGS_FILE} is missing")
    if sha256_file(path) != info["embeddings_sha256"]:
        raise _corrupt(folder, f"the SHA-256 of {EMBEDDINGS_FILE} differs from the one in {INDEX_FILE}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            if keys != [EMBEDDINGS_KEY]:
                raise _corrupt(folder, f"{EMBEDDINGS_FILE} holds {keys}, expected only {EMBEDDINGS_KEY!r}")
            embeddings = handle.get_tensor(EMBEDDINGS_KEY)
    except UsageError:
        raise
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for unreadable files
        raise _corrupt(folder, f"{EMBEDDINGS_FILE} is not readable ({type(error).__name__}: {error})") from None
    count, dim = info["count"], info["dim"]
    if tuple(embeddings.shape) != (count, dim) or embeddings.dtype != torch.float32:
        raise _corrupt(
            folder,
            f"the embeddings are {tuple(embeddings.shape)} {embeddings.dtype}, {INDEX_FILE} says ({count}, {dim}) "
            "float32",
        )
    if count == 0:
        raise UsageError(f"the gallery index {folder} is empty (0 items); build it from at least one item")
    if not bool(torch.isfinite(embeddings).all()):
        raise _corrupt(folder, "the embeddings contain NaN or infinite values")
    metadata = read_metadata(folder, info.get("metadata"), count)
    return embeddings, info, metadata


def read_metadata(folder: Path, name: str | None, count: int) -> list[dict[str, Any]]:
    if name is None:
        return [{} for _ in range(count)]
    path = folder / name
    if not path.is_file():
        raise _corrupt(folder, f"its metadata file {name} is missing")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise _corrupt(folder, f"{name} is not readable UTF-8 text ({error})") from None
    if len(lines) != count:
        raise _corrupt(folder, f"{name} has {len(lines)} lines for {count} items")
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise _corrupt(folder, f"line {number} of {name} is not JSON ({error})") from None
        if not isinstance(row, dict):
            raise _corrupt(folder, f"line {number} of {name} is not a JSON object")
        rows.append(row)
    return rows


def metadata_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One JSON line per metadata row (strict JSON: NaN/Infinity refused).

    Raises:
        UsageError: a row that is not a dict or holds a value JSON cannot represent (naming the row).
    """
    lines = []
    for number, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UsageError(f"metadata row {number} is a {type(row).__name__}; each item's metadata must be a dict")
        try:
            lines.append(json.dumps(row, ensure_ascii=False, allow_nan=False))
        except (TypeError, ValueError) as error:
            raise UsageError(
                f"metadata row {number} is not JSON-serialisable ({error}); keep strings, numbers, booleans, None, "
                "lists and dicts of them"
            ) from None
    return lines


# ------------------------------------------------------------------------------------------------------------
# The model probe
def model_probe(model, processor) -> list[list[float]]:
    """`encode_text` of :data:`PROBE_TEXTS` through the library's embedding path, rounded to 6 decimals.

    Returns:
        `len(PROBE_TEXTS)` lists of `D` floats.
    """
    from ..encode import encode_texts

    probe = encode_texts(model, processor, list(PROBE_TEXTS), show_progress=False)
    return [[round(float(v), PROBE_DECIMALS) for v in row] for row in probe.double().tolist()]


def check_model(info: dict[str, Any], model, processor, folder: str | os.PathLike = "the gallery index") -> None:
    """Refuse a model other than the one that embedded the index: dimension, curvature, then the probe.

    Args:
        info: the parsed `index.json`.
    Raises:
        UsageError: saying which check failed and what to do.
    """
    built_with = info.get("model") or "another model"
    dim = int(model.config.projection_dim)
    if dim != info["dim"]:
        raise UsageError(
            f"the gallery index {folder} holds {info['dim']}-dimensional embeddings (built with {built_with}); this "
            f"model embeds in {dim} dimensions; {REBUILD_HINT}"
        )
    curvature = float(model.curvature.detach())
    if abs(float(info["curvature"]) - curvature) > CURVATURE_TOLERANCE * curvature:
        raise UsageError(
            f"the gallery index {folder} was embedded at curvature {info['curvature']} (by {built_with}), this model's "
            f"curvature is {curvature}: distances between the two are meaningless; {REBUILD_HINT}"
        )
    if info.get("model_probe") is None:
        logger.warning(
            "The gallery index %s has no model probe (built from embeddings without a model): only its dimension "
            "and curvature could be checked against this model.",
            folder,
        )
        return
    stored = torch.as_tensor(info["model_probe"], dtype=torch.float64)
    probe = torch.as_tensor(model_probe(model, processor), dtype=torch.float64)
    difference = float((stored - probe).abs().max())
    if difference > PROBE_TOLERANCE * (1 + float(stored.abs().max())):
        raise UsageError(
            f"the gallery index {folder} was embedded by {built_with}, not by this model (its probe embeddings differ "
            f"by up to {difference:.3g}); {REBUILD_HINT}"
        )


__all__ = [
    "CURVATURE_TOLERANCE",
    "EMBEDDINGS_FILE",
    "EMBEDDINGS_KEY",
    "FAISS_FILE",
    "INDEX_FILE",
    "INDEX_FORMAT",
    "METADATA_FILE",
    "PROBE_TEXTS",
    "PROBE_TOLERANCE",
    "check_model",
    "load_index_folder",
    "metadata_lines",
    "model_probe",
    "read_index_json",
    "sha256_file",
]
