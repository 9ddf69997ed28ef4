"""Exact hyperbolic nearest neighbours at scale: ranks for recall, chunked top-k, and a FAISS index.

Ranking by Lorentz distance is ranking by the Lorentz inner product, because
``d(x, y) = acosh(-c <x, y>_L) / sqrt(c)`` is decreasing in ``<x, y>_L``; and
``<x, y>_L = <[x_s, -x_t], [y_s, y_t]>`` is a plain dot product of `D + 1`-dimensional vectors
(:func:`modeling.lorentz.mips_query_vectors` / :func:`~modeling.lorentz.mips_pool_vectors`). So

    argmin_y d(x, y) = argmax_y <[x_s, -x_t], [y_s, y_t]>

exactly, and every search here is a matrix product (torch) or an inner-product index (FAISS `IndexFlatIP`).
Distances are recovered from the scores only for the items returned.

Tie rules (documented once, used everywhere):

- :func:`target_ranks`: *pessimistic*. The rank of the target is the number of *other* pool items whose score is
  greater than **or equal to** the target's. An item tied with the target counts as ranked above it, so a
  hit at `K` is never a lucky tie-break. `rank < K` means a hit at R@K.
- :func:`chunked_topk` / :class:`FaissLorentzIndex`: among equal scores, the smaller pool index comes first
  (both sort their candidates by (score descending, index ascending)).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..modeling.lorentz import autocast_disabled, mips_pool_vectors, mips_query_vectors

logger = logging.getLogger(__name__)

DEFAULT_POOL_CHUNK = 65_536
# Largest score block held at once by target_ranks (elements): 2**26 float32 = 256 MiB.
MAX_BLOCK_ELEMENTS = 2**26


def _check_pair(queries: Tensor, pool: Tensor) -> None:
    for name, x in (("queries", queries), ("pool", pool)):
        if not torch.is_tensor(x) or x.ndim != 2:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"{name} must be a (N, D) tensor of hyperboloid space components, got {shape}")
    if queries.shape[1] != pool.shape[1]:
        raise ValueError(
            f"queries have dim {queries.shape[1]} but the pool has dim {pool.shape[1]}; embed both with the same model"
        )


def lorentz_scores(queries: Tensor, pool: Tensor, curv: float | Tensor = 1.0) -> Tensor:
    """Ranking scores `<x, y>_L` (larger = closer), one matrix product.

    Args:
        queries: `(Q, D)` space components.
        pool: `(N, D)` space components.
        curv: positive curvature magnitude `c`.
    Returns:
        `(Q, N)` Lorentz inner products (float32, float64 for float64 inputs).
    """
    _check_pair(queries, pool)
    return mips_query_vectors(queries, curv) @ mips_pool_vectors(pool, curv).T


def scores_to_distances(scores: Tensor, curv: float | Tensor = 1.0) -> Tensor:
    """Lorentz inner products to geodesic distances, `acosh(-c <x, y>_L) / sqrt(c)` (argument clamped at 1)."""
    c = torch.as_tensor(curv, dtype=scores.dtype, device=scores.device)
    return torch.acosh((-c * scores).clamp(min=1.0)) / torch.sqrt(c)


def target_ranks(
    queries: Tensor,
    pool: Tensor,
    targets: Tensor,
    curv: float | Tensor = 1.0,
    max_block_elements: int = MAX_BLOCK_ELEMENTS,
) -> Tensor:
    """Pessimistic 0-based rank of each query's target in the pool (see the module docstring).

    Fully batched: queries are processed in blocks so that one block of scores holds at most
    `max_block_elements` entries (memory stays bounded for any pool size).

    Args:
        queries: `(Q, D)` space components.
        pool: `(N, D)` space components.
        targets: `(Q,)` int index of each query's ground truth in the pool.
        curv: positive curvature magnitude `c`.
        max_block_elements: memory bound of the score block.
    Returns:
        `(Q,)` int64 ranks in `[0, N)`; `rank < K` is a hit at R@K.
    """
    return ranks_and_block_max(queries, pool, targets, curv, max_block_elements=max_block_elements)[0]


def ranks_and_block_max(
    queries: Tensor,
    pool: Tensor,
    targets: Tensor,
    curv: float | Tensor = 1.0,
    block_sizes: Sequence[int] | None = None,
    max_block_elements: int = MAX_BLOCK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """:func:`target_ranks` plus the best score within each consecutive block of the pool, in one pass.

    Args:
        queries: `(Q, D)` space components.
        pool: `(N, D)` space components, the concatenation of blocks of sizes `block_sizes`.
        targets: `(Q,)` int index of each query's ground truth in the pool.
        curv: positive curvature magnitude `c`.
        block_sizes: sizes of the pool blocks (default: one block, the whole pool).
        max_block_elements: memory bound of one block of scores.
    Returns:
        `(ranks, block_max)`: `(Q,)` int64 pessimistic ranks and `(Q, len(block_sizes))` best Lorentz inner
        product in each pool block (larger = closer).
    """
    n = pool.shape[0]
    sizes = [n] if block_sizes is None else [int(b) for b in block_sizes]
    if sum(sizes) != n:
        raise ValueError(f"block_sizes {sizes} do not add up to the pool size {n}")
    edges = [0]
    for size in sizes:
        edges.append(edges[-1] + size)
    request = RankRequest(torch.ones(queries.shape[0]), torch.as_tensor(targets), 0, n, tuple(edges))
    return shared_product_ranks(queries, pool, [request], curv, max_block_elements)[0]


@dataclass(frozen=True)
class RankRequest:
    """One ranking served by :func:`shared_product_ranks`: the queries rescaled by `scales`, ranked against
    the pool columns `[start, stop)`; with `block_edges`, also the best score in each `[edges[j], edges[j+1])`.

    Attributes:
        scales: `(Q,)` factors applied to the queries' space components (1 = unchanged). A radial traversal is
            exactly such a rescaling.
        targets: `(Q,)` absolute pool index of each query's ground truth, inside `[start, stop)`.
        start: first pool column ranked.
        stop: end of the ranked columns (None: the pool size).
        block_edges: absolute pool indices delimiting blocks whose best score is wanted (empty: none).
    """

    scales: Tensor
    targets: Tensor
    start: int = 0
    stop: int | None = None
    block_edges: tuple[int, ...] = ()


def shared_product_ranks(
    queries: Tensor,
    pool: Tensor,
    requests: Sequence[RankRequest],
    curv: float | Tensor = 1.0,
    max_block_elements: int = MAX_BLOCK_ELEMENTS,
) -> list[tuple[Tensor, Tensor | None]]:
    """Pessimistic ranks for several radially rescaled versions of the same queries, from ONE matrix product.

    For `x' = s x` the Lorentz inner product is `<x', y>_L = s (x_s . y_s) - x'_t y_t`, so the Euclidean product
    `x_s . y_s` (the expensive `(Q, N, D)` part) is shared by every rescaling; each request only adds an
    element-wise rank-one update. This is how the union-pool tasks (the same queries, traversed to different
    bounds, against the same items) cost one product instead of one each.

    Args:
        queries: `(Q, D)` space components.
        pool: `(N, D)` space components.
        requests: the rankings wanted (:class:`RankRequest`).
        curv: positive curvature magnitude `c`.
        max_block_elements: memory bound of one block of scores (queries are processed in blocks).
    Returns:
        per request, `(ranks, block_max)`: `(Q,)` int64 pessimistic ranks within its columns, and
        `(Q, len(block_edges) - 1)` best inner product per block (None without `block_edges`).
    """
    _check_pair(queries, pool)
    n, q = pool.shape[0], queries.shape[0]
    dtype = torch.float64 if torch.float64 in (queries.dtype, pool.dtype) else torch.float32
    queries, pool = queries.to(dtype), pool.to(dtype)
    c = torch.as_tensor(curv, dtype=dtype)
    pool_time = torch.sqrt(1 / c + pool.pow(2).sum(dim=-1))
    query_sq = queries.pow(2).sum(dim=-1)
    prepared = []
    for req in requests:
        stop = n if req.stop is None else req.stop
        targets = torch.as_tensor(req.targets, dtype=torch.long)
        scales = torch.as_tensor(req.scales, dtype=dtype)
        if scales.shape != (q,) or targets.shape != (q,):
            raise ValueError(
                f"scales and targets must have shape ({q},), got {tuple(scales.shape)}, {tuple(targets.shape)}"
            )
        if not 0 <= req.start < stop <= n or (q and (int(targets.min()) < req.start or int(targets.max()) >= stop)):
            raise ValueError(
                f"targets must index the pool, i.e. lie in the ranked columns [{req.start}, {stop}) of a pool of {n}; "
                f"got [{int(targets.min())}, {int(targets.max())}]"
            )
        query_time = torch.sqrt(1 / c + scales.pow(2) * query_sq)  # time component of the rescaled queries
        prepared.append((req, stop, targets, scales, query_time))
    out = [
        (
            torch.empty(q, dtype=torch.long),
            torch.empty(q, max(len(r.block_edges) - 1, 0), dtype=dtype) if r.block_edges else None,
        )
        for r in requests
    ]
    step = max(1, max_block_elements // max(n, 1))
    with autocast_disabled(queries.device):
        for begin in range(0, q, step):
            rows = slice(begin, begin + step)
            euclid = queries[rows] @ pool.T  # the shared, expensive part
            for (req, stop, targets, scales, query_time), (ranks, block_max) in zip(prepared, out):
                cols = slice(req.start, stop)
                scores = scales[rows, None] * euclid[:, cols] - query_time[rows, None] * pool_time[None, cols]
                ranks[rows] = pessimistic_ranks(scores, scores.gather(1, targets[rows, None] - req.start))
                for j in range(len(req.block_edges) - 1):
                    lo, hi = req.block_edges[j] - req.start, req.block_edges[j + 1] - req.start
                    block_max[rows, j] = scores[:, lo:hi].amax(dim=1)
    return out


def pessimistic_ranks(scores: Tensor, target_scores: Tensor, dim: int = 1) -> Tensor:
    """0-based rank of each target among `scores` along `dim`: the number of OTHER items scoring >= the target.

    The one tie rule of the library (module docstring): an item tied with the target ranks above it.

    Args:
        scores: `(Q, N)` scores, larger = closer (or `(N, Q)` with `dim=0`).
        target_scores: the target's score per query, broadcastable against `scores` (`(Q, 1)`, or `(1, Q)`).
    Returns:
        `(Q,)` int64 ranks.
    """
    # >= counts the target itself once: subtract it.
    return (scores >= target_scores).sum(dim=dim) - 1


def recall_from_ranks(ranks: Tensor, ks: Sequence[int] = (1,)) -> dict[str, float]:
    """`{"R@K": percentage of ranks < K}` for each K."""
    if ranks.numel() == 0:
        raise ValueError("no queries: recall needs at least one ranked query")
    return {f"R@{k}": 100.0 * (ranks < k).double().mean().item() for k in ks}


def paired_ranks(
    x: Tensor, y: Tensor, curvature: float | Tensor = 1.0, max_block_elements: int = MAX_BLOCK_ELEMENTS
) -> tuple[Tensor, Tensor]:
    """Pessimistic ranks of paired retrieval both ways: `x_i` among `y` (target `y_i`), and `y_i` among `x`.

    The Lorentz inner product is symmetric, so one `(N, N)` score matrix serves both directions when it holds at
    most `max_block_elements` entries; larger sets take two blocked passes (:func:`target_ranks`).

    Args:
        x, y: `(N, D)` space components, row `i` of each paired.
    Returns:
        `(ranks of x -> y, ranks of y -> x)`, each `(N,)` int64.
    """
    _check_pair(x, y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"paired ranks need as many rows on both sides, got {x.shape[0]} and {y.shape[0]}")
    n = x.shape[0]
    if n * n > max_block_elements:
        targets = torch.arange(n)
        return (
            target_ranks(x, y, targets, curvature, max_block_elements),
            target_ranks(y, x, targets, curvature, max_block_elements),
        )
    scores = lorentz_scores(x, y, curvature)
    diag = scores.diagonal()
    return pessimistic_ranks(scores, diag[:, None], dim=1), pessimistic_ranks(scores, diag[None, :], dim=0)


def chunked_topk(
    queries: Tensor,
    pool: Tensor,
    k: int,
    curv: float | Tensor = 1.0,
    chunk_size: int = DEFAULT_POOL_CHUNK,
    show_progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Exact top-`k` nearest pool items for every query, scanning the pool in chunks (bounded memory).

    Memory is `O(Q * (chunk_size + k))` whatever the pool size; a running top-k is merged with each chunk's.

    Args:
        queries: `(Q, D)` space components.
        pool: `(N, D)` space components (any size; it is read chunk by chunk).
        k: neighbours per query, `1 <= k <= N`.
        curv: positive curvature magnitude `c`.
        chunk_size: pool rows scored at once.
        show_progress: tqdm bar over the chunks.
    Returns:
        `(distances, indices)`, both `(Q, k)`, nearest first; ties ordered by pool index.
    """
    _check_pair(queries, pool)
    n = pool.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the pool size {n}")
    query_vecs = mips_query_vectors(queries, curv)
    best_scores = torch.full((queries.shape[0], 0), -math.inf, dtype=query_vecs.dtype, device=queries.device)
    best_index = torch.zeros((queries.shape[0], 0), dtype=torch.long, device=queries.device)
    for start in tqdm(range(0, n, chunk_size), desc="Top-k over pool chunks", disable=not show_progress):
        chunk = mips_pool_vectors(pool[start : start + chunk_size], curv)
        scores = query_vecs @ chunk.T
        kk = min(k, scores.shape[1])
        chunk_scores, chunk_index = scores.topk(kk, dim=1)
        best_scores = torch.cat([best_scores, chunk_scores], dim=1)
        best_index = torch.cat([best_index, chunk_index + start], dim=1)
        best_scores, best_index = _sort_candidates(best_scores, best_index, k)
    return scores_to_distances(best_scores, curv), best_index


