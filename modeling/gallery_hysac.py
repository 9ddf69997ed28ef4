"""HySAC's one search engine: ranking by Lorentz distance, the redirect step, and the saved gallery index folder.

Every consumer ranks through this module: the two pipelines (`pipeline_hysac.py`), `hysac_hf.index.GalleryIndex`
and `hysac-index`, the evaluation's retrieval tables and training validation (`hysac_hf.evaluation`,
`hysac_hf.training`), and the Space. It ships to the Hub as remote code beside the pipelines (torch, numpy and
safetensors, which transformers needs anyway; FAISS only when a FAISS structure is built or read), and imports only
siblings that `modeling_hysac.py` imports itself (transformers 4 copies a local folder's remote code one import
deep).

Ranking
-------
The geodesic distance `d(x, y) = acosh(-c <x, y>_L) / sqrt(c)` decreases with the Lorentz inner product, and
`<x, y>_L = <[x_s, -x_t], [y_s, y_t]>` is a plain dot product of `D + 1`-dimensional vectors
(`lorentz.mips_query_vectors` / `mips_pool_vectors`), so

    argmin_y d(x, y) = argmax_y <[x_s, -x_t], [y_s, y_t]>

exactly: FAISS inner-product structures over the pool vectors rank by Lorentz distance.

- :func:`rank_exact`: exact top-k in float64 on the CPU, the gallery scanned in chunks of `RANK_CHUNK` rows.
- :func:`search`: :func:`rank_exact`, or the `k + RERANK_MARGIN` candidates of a FAISS structure re-ranked in float64
  (:func:`rerank`); FAISS scores in float32, so the spare candidates let near-ties at the k-th place be cut as a
  float64 ranking cuts them. Structures: :func:`flat_structure` (exact, `IndexFlatIP`) and the approximate IVF that
  `hysac_hf.index` trains; :func:`add_to_structure` fills either.
- :func:`redirect` (the `redirect` policy): queries farther from the root than the traversal threshold of the
  gallery's safe region (image gallery: safe images `V`; text gallery: safe texts `S`) are moved onto it with the
  traversal of `traversal.py`, exactly as `HySACModel.traverse_to_safe` moves them. :func:`search_safely` composes
  the policy, the search and the distances to the root; :func:`describe_results` turns its output into the results
  every consumer returns.
- Ranks of a known target, for recall (:func:`target_ranks`, :func:`paired_ranks`, :func:`shared_product_ranks`):
  one matrix product per query set, in blocks of bounded memory.

Tie rules (the only two):

- lists of results: nearest first, **equal distances in gallery order**;
- the rank of a known target: **pessimistic**, the number of *other* pool items whose score is greater than or equal
  to the target's (an item tied with the target ranks above it), so that a hit at R@K is never a lucky tie-break.

The gallery index folder (format 1)
-----------------------------------
```
index_dir/
  index.json              {"format": 1, "modality": "image"|"text", "count": N, "dim": D, "curvature": c,
                           "model": name_or_path, "model_probe": [[...], [...]] or null,
                           "faiss": {"type": "ivf", "params": {...}, "sha256": ...} or null,
                           "embeddings_sha256": ..., "metadata": "metadata.jsonl",
                           "bounds": {"S"|"V"|"U"|"G": {"avg", "up_95", "low_05"}} or null,
                           "traversal_offset": float or null}
  embeddings.safetensors  {"embeddings": (N, D) float32 hyperboloid space components, row i = item i}
  metadata.jsonl          one JSON object per item, row i = item i
  faiss.index             only when "faiss" is not null: faiss.write_index of the search structure over
                          mips_pool_vectors(embeddings, curvature) (queries: mips_query_vectors)
```
`"faiss": null` means exact search. `"bounds"` and `"traversal_offset"` are the embedding model's `config.bounds` and
`config.traversal_offset` at build time (what the `redirect` policy needs when no model is at hand); `faiss.sha256`
guards the FAISS file as `embeddings_sha256` guards the embeddings. `model_probe` fingerprints the embedding model:
`encode_text` of `PROBE_TEXTS`, rounded to `PROBE_DECIMALS` decimals. A reader holding a model recomputes it and
refuses an index built with another model (max abs difference above `PROBE_TOLERANCE * (1 + max abs stored value)`)
or another curvature (relative difference above `CURVATURE_TOLERANCE`).

:class:`Gallery` is a folder in memory; :func:`read_gallery` reads and checks one (no model, no FAISS),
:func:`check_gallery_model` checks a model against it, :func:`read_structure` reads its FAISS file,
:func:`load_gallery_index` composes them for the pipeline, and :func:`write_gallery` writes one into an empty folder
(`hysac_hf.index` makes that atomic). Readers raise `ValueError` saying what is wrong and what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .configuration_hysac import BOUND_STATS, MODALITIES, SAFE_KIND, validate_bounds
from .lorentz import autocast_disabled, dist_to_origin, mips_pool_vectors, mips_query_vectors, pairwise_dist
from .traversal import METHODS, traversal_threshold, traverse

POLICIES = ("redirect", "retain")
INDEX_KINDS = ("flat", "ivf")  # "flat": exact search (no FAISS file); "ivf": an approximate FAISS IVF
RERANK_MARGIN = 8  # FAISS candidates fetched beyond k: its float32 scores may order near-ties differently
RANK_CHUNK = 65_536  # gallery rows ranked at once by rank_exact: a (queries, RANK_CHUNK) float64 block
MAX_BLOCK_ELEMENTS = 2**26  # largest score block held by the target-rank functions: 256 MiB of float32
STRUCTURE_ADD_CHUNK = 65_536  # rows turned into float32 pool vectors at once while filling a FAISS structure

# The saved gallery index folder, format 1.
INDEX_FORMAT = 1
INDEX_FILE = "index.json"
EMBEDDINGS_FILE = "embeddings.safetensors"
EMBEDDINGS_KEY = "embeddings"
METADATA_FILE = "metadata.jsonl"
FAISS_FILE = "faiss.index"
REQUIRED_FIELDS = ("format", "modality", "count", "dim", "curvature", "model_probe", "embeddings_sha256")
# The model probe: `encode_text` of these texts identifies the model that embedded a gallery.
PROBE_TEXTS = ("a photo of a cat", "an empty street at night")
PROBE_DECIMALS = 6  # the writer rounds the stored probe to this many decimals
PROBE_TOLERANCE = 1e-3  # max abs difference allowed: PROBE_TOLERANCE * (1 + max abs value); device/dtype noise
CURVATURE_TOLERANCE = 1e-5  # relative
REBUILD_HINT = (
    "rebuild the index with this model (`hysac-index build --model MODEL ...`), or load the model that built it"
)


# ------------------------------------------------------------------------------------------------------------
# A gallery in memory
@dataclass(eq=False)
class Gallery:
    """A gallery to search: what a saved index folder holds, in memory.

    Attributes:
        embeddings: `(N, D)` float32 hyperboloid space components on the CPU, row `i` = item `i`.
        modality: `"image"` or `"text"`: what the items are (their safe region: `V` or `S`).
        curvature: curvature magnitude `c` of the model that embedded them (None: not recorded).
        metadata: one dict per item, or None.
        kind: `"flat"` (exact search) or `"ivf"` (a saved approximate FAISS structure).
        params: the structure's settings (`nlist`, `nprobe`, `cells` for `ivf`).
        model_name: name or path of the embedding model.
        model_probe: the model's rounded probe embeddings (:func:`model_probe`), or None.
        bounds: the model's `config.bounds` at build time, or None.
        traversal_offset: the model's `config.traversal_offset` at build time, or None.
        structure: the FAISS structure over the pool vectors, once built or read (:func:`read_structure`).
        faiss_path: where the saved FAISS file is (read on first use), or None.
        faiss_sha256: its recorded SHA-256, or None.
        source: where the gallery came from, for messages.
    """

    embeddings: Tensor
    modality: str
    curvature: float | None = None
    metadata: list[dict[str, Any]] | None = None
    kind: str = "flat"
    params: dict[str, Any] = field(default_factory=dict)
    model_name: str = ""
    model_probe: list[list[float]] | None = None
    bounds: dict[str, dict[str, float]] | None = None
    traversal_offset: float | None = None
    structure: Any = field(default=None, repr=False)
    faiss_path: str | None = None
    faiss_sha256: str | None = None
    source: str = "embeddings"

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]


# ------------------------------------------------------------------------------------------------------------
# Exact and approximate top-k
def _float64(curvature: float | Tensor) -> Tensor:
    """The curvature as a float64 CPU scalar (a Python float straight to float64, never through float32)."""
    if torch.is_tensor(curvature):
        return curvature.detach().to("cpu", torch.float64)
    return torch.tensor(curvature, dtype=torch.float64)


def rank_exact(queries: Tensor, embeddings: Tensor, curvature: float | Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k by Lorentz distance, in float64 on the CPU; equal distances in gallery order.

    The gallery is ranked in chunks of `RANK_CHUNK` rows, keeping the best `k` so far, so memory stays
    `(Q, k + RANK_CHUNK)` whatever the gallery's size.

    Args:
        queries: `(Q, D)` space components.
        embeddings: `(N, D)` space components, `N >= k`.
        curvature: positive curvature magnitude `c`.
        k: results per query.
    Returns:
        `(Q, k)` int64 gallery indices, nearest first, and their `(Q, k)` float64 distances.
    """
    queries = queries.detach().to("cpu", torch.float64)
    c = _float64(curvature)
    best_distances = best_indices = None
    for start in range(0, embeddings.shape[0], RANK_CHUNK):
        block = embeddings[start : start + RANK_CHUNK].to("cpu", torch.float64)
        distances = pairwise_dist(queries, block, c, eps=0.0)  # float64: no clamp beyond acosh's domain [1, inf)
        indices = torch.arange(start, start + block.shape[0]).expand(queries.shape[0], -1)
        if best_distances is not None:
            # Earlier rows first: a stable sort then keeps equal distances in gallery order.
            distances = torch.cat([best_distances, distances], dim=1)
            indices = torch.cat([best_indices, indices], dim=1)
        order = torch.sort(distances, dim=1, stable=True).indices[:, :k]
        best_distances, best_indices = distances.gather(1, order), indices.gather(1, order)
    return best_indices, best_distances


