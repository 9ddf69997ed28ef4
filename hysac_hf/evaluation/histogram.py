"""Distance-from-root histograms per content type (the paper's Figure 2), from cached embeddings.

HySAC should place safe text < safe image < unsafe text < unsafe image by distance to the root; the
histogram shows whether a model separates safe from unsafe content. The per-type statistics returned are
the same ones the bounds use (mean, 5th and 95th percentiles).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..modeling.lorentz import dist_to_origin
from .embed import CONTENT_NAMES, EmbeddingCache

logger = logging.getLogger(__name__)

# Plot order (the intended radial order) and colours: safe in greens/blues, unsafe in reds.
PLOT_ORDER = ("S", "V", "U", "G")
COLOURS = {"S": "tab:green", "V": "tab:blue", "U": "tab:orange", "G": "tab:red"}


def root_distances(cache: EmbeddingCache) -> dict[str, np.ndarray]:
    """`{content key: (N,) float64 distances to the root}` for every matrix in the cache."""
    return {k: dist_to_origin(cache.embeds[k].double(), cache.curv).numpy() for k in PLOT_ORDER if k in cache.embeds}


def distance_stats(distances: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Mean, 5th/95th percentiles, min and max per content type (the statistics of `config.bounds`)."""
    return {
        k: {
            "avg": float(d.mean()),
            "low_05": float(np.percentile(d, 5)),
            "up_95": float(np.percentile(d, 95)),
            "min": float(d.min()),
            "max": float(d.max()),
            "count": int(d.size),
        }
        for k, d in distances.items()
    }


def plot_root_histogram(
    distances: dict[str, np.ndarray],
    path: str | os.PathLike,
    bins: int = 60,
    title: str = "Distance from the root",
    bounds: dict | None = None,
) -> Path:
    """Overlaid histograms of the distance to the root per content type, as a PNG (Agg backend).

    Args:
        distances: output of :func:`root_distances`.
        path: PNG file to write.
        bins: shared bin count over the joint range.
        title: figure title.
        bounds: optional `config.bounds`; each type's `up_95` is drawn as a dashed line in its colour.
    Returns:
        the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not distances:
        raise ValueError("no distances to plot")
    joint = np.concatenate(list(distances.values()))
    edges = np.linspace(joint.min(), joint.max() if joint.max() > joint.min() else joint.min() + 1e-6, bins + 1)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for key, d in distances.items():
        ax.hist(d, bins=edges, alpha=0.45, color=COLOURS[key], label=f"{CONTENT_NAMES[key]} (n={d.size})")
        if bounds and key in bounds:
            ax.axvline(bounds[key]["up_95"], color=COLOURS[key], linestyle="--", linewidth=1)
    ax.set_xlabel("hyperbolic distance to the root")
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    logger.info("Wrote the distance histogram to %s", path)
    return path


__all__ = ["distance_stats", "plot_root_histogram", "root_distances"]
