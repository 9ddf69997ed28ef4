"""Approximate Lorentz nearest neighbours: FAISS IVF structures over the exact inner-product vectors, with radial cells.

This module constructs and trains the structures; filing items into them, searching them and reading and writing them
are the engine's (`modeling/gallery_hysac.py`, which also explains the reduction of Lorentz nearest neighbours to
inner products and defines the cells, :class:`~hysac_hf.modeling.gallery_hysac.RadialCells`). `tuning.py` chooses
among the structures built here by measuring them.

Why radial cells. The first release cut cells by direction only (spherical k-means on `y_s / |y_s|`, probed by the
cosine of the query). Lorentz neighbours of a query maximise `<x, y>_L = |x_s| |y_s| cos(x, y) - x_t y_t`: a cosine
term and a term that favours items near the root. On clustered galleries the cosine term decides and direction cells
work; on isotropic ones the neighbours of every query are the items nearest the root, whatever their direction
(measured: all true neighbours among the innermost 0.6 % of 200,000 points, at cosine 0.05 to the query), so
direction cells must all be probed (recall@10 0.17 at 12 % of the gallery scanned); anisotropic (power-law spectrum)
galleries lie between (neighbours at radius quantiles 0.01-0.15, cosine 0.4; recall 0.82 at 6 %). Two changes fix it:

- **Shells.** Items are first split by distance to the root into shells whose sizes grow geometrically from the
  root (the innermost holds one cell's worth of items), then each shell into direction cells (spherical k-means),
  so that every cell holds about `N / nlist` items. The innermost items, neighbours of everyone on isotropic data,
  sit in a few small cells.
- **Cells probed by the score they can hold.** A cell's quantizer vector is the pool vector of a point at its shell's
  inner edge in the cell's *mean* direction, `[rho_lo m_j, sqrt(1/c + rho_lo^2)]` (`|m_j| <= 1` shrinks with the
  spread of the cell), so FAISS probes cells by the Lorentz inner product of the query with that point.

Measured on 200,000 points of dimension 768 (2,048 cells; share of the gallery scanned for recall@10 >= 0.95): isotropic
0.4 % (direction cells: not reached at 12 %), power-law 2.0 % (19 %), clustered: shells 12 % or more, but a single shell
outside one innermost cell (probed by mean directions) 0.2 % (direction cells with unit centroids: 2.3 %). No one shell
growth suits every gallery, so :mod:`tuning` builds both layouts, `"shells"` (growth 2) and `"directions"` (one
innermost cell, then one shell), on a sample and keeps the cheaper one at the target recall.

HNSW graphs were measured too and are not offered: on these vectors they recall poorly (0.0003 recall@10 with inner
product; 0.68 at efSearch 128 with the usual MIPS-to-L2 augmentation, on 100,000 benchmark points).

The compressed kind `ivfpq` has the same cells over product-quantised vectors (FAISS `IndexIVFPQ`): the pool vectors
of dimension `D + 1` are padded with zeros to a multiple of the sub-vector length (an `IndexPreTransform` with a
`RemapDimensionsTransform`, so the structure still takes `D + 1`-dimensional vectors), and the engine re-ranks its
candidates exactly from the embeddings.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

TRAIN_POINTS_PER_CELL = 50  # k-means sample per cell (FAISS warns below 39)
KMEANS_ITERATIONS = 10  # FAISS trains its IVF quantizers with 10 as well
MIN_POINTS_PER_CELL = 39
# Shell growth of the two layouts: sizes grow by this factor from the root; inf: one innermost cell, then one shell.
LAYOUTS = {"shells": 2.0, "directions": math.inf}
PQ_SUBVECTOR = 4  # dimensions per product-quantiser sub-vector (8-bit codes): 1 byte per 4 floats, 1/16 the size
PQ_BITS = 8
PQ_ROWS_PER_CODE = MIN_POINTS_PER_CELL  # FAISS k-means asks as many training rows per code word as per cell
PQ_TRAIN_ROWS = 65_536  # rows the product quantiser trains on (FAISS samples 256 per code word of each sub-quantiser)


def default_nlist(count: int, per_root: float = 4.0) -> int:
    """Cells for `count` items: the power of two nearest `per_root * sqrt(count)` (FAISS's guideline is 4-16
    sqrt(N)), at most `count / 39` so that every cell has enough points to train (at least 1)."""
    target = per_root * math.sqrt(max(count, 1))
    nlist = 2 ** round(math.log2(target))
    return max(1, min(nlist, count // MIN_POINTS_PER_CELL))


def default_nprobe(nlist: int) -> int:
    """Cells probed per query when no target recall is measured (`target_recall=None`): 1/128 of the cells, at least
    16 (or all of them when there are fewer). A tuned build chooses its own (`tuning.py`)."""
    return min(nlist, max(16, nlist // 128))


def training_sample(count: int, nlist: int, seed: int = 0, exclude: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of the k-means sample: `TRAIN_POINTS_PER_CELL` per cell (all items when fewer), drawn without
    the `exclude`d items (held-out tuning queries)."""
    rng = np.random.default_rng(seed)
    pool = np.arange(count) if exclude is None or not len(exclude) else np.setdiff1d(np.arange(count), exclude)
    size = min(pool.size, TRAIN_POINTS_PER_CELL * nlist)
    return np.sort(pool if size == pool.size else rng.choice(pool, size, replace=False))