def rerank(
    queries: Tensor, embeddings: Tensor, candidates: Tensor, curvature: float | Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """The exact top-k of each query among its candidates, in float64 (ties in gallery order).

    A query whose candidate row holds `-1` (a FAISS structure that found fewer items than asked) is ranked against
    the whole gallery instead.

    Args:
        queries: `(Q, D)` space components.
        embeddings: `(N, D)` the gallery.
        candidates: `(Q, M)` int64 gallery indices, `M >= k`, `-1` for a missing candidate.
        curvature: positive curvature magnitude `c`.
        k: results per query.
    Returns:
        as :func:`rank_exact`.
    """
    indices, distances = [], []
    for row, found in zip(queries, candidates):
        if bool((found < 0).any()):
            best, best_distances = rank_exact(row[None], embeddings, curvature, k)
            indices.append(best[0])
            distances.append(best_distances[0])
            continue
        found = torch.sort(found).values  # gallery order, so the stable ranking breaks ties by index
        order, order_distances = rank_exact(row[None], embeddings[found], curvature, k)
        indices.append(found[order[0]])
        distances.append(order_distances[0])
    if not indices:
        return torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k, dtype=torch.float64)
    return torch.stack(indices), torch.stack(distances)


def structure_candidates(
    structure: Any, queries: Tensor, curvature: float | Tensor, count: int, nprobe: int | None = None
) -> Tensor:
    """The `count` best candidates of each query from a FAISS inner-product structure over the pool vectors.

    Args:
        structure: a FAISS index over `mips_pool_vectors(embeddings, curvature)` (flat or IVF).
        queries: `(Q, D)` space components.
        count: candidates per query.
        nprobe: cells probed by an IVF structure (None: the structure's own setting).
    Returns:
        `(Q, count)` int64 gallery indices, best first; `-1` where the structure found fewer items.
    """
    c = torch.as_tensor(curvature).detach().to("cpu", torch.float32)
    vectors = mips_query_vectors(queries.detach().to("cpu", torch.float32), c)
    vectors = np.ascontiguousarray(vectors.numpy(), dtype=np.float32)
    if nprobe is None:
        _, ids = structure.search(vectors, count)
    else:
        import faiss

        _, ids = structure.search(vectors, count, params=faiss.SearchParametersIVF(nprobe=int(nprobe)))
    return torch.from_numpy(ids.astype(np.int64))


