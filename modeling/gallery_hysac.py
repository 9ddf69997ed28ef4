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
- :func:`search`: :func:`rank_exact`, or the `k + RERANK_MARGIN` (or, for quantised codes, the folder's `rerank`)
  candidates of a FAISS structure re-ranked in float64 (:func:`rerank`); FAISS scores in float32, so the spare
  candidates let near-ties at the k-th place be cut as a float64 ranking cuts them. Structures: :func:`flat_structure`
  (exact, `IndexFlatIP`) and the approximate IVFs that `hysac_hf.index` trains, whose radial cells are defined here
  (:class:`RadialCells`); :func:`add_to_structure` fills any of them.
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
                           "faiss": {"type": "ivf"|"ivfpq", "params": {...}, "sha256": ...} or null,
                           "embeddings_sha256": ..., "metadata": "metadata.jsonl",
                           "bounds": {"S"|"V"|"U"|"G": {"avg", "up_95", "low_05"}} or null,
                           "traversal_offset": float or null,
                           "tuning": {...} (optional: what an approximate build measured and chose),
                           "metadata_sha256": ..., "fields_sha256": ...}
  embeddings.safetensors  {"embeddings": (N, D) float32 hyperboloid space components, row i = item i}
  metadata.jsonl          one JSON object per item, row i = item i
  faiss.index             only when "faiss" is not null: faiss.write_index of the search structure over
                          mips_pool_vectors(embeddings, curvature) (queries: mips_query_vectors)
