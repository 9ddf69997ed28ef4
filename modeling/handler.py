"""A HySAC folder as a service: the Hugging Face Inference Endpoints handler, and the one batched request path that it
and `hysac-serve` run.

Every saved or converted HySAC folder ships this file (`HySACModel.save_pretrained` imports it, so transformers copies
it with the remote code). Inference Endpoints (huggingface-inference-toolkit) loads `handler.py` from the repository
as a top-level file and calls it:

    handler = EndpointHandler(path)              # the repository folder
    handler({"inputs": "a photo of a cat"})      # unsafe-content detection (the default task)
    handler({"inputs": [image, "a text"], "parameters": {"task": "feature-extraction"}})
    handler({"inputs": "a rocket", "parameters": {"task": "safe-retrieval", "index": "photos", "top_k": 3}})

So it has no relative imports: the model, the processor and the two pipelines come from the folder's own remote code
through transformers (`trust_remote_code`), and it works where hysac-hf is not installed (torch, transformers and
Pillow only).

The request path (:class:`RequestRunner`) is the pipelines' own code, batched across requests: every text of every
request in one forward pass (padded to the longest), every image in another (in chunks of `forward_batch`), then per
request the pipelines' steps: `UnsafeContentDetectionPipeline.postprocess` on `distance_to_root` for detection, and
`SafeRetrievalPipeline.search` + `postprocess` for retrieval (the redirect policy and the search engine of
`gallery_hysac.py`). Options are checked by the pipelines' `_sanitize_parameters`, so a request gets the pipelines'
messages. `hysac-serve` (`hysac_hf.serve`) runs the same class in its batching worker.

Inputs (:func:`read_inputs`) are one item or a list of them, each a string (a text), a PIL image, or an OpenAI content
part: `{"type": "text", "text": ...}` or `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`.
Images are checked before they are decoded: at most `max_image_pixels` pixels (decompression bombs are refused from
their header), at most `max_image_bytes` encoded; remote `http(s)` URLs are fetched only when `allow_remote_images` is
set (`HYSAC_ALLOW_REMOTE_IMAGES=1` for the endpoint handler). Every refusal is an :class:`InputError` naming the input
and the fix.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import sys
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoModel, AutoProcessor
from transformers.dynamic_module_utils import get_class_from_dynamic_module

try:
    from PIL import Image
except ImportError:  # pragma: no cover - transformers' image processors need Pillow anyway
    Image = None

EMBEDDING_TASK = "feature-extraction"
DETECTION_TASK = "unsafe-content-detection"
RETRIEVAL_TASK = "safe-retrieval"
TASKS = (DETECTION_TASK, EMBEDDING_TASK, RETRIEVAL_TASK)
RETRIEVAL_OPTIONS = ("top_k", "policy", "method", "bound")

DEFAULT_MAX_ITEMS = 64  # inputs per request
DEFAULT_MAX_IMAGE_PIXELS = 25_000_000  # a 6000 x 4000 photo; a decoded RGB image of this size takes 75 MB
DEFAULT_MAX_IMAGE_BYTES = 10 * 2**20  # one encoded image (data URL payload or remote file)
DEFAULT_MAX_TEXT_CHARS = 10_000  # CLIP reads 77 tokens; longer strings only cost tokenizer time
DEFAULT_FORWARD_BATCH = 64  # items per forward pass
REMOTE_TIMEOUT_S = 10.0
REMOTE_ENV = "HYSAC_ALLOW_REMOTE_IMAGES"


class InputError(ValueError):
    """A request its sender must fix.

    Attributes:
        param: the request field at fault (`"input[2]"`, `"top_k"`), or None.
        code: a short machine-readable reason (`"invalid_image"`, `"too_many_inputs"`, ...).
        status: the HTTP status a service answers with (400, or 404 for an unknown index).
    """

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_input", status: int = 400):
        super().__init__(message)
        self.param = param
        self.code = code
        self.status = status

    def as_dict(self) -> dict[str, Any]:
        """The error in OpenAI's shape: `{"message", "type", "param", "code"}`."""
        return {"message": str(self), "type": "invalid_request_error", "param": self.param, "code": self.code}


@dataclass
class InputLimits:
    """What one request may hold. Defaults: the module's `DEFAULT_*` constants."""

    max_items: int = DEFAULT_MAX_ITEMS
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
    allow_remote_images: bool = False