def search(
    queries: Tensor,
    embeddings: Tensor,
    curvature: float | Tensor,
    k: int,
    structure: Any = None,
    nprobe: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The `k` nearest gallery items of each query by Lorentz distance.

    Without a `structure`: :func:`rank_exact`. With one: its `k + RERANK_MARGIN` best candidates
    (:func:`structure_candidates`), re-ranked in float64 (:func:`rerank`).

    Args:
        queries: `(Q, D)` space components.
        embeddings: `(N, D)` the gallery, `N >= k`.
        curvature: positive curvature magnitude `c`.
        k: results per query.
        structure: a FAISS structure over the gallery's pool vectors, or None.
        nprobe: cells probed by an IVF structure (None: its own setting).
    Returns:
        `(Q, k)` int64 gallery indices, nearest first (equal distances in gallery order), and their float64 distances.
    """
    if structure is None:
        return rank_exact(queries, embeddings, curvature, k)
    count = min(k + RERANK_MARGIN, embeddings.shape[0])
    candidates = structure_candidates(structure, queries, curvature, count, nprobe)
    return rerank(queries, embeddings, candidates, curvature, k)


def flat_structure(embeddings: Tensor, curvature: float | Tensor) -> Any:
    """An exact FAISS structure (`IndexFlatIP`) over the gallery's pool vectors (needs faiss)."""
    import faiss

    structure = faiss.IndexFlatIP(embeddings.shape[1] + 1)
    add_to_structure(structure, embeddings, curvature)
    return structure


def add_to_structure(structure: Any, embeddings: Tensor, curvature: float | Tensor) -> None:
    """Append `(M, D)` space components to a FAISS inner-product structure over the pool vectors, chunk by chunk
    (they take the next gallery indices)."""
    c = torch.as_tensor(curvature).detach().to("cpu", torch.float32)
    for start in range(0, embeddings.shape[0], STRUCTURE_ADD_CHUNK):
        vectors = mips_pool_vectors(embeddings[start : start + STRUCTURE_ADD_CHUNK].detach().cpu().float(), c)
        structure.add(np.ascontiguousarray(vectors.numpy(), dtype=np.float32))


# ------------------------------------------------------------------------------------------------------------
# Safe retrieval: the redirect step, the search, the results
def redirect(
    queries: Tensor,
    modality: str,
    bounds: dict[str, dict[str, float]] | None,
    curvature: float | Tensor,
    offset: float,
    method: str = "reference",
    bound: str = "up_95",
) -> tuple[Tensor, Tensor]:
    """Move the queries beyond the traversal threshold of a gallery's safe region onto it.

    The threshold is `b' = b + tanh((b - offset) / c) + 1` with `b = bounds[key][bound]`, `key` the safe kind of
    the gallery's `modality` (`V` for images, `S` for texts): the same move as `HySACModel.traverse_to_safe(queries,
    target=modality, method=method, bound=bound, offset=offset)`.

    Args:
        queries: `(Q, D)` space components.
        modality: the gallery's modality.
        bounds: calibrated bounds (`config.bounds`).
        curvature: positive curvature magnitude `c`.
        offset: the traversal margin offset (`config.traversal_offset`).
        method: `"reference"` or `"geodesic"`.
        bound: `"up_95"`, `"avg"` or `"low_05"`.
    Returns:
        `(searched, redirected)`: `(Q, D)` queries (rows within the threshold unchanged) and a `(Q,)` bool mask.
    Raises:
        ValueError: no bounds, or an unknown modality, method or bound.
    """
    if modality not in SAFE_KIND:
        raise ValueError(f"modality={modality!r} is not one of {list(MODALITIES)}")
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {list(METHODS)}")
    if bound not in BOUND_STATS:
        raise ValueError(f"bound={bound!r} is not one of {list(BOUND_STATS)}")
    if bounds is None:
        raise ValueError("the redirect policy needs calibrated bounds; calibrate the model or use policy='retain'")
    threshold = traversal_threshold(bounds[SAFE_KIND[modality].key][bound], curvature, offset)
    searched = traverse(queries, threshold, curvature, method=method)
    return searched, (searched != queries).any(dim=-1)


def search_safely(
    queries: Tensor,
    embeddings: Tensor,
    modality: str,
    curvature: float | Tensor,
    k: int,
    *,
    policy: str = "redirect",
    bounds: dict[str, dict[str, float]] | None = None,
    offset: float | None = None,
    method: str = "reference",
    bound: str = "up_95",
    structure: Any = None,
    nprobe: int | None = None,
) -> dict[str, Tensor]:
    """Safe retrieval on embeddings: the policy, then the search, then the distances to the root.

    Under `policy="redirect"` each query beyond the safe region's threshold is moved onto it first (:func:`redirect`);
    `"retain"` searches with the query as it is.

    Args:
        queries: `(Q, D)` space components (float32 from the model, or float64).
        embeddings, curvature, k, structure, nprobe: as in :func:`search`.
        modality: the gallery's modality.
        policy: `"redirect"` or `"retain"`.
        bounds, offset, method, bound: as in :func:`redirect` (used by `"redirect"` only).
    Returns:
        `{"redirected": (Q,) bool, "query_distance_to_root": (Q,), "search_distance_to_root": (Q,), "indices": (Q, k)
        int64, "distances": (Q, k) float64}`; distances to the root in the dtype of `queries`.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r} is not one of {list(POLICIES)}")
    if policy == "redirect":
        searched, redirected = redirect(queries, modality, bounds, curvature, offset, method, bound)
    else:
        searched, redirected = queries, torch.zeros(queries.shape[0], dtype=torch.bool, device=queries.device)
    indices, distances = search(searched, embeddings, curvature, k, structure, nprobe)
    c = curvature.detach() if torch.is_tensor(curvature) else curvature
    return {
        "redirected": redirected,
        "query_distance_to_root": dist_to_origin(queries, c),
        "search_distance_to_root": dist_to_origin(searched, c),
        "indices": indices,
        "distances": distances,
    }


def describe_results(outputs: dict[str, Tensor], metadata: Sequence[dict[str, Any]] | None = None) -> list[dict]:
    """The output of :func:`search_safely` as one dict per query, what every consumer returns:
    `{"redirected": bool, "query_distance_to_root": d, "search_distance_to_root": d', "results": [{"index": i,
    "distance": d(searched query, item), **metadata[i]}, ...]}`, nearest first. The ranking's own keys come first
    and win over metadata keys of the same name."""
    rows = []
    indices = outputs["indices"].reshape(-1, outputs["indices"].shape[-1]).tolist()
    distances = outputs["distances"].reshape(-1, outputs["distances"].shape[-1]).tolist()
    flags = outputs["redirected"].reshape(-1).tolist()
    before = outputs["query_distance_to_root"].reshape(-1).tolist()
    after = outputs["search_distance_to_root"].reshape(-1).tolist()
    for row_indices, row_distances, flag, d_before, d_after in zip(indices, distances, flags, before, after):
        results = []
        for index, distance in zip(row_indices, row_distances):
            extra = {} if metadata is None else metadata[index]
            results.append(
                {"index": int(index), "distance": float(distance)}
                | {key: value for key, value in extra.items() if key not in ("index", "distance")}
            )
        rows.append(
            {
                "redirected": bool(flag),
                "query_distance_to_root": float(d_before),
                "search_distance_to_root": float(d_after),
                "results": results,
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------------------
# Ranks of a known target (recall)
def lorentz_scores(queries: Tensor, pool: Tensor, curvature: float | Tensor = 1.0) -> Tensor:
    """Ranking scores `<x, y>_L` (larger = closer), one matrix product.

    Args:
        queries: `(Q, D)` space components.
        pool: `(N, D)` space components.
        curvature: positive curvature magnitude `c`.
    Returns:
        `(Q, N)` Lorentz inner products (float32, float64 for float64 inputs).
    """
    _check_pair(queries, pool)
    return mips_query_vectors(queries, curvature) @ mips_pool_vectors(pool, curvature).T


def pessimistic_ranks(scores: Tensor, target_scores: Tensor, dim: int = 1) -> Tensor:
    """0-based rank of each target among `scores` along `dim`: the number of OTHER items scoring >= the target.

    Args:
        scores: `(Q, N)` scores, larger = closer (or `(N, Q)` with `dim=0`).
        target_scores: the target's score per query, broadcastable against `scores` (`(Q, 1)`, or `(1, Q)`).
    Returns:
        `(Q,)` int64 ranks.
    """
    # >= counts the target itself once: subtract it.
    return (scores >= target_scores).sum(dim=dim) - 1


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
    curvature: float | Tensor = 1.0,
    max_block_elements: int = MAX_BLOCK_ELEMENTS,
) -> list[tuple[Tensor, Tensor | None]]:
    """Pessimistic ranks for several radially rescaled versions of the same queries, from ONE matrix product.

    For `x' = s x` the Lorentz inner product is `<x', y>_L = s (x_s . y_s) - x'_t y_t`, so the Euclidean product
    `x_s . y_s` (the expensive `(Q, N, D)` part) is shared by every rescaling; each request only adds an
    element-wise rank-one update. This is how the union-pool tasks of the paper's tables (the same queries,
    traversed to different bounds, against the same items) cost one product instead of one each.

    Args:
        queries: `(Q, D)` space components.
        pool: `(N, D)` space components.
        requests: the rankings wanted (:class:`RankRequest`).
        curvature: positive curvature magnitude `c`.
        max_block_elements: memory bound of one block of scores (queries are processed in blocks).
    Returns:
        per request, `(ranks, block_max)`: `(Q,)` int64 pessimistic ranks within its columns, and
        `(Q, len(block_edges) - 1)` best inner product per block (None without `block_edges`).
    """
    _check_pair(queries, pool)
    n, q = pool.shape[0], queries.shape[0]
    dtype = torch.float64 if torch.float64 in (queries.dtype, pool.dtype) else torch.float32
    queries, pool = queries.to(dtype), pool.to(dtype)
    c = torch.as_tensor(curvature, dtype=dtype)
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


def ranks_and_block_max(
    queries: Tensor,
    pool: Tensor,
    targets: Tensor,
    curvature: float | Tensor = 1.0,
    block_sizes: Sequence[int] | None = None,
    max_block_elements: int = MAX_BLOCK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """:func:`target_ranks` plus the best score within each consecutive block of the pool, in one pass.

    Args:
        queries: `(Q, D)` space components.
        pool: `(N, D)` space components, the concatenation of blocks of sizes `block_sizes`.
        targets: `(Q,)` int index of each query's ground truth in the pool.
        curvature: positive curvature magnitude `c`.
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
    return shared_product_ranks(queries, pool, [request], curvature, max_block_elements)[0]


