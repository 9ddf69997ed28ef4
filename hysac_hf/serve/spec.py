"""The OpenAI-shaped HTTP API of `hysac-serve`, as a LitServe spec: `/v1/embeddings`, `/v1/moderations`, `/v1/search`.

A `LitSpec` is LitServe's way to give one batched `LitAPI` several routes of a given shape (its own `OpenAISpec`
and `OpenAIEmbeddingSpec` do the same): the three routes feed one request queue, so one worker, one model and one
batch serve all three, and the items of concurrent requests of any kind are embedded together.

- In the HTTP process (:meth:`HySACSpec.endpoint`): the body is parsed and checked (JSON, fields, the items with
  `handler.read_inputs`: texts, data-URL images checked from their header, remote URLs only when allowed, the item
  limit), an unknown index is a 404; then the request is queued and awaited, at most `timeout` seconds.
- In the worker (:meth:`HySACSpec.decode_request`, :meth:`HySACSpec.encode_response`): images are decoded, and the
  results of `handler.RequestRunner` become OpenAI's response shapes.

Every answer is JSON; every refusal is `{"error": {"message", "type", "param", "code"}}` with a 4xx status.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from typing import Any

import numpy as np
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem

from ..modeling.handler import (
    DETECTION_TASK,
    EMBEDDING_TASK,
    RETRIEVAL_OPTIONS,
    RETRIEVAL_TASK,
    InputError,
    InputLimits,
    open_image,
    read_inputs,
)
from ..modeling.handler import Request as RunnerRequest

logger = logging.getLogger(__name__)

EMBEDDINGS_PATH = "/v1/embeddings"
MODERATIONS_PATH = "/v1/moderations"
SEARCH_PATH = "/v1/search"
ENDPOINTS = {EMBEDDINGS_PATH: EMBEDDING_TASK, MODERATIONS_PATH: DETECTION_TASK, SEARCH_PATH: RETRIEVAL_TASK}
# The fields each endpoint accepts (OpenAI's for the first two; `model` and `user` are accepted and not used).
FIELDS = {
    EMBEDDINGS_PATH: ("input", "model", "encoding_format", "dimensions", "user"),
    MODERATIONS_PATH: ("input", "model"),
    SEARCH_PATH: ("input", "model", "index", *RETRIEVAL_OPTIONS),
}
ENCODING_FORMATS = ("float", "base64")


def error_body(
    message: str, error_type: str = "invalid_request_error", param: str | None = None, code: str | None = None
):
    """An error in OpenAI's shape."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(error: InputError) -> JSONResponse:
    return JSONResponse({"error": error.as_dict()}, status_code=error.status)


