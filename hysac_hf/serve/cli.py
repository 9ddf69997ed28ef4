"""`hysac-serve`: serve a HySAC model over HTTP (OpenAI-shaped embeddings, moderation and safe search).

    hysac-serve --model FOLDER_OR_REPO [--index NAME=DIR ...] [--host 127.0.0.1] [--port 8000]

Routes: `POST /v1/embeddings`, `POST /v1/moderations`, `POST /v1/search`, `GET /health`, `GET /metrics` (README,
"Serving"). Safe by default: it listens on 127.0.0.1 only, refuses bodies above 10 MB, images above 25 megapixels
(from their header), requests of more than 64 items, remote image URLs (unless --allow_remote_images), and answers
503 with Retry-After beyond --max_queue requests in flight; --api_key (or HYSAC_API_KEY) requires
`Authorization: Bearer <key>` on every route but /health. SIGTERM or Ctrl-C stops it and its worker processes.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from ..cli import add_argument, add_debug_flag, run, setup_logging
from ..errors import UsageError, one_line, require, usage_errors
from ..modeling.handler import (
    DEFAULT_FORWARD_BATCH,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_ITEMS,
    DEFAULT_MAX_TEXT_CHARS,
    InputLimits,
)

logger = logging.getLogger(__name__)

PROG = "hysac-serve"
API_KEY_ENV = "HYSAC_API_KEY"
HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe binds
DEFAULT_MAX_BODY_BYTES = 10 * 2**20
DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_argument(parser, "--model", required=True, help="a HySAC folder or Hub repo id")
    add_argument(
        parser,
        "--index",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a gallery index folder (hysac-index build) that /v1/search searches as NAME; repeat for several",
    )
    add_argument(parser, "--host", default="127.0.0.1", choices=HOSTS, help="address to listen on (default: 127.0.0.1)")
    add_argument(parser, "--port", type=int, default=8000, help="port to listen on (1024-65535, default: 8000)")
    add_argument(
        parser,
        "--api_key",
        default=None,
        help=f"require 'Authorization: Bearer <key>' on every route but /health (default: ${API_KEY_ENV}, else none; "
        "prefer the variable: a key on the command line shows in the process list)",
    )
    add_argument(parser, "--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_argument(parser, "--dtype", default="float32", choices=DTYPES, help="tower precision (default: float32)")
    add_argument(parser, "--workers", type=int, default=1, help="model workers per device (default: 1)")
    add_argument(
        parser, "--max_batch_size", type=int, default=32, help="requests batched together (1: no batching; default: 32)"
    )
    add_argument(
        parser,
        "--batch_timeout",
        type=float,
        default=0.005,
        help="seconds a batch waits to fill up (default: 0.005)",
    )
    add_argument(parser, "--forward_batch", type=int, default=DEFAULT_FORWARD_BATCH, help="most items per forward pass")
    add_argument(
        parser,
        "--max_queue",
        type=int,
        default=256,
        help="most model requests in flight; more are answered 503 with Retry-After (default: 256)",
    )
    add_argument(
        parser, "--timeout", type=float, default=30.0, help="seconds a request may take (504 after; default: 30)"
    )
    add_argument(parser, "--max_body_bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="largest body (413 above)")
    add_argument(parser, "--max_items", type=int, default=DEFAULT_MAX_ITEMS, help="most inputs per request")
    add_argument(parser, "--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, help="most pixels per image")
    add_argument(parser, "--max_text_chars", type=int, default=DEFAULT_MAX_TEXT_CHARS, help="longest text")
    add_argument(
        parser,
        "--allow_remote_images",
        action="store_true",
        help="fetch http(s) image URLs (off by default: it lets callers make the server fetch any URL)",
    )
    add_argument(parser, "--served_model_name", default=None, help="the 'model' of responses (default: --model)")
    add_argument(parser, "--threads", type=int, default=None, help="torch CPU threads per worker (default: torch's)")
    add_argument(parser, "--log_level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.api_key is None:
        args.api_key = os.environ.get(API_KEY_ENV) or None
    for name in ("workers", "max_batch_size", "forward_batch", "max_queue", "max_body_bytes", "max_items"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.batch_timeout < 0 or args.timeout <= 0:
        parser.error("--batch_timeout must be >= 0 and --timeout > 0")
    return args


def parse_indexes(specs: list[str]) -> dict[str, str]:
    """`["NAME=DIR", ...]` -> `{NAME: DIR}`, each folder checked to be a readable gallery index.

    Raises:
        UsageError: a malformed or repeated NAME=DIR, or a folder that is not a gallery index.
    """
    from ..modeling.gallery_hysac import read_index_json

    indexes = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise UsageError(f"--index {spec!r} must be NAME=DIR (e.g. --index photos=photos-index)")
        if name in indexes:
            raise UsageError(f"--index names {name!r} twice; give each index its own name")
        with usage_errors():
            read_index_json(folder)
        indexes[name] = folder
    return indexes


def check_model(source: str) -> None:
    """Fail at start, in one line, when `source` is not a HySAC model (the worker loads the weights later).

    Raises:
        UsageError: no readable config, or the config of another model type.
    """
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(source)
    except (OSError, ValueError) as error:
        raise UsageError(
            f"cannot read a model config from {source} ({one_line(error)}); pass a HySAC folder or Hub repo id"
        ) from None
    if config.get("model_type") != "hysac":
        raise UsageError(
            f"{source} holds a {config.get('model_type')!r} model, not a HySAC one; convert it first (hysac-convert) "
            "or pass a HySAC folder"
        )


def build_server(args: argparse.Namespace):
    """The LitServer of `args`: one batching worker (:class:`~hysac_hf.serve.api.HySACAPI`) behind the OpenAI-shaped
    routes (:class:`~hysac_hf.serve.spec.HySACSpec`) and the edge (:mod:`hysac_hf.serve.edge`)."""
    import litserve as ls
    import torch

    from .api import HySACAPI
    from .edge import METRICS_PATH, EdgeMiddleware, Metrics, install_error_handlers
    from .spec import HySACSpec

    check_model(str(args.model))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device {device!r} must be cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device; use --device cpu")
    indexes = parse_indexes(args.index)
    limits = InputLimits(
        max_items=args.max_items,
        max_image_pixels=args.max_image_pixels,
        max_image_bytes=args.max_body_bytes,
        max_text_chars=args.max_text_chars,
        allow_remote_images=args.allow_remote_images,
    )
    spec = HySACSpec(args.served_model_name or str(args.model), list(indexes), limits, args.timeout)
    metrics = Metrics()
    spec.on_forwards = metrics.observe_forwards
    api = HySACAPI(
        model=str(args.model),
        indexes=indexes,
        dtype=args.dtype,
        forward_batch=args.forward_batch,
        threads=args.threads,
        log_level=args.log_level,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout if args.max_batch_size > 1 else 0.0,
        spec=spec,
    )
    edge = {
        "metrics": metrics,
        "api_key": args.api_key,
        "max_body_bytes": args.max_body_bytes,
        "max_in_flight": args.max_queue,
    }
    server = ls.LitServer(
        api,
        accelerator=device,
        devices=1 if device == "cpu" else "auto",
        workers_per_device=args.workers,
        timeout=args.timeout,
        middlewares=[(EdgeMiddleware, edge)],
        disable_openapi_url=True,
    )
    server.uvicorn_graceful_timeout = 5  # seconds open connections get at shutdown
    install_error_handlers(server.app)
    server.app.add_api_route(METRICS_PATH, metrics.render, methods=["GET"])
    return server


_MAIN_PID = os.getpid()


def _stop(signum, frame) -> None:
    """SIGTERM in the main process: a KeyboardInterrupt, on which LitServer.run stops its processes. The HTTP process,
    forked from it, inherits this handler: there the signal keeps its default meaning."""
    if os.getpid() == _MAIN_PID:
        raise KeyboardInterrupt
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def serve(args: argparse.Namespace) -> int:
    require("litserve", "prometheus_client", purpose=PROG)
    server = build_server(args)
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    signal.signal(signal.SIGTERM, _stop)
    logger.info(
        "serving %s on http://%s:%d (batches of up to %d requests%s)",
        args.model,
        args.host if args.host != "::" else "[::]",
        args.port,
        args.max_batch_size,
        ", API key required" if args.api_key else "",
    )
    try:
        server.run(
            host=args.host,
            port=args.port,
            num_api_servers=1,
            generate_client_file=False,
            log_level=logging.getLevelName(
                max(logging.WARNING, logging.getLogger("hysac_hf").getEffectiveLevel())
            ).lower(),
            access_log=False,  # hysac_hf.serve.access logs every request
            timeout_keep_alive=5,
        )
    except RuntimeError as error:
        if "failed to start" not in str(error):
            raise
        raise UsageError("the worker could not load the model or an index (the error is logged above)") from None
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    return run(serve, args, PROG)


if __name__ == "__main__":
    sys.exit(main())