def target_ranks(
    queries: Tensor,
    pool: Tensor,
    targets: Tensor,
    curvature: float | Tensor = 1.0,
    max_block_elements: int = MAX_BLOCK_ELEMENTS,
) -> Tensor:
    """Pessimistic 0-based rank of each query's target in the pool (module docstring), in blocks of bounded memory.

    Args:
        queries: `(Q, D)` space components.
        pool: `(N, D)` space components.
        targets: `(Q,)` int index of each query's ground truth in the pool.
        curvature: positive curvature magnitude `c`.
        max_block_elements: memory bound of the score block.
    Returns:
        `(Q,)` int64 ranks in `[0, N)`; `rank < K` is a hit at R@K.
    """
    return ranks_and_block_max(queries, pool, targets, curvature, max_block_elements=max_block_elements)[0]


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


def _check_pair(queries: Tensor, pool: Tensor) -> None:
    for name, x in (("queries", queries), ("pool", pool)):
        if not torch.is_tensor(x) or x.ndim != 2:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"{name} must be a (N, D) tensor of hyperboloid space components, got {shape}")
    if queries.shape[1] != pool.shape[1]:
        raise ValueError(
            f"queries have dim {queries.shape[1]} but the pool has dim {pool.shape[1]}; embed both with the same model"
        )