# ------------------------------------------------------------------------------------------------------------
# Inputs
def read_inputs(inputs: Any, limits: InputLimits, param: str = "input") -> list[tuple[str, Any]]:
    """A request's `input` (one item or a list) -> `[("text", str) | ("image", bytes | PIL image), ...]`.

    Images given as data URLs or remote URLs come back as their encoded bytes with the header checked
    (:func:`check_image_header`); :func:`open_image` decodes them. A PIL image comes back as it is.

    Raises:
        InputError: an empty input, too many items, or an item that is not a text or an image.
    """
    items = inputs if isinstance(inputs, list) else [inputs]
    if inputs is None or not items:
        raise InputError(
            f"{param} is empty; pass a text, an image content part, or a list of them", param, "empty_input"
        )
    if len(items) > limits.max_items:
        raise InputError(
            f"{param} holds {len(items)} items, more than the {limits.max_items} a request may hold; split it",
            param,
            "too_many_inputs",
        )
    if isinstance(inputs, list):
        return [read_item(item, limits, f"{param}[{i}]") for i, item in enumerate(items)]
    return [read_item(inputs, limits, param)]


def read_item(item: Any, limits: InputLimits, param: str = "input") -> tuple[str, Any]:
    """One input item -> `("text", str)` or `("image", bytes | PIL image)`; see :func:`read_inputs`."""
    if isinstance(item, str):
        return "text", _check_text(item, limits, param)
    if Image is not None and isinstance(item, Image.Image):
        _check_pixels(item.size, limits, param)
        return "image", item
    if isinstance(item, dict):
        kind = item.get("type")
        if kind == "text" and isinstance(item.get("text"), str):
            return "text", _check_text(item["text"], limits, f"{param}.text")
        if kind == "image_url":
            url = item.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if isinstance(url, str):
                return "image", read_image_url(url, limits, f"{param}.image_url.url")
    if isinstance(item, list) and item and all(isinstance(token, int) for token in item):
        raise InputError(
            f"{param} is a list of token ids; send the text itself (the service tokenizes it)", param, "invalid_input"
        )
    raise InputError(
        f"{param} is not a text or an image: pass a string, {{'type': 'text', 'text': ...}} or {{'type': 'image_url', "
        "'image_url': {'url': 'data:image/png;base64,...'}}",
        param,
        "invalid_input",
    )


def _check_text(text: str, limits: InputLimits, param: str) -> str:
    if not text.strip():
        raise InputError(f"{param} is an empty text; pass at least one word", param, "empty_input")
    if len(text) > limits.max_text_chars:
        raise InputError(
            f"{param} has {len(text)} characters, more than {limits.max_text_chars}; the model reads the first 77 "
            "tokens only, so send a shorter text",
            param,
            "text_too_long",
        )
    return text


def read_image_url(url: str, limits: InputLimits, param: str = "image_url") -> bytes:
    """The encoded bytes of a `data:image/...;base64,...` URL, or of an `http(s)` URL when remote images are allowed,
    with the header checked (:func:`check_image_header`).

    Raises:
        InputError: another scheme, a data URL that is not a base64 image, remote images not allowed, a failed or too
            large download, or a file that is not an image or has too many pixels.
    """
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise InputError(
                f"{param} is a data URL without base64 data; send data:image/png;base64,...", param, "invalid_image"
            )
        if not header[len("data:") :].lower().startswith("image/"):
            raise InputError(
                f"{param} is a data URL of {header[len('data:') : -len(';base64')] or 'no media type'}, not an image; "
                "send data:image/png;base64,... (or image/jpeg, image/webp, ...)",
                param,
                "invalid_image",
            )
        if len(payload) > limits.max_image_bytes * 4 // 3 + 4:
            raise InputError(
                f"{param} holds more than {limits.max_image_bytes} bytes of image; send a smaller image",
                param,
                "image_too_large",
            )
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InputError(f"{param} is not valid base64", param, "invalid_image") from None
    elif url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise InputError(
                f"{param} is a remote URL, and this service does not fetch remote images (start it with "
                "--allow_remote_images to allow it); send the image as a data:image/...;base64 URL",
                param,
                "remote_images_disabled",
            )
        data = _download(url, limits, param)
    else:
        raise InputError(f"{param} must be a data:image/...;base64 URL or an http(s) URL", param, "invalid_image")
    check_image_header(data, limits, param)
    return data


