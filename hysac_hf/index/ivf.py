"""Approximate Lorentz nearest neighbours: a FAISS `IndexIVFFlat` over the exact inner-product vectors, with cells
cut by direction.

This module builds the structure; searching it is the engine's (`modeling/gallery_hysac.py`, which also explains the
reduction of Lorentz nearest neighbours to inner products): FAISS probes `nprobe` cells and ranks their items by the
exact Lorentz inner product, and the engine re-ranks the candidates in float64. Only the cells differ from a stock
inner-product IVF, because the stock one does not work here:

- The pool vectors `[y_s, y_t]` are not unit vectors and their time component grows with the distance to the root,
  so FAISS's inner-product k-means puts most items into a few cells and probes the wrong ones (recall@10 0.2 at
  any `nprobe` on 100,000 points shaped like benchmarks/bench_index.py's). HNSW graphs on these vectors fail the
  same way (recall@10 0.0003 with inner product; 0.68 at efSearch 128 with the usual MIPS-to-L2 augmentation);
  k-means in L2 with inner-product probing recalls well but probes the few large cells near the root, and scans a
  third of the gallery.
- Lorentz neighbours of a query lie in *its direction* at a smaller distance to the root (the hierarchy HySAC
  learns puts general content near the root, close to everything below it). So the cells here are directions:
  spherical k-means on `y_s / |y_s|` gives `nlist` unit centroids `u_j`, and the coarse quantizer is an
  `IndexFlatIP` over `[u_j, 0]`. For a query `[x_s, -x_t]` its inner product with `[u_j, 0]` is
  `|x_s| cos(x_s, u_j)`: cells are probed by the cosine of the query's direction, and an item `[y_s, y_t]` is
  filed (by FAISS's own `add`) under the centroid of largest `|y_s| cos(y_s, u_j)`, i.e. its nearest direction.

The result is a plain `IndexIVFFlat` (inner product, `D + 1` dimensions): `faiss.write_index`/`read_index`, `add`
and `search` work unchanged, and a reader that knows only the inner-product reduction searches it correctly.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import Tensor

from ..modeling.gallery_hysac import add_to_structure

logger = logging.getLogger(__name__)

TRAIN_POINTS_PER_CELL = 50  # k-means sample per cell (FAISS warns below 39)
KMEANS_ITERATIONS = 10  # FAISS trains its IVF quantizers with 10 as well
MIN_POINTS_PER_CELL = 39


def default_nlist(count: int) -> int:
    """Cells for `count` items: the power of two nearest `4 sqrt(count)` (FAISS's guideline is 4-16 sqrt(N)),
    at most `count / 39` so that every cell has enough points to train (at least 1)."""
    target = 4 * math.sqrt(max(count, 1))
    nlist = 2 ** round(math.log2(target))
    return max(1, min(nlist, count // MIN_POINTS_PER_CELL))


def default_nprobe(nlist: int) -> int:
    """Cells probed per query: 1/128 of the cells, at least 16 (or all of them when there are fewer).

    On benchmarks/bench_index.py's 1,000,000-point gallery (`nlist` 4096, `nprobe` 32) this gives recall@10 0.999
    against exact search at 16x its queries per second (`nprobe` 8 already gives 0.999 at 35x there; galleries
    whose clusters span many cells need more probes: 16 of 512 cells for 0.99 on 20,000 points in 40 clusters)."""
    return min(nlist, max(16, nlist // 128))


def train_direction_ivf(
    embeddings: Tensor, curvature: float, nlist: int, nprobe: int, seed: int = 0, show_progress: bool = False
):
    """Build the direction-celled `IndexIVFFlat` over `mips_pool_vectors(embeddings, curvature)` and fill it.

    Args:
        embeddings: `(N, D)` space components, `N >= nlist`.
        curvature: positive curvature magnitude `c`.
        nlist: number of cells.
        nprobe: cells probed per query (stored in the index; `search` may override it).
        seed: k-means seed (sample and initialisation), for reproducible cells.
        show_progress: log k-means progress.
    Returns:
        a trained and filled `faiss.IndexIVFFlat` with `d = D + 1`, inner-product metric.
    """
    import faiss

    count, dim = embeddings.shape
    if not 1 <= nlist <= count:
        raise ValueError(f"nlist={nlist} must be between 1 and the number of items {count}")
    generator = torch.Generator().manual_seed(seed)
    sample_size = min(count, TRAIN_POINTS_PER_CELL * nlist)
    sample = (
        embeddings if sample_size == count else embeddings[torch.randperm(count, generator=generator)[:sample_size]]
    )
    directions = sample.float() / sample.float().norm(dim=1, keepdim=True).clamp(min=1e-12)  # the root: no direction
    kmeans = faiss.Kmeans(
        dim,
        nlist,
        niter=KMEANS_ITERATIONS,
        seed=seed,
        spherical=True,
        max_points_per_centroid=TRAIN_POINTS_PER_CELL,
        verbose=show_progress,
    )
    kmeans.train(np.ascontiguousarray(directions.numpy(), dtype=np.float32))
    centroids = np.hstack([kmeans.centroids, np.zeros((nlist, 1), dtype=np.float32)])
    quantizer = faiss.IndexFlatIP(dim + 1)
    quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    index = faiss.IndexIVFFlat(quantizer, dim + 1, nlist, faiss.METRIC_INNER_PRODUCT)  # keeps `quantizer` alive
    index.nprobe = nprobe
    add_to_structure(index, embeddings, curvature)
    return index


def cell_sizes(index) -> np.ndarray:
    """Items per cell of an IVF index (balance diagnostics)."""
    return np.array([index.invlists.list_size(i) for i in range(index.nlist)])


__all__ = ["cell_sizes", "default_nlist", "default_nprobe", "train_direction_ivf"]