# ------------------------------------------------------------------------------------------------------------
# The gallery index folder: reading
def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks, as a hex string."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _corrupt(folder: Path, problem: str) -> ValueError:
    return ValueError(
        f"the gallery index {folder} is corrupt: {problem}; rebuild it with `hysac-index build` or restore a copy"
    )


def _first_line(error: BaseException) -> str:
    """The first line of an error message (FAISS errors carry a C++ stack)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _finite_number(value: Any, name: str, folder: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _corrupt(folder, f"{INDEX_FILE} field {name!r} = {value!r} is not a finite number")
    return float(value)


def is_gallery_index(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a gallery index (its `index.json`), whatever its state."""
    return (Path(folder) / INDEX_FILE).is_file()


def read_index_json(folder: str | os.PathLike) -> dict[str, Any]:
    """`index.json` of a gallery index folder, with its fields checked (types and ranges, not the other files).

    Checks: format 1; every field of `REQUIRED_FIELDS`; `modality` one of `MODALITIES`; `count` and `dim`
    non-negative integers; `curvature` finite and positive; `model_probe` null or `(len(PROBE_TEXTS), dim)` finite
    numbers; `faiss` null or `{"type": str, "params": {...}}`; `metadata` null or a plain file name; `bounds`
    (`validate_bounds`, returned as floats) and `traversal_offset` (a finite number) when present.

    Raises:
        ValueError: not an index folder, unreadable JSON, another format, or a missing or malformed field.
    """
    folder = Path(folder)
    path = folder / INDEX_FILE
    if not path.is_file():
        raise ValueError(
            f"{folder} is not a saved gallery index (no {INDEX_FILE}); build one with "
            "`hysac-index build --model MODEL --images DIR --output INDEX_DIR`"
        )
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _corrupt(folder, f"{INDEX_FILE} is not readable JSON ({error})") from None
    if not isinstance(info, dict):
        raise _corrupt(folder, f"{INDEX_FILE} holds a {type(info).__name__}, not an object")
    missing = [key for key in REQUIRED_FIELDS if key not in info]
    if "format" not in missing and info["format"] != INDEX_FORMAT:  # another format may have other fields
        raise ValueError(
            f"the gallery index {folder} has format {info['format']!r}; this code reads format {INDEX_FORMAT}: "
            "rebuild it with `hysac-index build`, or use the hysac_hf and model code that wrote it"
        )
    if missing:
        raise _corrupt(folder, f"{INDEX_FILE} lacks {missing}")
    if info["modality"] not in MODALITIES:
        raise _corrupt(folder, f"modality {info['modality']!r} is not one of {list(MODALITIES)}")
    for name in ("count", "dim"):
        value = info[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _corrupt(folder, f"{INDEX_FILE} field {name!r} = {value!r} is not a non-negative integer")
    if _finite_number(info["curvature"], "curvature", folder) <= 0:
        raise _corrupt(folder, f"curvature {info['curvature']} is not positive")
    if info["model_probe"] is not None:
        try:
            probe = torch.as_tensor(info["model_probe"], dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise _corrupt(folder, "model_probe is not a list of lists of numbers") from None
        if probe.shape != (len(PROBE_TEXTS), info["dim"]) or not bool(torch.isfinite(probe).all()):
            raise _corrupt(
                folder,
                f"model_probe has shape {tuple(probe.shape)}, expected ({len(PROBE_TEXTS)}, {info['dim']}) "
                "finite numbers",
            )
    faiss_info = info.get("faiss")
    if faiss_info is not None and (
        not isinstance(faiss_info, dict)
        or not isinstance(faiss_info.get("type"), str)
        or not isinstance(faiss_info.get("params", {}), dict)
    ):
        raise _corrupt(folder, f"{INDEX_FILE} field 'faiss' = {faiss_info!r} is not {{'type': str, 'params': {{}}}}")
    if info.get("metadata") is not None and (
        not isinstance(info["metadata"], str) or Path(info["metadata"]).name != info["metadata"]
    ):
        raise _corrupt(folder, f"{INDEX_FILE} field 'metadata' = {info['metadata']!r} is not a file name")
    try:
        info["bounds"] = validate_bounds(info.get("bounds"))
    except ValueError as error:
        raise _corrupt(folder, f"its bounds are invalid: {error}") from None
    if info.get("traversal_offset") is not None:
        info["traversal_offset"] = _finite_number(info["traversal_offset"], "traversal_offset", folder)
    return info


def read_metadata(folder: str | os.PathLike, name: str | None, count: int) -> list[dict[str, Any]]:
    """The metadata file `name` of an index folder: exactly `count` lines, each a JSON object (`count` empty
    objects when `name` is None).

    Raises:
        ValueError: a missing or unreadable file, another number of lines, or a line that is not a JSON object.
    """
    folder = Path(folder)
    if name is None:
        return [{} for _ in range(count)]
    path = folder / name
    if not path.is_file():
        raise _corrupt(folder, f"its metadata file {name} is missing")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise _corrupt(folder, f"{name} is not readable UTF-8 text ({error})") from None
    if len(lines) != count:
        raise _corrupt(folder, f"{name} has {len(lines)} lines for {count} items")
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise _corrupt(folder, f"line {number} of {name} is not JSON ({error})") from None
        if not isinstance(row, dict):
            raise _corrupt(folder, f"line {number} of {name} is not a JSON object")
        rows.append(row)
    return rows


def read_gallery(folder: str | os.PathLike) -> Gallery:
    """Read a gallery index folder (format 1) and check that its parts belong together. Needs no model, no FAISS.

    Checks, in order: `index.json` (:func:`read_index_json`), `embeddings.safetensors` present with the SHA-256
    recorded in `embeddings_sha256`, holding one float32 tensor `"embeddings"` of shape `(count, dim)`, `count >= 1`,
    finite values, and the metadata file (:func:`read_metadata`). A FAISS file named by `index.json` is not read here
    (:func:`read_structure` reads it).

    Returns:
        the :class:`Gallery` (`metadata` None when the folder names no metadata file; `structure` not read yet).
    Raises:
        ValueError: not an index folder, a corrupt one (what is wrong, and to rebuild it) or an empty one.
    """
    folder = Path(folder)
    info = read_index_json(folder)
    path = folder / EMBEDDINGS_FILE
    if not path.is_file():
        raise _corrupt(folder, f"{EMBEDDINGS_FILE} is missing")
    if sha256_file(path) != info["embeddings_sha256"]:
        raise _corrupt(folder, f"the SHA-256 of {EMBEDDINGS_FILE} differs from the one in {INDEX_FILE}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            embeddings = handle.get_tensor(EMBEDDINGS_KEY) if keys == [EMBEDDINGS_KEY] else None
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for unreadable files
        raise _corrupt(folder, f"{EMBEDDINGS_FILE} is not readable ({type(error).__name__}: {error})") from None
    if embeddings is None:
        raise _corrupt(folder, f"{EMBEDDINGS_FILE} holds {keys}, expected only {EMBEDDINGS_KEY!r}")
    count, dim = info["count"], info["dim"]
    if tuple(embeddings.shape) != (count, dim) or embeddings.dtype != torch.float32:
        raise _corrupt(
            folder,
            f"the embeddings are {tuple(embeddings.shape)} {embeddings.dtype}, {INDEX_FILE} says ({count}, {dim}) "
            "float32",
        )
    if count == 0:
        raise ValueError(f"the gallery index {folder} is empty (0 items); rebuild it from at least one item")
    if not bool(torch.isfinite(embeddings).all()):
        raise _corrupt(folder, "the embeddings contain NaN or infinite values")
    metadata = read_metadata(folder, info.get("metadata"), count)
    faiss_info = info.get("faiss")
    return Gallery(
        embeddings=embeddings,
        modality=info["modality"],
        curvature=float(info["curvature"]),
        metadata=metadata if info.get("metadata") is not None else None,
        kind="flat" if faiss_info is None else faiss_info["type"],
        params=dict(faiss_info.get("params", {})) if faiss_info is not None else {},
        model_name=str(info.get("model") or ""),
        model_probe=info.get("model_probe"),
        bounds=info.get("bounds"),
        traversal_offset=info.get("traversal_offset"),
        faiss_path=None if faiss_info is None else str(folder / FAISS_FILE),
        faiss_sha256=None if faiss_info is None else faiss_info.get("sha256"),
        source=str(folder),
    )


def _faiss_file(gallery: Gallery) -> Path:
    path = Path(gallery.faiss_path)
    if not path.is_file():
        raise _corrupt(Path(gallery.source), f"{INDEX_FILE} names a FAISS index but {FAISS_FILE} is missing")
    return path


def read_structure(gallery: Gallery) -> Any:
    """The gallery's saved FAISS structure (needs faiss), read once (then kept in `gallery.structure`) and checked
    against the folder: the recorded SHA-256, an inner-product structure of `len(gallery)` vectors of dimension
    `dim + 1` with `params.nlist` cells; its `nprobe` is set from `params.nprobe`.

    Raises:
        ValueError: no FAISS file, faiss missing, or a file that is altered, unreadable or does not fit the index.
    """
    if gallery.structure is not None:
        return gallery.structure
    if gallery.faiss_path is None:
        raise ValueError(
            f"the gallery {gallery.source} has no FAISS structure (exact indexes store none; exact search is the "
            "default): build an approximate one with `hysac-index build --kind ivf`, or search exactly"
        )
    try:
        import faiss
    except ImportError:
        raise ValueError("reading a FAISS index needs faiss: pip install faiss-cpu (or search exactly)") from None
    folder, path = Path(gallery.source), _faiss_file(gallery)
    if gallery.faiss_sha256 and sha256_file(path) != gallery.faiss_sha256:
        raise _corrupt(folder, f"the SHA-256 of {FAISS_FILE} differs from the one in {INDEX_FILE}")
    try:
        structure = faiss.read_index(str(path))
    except RuntimeError as error:
        raise _corrupt(folder, f"{FAISS_FILE} is not readable ({_first_line(error)})") from None
    nlist = gallery.params.get("nlist")
    if (
        structure.ntotal != len(gallery)
        or structure.d != gallery.dim + 1
        or structure.metric_type != faiss.METRIC_INNER_PRODUCT
        or getattr(faiss.try_extract_index_ivf(structure), "nlist", None) != nlist
    ):
        raise _corrupt(
            folder,
            f"{FAISS_FILE} holds {structure.ntotal} vectors of dimension {structure.d}, expected an inner-product "
            f"index of {len(gallery)} vectors of dimension {gallery.dim + 1} with {nlist} cells",
        )
    if gallery.params.get("nprobe") is not None and hasattr(structure, "nprobe"):
        structure.nprobe = int(gallery.params["nprobe"])
    gallery.structure = structure
    return structure


# ------------------------------------------------------------------------------------------------------------
# The model that embedded a gallery
@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Run `model` in eval mode (no dropout) and give every submodule back its mode afterwards."""
    modes = [(m, m.training) for m in model.modules()] if hasattr(model, "modules") else []
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def model_probe(model: Any, tokenizer: Any) -> Tensor:
    """`encode_text` of `PROBE_TEXTS` (padded to the longest; SigLIP families: to their fixed length), in eval mode:
    the fingerprint a gallery index stores of the model that embedded it.

    Returns:
        `(len(PROBE_TEXTS), D)` float32 on the CPU.
    """
    limit = model.config.text_config.max_position_embeddings
    padding = "max_length" if getattr(model.config, "fixed_text_length", None) else True
    batch = tokenizer(list(PROBE_TEXTS), padding=padding, truncation=True, max_length=limit, return_tensors="pt")
    device = next(model.parameters()).device
    mask = batch.get("attention_mask")
    with torch.no_grad(), _eval_mode(model):
        probe = model.encode_text(batch["input_ids"].to(device), None if mask is None else mask.to(device))
    return probe.float().cpu()


def round_probe(probe: Tensor) -> list[list[float]]:
    """A probe as `index.json` stores it: lists of floats rounded to `PROBE_DECIMALS` decimals."""
    return [[round(float(v), PROBE_DECIMALS) for v in row] for row in probe.double().tolist()]


def check_gallery_model(gallery: Gallery, model: Any, probe: Callable[[], Tensor]) -> None:
    """Refuse a model other than the one that embedded the gallery: its dimension, its curvature, then its probe.

    Args:
        gallery: a gallery read from a folder (:func:`read_gallery`).
        model: the HySAC model that will search it (`config.projection_dim`, `curvature`).
        probe: computes the model's `(len(PROBE_TEXTS), D)` probe embeddings (:func:`model_probe`); called only
            when the gallery stores a probe and the dimension and curvature agree.
    Raises:
        ValueError: saying which check failed and what to do. A gallery without a probe (built from bare
            embeddings) passes on its dimension and curvature, with a warning.
    """
    from transformers.utils import logging

    folder, built_with = gallery.source, gallery.model_name or "another model"
    dim = int(model.config.projection_dim)
    if dim != gallery.dim:
        raise ValueError(
            f"the gallery index {folder} holds {gallery.dim}-dimensional embeddings (built with {built_with}); this "
            f"model embeds in {dim} dimensions; {REBUILD_HINT}"
        )
    curvature = float(model.curvature.detach())
    if gallery.curvature is None or abs(gallery.curvature - curvature) > CURVATURE_TOLERANCE * curvature:
        raise ValueError(
            f"the gallery index {folder} was embedded at curvature {gallery.curvature} (by {built_with}), this model's "
            f"curvature is {curvature}: distances between the two are meaningless; {REBUILD_HINT}"
        )
    if gallery.model_probe is None:
        logging.get_logger(__name__).warning(
            "The gallery index %s has no model probe (built from embeddings without a model): only its dimension "
            "and curvature could be checked against this model.",
            folder,
        )
        return
    stored = torch.as_tensor(gallery.model_probe, dtype=torch.float64)
    difference = float((stored - torch.as_tensor(probe(), dtype=torch.float64)).abs().max())
    if difference > PROBE_TOLERANCE * (1 + float(stored.abs().max())):
        raise ValueError(
            f"the gallery index {folder} was embedded by {built_with}, not by this model (its probe embeddings differ "
            f"by up to {difference:.3g}); {REBUILD_HINT}"
        )


def load_gallery_index(folder: str | os.PathLike, model: Any, tokenizer: Any) -> Gallery:
    """Read a saved gallery index folder and check that `model` can search it (:func:`read_gallery`, then
    :func:`check_gallery_model` with the probe recomputed by `model` and `tokenizer`); a FAISS file named by the folder
    must exist. FAISS is not needed: the file is read when first searched (:func:`read_structure`).

    Raises:
        ValueError: a folder that is not an index, a corrupt one, an empty one, or one built with another model or
            curvature, each saying what to do.
    """
    gallery = read_gallery(folder)
    check_gallery_model(gallery, model, lambda: model_probe(model, tokenizer))
    if gallery.faiss_path is not None:
        _faiss_file(gallery)  # a named FAISS file must exist, even when the search is exact
    return gallery


# ------------------------------------------------------------------------------------------------------------
# The gallery index folder: writing
def metadata_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One JSON line per metadata row (strict JSON: NaN/Infinity refused).

    Raises:
        ValueError: a row that is not a dict or holds a value JSON cannot represent (naming the row).
    """
    lines = []
    for number, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"metadata row {number} is a {type(row).__name__}; each item's metadata must be a dict")
        try:
            lines.append(json.dumps(row, ensure_ascii=False, allow_nan=False))
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"metadata row {number} is not JSON-serialisable ({error}); keep strings, numbers, booleans, None, "
                "lists and dicts of them"
            ) from None
    return lines


def write_gallery(gallery: Gallery, folder: str | os.PathLike) -> None:
    """Write `gallery` as a format-1 index folder into `folder` (which should be new and empty; make it atomic by
    writing into a temporary folder and renaming it). An approximate gallery's structure must be built, and is
    saved with its `params["nprobe"]`.

    Raises:
        ValueError: metadata that JSON cannot hold, or an approximate gallery without a structure.
    """
    folder = Path(folder)
    lines = metadata_lines(gallery.metadata if gallery.metadata is not None else [{} for _ in range(len(gallery))])
    save_file({EMBEDDINGS_KEY: gallery.embeddings.contiguous()}, str(folder / EMBEDDINGS_FILE))
    with open(folder / METADATA_FILE, "w", encoding="utf-8") as handle:
        handle.writelines(line + "\n" for line in lines)
    faiss_info = None
    if gallery.kind != "flat":
        import faiss

        if gallery.structure is None:
            raise ValueError(f"the {gallery.kind} gallery has no structure to save; build it first")
        gallery.structure.nprobe = gallery.params["nprobe"]
        faiss.write_index(gallery.structure, str(folder / FAISS_FILE))
        faiss_info = {"type": gallery.kind, "params": dict(gallery.params), "sha256": sha256_file(folder / FAISS_FILE)}
    info = {
        "format": INDEX_FORMAT,
        "modality": gallery.modality,
        "count": len(gallery),
        "dim": gallery.dim,
        "curvature": gallery.curvature,
        "model": gallery.model_name,
        "model_probe": gallery.model_probe,
        "faiss": faiss_info,
        "embeddings_sha256": sha256_file(folder / EMBEDDINGS_FILE),
        "metadata": METADATA_FILE,
        "bounds": gallery.bounds,
        "traversal_offset": gallery.traversal_offset,
    }
    (folder / INDEX_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


__all__ = [
    "CURVATURE_TOLERANCE",
    "EMBEDDINGS_FILE",
    "EMBEDDINGS_KEY",
    "FAISS_FILE",
    "INDEX_FILE",
    "INDEX_FORMAT",
    "INDEX_KINDS",
    "MAX_BLOCK_ELEMENTS",
    "METADATA_FILE",
    "POLICIES",
    "PROBE_DECIMALS",
    "PROBE_TEXTS",
    "PROBE_TOLERANCE",
    "RANK_CHUNK",
    "RERANK_MARGIN",
    "Gallery",
    "RankRequest",
    "add_to_structure",
    "check_gallery_model",
    "describe_results",
    "flat_structure",
    "is_gallery_index",
    "load_gallery_index",
    "lorentz_scores",
    "metadata_lines",
    "model_probe",
    "paired_ranks",
    "pessimistic_ranks",
    "rank_exact",
    "ranks_and_block_max",
    "read_gallery",
    "read_index_json",
    "read_metadata",
    "read_structure",
    "redirect",
    "rerank",
    "round_probe",
    "search",
    "search_safely",
    "shared_product_ranks",
    "sha256_file",
    "structure_candidates",
    "target_ranks",
    "write_gallery",
]