def _spherical_kmeans(directions: np.ndarray, cells: int, seed: int, show_progress: bool) -> np.ndarray:
    import faiss

    kmeans = faiss.Kmeans(
        directions.shape[1],
        cells,
        niter=KMEANS_ITERATIONS,
        seed=seed,
        spherical=True,
        max_points_per_centroid=TRAIN_POINTS_PER_CELL,
        min_points_per_centroid=1,  # small shells train few cells on few points, knowingly (FAISS would warn)
        verbose=show_progress,
    )
    kmeans.train(np.ascontiguousarray(directions, dtype=np.float32))
    return kmeans.centroids


def shell_sizes(count: int, nlist: int, growth: float) -> list[int]:
    """Items per shell, from the root out, for `count` sorted items and cells of `count / nlist` items: one cell's
    worth, then `growth` times more each shell; the last shell takes the rest (a remainder under half a shell joins
    the one before)."""
    cell = count / max(nlist, 1)
    sizes: list[int] = []
    size, used = cell, 0
    while used + size < count and math.isfinite(size):
        sizes.append(max(1, round(size)))
        used += sizes[-1]
        size *= growth
    rest = count - used
    if sizes and math.isfinite(size) and rest < size / (2 * growth):
        sizes[-1] += rest
    elif rest > 0:
        sizes.append(rest)
    return sizes


