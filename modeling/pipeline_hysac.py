"""HySAC's two `transformers` pipelines: `unsafe-content-detection` and `safe-retrieval`.

Ships to the Hub as remote code beside the weights (torch + transformers, with Pillow, which transformers' image
pipelines need anyway). `HySACModel.save_pretrained` declares both tasks in `config.custom_pipelines` (see
:func:`custom_pipelines`), so every saved or converted HySAC folder loads them with `trust_remote_code=True` alone,
where `hysac_hf` is not installed:

    detector = pipeline("unsafe-content-detection", model=FOLDER_OR_REPO_ID, trust_remote_code=True)
    detector(image)                      # {"label": "unsafe"|"safe", "score": d, "threshold": t, "modality": "image"}
    detector(text=["...", "..."])        # one dict per text

    retriever = pipeline("safe-retrieval", model=FOLDER_OR_REPO_ID, trust_remote_code=True)
    retriever("a query", gallery=images, top_k=5, policy="redirect")
    # {"redirected": bool, "query_distance_to_root": d, "search_distance_to_root": d', "results": [...]}

They have transformers' shape: `__call__` only routes its arguments to `Pipeline.__call__`; the options are checked
once per call in `_sanitize_parameters` (which also resolves the gallery), every input in `preprocess`; `_forward`
encodes with the model's own methods (`encode_image`, `encode_text`, `distance_to_root`) and `safe-retrieval` then
ranks through the one search engine, `gallery_hysac.py` (the redirect step, exact and FAISS search, the results).
Images go through the folder's `HySACProcessor`, the one reading of a picture (transparency over white, 16-bit and
float pictures to 8 bits, then the base model's image processor); texts through its tokenizer, truncated to the text
tower's length and padded to the longest text of each batch (SigLIP families: always to the tower's 64 tokens).

This file imports only siblings that `modeling_hysac.py` imports itself (it imports this file so that transformers
ships it), and every sibling that `gallery_hysac.py` imports: transformers 4 copies a local folder's remote code one
import deep from the file it loads, so a sibling that only a deeper file needed would be missing.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import Pipeline

from .configuration_hysac import BOUND_STATS, MODALITIES
from .gallery_hysac import (
    EMBEDDINGS_FILE,
    FAISS_FILE,
    INDEX_FILE,
    METADATA_FILE,
    POLICIES,
    Gallery,
    describe_results,
    load_gallery_index,
    read_structure,
    search_safely,
)
from .lorentz import dist_to_origin  # noqa: F401 - see below
from .processing_hysac import IMAGE_INPUT_NAMES, input_modality
from .traversal import METHODS

# transformers 4 copies a folder's remote code one relative import deep from the file it loads (this one, for
# `pipeline()`): every sibling the search engine imports is imported here too (the lorentz import above).

try:
    from PIL import Image
except ImportError:  # pragma: no cover - transformers' image processors need Pillow anyway
    Image = None

DETECTION_TASK = "unsafe-content-detection"
RETRIEVAL_TASK = "safe-retrieval"
DEFAULT_GALLERY_BATCH_SIZE = 32

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
    `hysac_hf`'s embedding path opens files, so a transparent PNG reads the same through both), an undecoded
    `datasets.Image` value (`{"bytes": ..., "path": ...}`), or an http(s) URL or base64 string (fetched by
    transformers' `load_image`, as its image pipelines do; it returns RGB).

    Raises:
        ValueError: naming the input and what is accepted.
    """
    if _is_image(image):
        return image
    if isinstance(image, dict) and (image.get("bytes") is not None or image.get("path") is not None):
        if image.get("bytes") is None:
            return load_image_input(image["path"])
        import io

        try:
            with Image.open(io.BytesIO(image["bytes"])) as opened:
                opened.load()
                return opened
        except OSError as error:
            source = image.get("path") or "a dataset row"
            raise ValueError(f"cannot decode the image bytes of {source}: {error}; re-export or remove it") from None
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


