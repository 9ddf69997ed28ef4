"""HySAC evaluation: retrieval (Tables 1, 2, 8), classification (Tables 5, 6), histograms, zero-shot; `hysac-eval`.

Every evaluation reads embeddings made by `hysac_hf.encode` (an `EmbeddingCache`, or `encode_images`/`encode_texts`).
Modules: `retrieval` (the paper's tables and the one recall, on the search engine's ranks: `modeling/gallery_hysac.py`),
`classification` (metrics and sweeps; choosing a threshold is `hysac_hf.calibration`), `zeroshot`, `cli`; the distance
statistics and the Figure-2 histogram are `hysac_hf.calibration`. The `evaluate` metric modules live in
`metrics/<name>/<name>.py`; load them offline with `evaluate.load(metric_path("recall_at_k"))`.
"""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).parent / "metrics"
METRIC_NAMES = ("recall_at_k", "unsafe_classification")


def metric_path(name: str) -> str:
    """Local folder of a bundled `evaluate` metric module, for `evaluate.load(metric_path(name))`."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; bundled metrics: {list(METRIC_NAMES)}")
    return str(METRICS_DIR / name)


__all__ = ["METRICS_DIR", "METRIC_NAMES", "metric_path"]
