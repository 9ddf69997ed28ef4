"""HySAC's two `transformers` pipelines: `unsafe-content-detection` and `safe-retrieval`.

Ships to the Hub as remote code beside the weights (torch + transformers, with safetensors and Pillow, which
transformers' image pipelines need anyway). `HySACModel.save_pretrained` declares both tasks in
`config.custom_pipelines` (see :func:`custom_pipelines`), so every saved or converted HySAC folder loads them
with `trust_remote_code=True` alone, where `hysac_hf` is not installed:

    detector = pipeline("unsafe-content-detection", model=FOLDER_OR_REPO_ID, trust_remote_code=True)
    detector(image)                      # {"label": "unsafe"|"safe", "score": d, "threshold": t, "modality": "image"}
    detector(text=["...", "..."])        # one dict per text

    retriever = pipeline("safe-retrieval", model=FOLDER_OR_REPO_ID, trust_remote_code=True)
    retriever("a query", gallery=images, top_k=5, policy="redirect")
    # {"redirected": bool, "query_distance_to_root": d, "search_distance_to_root": d', "results": [...]}

Both use the model's own methods (`encode_image`, `encode_text`, `distance_to_root`, `traverse_to_safe`,
`traversal_threshold`): the maths lives in `modeling_hysac.py` only. Images go through the folder's
`HySACProcessor`, the one reading of a picture (transparency over white, 16-bit and float pictures to 8 bits,
then CLIP's image processor); texts through its CLIP tokenizer, truncated to the text tower's length and padded
to the longest text of each batch.

This file imports only siblings that `modeling_hysac.py` imports itself (it imports this file so that
transformers ships it): transformers 4 copies a local folder's remote code one import deep, so a sibling that
only this file needed would be missing when `AutoModel` loads the folder.

Retrieval ranks by Lorentz distance computed in float64 on the CPU, nearest first, equal distances in gallery
order: the same ranking as a brute-force float64 search.

The saved gallery index folder (format 1) is defined here, once: its file names, fields, model probe and
tolerances, and its readers, which need no `hysac_hf`: :func:`read_index_folder` checks the folder's parts without a
model (`index.json` fields, checksum, shapes, finite values, metadata lines), :func:`check_index_model` checks a
model against it (dimension, curvature, probe), :func:`read_faiss_index` reads its optional FAISS file, and
:func:`load_gallery_index` composes them for the pipeline. `hysac_hf.index` writes the folder and reads it through
these functions (turning their `ValueError` into its `UsageError`).

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

`"faiss": null` means exact search. `"bounds"` and `"traversal_offset"` are the embedding model's `config.bounds`
and `config.traversal_offset` at build time (what the `redirect` policy needs when no model is at hand);
`faiss.sha256` guards the FAISS file as `embeddings_sha256` guards the embeddings. `model_probe` fingerprints the
embedding model: `encode_text` of `PROBE_TEXTS`, rounded to `PROBE_DECIMALS` decimals. A reader holding a model
recomputes it and refuses an index built with another model (max abs difference above
`PROBE_TOLERANCE * (1 + max abs stored value)`) or another curvature (relative difference above
`CURVATURE_TOLERANCE`).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor
from transformers import Pipeline
from transformers.utils import logging

from .configuration_hysac import BOUND_STATS, MODALITIES, validate_bounds
from .lorentz import mips_query_vectors, pairwise_dist
from .traversal import METHODS

try:
    from PIL import Image
except ImportError:  # pragma: no cover - transformers' image processors need Pillow anyway
    Image = None

logger = logging.get_logger(__name__)

DETECTION_TASK = "unsafe-content-detection"
RETRIEVAL_TASK = "safe-retrieval"
POLICIES = ("redirect", "retain")
DEFAULT_GALLERY_BATCH_SIZE = 32
# Gallery rows ranked at once: a (queries, RANK_CHUNK) float64 block of distances.
RANK_CHUNK = 65_536

# The saved gallery index folder, format 1: defined here, once. hysac_hf.index writes it and reads it through the
# functions below (wrapping their ValueError in its UsageError); the pipeline reads it with load_gallery_index.
INDEX_FORMAT = 1
INDEX_FILE = "index.json"
EMBEDDINGS_FILE = "embeddings.safetensors"
EMBEDDINGS_KEY = "embeddings"
METADATA_FILE = "metadata.jsonl"
FAISS_FILE = "faiss.index"
REQUIRED_FIELDS = ("format", "modality", "count", "dim", "curvature", "model_probe", "embeddings_sha256")
# The model probe: `encode_text` of these texts identifies the model that embedded a gallery.
PROBE_TEXTS = ("a photo of a cat", "an empty street at night")
PROBE_DECIMALS = 6  # the writer rounds the stored probe to this many decimals
PROBE_TOLERANCE = 1e-3  # max abs difference allowed: PROBE_TOLERANCE * (1 + max abs value); device/dtype noise
CURVATURE_TOLERANCE = 1e-5  # relative
REBUILD_HINT = (
    "rebuild the index with this model (`hysac-index build --model MODEL ...`), or load the model that built it"
)
RERANK_MARGIN = 8  # FAISS candidates fetched beyond top_k: its float32 scores may order near-ties differently

CALIBRATE_HINT = (
    "calibrate one on labelled data with `hysac-eval classify --model FOLDER --modality {modality} "
    "--calibrate accuracy --save` (with --images DIR holding safe/ and unsafe/ sub-folders, or --cache CACHE), "
    "which stores it in config.unsafe_thresholds, or pass threshold=<distance to the root>"
)


# ------------------------------------------------------------------------------------------------------------
# Registration
def custom_pipelines() -> dict[str, dict[str, Any]]:
    """The `config.custom_pipelines` entries that `pipeline(task, model=..., trust_remote_code=True)` resolves.

    `impl` is `"<module>.<class>"` in the model folder (fetched with `get_class_from_dynamic_module`); `pt` names
    transformers auto classes, looked up with `getattr(transformers, name)` on both transformers lines; transformers
    4 also reads `tf` (empty). No `default`: transformers only reads it when no model is given, and its format differs
    between the lines (`{"model": {"pt": (id, rev)}}` on 4, `{"model": (id, rev)}` on 5).
    """
    module = __name__.split(".")[-1]
    return {
        task: {"impl": f"{module}.{cls.__name__}", "pt": ["AutoModel"], "tf": [], "type": "multimodal"}
        for task, cls in ((DETECTION_TASK, UnsafeContentDetectionPipeline), (RETRIEVAL_TASK, SafeRetrievalPipeline))
    }


# ------------------------------------------------------------------------------------------------------------
# Inputs
def _is_image(value: Any) -> bool:
    return (Image is not None and isinstance(value, Image.Image)) or isinstance(value, np.ndarray)


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def load_image_input(image: Any) -> Any:
    """One image input -> a PIL image or numpy array for `HySACProcessor` (which reads every mode and dtype).

    Accepts a PIL image or a numpy array (returned as they are), the path of an image file (opened as it is, as
    `hysac_hf`'s embedding path opens files, so a transparent PNG reads the same through both), or an http(s) URL or
    base64 string (fetched by transformers' `load_image`, as its image pipelines do; it returns RGB).

    Raises:
        ValueError: naming the input and what is accepted.
    """
    if _is_image(image):
        return image
    if isinstance(image, (str, os.PathLike)):
        source = os.fspath(image)
        if os.path.isfile(source):
            try:
                with Image.open(source) as opened:
                    opened.load()  # decode now: a truncated file fails here, naming the file
                    return opened
            except OSError as error:
                raise ValueError(f"cannot decode image {source}: {error}; re-export or remove it") from None
        from transformers.image_utils import load_image

        try:
            return load_image(source)
        except Exception as error:  # noqa: BLE001 - decoding, base64 and HTTP client errors alike
            raise ValueError(
                f"{_describe(source)} is not an image file, an http(s) URL or a base64 image ({error}); pass a path, "
                "a URL, a PIL image or a numpy array. To classify texts, call the pipeline with text=..."
            ) from None
    raise ValueError(
        f"cannot read an image from a {type(image).__name__}; pass a PIL image, a numpy array (H, W, C), a file path "
        "or an http(s) URL (texts go in text=...)"
    )


def _as_list(inputs: Any, what: str) -> tuple[list, bool]:
    """`inputs` as a non-empty list, and whether it was a list (a batch) rather than one item."""
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise ValueError(f"{what} is an empty list; pass at least one")
        return list(inputs), True
    return [inputs], False


def _check_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name}={value!r} must be a finite number (a distance to the root)")
    return float(value)


class _HySACPipeline(Pipeline):
    """What both pipelines share: the processor `pipeline()` loads, and turning inputs into HySAC embeddings."""

    # pipeline() loads the folder's HySACProcessor (AutoProcessor); Pipeline.__init__ then takes its tokenizer and
    # image processor, which batching pads and concatenates with.
    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        missing = [
            name for name in ("encode_image", "encode_text", "distance_to_root") if not hasattr(self.model, name)
        ]
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs a HySAC model, got {type(self.model).__name__} (no {', '.join(missing)}); "
                "load a HySAC folder with trust_remote_code=True"
            )

    @property
    def max_text_length(self) -> int:
        """Tokens per text: the tokenizer's limit, at most what the text tower takes (77 for CLIP)."""
        limit = self.model.config.text_config.max_position_embeddings
        length = getattr(self.tokenizer, "model_max_length", limit)
        return min(length, limit) if 0 < length else limit

    def _check_processors(self, modality: str) -> None:
        needed = self.processor if modality == "image" else self.tokenizer
        if needed is None:
            name = "processor (a HySACProcessor)" if modality == "image" else "tokenizer"
            raise ValueError(
                f"this pipeline has no {name}, so it cannot read {modality}s; save the HySACProcessor beside the model "
                "(processor.save_pretrained(FOLDER)) or pass processor=..."
            )

    def _prepare(self, items: list, modality: str, padding: bool) -> dict[str, Tensor]:
        """Images or texts -> model inputs (`pixel_values`, or `input_ids` + `attention_mask`)."""
        if modality == "image":
            images = [load_image_input(item) for item in items]
            pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
            return {"pixel_values": pixel_values.to(self.dtype)}
        encoding = self.tokenizer(
            list(items), padding=padding, truncation=True, max_length=self.max_text_length, return_tensors="pt"
        )
        return {"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"]}

    def _encode(self, model_inputs: dict[str, Tensor]) -> Tensor:
        """Model inputs -> `(B, D)` float32 hyperboloid embeddings, with the model's own encoders."""
        if "pixel_values" in model_inputs:
            return self.model.encode_image(model_inputs["pixel_values"])
        return self.model.encode_text(model_inputs["input_ids"], model_inputs.get("attention_mask"))

    def preprocess(self, item: Any, _modality: str = "image") -> dict[str, Tensor]:
        return self._prepare([item], _modality, padding=False)

    def embed(self, items: list, modality: str, batch_size: int = DEFAULT_GALLERY_BATCH_SIZE) -> Tensor:
        """Embed images or texts in batches (texts padded to the longest of each batch).

        Returns:
            `(N, D)` float32 hyperboloid space components on the CPU, in input order.
        """
        self._check_processors(modality)
        chunks = []
        with self.device_placement(), torch.no_grad():
            for start in range(0, len(items), batch_size):
                inputs = self._prepare(items[start : start + batch_size], modality, padding=True)
                inputs = self._ensure_tensor_on_device(inputs, device=self.device)
                chunks.append(self._encode(inputs).float().cpu())
        return torch.cat(chunks)


# ------------------------------------------------------------------------------------------------------------
# unsafe-content-detection
class UnsafeContentDetectionPipeline(_HySACPipeline):
    """Unsafe-content detection: a text or an image is unsafe when its distance to the root exceeds a threshold.

    `detector(images)` takes one image (PIL image, numpy array, path or URL) or a list of them;
    `detector(text=...)` one text or a list (lists, not generators or datasets: each call checks all its inputs
    before it runs the model). One input gives one dict, a list gives a list, each
    `{"label": "unsafe" | "safe", "score": distance to the root, "threshold": t, "modality": "image" | "text"}`.

    Args (at construction or per call):
        threshold: distance to the root above which content is unsafe. Default: the model's calibrated
            `config.unsafe_thresholds[modality]`; a model without one is an error that says how to calibrate.
        batch_size: inputs per forward pass.
    """

    def __call__(self, inputs: Any = None, *, text: Any = None, **kwargs):
        if "_modality" in kwargs:
            raise TypeError("_modality is set by the pipeline; pass images positionally or texts as text=...")
        if (inputs is None) == (text is None):
            raise ValueError(
                "pass images as detector(images) or texts as detector(text=...); "
                + ("got both" if inputs is not None else "got neither")
            )
        modality = "image" if text is None else "text"
        items, is_batch = _as_list(inputs if text is None else text, "images" if text is None else "text")
        if modality == "text":
            bad = [i for i, item in enumerate(items) if not isinstance(item, str)]
            if bad:
                raise ValueError(
                    f"text[{bad[0]}] is a {type(items[bad[0]]).__name__}, not a string; pass images positionally"
                )
        else:
            bad = [i for i, item in enumerate(items) if not (_is_image(item) or isinstance(item, (str, os.PathLike)))]
            if bad:
                raise ValueError(
                    f"image {bad[0]} is a {type(items[bad[0]]).__name__}; pass PIL images, numpy arrays, file paths or "
                    "URLs (texts go in text=...)"
                )
        self._check_processors(modality)
        batch_size = kwargs.pop("batch_size", None)
        num_workers = kwargs.pop("num_workers", None)
        _, _, post = self._sanitize_parameters(**kwargs)
        threshold = {**self._postprocess_params, **post}.get("threshold")
        threshold = self.threshold(modality) if threshold is None else threshold
        results = super().__call__(
            items, batch_size=batch_size, num_workers=num_workers, _modality=modality, threshold=threshold
        )
        return results if is_batch else results[0]

    def threshold(self, modality: str) -> float:
        """The model's calibrated unsafe threshold for `"image"` or `"text"`.

        Raises:
            ValueError: when the model has none, saying how to calibrate it.
        """
        thresholds = getattr(self.model.config, "unsafe_thresholds", None) or {}
        if modality not in thresholds:
            raise ValueError(
                f"this model has no calibrated unsafe threshold for {modality}s (config.unsafe_thresholds = "
                f"{thresholds or None}); " + CALIBRATE_HINT.format(modality=modality)
            )
        return float(thresholds[modality])

    def _sanitize_parameters(self, _modality: str | None = None, threshold: Any = None, **unknown):
        if unknown:
            raise TypeError(
                f"{DETECTION_TASK} got unexpected arguments {sorted(unknown)}; it takes threshold= and batch_size="
            )
        preprocess, postprocess = {}, {}
        if _modality is not None:
            preprocess["_modality"] = postprocess["_modality"] = _modality
        if threshold is not None:
            postprocess["threshold"] = _check_number(threshold, "threshold")
        return preprocess, {}, postprocess

    def _forward(self, model_inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"distance": self.model.distance_to_root(self._encode(model_inputs))}

    def postprocess(self, model_outputs: dict[str, Tensor], _modality: str = "image", threshold: float | None = None):
        distance = float(model_outputs["distance"].reshape(-1)[0])
        return {
            "label": "unsafe" if distance > threshold else "safe",
            "score": distance,
            "threshold": float(threshold),
            "modality": _modality,
        }


# ------------------------------------------------------------------------------------------------------------
# Galleries
@dataclass
class Gallery:
    """A gallery to search: `(N, D)` float32 hyperboloid embeddings on the CPU, their modality, and optionally one
    metadata dict per row and the path of a FAISS index over them (from a saved index folder)."""

    embeddings: Tensor
    modality: str
    metadata: list[dict] | None = None
    faiss_path: str | None = None
    faiss_info: dict | None = None
    faiss_index: Any = field(default=None, repr=False)  # read on first use
    source: str = "embeddings"

    def __len__(self) -> int:
        return self.embeddings.shape[0]


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks, as a hex string."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _corrupt(folder: Path, problem: str) -> ValueError:
    return ValueError(
        f"the gallery index {folder} is corrupt: {problem}; rebuild it with `hysac-index build` or restore a copy"
    )


def _first_line(error: BaseException) -> str:
    """The first line of an error message (FAISS errors carry a C++ stack)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _finite_number(value: Any, name: str, folder: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _corrupt(folder, f"{INDEX_FILE} field {name!r} = {value!r} is not a finite number")
    return float(value)


def read_index_json(folder: str | os.PathLike) -> dict[str, Any]:
    """`index.json` of a gallery index folder, with its fields checked (types and ranges, not the other files).

    Checks: format 1; every field of `REQUIRED_FIELDS`; `modality` one of `MODALITIES`; `count` and `dim`
    non-negative integers; `curvature` finite and positive; `model_probe` null or `(len(PROBE_TEXTS), dim)` finite
    numbers; `faiss` null or `{"type": str, "params": {...}}`; `metadata` null or a plain file name; `bounds`
    (:func:`validate_bounds`, returned as floats) and `traversal_offset` (a finite number) when present.

    Raises:
        ValueError: not an index folder, unreadable JSON, another format, or a missing or malformed field.
    """
    folder = Path(folder)
    path = folder / INDEX_FILE
    if not path.is_file():
        raise ValueError(
            f"{folder} is not a saved gallery index (no {INDEX_FILE}); build one with "
            "`hysac-index build --model MODEL --images DIR --output INDEX_DIR`"
        )
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _corrupt(folder, f"{INDEX_FILE} is not readable JSON ({error})") from None
    if not isinstance(info, dict):
        raise _corrupt(folder, f"{INDEX_FILE} holds a {type(info).__name__}, not an object")
    missing = [key for key in REQUIRED_FIELDS if key not in info]
    if "format" not in missing and info["format"] != INDEX_FORMAT:  # another format may have other fields
        raise ValueError(
            f"the gallery index {folder} has format {info['format']!r}; this code reads format {INDEX_FORMAT}: "
            "rebuild it with `hysac-index build`, or use the hysac_hf and model code that wrote it"
        )
    if missing:
        raise _corrupt(folder, f"{INDEX_FILE} lacks {missing}")
    if info["modality"] not in MODALITIES:
        raise _corrupt(folder, f"modality {info['modality']!r} is not one of {list(MODALITIES)}")
    for name in ("count", "dim"):
        value = info[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _corrupt(folder, f"{INDEX_FILE} field {name!r} = {value!r} is not a non-negative integer")
    if _finite_number(info["curvature"], "curvature", folder) <= 0:
        raise _corrupt(folder, f"curvature {info['curvature']} is not positive")
    if info["model_probe"] is not None:
        try:
            probe = torch.as_tensor(info["model_probe"], dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise _corrupt(folder, "model_probe is not a list of lists of numbers") from None
        if probe.shape != (len(PROBE_TEXTS), info["dim"]) or not bool(torch.isfinite(probe).all()):
            raise _corrupt(
                folder,
                f"model_probe has shape {tuple(probe.shape)}, expected ({len(PROBE_TEXTS)}, {info['dim']}) "
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
        info["traversal_offset"] = _finite_number(info["traversal_offset"], "traversal_offset", folder)
    return info


def read_metadata(folder: str | os.PathLike, name: str | None, count: int) -> list[dict[str, Any]]:
    """The metadata file `name` of an index folder: exactly `count` lines, each a JSON object (`count` empty
    objects when `name` is None).

    Raises:
        ValueError: a missing or unreadable file, another number of lines, or a line that is not a JSON object.
    """
    folder = Path(folder)
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


def read_index_folder(folder: str | os.PathLike) -> tuple[Tensor, dict[str, Any], list[dict[str, Any]]]:
    """Read a gallery index folder (format 1) and check that its parts belong together. Needs no model, no FAISS.

    Checks, in order: `index.json` (:func:`read_index_json`), `embeddings.safetensors` present with the SHA-256
    recorded in `embeddings_sha256`, holding one float32 tensor `"embeddings"` of shape `(count, dim)`, `count >= 1`,
    finite values, and the metadata file (:func:`read_metadata`). `faiss.index` is not read here
    (:func:`read_faiss_index` reads it).

    Returns:
        `(embeddings, info, metadata_rows)`: the `(count, dim)` float32 embeddings, the parsed `index.json`, and
        `count` metadata dicts (row `i` describes item `i`).
    Raises:
        ValueError: not an index folder, a corrupt one (what is wrong, and to rebuild it) or an empty one.
    """
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
            embeddings = handle.get_tensor(EMBEDDINGS_KEY) if keys == [EMBEDDINGS_KEY] else None
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for unreadable files
        raise _corrupt(folder, f"{EMBEDDINGS_FILE} is not readable ({type(error).__name__}: {error})") from None
    if embeddings is None:
        raise _corrupt(folder, f"{EMBEDDINGS_FILE} holds {keys}, expected only {EMBEDDINGS_KEY!r}")
    count, dim = info["count"], info["dim"]
    if tuple(embeddings.shape) != (count, dim) or embeddings.dtype != torch.float32:
        raise _corrupt(
            folder,
            f"the embeddings are {tuple(embeddings.shape)} {embeddings.dtype}, {INDEX_FILE} says ({count}, {dim}) "
            "float32",
        )
    if count == 0:
        raise ValueError(f"the gallery index {folder} is empty (0 items); rebuild it from at least one item")
    if not bool(torch.isfinite(embeddings).all()):
        raise _corrupt(folder, "the embeddings contain NaN or infinite values")
    return embeddings, info, read_metadata(folder, info.get("metadata"), count)


def model_probe(model: Any, tokenizer: Any) -> Tensor:
    """`encode_text` of `PROBE_TEXTS`: the fingerprint a gallery index stores of the model that embedded it.

    Returns:
        `(len(PROBE_TEXTS), D)` float32 on the CPU.
    """
    limit = model.config.text_config.max_position_embeddings
    batch = tokenizer(list(PROBE_TEXTS), padding=True, truncation=True, max_length=limit, return_tensors="pt")
    device = next(model.parameters()).device
    with torch.no_grad():
        probe = model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device))
    return probe.float().cpu()


def check_index_model(
    info: dict[str, Any], model: Any, probe: Callable[[], Tensor], folder: str | os.PathLike = "(unnamed)"
) -> None:
    """Refuse a model other than the one that embedded the index: its dimension, its curvature, then its probe.

    Args:
        info: the checked `index.json` (:func:`read_index_json`).
        model: the HySAC model that will search the index (`config.projection_dim`, `curvature`).
        probe: computes the model's `(len(PROBE_TEXTS), D)` probe embeddings; called only when the index stores a
            probe and the dimension and curvature agree.
        folder: the index folder, for the messages.
    Raises:
        ValueError: saying which check failed and what to do. An index without a probe (built from bare embeddings)
            passes on its dimension and curvature, with a warning.
    """
    built_with = info.get("model") or "another model"
    dim = int(model.config.projection_dim)
    if dim != info["dim"]:
        raise ValueError(
            f"the gallery index {folder} holds {info['dim']}-dimensional embeddings (built with {built_with}); this "
            f"model embeds in {dim} dimensions; {REBUILD_HINT}"
        )
    curvature = float(model.curvature.detach())
    if abs(float(info["curvature"]) - curvature) > CURVATURE_TOLERANCE * curvature:
        raise ValueError(
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
    difference = float((stored - torch.as_tensor(probe(), dtype=torch.float64)).abs().max())
    if difference > PROBE_TOLERANCE * (1 + float(stored.abs().max())):
        raise ValueError(
            f"the gallery index {folder} was embedded by {built_with}, not by this model (its probe embeddings differ "
            f"by up to {difference:.3g}); {REBUILD_HINT}"
        )


def faiss_file(folder: str | os.PathLike, info: dict[str, Any]) -> Path | None:
    """The index's `faiss.index`, or None when `index.json` names no FAISS index (exact search).

    Raises:
        ValueError: `index.json` names one and the file is missing.
    """
    if info.get("faiss") is None:
        return None
    path = Path(folder) / FAISS_FILE
    if not path.is_file():
        raise _corrupt(Path(folder), f"{INDEX_FILE} names a FAISS index but {FAISS_FILE} is missing")
    return path


def read_faiss_index(folder: str | os.PathLike, faiss_info: dict[str, Any], count: int, dim: int) -> Any:
    """Read `faiss.index` (needs faiss) and check it against `index.json`: the SHA-256 in `faiss.sha256` (when
    recorded), an inner-product index of `count` vectors of dimension `dim + 1` with `params.nlist` cells; `nprobe`
    is set from `params.nprobe`.

    Raises:
        ValueError: a missing, altered or unreadable file, or one that does not fit the index.
    """
    import faiss

    folder = Path(folder)
    path = faiss_file(folder, {"faiss": faiss_info})
    if faiss_info.get("sha256") and sha256_file(path) != faiss_info["sha256"]:
        raise _corrupt(folder, f"the SHA-256 of {FAISS_FILE} differs from the one in {INDEX_FILE}")
    try:
        structure = faiss.read_index(str(path))
    except RuntimeError as error:
        raise _corrupt(folder, f"{FAISS_FILE} is not readable ({_first_line(error)})") from None
    params = faiss_info.get("params", {})
    nlist = params.get("nlist")
    if (
        structure.ntotal != count
        or structure.d != dim + 1
        or structure.metric_type != faiss.METRIC_INNER_PRODUCT
        or getattr(faiss.try_extract_index_ivf(structure), "nlist", None) != nlist
    ):
        raise _corrupt(
            folder,
            f"{FAISS_FILE} holds {structure.ntotal} vectors of dimension {structure.d}, expected an inner-product "
            f"index of {count} vectors of dimension {dim + 1} with {nlist} cells",
        )
    if params.get("nprobe") is not None and hasattr(structure, "nprobe"):
        structure.nprobe = int(params["nprobe"])
    return structure


def load_gallery_index(folder: str | os.PathLike, model: Any, tokenizer: Any) -> Gallery:
    """Read a saved gallery index folder (format 1) and check that `model` can search it.

    Composes :func:`read_index_folder` (the folder's parts: `index.json`, the SHA-256, shape and values of the
    embeddings, the metadata lines) and :func:`check_index_model` (the model's dimension and curvature, and its probe,
    recomputed with `model` and `tokenizer`); a FAISS file named by `index.json` must exist, and is read only when
    searched with `use_faiss=True`. FAISS is not needed.

    Raises:
        ValueError: a folder that is not an index, a corrupt one (checksum, shapes, metadata), an empty one, or one
            built with another model or curvature, each saying what to do.
    """
    folder = Path(folder)
    embeddings, info, metadata = read_index_folder(folder)
    check_index_model(info, model, lambda: model_probe(model, tokenizer), folder)
    path = faiss_file(folder, info)
    return Gallery(
        embeddings=embeddings,
        modality=info["modality"],
        metadata=metadata if info.get("metadata") is not None else None,
        faiss_path=None if path is None else str(path),
        faiss_info=info.get("faiss"),
        source=str(folder),
    )


def rank_gallery(queries: Tensor, embeddings: Tensor, curvature: float | Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k by Lorentz distance, in float64 on the CPU; equal distances in gallery order.

    The gallery is ranked in chunks of `RANK_CHUNK` rows, keeping the best `top_k` so far, so memory stays
    `(Q, top_k + RANK_CHUNK)` whatever the gallery's size.

    Args:
        queries: `(Q, D)` space components.
        embeddings: `(N, D)` space components, `N >= top_k`.
        curvature: positive curvature magnitude `c`.
        top_k: results per query.
    Returns:
        `(Q, top_k)` int64 gallery indices, nearest first, and their `(Q, top_k)` float64 distances.
    """
    queries = queries.detach().to("cpu", torch.float64)
    c = torch.as_tensor(curvature).detach().to("cpu", torch.float64)
    best_distances = best_indices = None
    for start in range(0, embeddings.shape[0], RANK_CHUNK):
        block = embeddings[start : start + RANK_CHUNK].to("cpu", torch.float64)
        distances = pairwise_dist(queries, block, c, eps=0.0)  # float64: no clamp beyond acosh's domain [1, inf)
        indices = torch.arange(start, start + block.shape[0]).expand(queries.shape[0], -1)
        if best_distances is not None:
            # Earlier rows first: a stable sort then keeps equal distances in gallery order.
            distances = torch.cat([best_distances, distances], dim=1)
            indices = torch.cat([best_indices, indices], dim=1)
        order = torch.sort(distances, dim=1, stable=True).indices[:, :top_k]
        best_distances, best_indices = distances.gather(1, order), indices.gather(1, order)
    return best_indices, best_distances


def _read_faiss(gallery: Gallery) -> Any:
    """The gallery's saved FAISS index, read once and checked (:func:`read_faiss_index`)."""
    if gallery.faiss_index is None:
        try:
            import faiss  # noqa: F401 - read_faiss_index imports it; say here what to do without it
        except ImportError:
            raise ValueError(
                "use_faiss=True needs faiss: pip install faiss-cpu (or search exactly: use_faiss=False)"
            ) from None
        count, dim = gallery.embeddings.shape
        gallery.faiss_index = read_faiss_index(Path(gallery.source), gallery.faiss_info, count, dim)
    return gallery.faiss_index


def faiss_rank(gallery: Gallery, queries: Tensor, curvature: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Top-k from the saved FAISS index: candidates by FAISS (approximate for IVF), re-ranked in float64.

    `top_k + RERANK_MARGIN` candidates are fetched, so near-ties at the k-th place are cut as a float64 ranking
    cuts them; a query whose probed cells hold too few items is searched exactly.

    Returns:
        as :func:`rank_gallery`.
    """
    index = _read_faiss(gallery)
    count = min(top_k + RERANK_MARGIN, len(gallery))
    vectors = mips_query_vectors(queries.detach().to("cpu", torch.float32), curvature.to("cpu", torch.float32))
    _, ids = index.search(np.ascontiguousarray(vectors.numpy(), dtype=np.float32), count)
    indices, distances = [], []
    for row, candidates in zip(queries, torch.from_numpy(ids.astype(np.int64))):
        if bool((candidates < 0).any()):  # the probed cells held fewer than `count` items
            found, found_distances = rank_gallery(row[None], gallery.embeddings, curvature, top_k)
            indices.append(found[0])
            distances.append(found_distances[0])
            continue
        candidates = torch.sort(candidates).values  # gallery order, so the stable ranking breaks ties by index
        order, order_distances = rank_gallery(row[None], gallery.embeddings[candidates], curvature, top_k)
        indices.append(candidates[order[0]])
        distances.append(order_distances[0])
    return torch.stack(indices), torch.stack(distances)


# ------------------------------------------------------------------------------------------------------------
# safe-retrieval
_RETRIEVAL_DEFAULTS = {
    "gallery": None,
    "gallery_modality": None,
    "top_k": 5,
    "policy": "redirect",
    "method": "reference",
    "bound": "up_95",
    "use_faiss": False,
}


class SafeRetrievalPipeline(_HySACPipeline):
    """Safe retrieval: rank a gallery by Lorentz distance to each query, optionally redirecting unsafe queries.

    `retriever(query, gallery=..., top_k=5, policy="redirect")`. A query is a string (a text) or an image (PIL
    image or numpy array); a list of queries gives a list of results. Under `policy="redirect"`, a query whose
    distance to the root exceeds the traversal threshold of the gallery's safe region (image gallery: safe images
    `V`; text gallery: safe texts `S`) is moved there with `HySACModel.traverse_to_safe` before ranking;
    `"retain"` ranks with the query as it is. Each query gives
    `{"redirected": bool, "query_distance_to_root": d, "search_distance_to_root": d', "results": [{"index": i,
    "distance": d(query, item), **metadata}, ...]}`: `search_distance_to_root` is that of the embedding actually
    searched with (the moved one when redirected), results are nearest first with equal distances in gallery order.

    Args (at construction or per call; a gallery given at construction is embedded once and reused):
        gallery: a list of images (PIL/numpy), a list of texts, an `(N, D)` tensor of hyperboloid embeddings
            (with `gallery_modality`), or the path of a saved gallery index folder (its metadata joins the results).
        gallery_modality: `"image"` or `"text"`: what an embedding tensor holds (checked for the other kinds).
        top_k: results per query, at most the gallery's size.
        policy: `"redirect"` (default) or `"retain"`.
        method: the traversal, `"reference"` (default, the authors' rule) or `"geodesic"`.
        bound: which calibrated bound the traversal threshold uses: `"up_95"` (default), `"avg"` or `"low_05"`.
        use_faiss: search an index folder through its saved FAISS index (an approximate IVF index, built with
            `hysac-index build --kind ivf`; needs faiss): candidates from FAISS, re-ranked exactly. Default: exact
            float64 search of the stored embeddings.
        batch_size: queries (and gallery items to embed) per forward pass.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._index_cache: tuple[Any, Gallery] | None = None
        self._init_gallery: tuple[Any, Gallery] | None = None

    def __call__(self, query: Any, **kwargs):
        if "_modality" in kwargs:
            raise TypeError("_modality is set by the pipeline from the query")
        batch_size = kwargs.pop("batch_size", None)
        num_workers = kwargs.pop("num_workers", None)
        queries, is_batch = _as_list(query, "query")
        modality = _query_modality(queries)
        self._check_processors(modality)
        _, forward, _ = self._sanitize_parameters(**kwargs)
        options = {**_RETRIEVAL_DEFAULTS, **self._forward_params, **forward}
        if options["gallery"] is None:
            raise ValueError("pass the gallery to search: retriever(query, gallery=...)")
        if options["policy"] == "redirect" and getattr(self.model.config, "bounds", None) is None:
            raise ValueError(
                "policy='redirect' needs the model's calibrated bounds, and config.bounds is None: calibrate them with "
                "`hysac-calibrate --model FOLDER --dataset ...`, or rank without moving the query: policy='retain'"
            )
        gallery = self._gallery(options, batch_size or self._batch_size or DEFAULT_GALLERY_BATCH_SIZE)
        if options["top_k"] > len(gallery):
            raise ValueError(
                f"top_k={options['top_k']} is larger than the gallery ({len(gallery)} items); pass top_k <= {len(gallery)}"
            )
        if options["use_faiss"] and gallery.faiss_path is None:
            raise ValueError(
                "use_faiss=True searches the FAISS index of a saved index folder, and this gallery has none "
                f"({gallery.source}); exact indexes store none (exact search is the default): build an approximate "
                "one with `hysac-index build --kind ivf`, or search exactly with use_faiss=False"
            )
        options["gallery"] = gallery
        results = super().__call__(
            queries, batch_size=batch_size, num_workers=num_workers, _modality=modality, **options
        )
        return results if is_batch else results[0]

    def _gallery(self, options: dict[str, Any], batch_size: int) -> Gallery:
        raw = options["gallery"]
        # A list given at construction is embedded once; index folders are re-read only when their files change.
        at_init = isinstance(raw, (list, tuple)) and raw is self._forward_params.get("gallery")
        if at_init and self._init_gallery is not None and self._init_gallery[0] is raw:
            gallery = self._init_gallery[1]
        else:
            gallery = self._resolve_gallery(raw, options["gallery_modality"], batch_size)
            if at_init:
                self._init_gallery = (raw, gallery)
        expected = options["gallery_modality"]
        if expected is not None and expected != gallery.modality:
            raise ValueError(f"gallery_modality={expected!r}, but the gallery holds {gallery.modality}s")
        return gallery

    def _resolve_gallery(self, raw: Any, gallery_modality: str | None, batch_size: int) -> Gallery:
        if isinstance(raw, Gallery):
            return raw
        if isinstance(raw, (str, os.PathLike)):
            if not os.path.isdir(raw):
                raise ValueError(
                    f"gallery={_describe(raw)} is not a folder; a gallery is a saved index folder, a list of images or "
                    "texts (to search one text, pass [text]), or an (N, D) embedding tensor with gallery_modality="
                )
            return self._load_index(raw)
        if torch.is_tensor(raw) or isinstance(raw, np.ndarray):
            return self._embedding_gallery(raw, gallery_modality)
        if isinstance(raw, (list, tuple)):
            if not raw:
                raise ValueError("the gallery is empty; pass at least one image or text")
            modality = _one_modality(
                raw,
                "gallery[{}]",
                "a gallery list holds images (PIL images or numpy arrays) or texts (strings); image files go in a "
                "saved index folder or are opened first",
                "the gallery mixes",
                "search one modality per gallery",
            )
            if gallery_modality is not None and gallery_modality != modality:
                raise ValueError(f"gallery_modality={gallery_modality!r}, but the gallery holds {modality}s")
            return Gallery(self.embed(list(raw), modality, batch_size), modality, source=f"a list of {modality}s")
        raise ValueError(
            f"cannot search a gallery of type {type(raw).__name__}; pass a list of images or texts, an (N, D) tensor "
            "of hyperboloid embeddings with gallery_modality=, or a saved index folder"
        )

    def _embedding_gallery(self, raw: Any, gallery_modality: str | None) -> Gallery:
        if gallery_modality is None:
            raise ValueError(
                "a gallery of embeddings needs gallery_modality='image' or 'text' (which content they embed): it "
                "chooses the safe region a redirected query moves to"
            )
        embeddings = torch.as_tensor(raw).detach()
        dim = self.model.config.projection_dim
        if embeddings.ndim != 2 or embeddings.shape[1] != dim or not embeddings.is_floating_point():
            raise ValueError(
                f"a gallery of embeddings must be a float (N, {dim}) tensor of hyperboloid space components (from "
                f"encode_image/encode_text), got {tuple(embeddings.shape)} {embeddings.dtype}"
            )
        if embeddings.shape[0] == 0:
            raise ValueError("the gallery is empty (0 embeddings); pass at least one")
        if not bool(torch.isfinite(embeddings).all()):
            raise ValueError("the gallery embeddings contain NaN or infinite values")
        return Gallery(embeddings.to("cpu", torch.float32), gallery_modality)

    def _load_index(self, folder: str | os.PathLike) -> Gallery:
        """`load_gallery_index`, reused while the folder's files are unchanged (same inode, size, mtime)."""
        folder = Path(folder).resolve()
        signature = [str(folder)]
        for name in (INDEX_FILE, EMBEDDINGS_FILE, METADATA_FILE, FAISS_FILE):
            try:
                stat = (folder / name).stat()
                signature.append((name, stat.st_ino, stat.st_size, stat.st_mtime_ns))
            except OSError:
                signature.append((name, None))
        if self._index_cache is not None and self._index_cache[0] == signature:
            return self._index_cache[1]
        self._check_processors("text")  # the model probe is a text embedding
        gallery = load_gallery_index(folder, self.model, self.tokenizer)
        self._index_cache = (signature, gallery)
        return gallery

    def _sanitize_parameters(self, _modality: str | None = None, **options):
        unknown = sorted(set(options) - set(_RETRIEVAL_DEFAULTS))
        if unknown:
            raise TypeError(
                f"{RETRIEVAL_TASK} got unexpected arguments {unknown}; it takes {sorted(_RETRIEVAL_DEFAULTS)} and "
                "batch_size="
            )
        checks = {
            "gallery_modality": (lambda v: v is None or v in MODALITIES, f"None or one of {list(MODALITIES)}"),
            "top_k": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
            "policy": (lambda v: v in POLICIES, f"one of {list(POLICIES)}"),
            "method": (lambda v: v in METHODS, f"one of {list(METHODS)}"),
            "bound": (lambda v: v in BOUND_STATS, f"one of {list(BOUND_STATS)}"),
            "use_faiss": (lambda v: isinstance(v, bool), "True or False"),
        }
        for name, value in options.items():
            if name in checks and not checks[name][0](value):
                raise ValueError(f"{name}={value!r} must be {checks[name][1]}")
        preprocess = {"_modality": _modality} if _modality is not None else {}
        postprocess = {"gallery": options["gallery"]} if isinstance(options.get("gallery"), Gallery) else {}
        return preprocess, options, postprocess

    def _forward(
        self,
        model_inputs: dict[str, Tensor],
        gallery: Gallery | None = None,
        gallery_modality: str | None = None,
        top_k: int = 5,
        policy: str = "redirect",
        method: str = "reference",
        bound: str = "up_95",
        use_faiss: bool = False,
    ) -> dict[str, Tensor]:
        embeds = self._encode(model_inputs)
        search = embeds
        if policy == "redirect":
            search = self.model.traverse_to_safe(embeds, target=gallery.modality, method=method, bound=bound)
        curvature = self.model.curvature.detach()
        if use_faiss:
            indices, distances = faiss_rank(gallery, search, curvature, top_k)
        else:
            indices, distances = rank_gallery(search, gallery.embeddings, curvature, top_k)
        return {
            "redirected": (search != embeds).any(dim=-1),
            "query_distance_to_root": self.model.distance_to_root(embeds),
            "search_distance_to_root": self.model.distance_to_root(search),
            "indices": indices,
            "distances": distances,
        }

    def postprocess(self, model_outputs: dict[str, Tensor], gallery: Gallery | None = None) -> dict[str, Any]:
        metadata = gallery.metadata if gallery is not None else None
        results = []
        for index, distance in zip(
            model_outputs["indices"].reshape(-1).tolist(), model_outputs["distances"].reshape(-1).tolist()
        ):
            item = dict(metadata[index]) if metadata is not None else {}
            item.update(index=int(index), distance=float(distance))  # the ranking's own keys win over metadata
            results.append(item)
        return {
            "redirected": bool(model_outputs["redirected"].reshape(-1)[0]),
            "query_distance_to_root": float(model_outputs["query_distance_to_root"].reshape(-1)[0]),
            "search_distance_to_root": float(model_outputs["search_distance_to_root"].reshape(-1)[0]),
            "results": results,
        }


def _one_modality(items: list, label: str, accepted: str, mixed: str, fix: str) -> str:
    """The one modality of a list of queries or gallery items: strings are texts, PIL images and numpy arrays are
    images.

    Raises:
        ValueError: an item of another type (`label.format(position)`, then `accepted`), or a mix of images and
            texts (`mixed`, the first position of each, then `fix`).
    """
    kinds = {}
    for position, item in enumerate(items):
        kind = "text" if isinstance(item, str) else "image" if _is_image(item) else None
        if kind is None:
            raise ValueError(f"{label.format(position)} is a {type(item).__name__}; {accepted}")
        kinds.setdefault(kind, position)
    if len(kinds) > 1:
        raise ValueError(f"{mixed} images (first at {kinds['image']}) and texts (first at {kinds['text']}); {fix}")
    return next(iter(kinds))


def _query_modality(queries: list) -> str:
    return _one_modality(
        queries,
        "query {}",
        "a query is a text (str) or an image (PIL image or numpy array). Open image files first (PIL.Image.open); "
        "to search with an embedding, rank it against the gallery with rank_gallery",
        "the queries mix",
        "call the pipeline once per modality",
    )


__all__ = [
    "CURVATURE_TOLERANCE",
    "DETECTION_TASK",
    "EMBEDDINGS_FILE",
    "EMBEDDINGS_KEY",
    "FAISS_FILE",
    "INDEX_FILE",
    "INDEX_FORMAT",
    "METADATA_FILE",
    "PROBE_DECIMALS",
    "PROBE_TEXTS",
    "PROBE_TOLERANCE",
    "RETRIEVAL_TASK",
    "Gallery",
    "SafeRetrievalPipeline",
    "UnsafeContentDetectionPipeline",
    "check_index_model",
    "custom_pipelines",
    "faiss_file",
    "load_gallery_index",
    "load_image_input",
    "model_probe",
    "rank_gallery",
    "read_faiss_index",
    "read_index_folder",
    "read_index_json",
    "read_metadata",
    "sha256_file",
]