```
`"faiss": null` means exact search. `faiss.params`: `nlist`, `nprobe` (the default of a search), `cells`
(`"direction"`: the first release's cells, filed by FAISS; `"radial"`: :class:`RadialCells`, filed by the engine), and
for `ivfpq` `rerank` (candidates re-ranked exactly) and `code` (`PQ<M>x<bits>`); an `ivfpq` file is an
`IndexPreTransform` that pads the `D + 1`-dimensional vectors with zeros for its product quantiser, so readers that
know only `D + 1` (this format's first release) read and search it too. `"tuning"` (written only by approximate builds
that measured something; readers that do not know it ignore it): `target_recall`, `k`, `queries` (held-out gallery
items), the chosen `cells`, `nprobe` (and `rerank`), the measured `recall`, its `recall_lower_bound`, `scanned`,
`queries_per_s`, `exact_queries_per_s`, `speedup`, the `candidates` compared, and, when the target could not be met
at twice the exact speed, `refused` (then `"faiss"` is null: exact search) and `requested_kind`. The embeddings of an
`ivfpq` index, or of any file over `MEMORY_MAP_BYTES`, are memory-mapped: read row by row, never loaded whole.
`"bounds"` and `"traversal_offset"` are the embedding model's `config.bounds` and
`config.traversal_offset` at build time (what the `redirect` policy needs when no model is at hand); `faiss.sha256`
guards the FAISS file as `embeddings_sha256` guards the embeddings and `metadata_sha256` the metadata file;
`fields_sha256` guards `index.json` itself: the SHA-256 of its other fields as canonical JSON (:func:`fields_digest`),
so that an edited `modality`, `count` or `model` is refused instead of answering wrongly. Folders written before
these two fields existed have neither and are read without those checks. `model_probe` fingerprints the embedding model:
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
from torch import Tensor

from .configuration_hysac import BOUND_STATS, MODALITIES, SAFE_KIND, validate_bounds
from .lorentz import autocast_disabled, dist_to_origin, mips_pool_vectors, mips_query_vectors, pairwise_dist
from .traversal import METHODS, traversal_threshold, traverse

POLICIES = ("redirect", "retain")
# "flat": exact search (no FAISS file); "ivf": an approximate FAISS IVF over the float32 pool vectors; "ivfpq": an
# approximate IVF over product-quantised pool vectors, its candidates re-ranked from memory-mapped embeddings.
INDEX_KINDS = ("flat", "ivf", "ivfpq")
MEMORY_MAPPED_KINDS = ("ivfpq",)  # kinds whose embeddings are read from disk row by row, never loaded whole
MEMORY_MAP_BYTES = 4 << 30  # embeddings files larger than this are memory-mapped whatever the kind
# How an IVF's items are filed into its cells: "direction" (the first release: FAISS files each item under the
# quantizer vector [u_j, 0] of its nearest direction) or "radial" (shells of distance to the root cut into direction
# cells; the engine files each item, see radial_cells).
CELL_SCHEMES = ("direction", "radial")
RERANK_MARGIN = 8  # FAISS candidates fetched beyond k: its float32 scores may order near-ties differently
RANK_CHUNK = 65_536  # gallery rows ranked at once by rank_exact: a (queries, RANK_CHUNK) float64 block
MAX_BLOCK_ELEMENTS = 2**26  # largest score block held by the target-rank functions: 256 MiB of float32
STRUCTURE_ADD_CHUNK = 65_536  # rows turned into float32 pool vectors at once while filling a FAISS structure
ASSIGN_CHUNK = 8_192  # rows filed into radial cells at once (a (rows, cells of one shell) score block)
ASSIGN_EXACT_CELLS = 1_024  # shells with more cells find an item's nearest direction with an HNSW graph (approximate)
WRITE_CHUNK = 65_536  # embedding rows written at once by write_embeddings
RERANK_BLOCK_ELEMENTS = 2**23  # float64 candidate values gathered at once by rerank: 64 MiB

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
        embeddings: `(N, D)` float32 hyperboloid space components on the CPU, row `i` = item `i` (memory-mapped from
            the folder's file for the kinds of `MEMORY_MAPPED_KINDS`).
        modality: `"image"` or `"text"`: what the items are (their safe region: `V` or `S`).
        curvature: curvature magnitude `c` of the model that embedded them (None: not recorded).
        metadata: one dict per item, or None.
        kind: `"flat"` (exact search), `"ivf"` or `"ivfpq"` (a saved approximate FAISS structure).
        params: the structure's settings (`nlist`, `nprobe`, `cells`; `rerank` and `code` for `ivfpq`).
        model_name: name or path of the embedding model.
        model_probe: the model's rounded probe embeddings (:func:`model_probe`), or None.
        bounds: the model's `config.bounds` at build time, or None.
        traversal_offset: the model's `config.traversal_offset` at build time, or None.
        structure: the FAISS structure over the pool vectors, once built or read (:func:`read_structure`).
        faiss_path: where the saved FAISS file is (read on first use), or None.
        faiss_sha256: its recorded SHA-256, or None.
        tuning: what the build measured and chose for an approximate kind (`index.json` field `"tuning"`), or None.
        source: where the gallery came from, for messages.
        memory_mapped: whether `embeddings` are memory-mapped from the folder's file.
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
    tuning: dict[str, Any] | None = None
    source: str = "embeddings"
    memory_mapped: bool = False

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]


# ------------------------------------------------------------------------------------------------------------
# Exact and approximate top-k
def all_finite(embeddings: Tensor, rows: int = WRITE_CHUNK) -> bool:
    """Whether every value is finite, checked `rows` rows at a time (`torch.isfinite` of a whole float tensor makes
    an absolute-value copy of it and two masks: 1.5 times its size again, transiently)."""
    return all(bool(torch.isfinite(embeddings[start : start + rows]).all()) for start in range(0, embeddings.shape[0], rows))


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

    Queries are re-ranked together, in blocks of at most `RERANK_BLOCK_ELEMENTS` gathered float64 values (a batched
    :func:`pairwise_dist`: one small matrix product per query costs more in overhead than in arithmetic). `-1` marks a
    missing candidate (an IVF whose probed cells held fewer items than asked): the others are re-ranked, and a query
    left with fewer than `k` candidates is ranked against the whole gallery instead.

    Args:
        queries: `(Q, D)` space components.
        embeddings: `(N, D)` the gallery (a memory-mapped tensor: only the candidates' rows are read).
        candidates: `(Q, M)` int64 gallery indices, `M >= k`, `-1` for a missing candidate.
        curvature: positive curvature magnitude `c`.
        k: results per query.
    Returns:
        as :func:`rank_exact`.
    """
    count = queries.shape[0]
    indices = torch.zeros(count, k, dtype=torch.long)
    distances = torch.zeros(count, k, dtype=torch.float64)
    if count == 0:
        return indices, distances
    queries = queries.detach().to("cpu", torch.float64)
    candidates = candidates.to(torch.long)
    c = _float64(curvature)
    missing = (candidates >= 0).sum(dim=1) < k
    for row in torch.nonzero(missing).flatten().tolist():
        best, best_distances = rank_exact(queries[row : row + 1], embeddings, c, k)
        indices[row], distances[row] = best[0], best_distances[0]
    rows = torch.nonzero(~missing).flatten()
    # Gallery order within each row, so that the stable sort below breaks equal distances by index.
    found = torch.sort(candidates[rows], dim=1).values
    step = max(1, RERANK_BLOCK_ELEMENTS // max(1, found.shape[1] * embeddings.shape[1]))
    for begin in range(0, rows.shape[0], step):
        block, block_found = rows[begin : begin + step], found[begin : begin + step]
        gathered = embeddings[block_found.clamp(min=0).reshape(-1)].to(torch.float64).reshape(*block_found.shape, -1)
        block_distances = pairwise_dist(queries[block, None, :], gathered, c, eps=0.0)[:, 0, :]
        block_distances = block_distances.masked_fill(block_found < 0, math.inf)  # sorted after every real one
        order = torch.sort(block_distances, dim=1, stable=True).indices[:, :k]
        indices[block] = block_found.gather(1, order)
        distances[block] = block_distances.gather(1, order)
    return indices, distances


def _search_parameters(structure: Any, nprobe: int | None) -> tuple[Any, list[Any]]:
    """FAISS search parameters probing `nprobe` cells of an IVF (plain or behind an `IndexPreTransform`), and the
    objects they point to (kept alive by the caller while FAISS searches)."""
    if nprobe is None:
        return None, []
    import faiss

    ivf_params = faiss.SearchParametersIVF(nprobe=int(nprobe))
    if isinstance(structure, faiss.IndexPreTransform):
        return faiss.SearchParametersPreTransform(index_params=ivf_params), [ivf_params]
    return ivf_params, []


def structure_candidates(
    structure: Any, queries: Tensor, curvature: float | Tensor, count: int, nprobe: int | None = None
) -> Tensor:
    """The `count` best candidates of each query from a FAISS inner-product structure over the pool vectors.

    Args:
        structure: a FAISS index over `mips_pool_vectors(embeddings, curvature)` (flat, IVF, or an IVF over
            quantised codes behind an `IndexPreTransform` that pads the vectors).
        queries: `(Q, D)` space components.
        count: candidates per query.
        nprobe: cells probed by an IVF structure (None: the structure's own setting).
    Returns:
        `(Q, count)` int64 gallery indices, best first; `-1` where the structure found fewer items.
    """
    c = torch.as_tensor(curvature).detach().to("cpu", torch.float32)
    vectors = mips_query_vectors(queries.detach().to("cpu", torch.float32), c)
    vectors = np.ascontiguousarray(vectors.numpy(), dtype=np.float32)
    params, keep_alive = _search_parameters(structure, nprobe)
    _, ids = structure.search(vectors, count) if params is None else structure.search(vectors, count, params=params)
    del keep_alive
    return torch.from_numpy(ids.astype(np.int64))


def search(
    queries: Tensor,
    embeddings: Tensor,
    curvature: float | Tensor,
    k: int,
    structure: Any = None,
    nprobe: int | None = None,
    candidates: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The `k` nearest gallery items of each query by Lorentz distance.

    Without a `structure`: :func:`rank_exact`. With one: its `max(k + RERANK_MARGIN, candidates)` best candidates
    (:func:`structure_candidates`), re-ranked in float64 (:func:`rerank`).

    Args:
        queries: `(Q, D)` space components.
        embeddings: `(N, D)` the gallery, `N >= k` (a memory-mapped tensor is read only where needed).
        curvature: positive curvature magnitude `c`.
        k: results per query.
        structure: a FAISS structure over the gallery's pool vectors, or None.
        nprobe: cells probed by an IVF structure (None: its own setting).
        candidates: candidates re-ranked per query (None: `k + RERANK_MARGIN`); a structure over quantised codes
            scores approximately and needs more (its saved `params["rerank"]`).
    Returns:
        `(Q, k)` int64 gallery indices, nearest first (equal distances in gallery order), and their float64 distances.
    """
    if structure is None:
        return rank_exact(queries, embeddings, curvature, k)
    count = min(max(k + RERANK_MARGIN, int(candidates or 0)), embeddings.shape[0])
    found = structure_candidates(structure, queries, curvature, count, nprobe)
    return rerank(queries, embeddings, found, curvature, k)


def flat_structure(embeddings: Tensor, curvature: float | Tensor) -> Any:
    """An exact FAISS structure (`IndexFlatIP`) over the gallery's pool vectors (needs faiss)."""
    import faiss

    structure = faiss.IndexFlatIP(embeddings.shape[1] + 1)
    add_to_structure(structure, embeddings, curvature)
    return structure


@dataclass
class RadialCells:
    """The cells of a radial IVF, read back from its quantizer (so that the FAISS file alone defines them).

    A radial IVF cuts the hyperboloid into shells of distance to the root, and each shell into direction cells. The
    quantizer vector of cell `j` in the shell whose inner edge has space norm `rho` is the pool vector of a point at
    that edge, `[rho m_j, sqrt(1/c + rho^2)]`, with `m_j` the mean unit direction of the cell's items (its length,
    at most 1, says how spread they are). FAISS probes the cells whose vector has the largest inner product with the
    query vector `[x_s, -x_t]`: the Lorentz inner product of the query with that edge point, an estimate of the best
    score the cell can hold. Items are filed here, not by FAISS: into the outermost shell whose edge lies at or below
    them (their time component against the shells' time components), then into the cell of that shell whose
    direction `m_j / |m_j|` is nearest to theirs (exactly; in shells of more than `ASSIGN_EXACT_CELLS` cells, as an
    HNSW graph over the directions finds it, which costs `log(cells)` instead of `cells` products per item and may
    file an item beside its nearest cell: searches re-rank exactly, so this costs recall, never exactness).

    Attributes:
        shell_times: `(S,)` float32 ascending time components of the shells' inner edges.
        cell_shells: `(nlist,)` int64 shell of each cell.
        directions: `(nlist, D)` float32 unit direction of each cell (zero for a cell without one).
    """

    shell_times: np.ndarray
    cell_shells: np.ndarray
    directions: np.ndarray
    _searchers: dict[int, tuple[np.ndarray, Any]] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, structure: Any, dim: int) -> RadialCells:
        """The cells of `structure` (an IVF over `dim + 1`-dimensional pool vectors, possibly padded)."""
        import faiss

        ivf = faiss.extract_index_ivf(structure)
        vectors = ivf.quantizer.reconstruct_n(0, ivf.nlist)[:, : dim + 1]
        shell_times, cell_shells = np.unique(vectors[:, dim], return_inverse=True)
        norms = np.linalg.norm(vectors[:, :dim], axis=1, keepdims=True)
        directions = np.divide(vectors[:, :dim], norms, out=np.zeros_like(vectors[:, :dim]), where=norms > 0)
        return cls(shell_times, cell_shells.astype(np.int64).reshape(-1), np.ascontiguousarray(directions))

    def assign(self, pool: np.ndarray) -> np.ndarray:
        """The cell of each pool vector.

        Args:
            pool: `(n, D + 1)` float32 pool vectors `[y_s, y_t]`.
        Returns:
            `(n,)` int64 cell numbers.
        """
        import faiss

        dim = self.directions.shape[1]
        shells = np.clip(np.searchsorted(self.shell_times, pool[:, dim], side="right") - 1, 0, None)
        labels = np.empty(pool.shape[0], dtype=np.int64)
        for shell in np.unique(shells):
            rows = np.nonzero(shells == shell)[0]
            if int(shell) not in self._searchers:
                members = np.nonzero(self.cell_shells == shell)[0]
                if members.size > ASSIGN_EXACT_CELLS:
                    directions = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
                    directions.hnsw.efSearch = 64
                else:
                    directions = faiss.IndexFlatIP(dim)
                directions.add(np.ascontiguousarray(self.directions[members]))
                self._searchers[int(shell)] = (members, directions)
            members, directions = self._searchers[int(shell)]
            if members.size == 1:
                labels[rows] = members[0]
                continue
            for start in range(0, rows.size, ASSIGN_CHUNK):
                part = rows[start : start + ASSIGN_CHUNK]
                _, best = directions.search(np.ascontiguousarray(pool[part, :dim]), 1)
                labels[part] = members[best[:, 0]]
        return labels


def _add_assigned(structure: Any, vectors: np.ndarray, labels: np.ndarray) -> None:
    """Append pool vectors to the given cells of an IVF (through its `IndexPreTransform`, if any); they take the next
    gallery indices."""
    import faiss

    ivf = faiss.extract_index_ivf(structure)
    if isinstance(structure, faiss.IndexPreTransform):
        for position in range(structure.chain.size()):
            vectors = faiss.downcast_VectorTransform(structure.chain.at(position)).apply(vectors)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    ivf.add_core(vectors.shape[0], faiss.swig_ptr(vectors), None, faiss.swig_ptr(labels))
    structure.ntotal = ivf.ntotal


def add_to_structure(
    structure: Any, embeddings: Tensor, curvature: float | Tensor, cells: str | None = None
) -> None:
    """Append `(M, D)` space components to a FAISS inner-product structure over the pool vectors, chunk by chunk
    (they take the next gallery indices).

    Args:
        structure: a flat or IVF FAISS structure.
        embeddings: `(M, D)` space components (a memory-mapped tensor is read chunk by chunk).
        curvature: positive curvature magnitude `c`.
        cells: the IVF's cell scheme (`params["cells"]`): `"radial"` files items by :class:`RadialCells`; None or
            `"direction"` lets FAISS file them by its quantizer.
    """
    if cells is not None and cells not in CELL_SCHEMES:
        raise ValueError(f"cells={cells!r} is not one of {list(CELL_SCHEMES)}")
    c = torch.as_tensor(curvature).detach().to("cpu", torch.float32)
    layout = RadialCells.of(structure, embeddings.shape[1]) if cells == "radial" else None
    for start in range(0, embeddings.shape[0], STRUCTURE_ADD_CHUNK):
        vectors = mips_pool_vectors(embeddings[start : start + STRUCTURE_ADD_CHUNK].detach().cpu().float(), c)
        vectors = np.ascontiguousarray(vectors.numpy(), dtype=np.float32)
        if layout is None:
            structure.add(vectors)
        else:
            _add_assigned(structure, vectors, layout.assign(vectors))


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
    candidates: int | None = None,
) -> dict[str, Tensor]:
    """Safe retrieval on embeddings: the policy, then the search, then the distances to the root.

    Under `policy="redirect"` each query beyond the safe region's threshold is moved onto it first (:func:`redirect`);
    `"retain"` searches with the query as it is.

    Args:
        queries: `(Q, D)` space components (float32 from the model, or float64).
        embeddings, curvature, k, structure, nprobe, candidates: as in :func:`search`.
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
    indices, distances = search(searched, embeddings, curvature, k, structure, nprobe, candidates)
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


FIELDS_DIGEST_KEY = "fields_sha256"


def fields_digest(info: dict[str, Any]) -> str:
    """The SHA-256 of an `index.json`'s fields other than `fields_sha256`, as canonical JSON (sorted keys, no spaces):
    the same for the written dict and the one read back (JSON keeps Python floats exactly)."""
    fields = {key: value for key, value in info.items() if key != FIELDS_DIGEST_KEY}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_index_json(folder: str | os.PathLike) -> dict[str, Any]:
    """`index.json` of a gallery index folder, with its fields checked (types and ranges, not the other files).

    Checks: format 1; every field of `REQUIRED_FIELDS`; `modality` one of `MODALITIES`; `count` and `dim`
    non-negative integers; `curvature` finite and positive; `model_probe` null or `(len(PROBE_TEXTS), dim)` finite
    numbers; `faiss` null or `{"type": str, "params": {...}}`; `metadata` null or a plain file name; `bounds`
    (`validate_bounds`, returned as floats) and `traversal_offset` (a finite number) when present; then, when the
    folder records one, that `fields_sha256` is still the digest of the other fields (:func:`fields_digest`).

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
    try:
        digest = fields_digest(info)  # of the fields as read, before the checks below normalise any
    except ValueError:  # NaN or infinity: the field checks below name it
        digest = None
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
    if info.get("tuning") is not None and not isinstance(info["tuning"], dict):
        raise _corrupt(folder, f"{INDEX_FILE} field 'tuning' = {info['tuning']!r} is not an object")
    if info.get("metadata") is not None and (
        not isinstance(info["metadata"], str) or Path(info["metadata"]).name != info["metadata"]
    ):
        raise _corrupt(folder, f"{INDEX_FILE} field 'metadata' = {info['metadata']!r} is not a file name")
    try:
        info["bounds"] = validate_bounds(info.get("bounds"))
    except ValueError as error:
        raise _corrupt(folder, f"its bounds are invalid: {error}") from None
    if FIELDS_DIGEST_KEY in info and info[FIELDS_DIGEST_KEY] != digest:
        raise _corrupt(
            folder,
            f"{INDEX_FILE} was changed after the index was written (its fields no longer match {FIELDS_DIGEST_KEY}); "
            "an edited modality, count or model would give wrong answers without an error",
        )
    if info.get("traversal_offset") is not None:
        info["traversal_offset"] = _finite_number(info["traversal_offset"], "traversal_offset", folder)
    return info


def read_metadata(
    folder: str | os.PathLike, name: str | None, count: int, sha256: str | None = None
) -> list[dict[str, Any]]:
    """The metadata file `name` of an index folder: exactly `count` lines, each a JSON object (`count` empty
    objects when `name` is None), with the SHA-256 `sha256` when one is recorded.

    Raises:
        ValueError: a missing or unreadable file, another checksum, another number of lines, or a line that is not a
            JSON object.
    """
    folder = Path(folder)
    if name is None:
        return [{} for _ in range(count)]
    path = folder / name
    if not path.is_file():
        raise _corrupt(folder, f"its metadata file {name} is missing")
    try:
        data = path.read_bytes()
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise _corrupt(folder, f"the SHA-256 of {name} differs from the one in {INDEX_FILE} (was it edited?)")
        lines = data.decode("utf-8").splitlines()
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


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset of its data (raises ValueError on a malformed one)."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError("shorter than a safetensors header")
        size = int.from_bytes(prefix, "little")
        if size > 100_000_000:
            raise ValueError(f"its header claims {size} bytes")
        raw = handle.read(size)
    if len(raw) != size:
        raise ValueError("its header is truncated")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"its header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    return header, 8 + size


def memory_map_embeddings(folder: str | os.PathLike, count: int, dim: int) -> Tensor:
    """The `(count, dim)` float32 embeddings of an index folder, memory-mapped (copy-on-write: the file is never
    written through it), so that rows are read from disk only when used.

    Checks the file's header and size against `count` and `dim`; not its checksum or values (that reads the whole
    file: :func:`verify_embeddings`).

    Raises:
        ValueError: a missing file, or one whose header or size does not match.
    """
    folder = Path(folder)
    path = folder / EMBEDDINGS_FILE
    if not path.is_file():
        raise _corrupt(folder, f"{EMBEDDINGS_FILE} is missing")
    try:
        header, offset = _safetensors_header(path)
    except (OSError, ValueError) as error:
        raise _corrupt(folder, f"{EMBEDDINGS_FILE} is not readable ({error})") from None
    entry = header.get(EMBEDDINGS_KEY)
    keys = [key for key in header if key != "__metadata__"]
    nbytes = count * dim * 4
    if (
        keys != [EMBEDDINGS_KEY]
        or not isinstance(entry, dict)
        or entry.get("dtype") != "F32"
        or entry.get("shape") != [count, dim]
        or entry.get("data_offsets") != [0, nbytes]
    ):
        raise _corrupt(
            folder,
            f"{EMBEDDINGS_FILE} holds {header if len(str(header)) < 300 else keys}, expected one float32 tensor "
            f"{EMBEDDINGS_KEY!r} of shape ({count}, {dim})",
        )
    if path.stat().st_size != offset + nbytes:
        raise _corrupt(folder, f"{EMBEDDINGS_FILE} has {path.stat().st_size} bytes, expected {offset + nbytes}")
    if count == 0:
        return torch.zeros(0, dim)
    return torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c", offset=offset, shape=(count, dim)))


def verify_embeddings(gallery: Gallery) -> None:
    """Read a memory-mapped gallery's embeddings once, in chunks: their file's SHA-256 against the one recorded in
    `index.json`, and finite values (what :func:`read_gallery` checks of the galleries it loads whole).

    Raises:
        ValueError: saying which check failed.
    """
    folder = Path(gallery.source)
    info = read_index_json(folder)
    if sha256_file(folder / EMBEDDINGS_FILE) != info["embeddings_sha256"]:
        raise _corrupt(folder, f"the SHA-256 of {EMBEDDINGS_FILE} differs from the one in {INDEX_FILE}")
    if not all_finite(gallery.embeddings):
        raise _corrupt(folder, "the embeddings contain NaN or infinite values")


def read_gallery(folder: str | os.PathLike, memory_map: bool | None = None) -> Gallery:
    """Read a gallery index folder (format 1) and check that its parts belong together. Needs no model, no FAISS.

    Checks, in order: `index.json` (:func:`read_index_json`), `embeddings.safetensors` present with the SHA-256
    recorded in `embeddings_sha256`, holding one float32 tensor `"embeddings"` of shape `(count, dim)`, `count >= 1`,
    finite values, and the metadata file (:func:`read_metadata`). A FAISS file named by `index.json` is not read here
    (:func:`read_structure` reads it).

    Memory-mapped embeddings (the default for the kinds of `MEMORY_MAPPED_KINDS` and for files over
    `MEMORY_MAP_BYTES`: they may exceed the memory) are checked by their header and size only:
    :func:`verify_embeddings` reads them whole.

    Args:
        folder: the index folder.
        memory_map: memory-map the embeddings (None: by the index's kind and the file's size).
    Returns:
        the :class:`Gallery` (`metadata` None when the folder names no metadata file; `structure` not read yet).
    Raises:
        ValueError: not an index folder, a corrupt one (what is wrong, and to rebuild it) or an empty one.
    """
    folder = Path(folder)
    info = read_index_json(folder)
    faiss_info = info.get("faiss")
    kind = "flat" if faiss_info is None else faiss_info["type"]
    count, dim = info["count"], info["dim"]
    path = folder / EMBEDDINGS_FILE
    if memory_map is None:
        memory_map = kind in MEMORY_MAPPED_KINDS or (path.is_file() and path.stat().st_size > MEMORY_MAP_BYTES)
    if memory_map:
        embeddings = memory_map_embeddings(folder, count, dim)
    else:
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
        if tuple(embeddings.shape) != (count, dim) or embeddings.dtype != torch.float32:
            raise _corrupt(
                folder,
                f"the embeddings are {tuple(embeddings.shape)} {embeddings.dtype}, {INDEX_FILE} says ({count}, {dim}) "
                "float32",
            )
    if count == 0:
        raise ValueError(f"the gallery index {folder} is empty (0 items); rebuild it from at least one item")
    if not memory_map and not all_finite(embeddings):
        raise _corrupt(folder, "the embeddings contain NaN or infinite values")
    metadata = read_metadata(folder, info.get("metadata"), count, info.get("metadata_sha256"))
    return Gallery(
        embeddings=embeddings,
        modality=info["modality"],
        curvature=float(info["curvature"]),
        metadata=metadata if info.get("metadata") is not None else None,
        kind=kind,
        params=dict(faiss_info.get("params", {})) if faiss_info is not None else {},
        model_name=str(info.get("model") or ""),
        model_probe=info.get("model_probe"),
        bounds=info.get("bounds"),
        traversal_offset=info.get("traversal_offset"),
        faiss_path=None if faiss_info is None else str(folder / FAISS_FILE),
        faiss_sha256=None if faiss_info is None else faiss_info.get("sha256"),
        tuning=info.get("tuning"),
        source=str(folder),
        memory_mapped=memory_map,
    )


def _faiss_file(gallery: Gallery) -> Path:
    path = Path(gallery.faiss_path)
    if not path.is_file():
        raise _corrupt(Path(gallery.source), f"{INDEX_FILE} names a FAISS index but {FAISS_FILE} is missing")
    return path


def read_structure(gallery: Gallery) -> Any:
    """The gallery's saved FAISS structure (needs faiss), read once (then kept in `gallery.structure`) and checked
    against the folder: the recorded SHA-256, an inner-product structure of `len(gallery)` vectors of dimension
    `dim + 1` (the structure's own input dimension: one that pads the vectors wraps its IVF in an
    `IndexPreTransform`) with `params.nlist` cells; its `nprobe` is set from `params.nprobe`.

    Raises:
        ValueError: no FAISS file, faiss missing, or a file that is altered, unreadable or does not fit the index.
    """
    if gallery.structure is not None:
        return gallery.structure
    if gallery.faiss_path is None:
        raise ValueError(
            f"the gallery {gallery.source} has no FAISS structure (exact indexes store none; exact search is the "
            "default): build an approximate one with `hysac-index build --kind ivf` (or ivfpq), or search exactly"
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
    ivf = faiss.try_extract_index_ivf(structure)
    if (
        structure.ntotal != len(gallery)
        or structure.d != gallery.dim + 1
        or structure.metric_type != faiss.METRIC_INNER_PRODUCT
        or getattr(ivf, "nlist", None) != nlist
    ):
        raise _corrupt(
            folder,
            f"{FAISS_FILE} holds {structure.ntotal} vectors of dimension {structure.d}, expected an inner-product "
            f"index of {len(gallery)} vectors of dimension {gallery.dim + 1} with {nlist} cells",
        )
    if gallery.params.get("nprobe") is not None:
        ivf.nprobe = int(gallery.params["nprobe"])
    gallery.structure = structure
    return structure


def save_structure(structure: Any, path: str | os.PathLike) -> None:
    """Write a FAISS structure to `path` atomically (a `.part` file renamed over it): a resumable build's checkpoint."""
    import faiss

    part = Path(str(path) + ".part")
    faiss.write_index(structure, str(part))
    os.replace(part, path)


def load_structure(path: str | os.PathLike) -> Any:
    """A FAISS structure written by :func:`save_structure` (a checkpoint of the builder's own, not an index folder's
    file: :func:`read_structure` reads and checks those)."""
    import faiss

    return faiss.read_index(str(path))


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


def _embeddings_header(count: int, dim: int) -> bytes:
    """The safetensors header of one `(count, dim)` float32 tensor `"embeddings"`, as `safetensors` writes it
    (compact JSON padded with spaces to a multiple of 8 bytes, after its 8-byte little-endian length)."""
    header = json.dumps(
        {EMBEDDINGS_KEY: {"dtype": "F32", "shape": [count, dim], "data_offsets": [0, count * dim * 4]}},
        separators=(",", ":"),
    ).encode("utf-8")
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header


class EmbeddingsWriter:
    """Writes `embeddings.safetensors` row block by row block, never holding the whole `(N, D)` matrix. The header
    is reserved first and rewritten by :meth:`finish` with the final row count (its JSON padded with spaces to the
    reserved length, which the safetensors format allows); until then the file is not a valid safetensors file.

    A writer can resume an unfinished file: `resume_rows` rows already written are kept (the file is cut after
    them).

    Args:
        path: the file to write.
        dim: row length `D`.
        resume_rows: rows of an unfinished file at `path` to keep (0: start a new file).
    """

    HEADER_BYTES = 256  # room for the header of any (count, dim) float32 tensor: 8 + 248

    def __init__(self, path: str | os.PathLike, dim: int, resume_rows: int = 0):
        self.path, self.dim, self.rows = Path(path), int(dim), int(resume_rows)
        if self.rows:
            with open(self.path, "r+b") as handle:
                handle.truncate(self.HEADER_BYTES + self.rows * self.dim * 4)
        else:
            with open(self.path, "wb") as handle:
                handle.write(b"\0" * self.HEADER_BYTES)
        self._handle = open(self.path, "ab")

    def write(self, rows: Tensor) -> None:
        """Append `(n, D)` rows (converted to contiguous float32)."""
        block = rows.detach().to("cpu", torch.float32).contiguous()
        if block.ndim != 2 or block.shape[1] != self.dim:
            raise ValueError(f"rows of shape {tuple(block.shape)} do not fit embeddings of dimension {self.dim}")
        self._handle.write(block.numpy().tobytes())
        self.rows += block.shape[0]

    def flush(self) -> None:
        """Push what was written to the disk (a resumable build's checkpoint)."""
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def finish(self) -> str:
        """Write the final header and return the file's SHA-256."""
        self._handle.close()
        header = _embeddings_header(self.rows, self.dim)
        if len(header) > self.HEADER_BYTES:
            raise ValueError(f"the header of ({self.rows}, {self.dim}) embeddings does not fit the reserved bytes")
        length = self.HEADER_BYTES - 8
        header = length.to_bytes(8, "little") + header[8:] + b" " * (length - len(header) + 8)
        with open(self.path, "r+b") as handle:
            handle.write(header)
        return sha256_file(self.path)


def write_embeddings(embeddings: Tensor, path: str | os.PathLike) -> str:
    """Write `(N, D)` embeddings as `embeddings.safetensors`, byte for byte what `safetensors.torch.save_file` writes,
    in blocks of `WRITE_CHUNK` rows (a memory-mapped tensor is never loaded whole).

    Returns:
        the file's SHA-256.
    """
    count, dim = embeddings.shape
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        header = _embeddings_header(count, dim)
        handle.write(header)
        digest.update(header)
        for start in range(0, count, WRITE_CHUNK):
            block = embeddings[start : start + WRITE_CHUNK].detach().to("cpu", torch.float32).contiguous()
            data = block.numpy().tobytes()
            handle.write(data)
            digest.update(data)
    return digest.hexdigest()


def write_gallery(
    gallery: Gallery,
    folder: str | os.PathLike,
    embeddings_sha256: str | None = None,
    metadata_file: str | os.PathLike | None = None,
) -> None:
    """Write `gallery` as a format-1 index folder into `folder` (which should be new and empty; make it atomic by
    writing into a temporary folder and renaming it). An approximate gallery's structure must be built, and is
    saved with its `params["nprobe"]`.

    Args:
        gallery: what to write.
        folder: the (new, empty) folder.
        embeddings_sha256: the SHA-256 of an `embeddings.safetensors` already in `folder` (a streaming build wrote
            it): it is kept instead of being written again.
        metadata_file: a file of `len(gallery)` metadata lines already written (a streaming build's), linked into
            `folder` instead of writing `gallery.metadata`.
    Raises:
        ValueError: metadata that JSON cannot hold, or an approximate gallery without a structure.
    """
    folder = Path(folder)
    if metadata_file is None:
        lines = metadata_lines(gallery.metadata if gallery.metadata is not None else [{} for _ in range(len(gallery))])
    if embeddings_sha256 is None:
        embeddings_sha256 = write_embeddings(gallery.embeddings, folder / EMBEDDINGS_FILE)
    if metadata_file is None:
        with open(folder / METADATA_FILE, "w", encoding="utf-8") as handle:
            handle.writelines(line + "\n" for line in lines)
    else:
        os.link(metadata_file, folder / METADATA_FILE)
    faiss_info = None
    if gallery.kind != "flat":
        import faiss

        if gallery.structure is None:
            raise ValueError(f"the {gallery.kind} gallery has no structure to save; build it first")
        faiss.extract_index_ivf(gallery.structure).nprobe = gallery.params["nprobe"]
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
        "embeddings_sha256": embeddings_sha256,
        "metadata": METADATA_FILE,
        "bounds": gallery.bounds,
        "traversal_offset": gallery.traversal_offset,
    }
    if gallery.tuning is not None:  # written only when there is one
        info["tuning"] = gallery.tuning
    info["metadata_sha256"] = sha256_file(folder / METADATA_FILE)
    info[FIELDS_DIGEST_KEY] = fields_digest(info)
    (folder / INDEX_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


__all__ = [
    "CELL_SCHEMES",
    "CURVATURE_TOLERANCE",
    "EMBEDDINGS_FILE",
    "EMBEDDINGS_KEY",
    "FAISS_FILE",
    "FIELDS_DIGEST_KEY",
    "INDEX_FILE",
    "INDEX_FORMAT",
    "INDEX_KINDS",
    "MAX_BLOCK_ELEMENTS",
    "MEMORY_MAPPED_KINDS",
    "METADATA_FILE",
    "POLICIES",
    "PROBE_DECIMALS",
    "PROBE_TEXTS",
    "PROBE_TOLERANCE",
    "RANK_CHUNK",
    "RERANK_MARGIN",
    "EmbeddingsWriter",
    "Gallery",
    "RadialCells",
    "RankRequest",
    "add_to_structure",
    "all_finite",
    "check_gallery_model",
    "describe_results",
    "fields_digest",
    "flat_structure",
    "is_gallery_index",
    "load_gallery_index",
    "load_structure",
    "memory_map_embeddings",
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
    "save_structure",
    "search",
    "search_safely",
    "shared_product_ranks",
    "sha256_file",
    "structure_candidates",
    "target_ranks",
    "verify_embeddings",
    "write_embeddings",
    "write_gallery",
]