def _download(url: str, limits: InputLimits, param: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=REMOTE_TIMEOUT_S) as response:  # noqa: S310 - http(s) only, checked above
            data = response.read(limits.max_image_bytes + 1)
    except (OSError, ValueError) as error:
        raise InputError(f"{param}: cannot fetch {url[:200]} ({error})", param, "image_download_failed") from None
    if len(data) > limits.max_image_bytes:
        raise InputError(
            f"{param}: {url[:200]} is larger than {limits.max_image_bytes} bytes", param, "image_too_large"
        )
    return data


def _check_pixels(size: tuple[int, int], limits: InputLimits, param: str) -> None:
    width, height = size
    if width * height > limits.max_image_pixels:
        raise InputError(
            f"{param} is a {width} x {height} image, more than {limits.max_image_pixels} pixels; send a smaller image",
            param,
            "image_too_large",
        )


def check_image_header(data: bytes, limits: InputLimits, param: str = "image") -> None:
    """Check encoded image bytes from their header alone (no pixel is decoded): a format Pillow reads, and at most
    `limits.max_image_pixels` pixels, so that a decompression bomb is refused before it expands.

    Raises:
        InputError: not an image, or too many pixels.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
    except Image.DecompressionBombError:
        raise InputError(f"{param} has too many pixels (a decompression bomb?)", param, "image_too_large") from None
    except (OSError, ValueError, SyntaxError) as error:  # Pillow raises all three for undecodable files
        raise InputError(f"{param} is not an image Pillow can read ({error})", param, "invalid_image") from None
    _check_pixels(size, limits, param)


def open_image(data: bytes | Any, limits: InputLimits, param: str = "image") -> Any:
    """Decode image bytes (checked again by :func:`check_image_header`); a PIL image is returned as it is.

    Raises:
        InputError: a file that is not an image, too large, or truncated.
    """
    if not isinstance(data, (bytes, bytearray)):
        return data
    check_image_header(data, limits, param)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Image.DecompressionBombError:
        raise InputError(f"{param} has too many pixels (a decompression bomb?)", param, "image_too_large") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise InputError(f"{param} cannot be decoded ({error}); re-encode it", param, "invalid_image") from None
    return image


# ------------------------------------------------------------------------------------------------------------
# The batched request path
@dataclass
class Request:
    """One request to :class:`RequestRunner`.

    Attributes:
        task: one of :data:`TASKS`.
        items: `[("text", str) | ("image", PIL image), ...]` (:func:`read_inputs`, images opened).
        options: detection: `threshold` (default: the model's calibrated one); retrieval: `index` (a gallery name),
            `top_k`, `policy`, `method`, `bound` (the pipeline's defaults when absent).
    """

    task: str
    items: list[tuple[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)


class RequestRunner:
    """Answer a batch of requests with the pipelines' code, embedding every request's items together.

    Args:
        detector: an `UnsafeContentDetectionPipeline` (its model, processor and device serve every task).
        retriever: a `SafeRetrievalPipeline` on the same model.
        galleries: searchable galleries by name (`gallery_hysac.Gallery`, e.g. from `retriever._load_index(folder)`).
        forward_batch: most items per forward pass.
    """

    def __init__(
        self,
        detector: Any,
        retriever: Any,
        galleries: dict[str, Any] | None = None,
        forward_batch: int = DEFAULT_FORWARD_BATCH,
    ):
        if retriever.model is not detector.model:
            raise ValueError("the detector and the retriever must share one model")
        self.detector = detector
        self.retriever = retriever
        self.model = detector.model
        self.galleries = dict(galleries or {})
        self.forward_batch = forward_batch

    def run(self, requests: list[Request]) -> tuple[list[Any], list[tuple[str, int]]]:
        """Answer each request; a bad request gets its :class:`InputError` and does not disturb the others.

        Returns:
            one result per request (an :class:`InputError` for a refused one) and the forward passes run,
            `[(modality, items), ...]`. Results: detection, one pipeline dict per item (`label`, `score`,
            `threshold`, `modality`); embeddings, `{"embeddings": (N, D) float32 CPU tensor, "tokens": int}`;
            retrieval, one `safe-retrieval` pipeline result per item.
        """
        results: list[Any] = [None] * len(requests)
        plans: list[dict[str, Any] | None] = []
        for position, request in enumerate(requests):
            try:
                plans.append(self._plan(request))
            except InputError as error:
                results[position] = error
                plans.append(None)
        embeddings, forwards = self._embed([r for r, plan in zip(requests, plans) if plan is not None])
        for position, (request, plan) in enumerate(zip(requests, plans)):
            if plan is None:
                continue
            rows = embeddings.pop(0)
            try:
                results[position] = self._answer(request, plan, rows)
            except (ValueError, TypeError) as error:  # the pipelines' checks of a request's own values
                results[position] = error if isinstance(error, InputError) else InputError(str(error))
        return results, forwards

    def _plan(self, request: Request) -> dict[str, Any]:
        """Check a request's options with the pipelines' own checks, before any work."""
        if request.task not in TASKS:
            raise InputError(f"task={request.task!r} is not one of {list(TASKS)}", "task")
        if not request.items:
            raise InputError(
                "input is empty; pass a text, an image content part, or a list of them", "input", "empty_input"
            )
        options = dict(request.options)
        if request.task == DETECTION_TASK:
            threshold = options.pop("threshold", None)
            _refuse_unknown(options, ("threshold",))
            plan = {}
            for modality in {kind for kind, _ in request.items}:
                try:
                    _, _, postprocess = self.detector._sanitize_parameters(_modality=modality, threshold=threshold)
                except ValueError as error:
                    raise InputError(
                        str(error), "threshold", "model_not_calibrated" if threshold is None else "invalid_value"
                    ) from None
                plan[modality] = postprocess
            return plan
        if request.task == RETRIEVAL_TASK:
            name = options.pop("index", None)
            if name not in self.galleries:
                known = ", ".join(sorted(self.galleries)) or "none"
                raise InputError(
                    f"no index named {name!r}; this service searches: {known}", "index", "index_not_found", 404
                )
            _refuse_unknown(options, ("index", *RETRIEVAL_OPTIONS))
            try:
                _, forward, postprocess = self.retriever._sanitize_parameters(gallery=self.galleries[name], **options)
            except (ValueError, TypeError) as error:
                message = str(error)
                param = next((o for o in RETRIEVAL_OPTIONS if message.startswith(f"{o}=")), None)
                raise InputError(message, param, "invalid_value") from None
            return {"forward": forward, "postprocess": postprocess}
        _refuse_unknown(options, ())
        return {}

    def _embed(self, requests: list[Request]) -> tuple[list[torch.Tensor], list[tuple[str, int]]]:
        """Every request's items in as few forward passes as possible: all texts together, all images together."""
        by_modality: dict[str, list[Any]] = {"text": [], "image": []}
        for request in requests:
            for kind, value in request.items:
                by_modality[kind].append(value)
        embedded, forwards = {}, []
        for modality, values in by_modality.items():
            chunks = []
            for start in range(0, len(values), self.forward_batch):
                chunk = values[start : start + self.forward_batch]
                chunks.append(self.detector.embed(chunk, modality, batch_size=len(chunk)))
                forwards.append((modality, len(chunk)))
            embedded[modality] = torch.cat(chunks) if chunks else None
        cursor = {"text": 0, "image": 0}
        per_request = []
        for request in requests:
            rows = []
            for kind, _ in request.items:
                rows.append(embedded[kind][cursor[kind]])
                cursor[kind] += 1
            per_request.append(torch.stack(rows))
        return per_request, forwards

    def _answer(self, request: Request, plan: dict[str, Any], embeddings: torch.Tensor) -> Any:
        modalities = [kind for kind, _ in request.items]
        if request.task == EMBEDDING_TASK:
            texts = [value for kind, value in request.items if kind == "text"]
            return {"embeddings": embeddings, "tokens": self._count_tokens(texts)}
        device_embeddings = embeddings.to(self.detector.device)
        if request.task == DETECTION_TASK:
            with torch.no_grad():
                distances = self.model.distance_to_root(device_embeddings).float().cpu()
            return [
                self.detector.postprocess({"distance": distance.reshape(1)}, **plan[modality])
                for distance, modality in zip(distances, modalities)
            ]
        with torch.no_grad():
            outputs = self.retriever.search(device_embeddings, **plan["forward"])
        return [
            self.retriever.postprocess(
                {key: value[row : row + 1] for key, value in outputs.items()}, **plan["postprocess"]
            )
            for row in range(len(modalities))
        ]

    def _count_tokens(self, texts: list[str]) -> int:
        if not texts:
            return 0
        ids = self.detector.tokenizer(texts, truncation=True, max_length=self.detector.max_text_length)["input_ids"]
        return sum(len(row) for row in ids)


def _refuse_unknown(options: dict[str, Any], accepted: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise InputError(
            f"unknown parameters {unknown}; this task takes {sorted(accepted) or 'none'}",
            unknown[0],
            "unknown_parameter",
        )


# ------------------------------------------------------------------------------------------------------------
# Inference Endpoints
class EndpointHandler:
    """The custom handler of Hugging Face Inference Endpoints for a HySAC repository.

    `EndpointHandler(path)` loads the model, the processor and the pipelines from the folder's remote code, on the GPU
    when there is one, and every gallery index folder found directly inside `path` (searchable by its folder name).
    `handler({"inputs": ..., "parameters": {...}})` answers one request; `parameters["task"]` is
    `"unsafe-content-detection"` (default), `"feature-extraction"` or `"safe-retrieval"`, the other parameters are the
    task's options (:class:`Request`). One input gives one result, a list gives a list: a detection dict, an embedding
    (a list of floats: hyperboloid space components, as `encode_text`/`encode_image`), or a retrieval result.

    Raises (from `__call__`):
        InputError: a request to fix (its message names the field).
    """

    def __init__(self, path: str = "", limits: InputLimits | None = None):
        path = path or "."
        model = AutoModel.from_pretrained(path, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        # One load of the folder's pipeline module; its siblings come from sys.modules, never loaded again: transformers
        # 4 re-executes a module it is asked for again, and a re-executed gallery_hysac would make Gallery objects of a
        # new class that the loaded pipeline no longer recognises.
        retrieval = get_class_from_dynamic_module("pipeline_hysac.SafeRetrievalPipeline", path)
        detection = sys.modules[retrieval.__module__].UnsafeContentDetectionPipeline
        engine = sys.modules[retrieval.__module__.rpartition(".")[0] + ".gallery_hysac"]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        detector = detection(model=model, processor=processor, device=device)
        retriever = retrieval(model=detector.model, processor=processor, device=device)
        galleries = {
            entry.name: retriever._load_index(entry.path)
            for entry in sorted(os.scandir(path), key=lambda e: e.name)
            if entry.is_dir() and engine.is_gallery_index(entry.path)
        }
        self.limits = limits or InputLimits(allow_remote_images=os.environ.get(REMOTE_ENV, "") == "1")
        self.runner = RequestRunner(detector, retriever, galleries)

    def __call__(self, data: dict[str, Any]) -> Any:
        """Answer one request `{"inputs": item | [items], "parameters": {"task": ..., **options}}`.

        Returns:
            for one item, its result; for a list, a list (see the class docstring).
        Raises:
            InputError: naming the field to fix.
        """
        if not isinstance(data, dict) or "inputs" not in data:
            raise InputError('the request must be {"inputs": ..., "parameters": {...}}', "inputs")
        options = dict(data.get("parameters") or {})
        task = options.pop("task", DETECTION_TASK)
        items = read_inputs(data["inputs"], self.limits, "inputs")
        items = [
            (kind, open_image(value, self.limits, "inputs") if kind == "image" else value) for kind, value in items
        ]
        (result,), _ = self.runner.run([Request(task, items, options)])
        if isinstance(result, InputError):
            raise result
        if task == EMBEDDING_TASK:
            result = result["embeddings"].tolist()
        return result if isinstance(data["inputs"], list) else result[0]


__all__ = [
    "DETECTION_TASK",
    "EMBEDDING_TASK",
    "RETRIEVAL_TASK",
    "TASKS",
    "EndpointHandler",
    "InputError",
    "InputLimits",
    "Request",
    "RequestRunner",
    "check_image_header",
    "open_image",
    "read_image_url",
    "read_inputs",
]