def radial_quantizer(
    sample: Tensor,
    curvature: float,
    nlist: int,
    layout: str = "shells",
    seed: int = 0,
    show_progress: bool = False,
) -> np.ndarray:
    """The quantizer vectors of radial cells trained on `sample` (see the module docstring and
    :class:`~hysac_hf.modeling.gallery_hysac.RadialCells`).

    Args:
        sample: `(n, D)` space components (the training sample, `n >= 1`).
        curvature: positive curvature magnitude `c`.
        nlist: cells wanted (the result may hold a few more or fewer: every shell gets a whole number of cells).
        layout: a key of `LAYOUTS`.
        seed: k-means seed.
        show_progress: log k-means progress.
    Returns:
        `(cells, D + 1)` float32 quantizer vectors `[rho_lo m_j, sqrt(1/c + rho_lo^2)]`, shell by shell from the root.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {list(LAYOUTS)}")
    sample = sample.detach().to("cpu", torch.float32)
    count = sample.shape[0]
    norms = sample.norm(dim=1)
    order = torch.argsort(norms, stable=True).numpy()
    norms = norms.numpy()
    directions = (sample / sample.norm(dim=1, keepdim=True).clamp(min=1e-12)).numpy()  # the root: no direction
    vectors, start = [], 0
    for shell, size in enumerate(shell_sizes(count, nlist, LAYOUTS[layout])):
        members = order[start : start + size]
        start += size
        # The shell's inner edge: 0 for the innermost (its time component is then 1/sqrt(c), the highest score any
        # cell can promise), else the norm of its first item. Shells whose edges coincide (tied norms) merge.
        edge = 0.0 if shell == 0 else float(norms[members[0]])
        cells = max(1, min(members.size, round(members.size * nlist / count)))
        if cells > 1:
            centroids = _spherical_kmeans(directions[members], cells, seed + shell, show_progress)
            labels = np.argmax(directions[members] @ centroids.T, axis=1)
        else:
            centroids, labels = directions[members].mean(axis=0, keepdims=True), np.zeros(members.size, dtype=int)
        time = math.sqrt(1.0 / curvature + edge * edge)
        for cell in range(cells):
            mine = members[labels == cell]
            mean = (
                directions[mine].mean(axis=0)
                if mine.size
                else centroids[cell] / max(np.linalg.norm(centroids[cell]), 1e-12)
            )
            vectors.append(np.concatenate([edge * mean, [time]]))
    return np.asarray(vectors, dtype=np.float32)


def padded_dim(dim: int) -> int:
    """Input dimension of the product quantiser for `dim`-dimensional pool vectors: the next multiple of
    `PQ_SUBVECTOR`."""
    return -(-dim // PQ_SUBVECTOR) * PQ_SUBVECTOR


def empty_structure(quantizer_vectors: np.ndarray, kind: str = "ivf", train_rows: int | None = None):
    """An empty FAISS IVF over `D + 1`-dimensional pool vectors with the given radial cells.

    Args:
        quantizer_vectors: `(nlist, D + 1)` float32 (:func:`radial_quantizer`).
        kind: `"ivf"` (an `IndexIVFFlat`: float32 vectors, ready to fill) or `"ivfpq"` (an `IndexIVFPQ` of
            `padded_dim / PQ_SUBVECTOR` bytes per item behind a zero-padding `IndexPreTransform`; train it with
            :func:`train_codes` before filling it).
        train_rows: `ivfpq`: the rows the codes will be trained on; under `PQ_ROWS_PER_CODE` per code word of
            `PQ_BITS` bits (9,984), each sub-quantiser gets fewer bits, as FAISS's k-means asks (at least 1).
    Returns:
        the FAISS structure (inner-product metric, `d = D + 1`).
    """
    import faiss

    nlist, dim = quantizer_vectors.shape
    if kind == "ivf":
        quantizer = faiss.IndexFlatIP(dim)
        quantizer.add(np.ascontiguousarray(quantizer_vectors))
        structure = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        structure.own_fields = True
        quantizer.this.disown()  # the IVF owns (and frees) its quantizer
        return structure
    if kind != "ivfpq":
        raise ValueError(f"kind={kind!r} is not 'ivf' or 'ivfpq'")
    wide = padded_dim(dim)
    quantizer = faiss.IndexFlatIP(wide)
    quantizer.add(np.ascontiguousarray(np.pad(quantizer_vectors, ((0, 0), (0, wide - dim)))))
    bits = (
        PQ_BITS if train_rows is None else max(1, min(PQ_BITS, int(math.log2(max(train_rows / PQ_ROWS_PER_CODE, 2)))))
    )
    codes = faiss.IndexIVFPQ(quantizer, wide, nlist, wide // PQ_SUBVECTOR, bits, faiss.METRIC_INNER_PRODUCT)
    codes.own_fields = True
    quantizer.this.disown()
    codes.by_residual = False  # one table per query; the cells' vectors are probe points, not centroids
    pad = faiss.RemapDimensionsTransform(dim, wide, False)  # [v, 0, ..., 0]
    structure = faiss.IndexPreTransform(pad, codes)
    structure.own_fields = True
    pad.this.disown()
    codes.this.disown()
    return structure


def train_codes(structure, pool_sample: np.ndarray, seed: int = 0) -> None:
    """Train the product quantiser of an `ivfpq` structure on `(n, D + 1)` float32 pool vectors (its cells stay)."""
    import faiss

    codes = faiss.downcast_index(faiss.extract_index_ivf(structure))
    wide = np.ascontiguousarray(np.pad(pool_sample, ((0, 0), (0, codes.d - pool_sample.shape[1]))), dtype=np.float32)
    codes.pq.cp.seed = seed
    codes.pq.cp.niter = KMEANS_ITERATIONS
    codes.pq.train(wide)
    codes.is_trained = True
    structure.is_trained = True


def structure_bytes(structure) -> int:
    """Bytes a FAISS IVF holds in memory and on disk, from its sizes: codes and ids per item, cells' vectors, and
    the product quantiser's tables."""
    import faiss

    ivf = faiss.downcast_index(faiss.extract_index_ivf(structure))
    size = ivf.ntotal * (ivf.code_size + 8) + ivf.nlist * ivf.quantizer.d * 4
    if isinstance(ivf, faiss.IndexIVFPQ):
        size += ivf.pq.centroids.size() * 4
    return int(size)


def cell_sizes(structure) -> np.ndarray:
    """Items per cell of an IVF structure (balance diagnostics)."""
    import faiss

    ivf = faiss.extract_index_ivf(structure)
    return np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)])


__all__ = [
    "LAYOUTS",
    "cell_sizes",
    "default_nlist",
    "default_nprobe",
    "empty_structure",
    "padded_dim",
    "radial_quantizer",
    "shell_sizes",
    "structure_bytes",
    "train_codes",
    "training_sample",
]