def _batch(inputs: Any, what: str) -> Any:
    """`inputs` as `Pipeline.__call__` takes them: a tuple becomes a list (a batch, like a list), an empty list is
    refused (transformers 5 would fail on it with an IndexError), anything else passes as it is."""
    if isinstance(inputs, tuple):
        inputs = list(inputs)
    if isinstance(inputs, list) and not inputs:
        raise ValueError(f"{what} is an empty list; pass at least one")
    return inputs


def _check_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name}={value!r} must be a finite number (a distance to the root)")
    return float(value)


def _item_modality(item: Any) -> str | None:
    """`processing_hysac.input_modality`: an image (PIL, numpy, a path of an existing file, an http(s) URL, an undecoded
    `datasets.Image` value), a text (any other string), or None."""
    return input_modality(item)


def _one_modality(items: list, label: str, accepted: str, mixed: str, fix: str) -> str:
    """The one modality of a list of queries or gallery items (:func:`_item_modality`).

    Raises:
        ValueError: an item of another type (`label.format(position)`, then `accepted`), or a mix of images and
            texts (`mixed`, the first position of each, then `fix`).
    """
    kinds = {}
    for position, item in enumerate(items):
        kind = _item_modality(item)
        if kind is None:
            raise ValueError(f"{label.format(position)} is a {type(item).__name__}; {accepted}")
        kinds.setdefault(kind, position)
    if len(kinds) > 1:
        raise ValueError(f"{mixed} images (first at {kinds['image']}) and texts (first at {kinds['text']}); {fix}")
    return next(iter(kinds))


QUERY_TYPES = (
    "a query is a text (a string) or an image (a PIL image, a numpy array, the path of an image file or an http(s) "
    "URL); to search with an embedding, rank it against the gallery with gallery_hysac.search_safely"
)


