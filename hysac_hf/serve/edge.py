"""The edge of `hysac-serve`: what every request meets before the API, and the metrics.

:class:`EdgeMiddleware` (an ASGI middleware in LitServe's `middlewares=`), in order:

1. the API key: with one set, every route but `/health` needs `Authorization: Bearer <key>` (compared in constant
   time, `hmac.compare_digest`), else 401;
2. the body limit: a declared `Content-Length` above `max_body_bytes` is a 413 before anything is read, and a body
   that grows past it while read is a 413 too;
3. the bounded queue: at most `max_in_flight` model requests (the three POST routes) are admitted at once; more are
   answered 503 with `Retry-After` at once, so an overload is refused instead of queued without end;
4. metrics and the access log: `hysac_requests_total{endpoint,status}`, `hysac_request_duration_seconds{endpoint}`,
   `hysac_requests_in_flight`, and one `logging` line per request (logger `hysac_hf.serve.access`).

:func:`install_error_handlers` makes every error JSON in OpenAI's shape (`{"error": {"message", "type", "param",
"code"}}`): FastAPI's and Starlette's (404 for an unknown route, 405, 413, LitServe's 504) keep their status, an
unexpected exception is a 500 whose body says only that (the traceback goes to the server log).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .spec import ENDPOINTS, error_body

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("hysac_hf.serve.access")

HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"
KNOWN_PATHS = {*ENDPOINTS, HEALTH_PATH, METRICS_PATH}
RETRY_AFTER_S = 1
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ERROR_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


class Metrics:
    """The service's Prometheus metrics, in their own registry (served at `/metrics` by the HTTP process)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hysac_requests",
            "Requests answered, by endpoint and HTTP status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "hysac_request_duration_seconds",
            "Time from the request's arrival to its answer, by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "hysac_requests_in_flight", "Model requests admitted and not yet answered.", registry=self.registry
        )
        self.batch_size = Histogram(
            "hysac_batch_size",
            "Items per forward pass the model ran (texts or images of all the requests batched together).",
            ["modality"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )

    def observe_forwards(self, forwards: list[tuple[str, int]]) -> None:
        for modality, size in forwards:
            self.batch_size.labels(modality=modality).observe(size)

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class _BodyTooLarge(Exception):
    pass


class EdgeMiddleware:
    """See the module docstring.

    Args:
        app: the ASGI app it wraps.
        metrics: where requests are counted.
        api_key: the key every route but `/health` needs, or None.
        max_body_bytes: the largest request body.
        max_in_flight: the most model requests admitted at once.
    """

    def __init__(self, app, metrics: Metrics, api_key: str | None, max_body_bytes: int, max_in_flight: int):
        self.app = app
        self.metrics = metrics
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path = scope["path"]
        endpoint = path if path in KNOWN_PATHS else "other"
        status = {"code": 500}

        async def send_recording(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        admitted = False
        try:
            refusal = self._refusal(scope, path)
            if refusal is not None:
                await refusal(scope, receive, send_recording)
                return
            if path in ENDPOINTS and scope["method"] == "POST":
                if self.in_flight >= self.max_in_flight:
                    message = f"the service is at capacity ({self.max_in_flight} requests in flight); retry later"
                    response = JSONResponse(
                        error_body(message, "server_error", None, "server_overloaded"),
                        status_code=503,
                        headers={"Retry-After": str(RETRY_AFTER_S)},
                    )
                    await response(scope, receive, send_recording)
                    return
                admitted = True
                self.in_flight += 1
                self.metrics.in_flight.set(self.in_flight)
            await self.app(scope, self._limited(receive), send_recording)
        finally:
            if admitted:
                self.in_flight -= 1
                self.metrics.in_flight.set(self.in_flight)
            elapsed = time.perf_counter() - start
            self.metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()
            self.metrics.latency.labels(endpoint=endpoint).observe(elapsed)
            client = scope.get("client") or ("-", 0)
            access_logger.info('%s "%s %s" %d %.1fms', client[0], scope["method"], path, status["code"], elapsed * 1e3)

    def _refusal(self, scope, path: str) -> JSONResponse | None:
        """A 401 for a missing or wrong key, a 413 for a declared body above the limit, else None."""
        headers = {key.lower(): value for key, value in scope.get("headers", [])}
        if self.api_key is not None and path != HEALTH_PATH:
            scheme, _, key = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), self.api_key):
                return JSONResponse(
                    error_body(
                        "a valid API key is required: send the header 'Authorization: Bearer <key>'",
                        "invalid_request_error",
                        None,
                        "invalid_api_key",
                    ),
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return self._too_large()
        return None

    def _too_large(self) -> JSONResponse:
        return JSONResponse(
            error_body(
                f"the request body is larger than {self.max_body_bytes} bytes; send fewer or smaller inputs",
                "invalid_request_error",
                None,
                "request_too_large",
            ),
            status_code=413,
        )

    def _limited(self, receive):
        """`receive`, refusing a body that grows past the limit (one sent without a Content-Length)."""
        seen = 0

        async def receive_limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise StarletteHTTPException(413, f"the request body is larger than {self.max_body_bytes} bytes")
            return message

        return receive_limited


def install_error_handlers(app: FastAPI) -> None:
    """Every error as JSON in OpenAI's shape; see the module docstring."""

    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        detail = error.detail if isinstance(error.detail, str) else json.dumps(error.detail)
        if error.status_code == 404:
            detail = f"no route {request.method} {request.url.path}; the service answers {sorted(ENDPOINTS)}"
        error_type = "server_error" if error.status_code >= 500 else "invalid_request_error"
        code = "timeout" if error.status_code == 504 else ERROR_CODES.get(error.status_code)
        return JSONResponse(
            error_body(detail, error_type, None, code), status_code=error.status_code, headers=error.headers
        )

    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(f"invalid request: {error.errors()}", code="invalid_input"), status_code=400)

    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        logger.error("error on %s %s: %r", request.method, request.url.path, error, exc_info=error)
        return JSONResponse(
            error_body("internal server error; the server log has the details", "server_error", None, "internal_error"),
            status_code=500,
        )

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected_error)


__all__ = ["EdgeMiddleware", "Metrics", "install_error_handlers"]
