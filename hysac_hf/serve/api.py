"""The batching worker of `hysac-serve`: a LitServe `LitAPI` over `handler.RequestRunner`.

LitServe collects up to `max_batch_size` queued requests (waiting at most `batch_timeout` for more) and hands them to
:meth:`HySACAPI.predict` together; the runner embeds every text of the batch in one forward pass and every image in
another, then answers each request with the pipelines' own steps. With `max_batch_size=1` LitServe runs one request
at a time (the unbatched baseline of `benchmarks/bench_serve.py`).
"""

from __future__ import annotations

import logging
from typing import Any

import litserve as ls

from ..errors import one_line
from ..modeling.handler import DEFAULT_FORWARD_BATCH, InputError, RequestRunner

logger = logging.getLogger(__name__)


class HySACAPI(ls.LitAPI):
    """Load the model, the pipelines and the indexes once per worker; answer batches of requests.

    Args:
        model: a HySAC folder or Hub id.
        indexes: gallery index folders by name.
        dtype: `"float32"`, `"bfloat16"` or `"float16"` for the towers (the hyperbolic math stays float32).
        forward_batch: most items per forward pass.
        threads: torch CPU threads (None: torch's default).
        log_level: the worker's logging level (it is a fresh process).
        max_batch_size, batch_timeout, spec: LitServe's.
    """

    def __init__(
        self,
        model: str,
        indexes: dict[str, str],
        dtype: str = "float32",
        forward_batch: int = DEFAULT_FORWARD_BATCH,
        threads: int | None = None,
        log_level: str = "INFO",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.model_source = model
        self.indexes = dict(indexes)
        self.dtype = dtype
        self.forward_batch = forward_batch
        self.threads = threads
        self.log_level = log_level
        self.runner: RequestRunner | None = None

    def setup(self, device: str) -> None:
        import torch

        from ..cli import setup_logging
        from ..loading import load_model
        from ..modeling.pipeline_hysac import SafeRetrievalPipeline, UnsafeContentDetectionPipeline

        setup_logging(self.log_level)
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            model, processor = load_model(self.model_source, device=device)
            model.to(getattr(torch, self.dtype))
            detector = UnsafeContentDetectionPipeline(model=model, processor=processor, device=device)
            retriever = SafeRetrievalPipeline(model=model, processor=processor, device=device)
            galleries = {name: retriever._load_index(folder) for name, folder in self.indexes.items()}
        except (ValueError, OSError) as error:  # UsageError, the index readers' ValueErrors
            logger.error("cannot start the worker: %s", one_line(error))
            raise
        self.runner = RequestRunner(detector, retriever, galleries, forward_batch=self.forward_batch)
        sizes = ", ".join(f"{name}: {len(gallery)} {gallery.modality}s" for name, gallery in galleries.items())
        logger.info("worker ready on %s (%s)%s", device, self.dtype, f"; indexes {sizes}" if sizes else "")

    def batch(self, inputs: list) -> list:
        return inputs

    def predict(self, decoded: Any) -> Any:
        """`(payload, Request | InputError)` pairs -> `(payload, result, forwards)` triples; the forward passes of the
        batch travel with its first answer (for the `hysac_batch_size` metric)."""
        single = isinstance(decoded, tuple)
        batch = [decoded] if single else decoded
        requests = [request for _, request in batch if not isinstance(request, InputError)]
        results, forwards = self.runner.run(requests)
        answers, cursor = [], iter(results)
        for payload, request in batch:
            result = request if isinstance(request, InputError) else next(cursor)
            answers.append((payload, result, forwards if not answers else []))
        return answers[0] if single else answers

    def unbatch(self, output: list) -> list:
        return output


__all__ = ["HySACAPI"]