def _sort_candidates(scores: Tensor, index: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Keep the `k` best candidates per row, ordered by (score descending, index ascending)."""
    by_index = index.argsort(dim=1, stable=True)
    scores, index = scores.gather(1, by_index), index.gather(1, by_index)
    order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, order), index.gather(1, order)


class FaissLorentzIndex:
    """Exact hyperbolic nearest-neighbour search with FAISS `IndexFlatIP` over `[y_s, y_t]` vectors.

    Queries are mapped to `[x_s, -x_t]`; the inner product is then the Lorentz inner product, so the inner
    product ranking equals the distance ranking (module docstring). FAISS computes in float32.

    Args:
        pool: `(N, D)` space components.
        curv: positive curvature magnitude `c`.
        chunk_size: rows added to the index at once (bounds the float32 copy made while adding).
    """

    def __init__(self, pool: Tensor, curv: float | Tensor = 1.0, chunk_size: int = DEFAULT_POOL_CHUNK):
        try:
            import faiss
        except ImportError as err:  # pragma: no cover - faiss-cpu is a dependency of the evaluation extra
            raise ImportError("FaissLorentzIndex needs faiss: pip install faiss-cpu") from err
        if not torch.is_tensor(pool) or pool.ndim != 2:
            raise ValueError("pool must be a (N, D) tensor of hyperboloid space components")
        self.curv = float(curv)
        self.dim = pool.shape[1]
        self.chunk_size = chunk_size
        self.index = faiss.IndexFlatIP(self.dim + 1)
        self.add(pool)

    def add(self, pool: Tensor) -> None:
        """Append `(M, D)` space components to the index (they take the next pool indices)."""
        if not torch.is_tensor(pool) or pool.ndim != 2 or pool.shape[1] != self.dim:
            raise ValueError(f"pool must be a (N, {self.dim}) tensor of hyperboloid space components")
        for start in range(0, pool.shape[0], self.chunk_size):
            vecs = mips_pool_vectors(pool[start : start + self.chunk_size].float(), self.curv)
            self.index.add(np.ascontiguousarray(vecs.cpu().numpy(), dtype=np.float32))

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-`k` nearest pool items.

        Args:
            queries: `(Q, D)` space components.
            k: neighbours per query, `1 <= k <= len(self)`.
        Returns:
            `(distances, indices)`, both `(Q, k)`, nearest first; equal scores ordered by pool index.
        """
        if not torch.is_tensor(queries) or queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be a (Q, {self.dim}) tensor")
        if not 1 <= k <= len(self):
            raise ValueError(f"k={k} must be between 1 and the index size {len(self)}")
        vecs = mips_query_vectors(queries.float(), self.curv).cpu().numpy()
        scores, index = self.index.search(np.ascontiguousarray(vecs, dtype=np.float32), k)
        scores_t, index_t = _sort_candidates(torch.from_numpy(scores), torch.from_numpy(index).long(), k)
        return scores_to_distances(scores_t, self.curv), index_t


__all__ = [
    "DEFAULT_POOL_CHUNK",
    "FaissLorentzIndex",
    "RankRequest",
    "chunked_topk",
    "lorentz_scores",
    "paired_ranks",
    "pessimistic_ranks",
    "ranks_and_block_max",
    "recall_from_ranks",
    "scores_to_distances",
    "shared_product_ranks",
    "target_ranks",
]