class HySACSpec(LitSpec):
    """The three OpenAI-shaped routes of `hysac-serve` on one batched `LitAPI` (see the module docstring).

    Args:
        model_name: the `model` every response names.
        index_names: the gallery indexes the service searches (others are a 404 before anything is queued).
        limits: what a request may hold.
        timeout: seconds a request may wait for its answer (504 after that).
    """

    def __init__(self, model_name: str, index_names: list[str], limits: InputLimits, timeout: float):
        super().__init__()
        self.api_path = EMBEDDINGS_PATH  # the key of the one request queue
        self.model_name = model_name
        self.index_names = set(index_names)
        self.limits = limits
        self.timeout = timeout
        self.on_forwards = None  # set in the HTTP process: called with the [(modality, items), ...] each batch ran

    def __getstate__(self) -> dict[str, Any]:
        """What the worker process gets: not the HTTP process's metrics callback."""
        state = super().__getstate__()
        state["on_forwards"] = None
        return state

    def pre_setup(self, lit_api) -> None:
        for path in ENDPOINTS:
            self.add_endpoint(path, self.endpoint, ["POST"])

    # ----------------------------------------------------------------------------------------------------
    # HTTP process
    async def endpoint(self, request: Request) -> JSONResponse:
        """Parse and check one request, queue it for the worker, and answer with its result."""
        path = request.url.path
        try:
            payload = await self._read(request, path)
        except InputError as error:
            return error_response(error)
        uid = uuid.uuid4()
        event = asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(event=event)
        self.request_queue.put_nowait((self.response_queue_id, uid, time.monotonic(), payload))
        try:
            await asyncio.wait_for(event.wait(), self.timeout)
        except asyncio.TimeoutError:
            self.response_buffer.pop(uid, None)  # a late answer finds no buffer and is dropped
            return JSONResponse(
                error_body(
                    f"the request took more than {self.timeout:g} s; retry later", "server_error", None, "timeout"
                ),
                status_code=504,
            )
        response, status = self.response_buffer.pop(uid).response
        if status == LitAPIStatus.ERROR:
            if isinstance(response, HTTPException):  # LitServe's own: a request that waited past the timeout (504)
                raise response
            raise RuntimeError(f"the worker failed on {path}: {response!r}")  # a bug: logged, answered 500
        if response.get("forwards") and self.on_forwards is not None:
            self.on_forwards(response["forwards"])
        return JSONResponse(response["body"], status_code=response["status"])

    async def _read(self, request: Request, path: str) -> dict[str, Any]:
        """The request body -> the payload for the worker; raises InputError."""
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InputError(f"the request body is not valid JSON ({error})", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise InputError("the request body must be a JSON object", None, "invalid_json")
        unknown = sorted(set(body) - set(FIELDS[path]))
        if unknown:
            raise InputError(
                f"unknown fields {unknown}; {path} takes {sorted(FIELDS[path])}", unknown[0], "unknown_parameter"
            )
        if "input" not in body:
            raise InputError(
                f"{path} needs 'input': a text, an image content part, or a list of them", "input", "missing_input"
            )
        options: dict[str, Any] = {}
        encoding_format = body.get("encoding_format") or "float"
        if path == EMBEDDINGS_PATH:
            if encoding_format not in ENCODING_FORMATS:
                raise InputError(
                    f"encoding_format must be one of {list(ENCODING_FORMATS)}", "encoding_format", "invalid_value"
                )
            if body.get("dimensions") is not None:
                raise InputError(
                    "dimensions is not supported: a truncated hyperboloid embedding no longer gives Lorentz distances",
                    "dimensions",
                    "invalid_value",
                )
        if path == SEARCH_PATH:
            name = body.get("index")
            if not isinstance(name, str) or name not in self.index_names:
                known = ", ".join(sorted(self.index_names)) or "none (start the service with --index NAME=DIR)"
                raise InputError(
                    f"no index named {name!r}; this service searches: {known}", "index", "index_not_found", 404
                )
            options = {key: body[key] for key in ("index", *RETRIEVAL_OPTIONS) if key in body}
        if self.limits.allow_remote_images:  # downloads block: off the event loop
            items = await asyncio.to_thread(read_inputs, body["input"], self.limits)
        else:
            items = read_inputs(body["input"], self.limits)
        return {
            "path": path,
            "items": items,
            "options": options,
            "encoding_format": encoding_format,
            "single": not isinstance(body["input"], list),
        }

    # ----------------------------------------------------------------------------------------------------
    # Worker
    def decode_request(self, payload: dict[str, Any], context_kwargs: dict | None = None):
        """The payload -> `(payload, handler.Request)`, images decoded; `(payload, InputError)` for a bad image."""
        try:
            items = [
                (kind, open_image(value, self.limits, f"input[{i}]") if kind == "image" else value)
                for i, (kind, value) in enumerate(payload["items"])
            ]
        except InputError as error:
            return payload, error
        return payload, RunnerRequest(ENDPOINTS[payload["path"]], items, payload["options"])

    def encode_response(self, output: tuple[dict[str, Any], Any, list], context_kwargs: dict | None = None) -> dict:
        """`(payload, result, forwards)` -> `{"status", "body", "forwards"}` (the body in OpenAI's shape)."""
        payload, result, forwards = output
        if isinstance(result, InputError):
            return {"status": result.status, "body": {"error": result.as_dict()}, "forwards": forwards}
        path = payload["path"]
        if path == EMBEDDINGS_PATH:
            body = self._embeddings(result, payload["encoding_format"])
        elif path == MODERATIONS_PATH:
            body = self._moderations(result)
        else:
            body = result[0] if payload["single"] else result
        return {"status": 200, "body": body, "forwards": forwards}

    def _embeddings(self, result: dict[str, Any], encoding_format: str) -> dict[str, Any]:
        embeddings = result["embeddings"].numpy()
        if encoding_format == "base64":  # OpenAI's clients read little-endian float32
            vectors = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in embeddings]
        else:
            vectors = embeddings.astype(np.float64).tolist()  # float32 values, printed exactly by JSON
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": vector} for i, vector in enumerate(vectors)],
            "model": self.model_name,
            "usage": {"prompt_tokens": result["tokens"], "total_tokens": result["tokens"]},
        }

    def _moderations(self, result: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": f"modr-{uuid.uuid4().hex}",
            "model": self.model_name,
            "results": [
                {
                    "flagged": item["label"] == "unsafe",
                    "categories": {"unsafe": item["label"] == "unsafe"},
                    "category_scores": {"unsafe": item["score"]},
                    "category_applied_input_types": {"unsafe": [item["modality"]]},
                }
                for item in result
            ],
        }


__all__ = ["ENDPOINTS", "HySACSpec", "error_body"]