class _HySACPipeline(Pipeline):
    """What both pipelines share: the processor `pipeline()` loads, and turning inputs into HySAC embeddings."""

    # pipeline() loads the folder's HySACProcessor (AutoProcessor); Pipeline.__init__ then takes its tokenizer and
    # image processor, which batching pads and concatenates with.
    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        missing = [name for name in ("encode_image", "encode_text", "distance_to_root") if not hasattr(model, name)]
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs a HySAC model, got {type(model).__name__} (no {', '.join(missing)}); "
                "load a HySAC folder with trust_remote_code=True"
            )
        super().__init__(*args, **kwargs)

    @property
    def max_text_length(self) -> int:
        """Tokens per text: the tokenizer's limit, at most what the text tower takes (77 for CLIP, 64 for SigLIP)."""
        limit = self.model.config.text_config.max_position_embeddings
        length = getattr(self.tokenizer, "model_max_length", limit)
        return min(length, limit) if 0 < length else limit

    def _text_options(self, padding: bool) -> dict[str, Any]:
        """The tokenizer's padding and length: as asked for CLIP and MetaCLIP 2; always the text tower's full length
        for SigLIP families (`config.fixed_text_length`: their tower pools the last position)."""
        fixed = getattr(self.model.config, "fixed_text_length", None)
        if fixed:
            return {"padding": "max_length", "truncation": True, "max_length": fixed}
        return {"padding": padding, "truncation": True, "max_length": self.max_text_length}

    @property
    def _called(self) -> bool:
        """False while `Pipeline.__init__` sanitizes the construction arguments, True during a call."""
        return hasattr(self, "_forward_params")

    def _check_processors(self, modality: str) -> None:
        needed = self.processor if modality == "image" else self.tokenizer
        if needed is None:
            name = "processor (a HySACProcessor)" if modality == "image" else "tokenizer"
            raise ValueError(
                f"this pipeline has no {name}, so it cannot read {modality}s; save the HySACProcessor beside the model "
                "(processor.save_pretrained(FOLDER)) or pass processor=..."
            )

    def _prepare(self, items: list, modality: str, padding: bool) -> dict[str, Tensor]:
        """Images or texts -> model inputs (`pixel_values`, SigLIP 2 NaFlex's `pixel_attention_mask` and
        `spatial_shapes`; or `input_ids` and the tokenizer's `attention_mask`)."""
        self._check_processors(modality)
        if modality == "image":
            images = [load_image_input(item) for item in items]
            image_inputs = self.processor(images=images, return_tensors="pt")
            inputs = {name: image_inputs[name] for name in IMAGE_INPUT_NAMES if name in image_inputs}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            return inputs
        encoding = self.tokenizer(list(items), return_tensors="pt", **self._text_options(padding))
        return {name: encoding[name] for name in ("input_ids", "attention_mask") if name in encoding}

    def _encode(self, model_inputs: dict[str, Tensor]) -> Tensor:
        """Model inputs -> `(B, D)` float32 hyperboloid embeddings, with the model's own encoders."""
        if "pixel_values" in model_inputs:
            image_inputs = {name: model_inputs[name] for name in IMAGE_INPUT_NAMES if name in model_inputs}
            return self.model.encode_image(**image_inputs)
        return self.model.encode_text(model_inputs["input_ids"], model_inputs.get("attention_mask"))

    def embed(self, items: list, modality: str, batch_size: int = DEFAULT_GALLERY_BATCH_SIZE) -> Tensor:
        """Embed images or texts in batches (texts padded to the longest of each batch).

        Returns:
            `(N, D)` float32 hyperboloid space components on the CPU, in input order.
        """
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

    `detector(images)` takes one image (PIL image, numpy array, path or URL), a list of them, or a generator or
    dataset (streamed, as every transformers pipeline does); `detector(text=...)` the same for texts. One input gives
    one dict, a list gives a list, each `{"label": "unsafe" | "safe", "score": distance to the root, "threshold": t,
    "modality": "image" | "text"}`.

    Args (at construction or per call):
        threshold: distance to the root above which content is unsafe. Default: the model's calibrated
            `config.unsafe_thresholds[modality]`; a model without one is an error that says how to calibrate.
        batch_size: inputs per forward pass.
    """

    def __call__(self, inputs: Any = None, *, text: Any = None, **kwargs):
        """Classify images (`inputs`) or texts (`text=`); see the class docstring."""
        if (inputs is None) == (text is None):
            raise ValueError(
                "pass images as detector(images) or texts as detector(text=...); "
                + ("got both" if inputs is not None else "got neither")
            )
        if text is None:
            return super().__call__(_batch(inputs, "images"), _modality="image", **kwargs)
        return super().__call__(_batch(text, "text"), _modality="text", **kwargs)

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
        postprocess = {} if threshold is None else {"threshold": _check_number(threshold, "threshold")}
        if _modality is None:  # at construction
            return {}, {}, postprocess
        if threshold is None:  # the construction's threshold, else the model's calibrated one (before any work)
            given = (self._postprocess_params if self._called else {}).get("threshold")
            postprocess["threshold"] = self.threshold(_modality) if given is None else given
        postprocess["_modality"] = _modality
        return {"_modality": _modality}, {}, postprocess

    def preprocess(self, item: Any, _modality: str = "image") -> dict[str, Tensor]:
        if _modality == "text" and not isinstance(item, str):
            raise ValueError(
                f"a text must be a string, got the {type(item).__name__} {_describe(item)}; pass images positionally"
            )
        if _modality == "image" and not (_is_image(item) or isinstance(item, (str, os.PathLike))):
            raise ValueError(
                f"cannot read an image from the {type(item).__name__} {_describe(item)}; pass PIL images, numpy "
                "arrays, file paths or URLs (texts go in text=...)"
            )
        return self._prepare([item], _modality, padding=False)

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
_RETRIEVAL_CHECKS = {
    "gallery_modality": (lambda v: v is None or v in MODALITIES, f"None or one of {list(MODALITIES)}"),
    "top_k": (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "policy": (lambda v: v in POLICIES, f"one of {list(POLICIES)}"),
    "method": (lambda v: v in METHODS, f"one of {list(METHODS)}"),
    "bound": (lambda v: v in BOUND_STATS, f"one of {list(BOUND_STATS)}"),
    "use_faiss": (lambda v: isinstance(v, bool), "True or False"),
}


class SafeRetrievalPipeline(_HySACPipeline):
    """Safe retrieval: rank a gallery by Lorentz distance to each query, optionally redirecting unsafe queries.

    `retriever(query, gallery=..., top_k=5, policy="redirect")`. A query is a text or an image: a string that names an
    existing file or is an http(s) URL is an image (opened as the detector opens it), any other string a text; PIL
    images and numpy arrays are images (`processing_hysac.input_modality`). A list of queries gives a list of
    results. Under `policy="redirect"`, a query whose
    distance to the root exceeds the traversal threshold of the gallery's safe region (image gallery: safe images
    `V`; text gallery: safe texts `S`) is moved there, as `HySACModel.traverse_to_safe` moves it, before ranking;
    `"retain"` ranks with the query as it is. Each query gives
    `{"redirected": bool, "query_distance_to_root": d, "search_distance_to_root": d', "results": [{"index": i,
    "distance": d(query, item), **metadata}, ...]}`: `search_distance_to_root` is that of the embedding actually
    searched with (the moved one when redirected), results are nearest first with equal distances in gallery order.

    Args (at construction or per call):
        gallery: a list of images (PIL/numpy, image file paths or URLs), a list of texts (other strings), an `(N, D)`
            tensor of hyperboloid embeddings (with `gallery_modality`), or the path of a saved gallery index folder
            (its metadata joins the results).
            A list given at construction is embedded then, once: the pipeline keeps those embeddings (a copy), so
            later changes to the list are not seen; pass a changing list per call. An index folder is re-read when
            its files change.
        gallery_modality: `"image"` or `"text"`: what an embedding tensor holds (checked for the other kinds).
        top_k: results per query, at most the gallery's size.
        policy: `"redirect"` (default) or `"retain"`.
        method: the traversal, `"reference"` (default, the authors' rule) or `"geodesic"`.
        bound: which calibrated bound the traversal threshold uses: `"up_95"` (default), `"avg"` or `"low_05"`.
        use_faiss: search an index folder through its saved FAISS index (an approximate IVF index, built with
            `hysac-index build --kind ivf`; needs faiss): candidates from FAISS, re-ranked exactly. Default: exact
            float64 search of the stored embeddings.
        batch_size: queries per forward pass; galleries are embedded in batches of the pipeline's `batch_size`
            (default 32).
    """

    _index_cache: tuple[list, Gallery] | None = None

    def __call__(self, query: Any, **kwargs):
        """Search the gallery with one query or a list of queries; see the class docstring."""
        query = _batch(query, "query")
        if isinstance(query, list):  # one modality per call: a batch stacks the inputs of one encoder
            _one_modality(query, "query {}", QUERY_TYPES, "the queries mix", "call the pipeline once per modality")
        return super().__call__(query, **kwargs)

    def _sanitize_parameters(self, **options):
        unknown = sorted(set(options) - set(_RETRIEVAL_DEFAULTS))
        if unknown:
            raise TypeError(
                f"{RETRIEVAL_TASK} got unexpected arguments {unknown}; it takes {sorted(_RETRIEVAL_DEFAULTS)} and "
                "batch_size="
            )
        for name, value in options.items():
            if name in _RETRIEVAL_CHECKS and not _RETRIEVAL_CHECKS[name][0](value):
                raise ValueError(f"{name}={value!r} must be {_RETRIEVAL_CHECKS[name][1]}")
        if "top_k" in options:
            options["top_k"] = int(options["top_k"])  # numpy integers too
        if not self._called:
            # At construction a list gallery is embedded once (a copy); folders and tensors are read per call.
            if isinstance(options.get("gallery"), (list, tuple)):
                options["gallery"] = self._resolve_gallery(options["gallery"], options.get("gallery_modality"))
            return {}, options, {}
        merged = {**_RETRIEVAL_DEFAULTS, **self._forward_params, **options}
        if merged["gallery"] is None:
            raise ValueError("pass the gallery to search: retriever(query, gallery=...)")
        if merged["policy"] == "redirect" and getattr(self.model.config, "bounds", None) is None:
            raise ValueError(
                "policy='redirect' needs the model's calibrated bounds, and config.bounds is None: calibrate them with "
                "`hysac-calibrate --model FOLDER --dataset ...`, or rank without moving the query: policy='retain'"
            )
        gallery = self._resolve_gallery(merged["gallery"], merged["gallery_modality"])
        if merged["gallery_modality"] is not None and merged["gallery_modality"] != gallery.modality:
            raise ValueError(f"gallery_modality={merged['gallery_modality']!r}, but the gallery holds {gallery.modality}s")
        if merged["top_k"] > len(gallery):
            raise ValueError(
                f"top_k={merged['top_k']} is larger than the gallery ({len(gallery)} items); pass top_k <= {len(gallery)}"
            )
        if merged["use_faiss"]:
            if gallery.faiss_path is None:
                raise ValueError(
                    "use_faiss=True searches the FAISS index of a saved index folder, and this gallery has none "
                    f"({gallery.source}); exact indexes store none (exact search is the default): build an approximate "
                    "one with `hysac-index build --kind ivf`, or search exactly with use_faiss=False"
                )
            try:
                import faiss  # noqa: F401 - read_structure reads the file; say here, before any work, what is missing
            except ImportError:
                raise ValueError(
                    "use_faiss=True needs faiss: pip install faiss-cpu (or search exactly: use_faiss=False)"
                ) from None
        forward = {name: merged[name] for name in ("top_k", "policy", "method", "bound", "use_faiss")}
        return {}, {"gallery": gallery, **forward}, {"gallery": gallery}

    def _resolve_gallery(self, raw: Any, gallery_modality: str | None) -> Gallery:
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
                "a gallery list holds images (PIL images, numpy arrays, image file paths or http(s) URLs) or texts "
                "(other strings)",
                "the gallery mixes",
                "search one modality per gallery",
            )
            if gallery_modality is not None and gallery_modality != modality:
                raise ValueError(f"gallery_modality={gallery_modality!r}, but the gallery holds {modality}s")
            embeddings = self.embed(list(raw), modality, self._batch_size or DEFAULT_GALLERY_BATCH_SIZE)
            return Gallery(embeddings, modality, source=f"a list of {modality}s")
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

    def preprocess(self, query: Any) -> dict[str, Tensor]:
        modality = _item_modality(query)
        if modality is None:
            raise ValueError(f"the query {_describe(query)} is a {type(query).__name__}; {QUERY_TYPES}")
        return self._prepare([query], modality, padding=False)

    def _forward(
        self,
        model_inputs: dict[str, Tensor],
        gallery: Gallery,
        top_k: int = 5,
        policy: str = "redirect",
        method: str = "reference",
        bound: str = "up_95",
        use_faiss: bool = False,
        gallery_modality: str | None = None,  # a construction option, checked by _sanitize_parameters
    ) -> dict[str, Tensor]:
        return self.search(self._encode(model_inputs), gallery, top_k, policy, method, bound, use_faiss)

    def search(
        self,
        queries: Tensor,
        gallery: Gallery,
        top_k: int = 5,
        policy: str = "redirect",
        method: str = "reference",
        bound: str = "up_95",
        use_faiss: bool = False,
    ) -> dict[str, Tensor]:
        """The ranking step of a call, for query embeddings already computed (`hysac-serve` embeds the queries of
        many requests in one batch): the policy, then the search (`gallery_hysac.search_safely`).

        Args:
            queries: `(Q, D)` hyperboloid space components from this pipeline's model, on its device.
            gallery: the gallery, as `_sanitize_parameters` resolved it; the other options as checked there.
        Returns:
            what `_forward` returns; `postprocess` of the row of one query gives that query's result.
        """
        config = self.model.config
        return search_safely(
            queries,
            gallery.embeddings,
            gallery.modality,
            self.model.curvature.detach(),
            top_k,
            policy=policy,
            bounds=config.bounds,
            offset=config.traversal_offset,
            method=method,
            bound=bound,
            structure=read_structure(gallery) if use_faiss else None,
            candidates=gallery.params.get("rerank") if use_faiss else None,  # ivfpq: its tuned re-ranking depth
        )

    def postprocess(self, model_outputs: dict[str, Tensor], gallery: Gallery) -> dict[str, Any]:
        return describe_results(model_outputs, gallery.metadata)[0]


__all__ = [
    "DETECTION_TASK",
    "RETRIEVAL_TASK",
    "SafeRetrievalPipeline",
    "UnsafeContentDetectionPipeline",
    "custom_pipelines",
    "load_image_input",
]
