"""Build an approximate index for a target recall: measure, choose, or refuse.

An approximate structure is only as good as its settings on the gallery at hand (the first release's fixed
`nprobe=16` gave recall@10 0.89 on the demo model's texts and 0.16 on isotropic points, silently). So, as autofaiss
tunes its indexes, :func:`build_approximate` measures before it commits:

1. **Held-out queries.** `queries` gallery items are drawn as queries (kept out of the k-means samples); each one's
   true `k` nearest *other* items come from an exact search (FAISS flat inner product over chunks of the gallery,
   re-ranked in float64: the `flat` kind's own search, timed as the exact speed).
   A setting reaches the target when the held-out recall does so by `CONFIDENCE_Z` standard errors (of the
   per-query recalls), so that new queries reach it too, not only these.
2. **Cells.** On a sample of the gallery (at most `SELECT_SAMPLE` items, with proportionally fewer cells so that a
   cell holds as many items as it will), each cell layout of `ivf.LAYOUTS` and each cell count of `NLIST_PER_ROOT`
   is built and probed until it reaches the target on the sample's own held-out items; the one that scans the
   least (probed items plus cells' vectors compared) is built on the whole gallery.
3. **Probes.** On the whole structure, the fewest cells probed (`nprobe`) that reach the target; for `ivfpq` also the
   number of candidates re-ranked exactly (`rerank`): each candidate depth of `RERANK_DEPTHS` with its fewest
   probes, the fastest measured.
4. **Refusal.** Where no setting reaches the target at `MIN_SPEEDUP` times the exact speed (measured on the
   held-out queries), the gallery keeps exact search, and says so in a warning and in `index.json`.

Everything measured and chosen is returned as the `tuning` report that `index.json` records and `hysac-index info`
shows. Recall here is recall@k against exact search: the share of each query's true `k` nearest items found.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..modeling.gallery_hysac import RERANK_MARGIN, add_to_structure, flat_structure, rerank, search
from ..modeling.lorentz import mips_pool_vectors, mips_query_vectors
from .ivf import (
    LAYOUTS,
    PQ_TRAIN_ROWS,
    default_nlist,
    default_nprobe,
    empty_structure,
    radial_quantizer,
    train_codes,
    training_sample,
)

logger = logging.getLogger(__name__)

DEFAULT_TARGET_RECALL = 0.95
RECALL_K = 10  # the target is recall@10
TUNING_QUERIES = 1000  # held-out gallery items used as queries (fewer for small galleries: N / 10, at least 50)
SELECT_SAMPLE = 100_000  # items the cell layouts are compared on
SELECT_QUERIES = 300
NLIST_PER_ROOT = (2.0, 4.0)  # cell counts compared: this times sqrt(N), as powers of two
RERANK_DEPTHS = (50, 100, 200, 400)  # ivfpq: candidates re-ranked exactly, compared
MIN_SPEEDUP = 2.0  # below this many times the exact speed, an approximate index is refused
CONFIDENCE_Z = 2.0  # the held-out recall must reach the target this many standard errors above it
MIN_TUNING_ITEMS = 200  # smaller galleries are searched exactly: too few items to measure (and nothing to gain)
EXACT_CHUNK = 262_144  # gallery rows per FAISS flat structure in the exact search of the held-out queries


@dataclass
class HeldOut:
    """Gallery items used as queries, and their true neighbours among the other items.

    Attributes:
        indices: `(H,)` int64 gallery indices of the queries.
        truth: `(H, k)` int64 true `k` nearest other items, nearest first.
        exact_seconds: wall time of the exact search that found them.
    """

    indices: np.ndarray
    truth: np.ndarray
    exact_seconds: float


def _drop_self(found: Tensor, indices: np.ndarray, k: int) -> np.ndarray:
    """Each row's results without the query's own index (or, when it is absent, without the last result)."""
    rows = []
    for row, own in zip(found.tolist(), indices.tolist()):
        rows.append([i for i in row if i != own][:k] if own in row else row[:k])
    return np.asarray(rows, dtype=np.int64)


def exact_neighbours(
    queries: Tensor, embeddings: Tensor, curvature: float, count: int
) -> tuple[Tensor, float]:
    """Exact top-`count` by Lorentz distance: FAISS flat inner product over chunks of the gallery (so a memory-mapped
    gallery is read once, chunk by chunk), the best `count + RERANK_MARGIN` of all chunks re-ranked in float64.

    Returns:
        `(Q, count)` int64 gallery indices, and the seconds spent searching (building the chunks' flat structures,
        which the `flat` kind does once when it loads, is not counted).
    """
    seconds = 0.0
    vectors = mips_query_vectors(queries.float(), torch.tensor(curvature, dtype=torch.float32)).numpy()
    vectors = np.ascontiguousarray(vectors)
    best_scores = best_ids = None
    for offset in range(0, embeddings.shape[0], EXACT_CHUNK):
        chunk = embeddings[offset : offset + EXACT_CHUNK]
        structure = flat_structure(chunk, curvature)
        start = time.perf_counter()
        scores, ids = structure.search(vectors, min(count + RERANK_MARGIN, chunk.shape[0]))
        seconds += time.perf_counter() - start
        ids = np.where(ids >= 0, ids + offset, -1)
        if best_scores is not None:
            scores, ids = np.hstack([best_scores, scores]), np.hstack([best_ids, ids])
        order = np.argsort(-scores, axis=1, kind="stable")[:, : count + RERANK_MARGIN]
        best_scores, best_ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    start = time.perf_counter()
    found, _ = rerank(queries, embeddings, torch.from_numpy(best_ids), curvature, count)
    return found, seconds + time.perf_counter() - start


def held_out(embeddings: Tensor, curvature: float, k: int, queries: int, seed: int) -> HeldOut:
    """Draw held-out queries among the gallery items and find their true neighbours (:class:`HeldOut`)."""
    count = embeddings.shape[0]
    size = min(queries, max(50, count // 10), count // 2)  # at least half of the items stay to train the cells
    indices = np.sort(np.random.default_rng(seed + 1).choice(count, size, replace=False))
    found, seconds = exact_neighbours(embeddings[torch.from_numpy(indices)], embeddings, curvature, min(k + 1, count))
    return HeldOut(indices, _drop_self(found, indices, k), seconds)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row of `truth` found in the same row of `found`."""
    hits = sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), truth.tolist()))
    return hits / max(truth.size, 1)


@dataclass(frozen=True)
class Measure:
    """One setting measured on the held-out queries.

    Attributes:
        recall: mean recall@k.
        bound: its lower confidence bound (mean minus `CONFIDENCE_Z` standard errors of the per-query recalls): the
            target is met when this reaches it, so that new queries meet it too, not only these.
        scanned: share of the gallery's vectors compared per query.
        seconds: wall time of the search of all held-out queries.
    """

    recall: float
    bound: float
    scanned: float
    seconds: float


def _measure(found: np.ndarray, truth: np.ndarray, scanned: float, seconds: float) -> Measure:
    per_query = np.array([len(set(a) & set(b)) / max(len(b), 1) for a, b in zip(found.tolist(), truth.tolist())])
    spread = per_query.std(ddof=1) / np.sqrt(len(per_query)) if len(per_query) > 1 else 0.0
    mean = float(per_query.mean()) if len(per_query) else 0.0
    return Measure(mean, mean - CONFIDENCE_Z * float(spread), scanned, seconds)


def _approximate(
    structure: Any, embeddings: Tensor, curvature: float, held: HeldOut, k: int, nprobe: int, candidates: int
) -> Measure:
    """One setting's recall, share of the gallery scanned and wall time on the held-out queries."""
    import faiss

    queries = embeddings[torch.from_numpy(held.indices)]
    stats = faiss.cvar.indexIVF_stats
    stats.reset()
    start = time.perf_counter()
    found, _ = search(queries, embeddings, curvature, k + 1, structure, nprobe, candidates)
    seconds = time.perf_counter() - start
    scanned = stats.ndis / (embeddings.shape[0] * len(held.indices))
    return _measure(_drop_self(found, held.indices, k), held.truth, scanned, seconds)


def fewest_probes(
    structure: Any,
    embeddings: Tensor,
    curvature: float,
    held: HeldOut,
    target: float,
    k: int,
    candidates: int,
    nlist: int,
    start: int = 1,
) -> tuple[int, Measure] | None:
    """The smallest `nprobe` whose recall on the held-out queries reaches `target` with confidence (its
    :attr:`Measure.bound`), by doubling from `start`, then bisection.

    Returns:
        `(nprobe, its measure)`, or None when probing every cell falls short.
    """
    measured: dict[int, Measure] = {}

    def reaches(nprobe: int) -> bool:
        if nprobe not in measured:
            measured[nprobe] = _approximate(structure, embeddings, curvature, held, k, nprobe, candidates)
        return measured[nprobe].bound >= target

    low, probe = 0, max(1, min(start, nlist))
    while not reaches(probe):
        if probe == nlist:
            return None
        low, probe = probe, min(nlist, probe * 2)
    high = probe
    while high - low > 1:
        middle = (low + high) // 2
        if reaches(middle):
            high = middle
        else:
            low = middle
    return high, measured[high]


def _build(
    embeddings: Tensor,
    curvature: float,
    kind: str,
    layout: str,
    nlist: int,
    seed: int,
    exclude: np.ndarray,
    show_progress: bool,
) -> Any:
    """A radial structure of `kind` over `embeddings`: cells trained on a sample (without the `exclude`d rows),
    `ivfpq` codes on another, then every row filed."""
    count = embeddings.shape[0]
    train = embeddings[torch.from_numpy(training_sample(count, nlist, seed, exclude))]
    codes = None
    if kind == "ivfpq":
        rows = min(count, PQ_TRAIN_ROWS)
        picked = np.sort(np.random.default_rng(seed + 4).choice(count, rows, replace=False))
        codes = embeddings[torch.from_numpy(picked)]
    return build_structure(train, curvature, kind, layout, nlist, seed, codes, show_progress, fill=embeddings)


def build_structure(
    train: Tensor,
    curvature: float,
    kind: str,
    layout: str,
    nlist: int,
    seed: int = 0,
    codes_sample: Tensor | None = None,
    show_progress: bool = False,
    fill: Tensor | None = None,
) -> Any:
    """An empty (or, with `fill`, filled) radial structure: cells trained on `train`, `ivfpq` codes on
    `codes_sample` (default: `train`)."""
    structure = empty_structure(
        radial_quantizer(train, curvature, nlist, layout, seed, show_progress),
        kind,
        len(train if codes_sample is None else codes_sample),
    )
    if kind == "ivfpq":
        sample = train if codes_sample is None else codes_sample
        pool = mips_pool_vectors(sample.float(), torch.tensor(curvature, dtype=torch.float32)).numpy()
        train_codes(structure, np.ascontiguousarray(pool), seed)
    if fill is not None:
        add_to_structure(structure, fill, curvature, cells="radial")
    return structure


def choose_cells(
    embeddings: Tensor,
    curvature: float,
    target: float,
    k: int,
    seed: int,
    nlist: int | None = None,
    held: HeldOut | None = None,
    show_progress: bool = False,
    total: int | None = None,
) -> tuple[str, int, list[dict[str, Any]], Any]:
    """Compare cell layouts and counts on a sample (module docstring, step 2).

    Args:
        embeddings: `(n, D)` the gallery, or a uniform sample of it (see `total`).
        held: held-out queries of the whole gallery: when the gallery is no larger than the sample, the candidates
            are built on all of it (without them) and measured with them, and the best one is returned built.
        total: the size of the gallery `embeddings` is a sample of (None: `embeddings` is the gallery).
    Returns:
        `(layout, nlist for the whole gallery, one report row per candidate, the best candidate's float32 IVF when it
        was built on the whole gallery, else None)`.
    """
    rows = embeddings.shape[0]
    count = rows if total is None else int(total)
    whole = rows <= SELECT_SAMPLE and held is not None and total is None
    if whole:
        sample, size = embeddings, rows
    else:
        size = min(rows, SELECT_SAMPLE)
        picked = np.arange(rows) if size == rows else np.sort(np.random.default_rng(seed + 2).choice(rows, size, replace=False))
        sample = embeddings[torch.from_numpy(picked)]
        held = held_out(sample, curvature, k, SELECT_QUERIES, seed)
    counts = [nlist] if nlist is not None else sorted({default_nlist(count, r) for r in NLIST_PER_ROOT})
    rows, best = [], None
    for layout in LAYOUTS:
        for full in counts:
            cells = max(1, min(size, round(full * size / count)))
            structure = _build(sample, curvature, "ivf", layout, cells, seed, held.indices, show_progress)
            built = structure.nlist
            result = fewest_probes(structure, sample, curvature, held, target, k, k + RERANK_MARGIN, built)
            row: dict[str, Any] = {"layout": layout, "nlist": full, "sample": size, "sample_nlist": built}
            if result is not None:
                nprobe, measure = result
                cost = measure.scanned + built / size  # items scanned + cells' vectors compared, per gallery item
                row.update({"nprobe": nprobe, "recall": round(measure.recall, 4), "cost": round(cost, 5)})
                if best is None or cost < best[0]:
                    best = (cost, layout, full, structure if whole else None)
            rows.append(row)
            logger.info("Cell candidate %s", row)
    if best is None:  # nothing reached the target even probing everything (impossible for float32 vectors)
        return next(iter(LAYOUTS)), counts[0], rows, None
    return best[1], best[2], rows, best[3]


def build_approximate(
    embeddings: Tensor,
    curvature: float,
    kind: str,
    *,
    target: float | None = DEFAULT_TARGET_RECALL,
    nlist: int | None = None,
    nprobe: int | None = None,
    rerank_depth: int | None = None,
    k: int = RECALL_K,
    queries: int = TUNING_QUERIES,
    seed: int = 0,
    show_progress: bool = False,
) -> tuple[Any, dict[str, Any], dict[str, Any] | None]:
    """Build an approximate structure of `kind` for `target` recall@k, or refuse (module docstring).

    Args:
        embeddings: `(N, D)` space components (a memory-mapped tensor is read in chunks).
        curvature: positive curvature magnitude `c`.
        kind: `"ivf"` or `"ivfpq"`.
        target: recall@k to reach against exact search; None builds with `nlist`/`nprobe` (or their defaults)
            without measuring anything.
        nlist: cells (None: chosen).
        nprobe: cells probed (None: the fewest reaching the target).
        rerank_depth: `ivfpq` candidates re-ranked exactly (None: chosen).
        k: the `k` of recall@k.
        queries: held-out queries.
        seed: seed of the samples and k-means.
        show_progress: log k-means progress.
    Returns:
        `(structure, params, tuning)`: `structure` None when refused (exact search is kept); `params` the structure's
        settings (`nlist`, `nprobe`, `cells`, and for `ivfpq` `rerank` and `code`); `tuning` the report (None
        without a target).
    """
    import faiss

    count = embeddings.shape[0]
    if target is not None and count < MIN_TUNING_ITEMS:
        if nprobe is None:
            report = {"target_recall": target, "k": k}
            return _refuse(report, kind, f"{count} items are too few to measure; exact search costs next to nothing")
        target = None  # settings given: built as asked, nothing measured
    if target is None:
        cells = nlist or default_nlist(count)
        structure = _build(embeddings, curvature, kind, "shells", cells, seed, np.zeros(0, np.int64), show_progress)
        params = _params(structure, kind, nprobe, rerank_depth or (RERANK_DEPTHS[3] if kind == "ivfpq" else None))
        return structure, params, None

    logger.info("Tuning a %s index over %d items for recall@%d >= %g", kind, count, k, target)
    held = held_out(embeddings, curvature, k, queries, seed)
    layout, cells, candidates, structure = choose_cells(
        embeddings, curvature, target, k, seed, nlist, held, show_progress
    )
    if structure is None or kind != "ivf":
        structure = _build(embeddings, curvature, kind, layout, cells, seed, held.indices, show_progress)
    report = {"candidates": candidates, "cells": {"layout": layout, "nlist": int(faiss.extract_index_ivf(structure).nlist)}}
    return tune_structure(
        structure, embeddings, curvature, kind, target=target, nprobe=nprobe, rerank_depth=rerank_depth, k=k,
        held=held, report=report,
    )  # fmt: skip


def tune_structure(
    structure: Any,
    embeddings: Tensor,
    curvature: float,
    kind: str,
    *,
    target: float | None = DEFAULT_TARGET_RECALL,
    nprobe: int | None = None,
    rerank_depth: int | None = None,
    k: int = RECALL_K,
    queries: int = TUNING_QUERIES,
    seed: int = 0,
    held: HeldOut | None = None,
    report: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any], dict[str, Any] | None]:
    """Choose the search settings of a filled structure for `target` recall@k, or refuse (module docstring, steps 3
    and 4).

    Args:
        structure: a filled radial IVF over `embeddings`.
        embeddings, curvature, kind, target, nprobe, rerank_depth, k, queries, seed: as in :func:`build_approximate`.
        held: held-out queries already drawn (None: drawn here).
        report: fields already measured (the cells), completed here.
    Returns:
        as :func:`build_approximate`.
    """
    import faiss

    if target is None:
        depth = rerank_depth or (RERANK_DEPTHS[3] if kind == "ivfpq" else None)
        return structure, _params(structure, kind, nprobe, depth), None
    report = {"target_recall": target, "k": k, "items": int(embeddings.shape[0]), **(report or {})}
    if held is None:
        held = held_out(embeddings, curvature, k, queries, seed)
    report["queries"] = len(held.indices)
    built_nlist = faiss.extract_index_ivf(structure).nlist
    depths = [k + RERANK_MARGIN] if kind == "ivf" else [d for d in RERANK_DEPTHS if d >= k + RERANK_MARGIN]
    if rerank_depth is not None:
        depths = [rerank_depth]
    options: list[tuple[int, int, Measure]] = []
    for depth in depths:
        if nprobe is not None:
            options.append((nprobe, depth, _approximate(structure, embeddings, curvature, held, k, nprobe, depth)))
            continue
        start = max(1, options[-1][0] // 4) if options else 1  # deeper re-ranking needs no more probes, or few
        result = fewest_probes(structure, embeddings, curvature, held, target, k, depth, built_nlist, start)
        if result is not None:
            options.append((result[0], depth, result[1]))
    exact_qps = len(held.indices) / held.exact_seconds
    report["exact_queries_per_s"] = round(exact_qps, 2)
    reaching = [o for o in options if o[2].bound >= target]
    if not reaching:
        best = max(options, key=lambda o: o[2].recall) if options else None
        if nprobe is not None and best is not None:  # the settings were given: keep them, but say so
            logger.warning(
                "The %s index with nprobe=%d reaches recall@%d %.3f on held-out gallery items, under the target %g",
                kind, nprobe, k, best[2].recall, target,
            )  # fmt: skip
            report.update(_measured(best, exact_qps, len(held.indices), kind))
            return structure, _params(structure, kind, best[0], best[1]), report
        reason = (
            f"recall@{k} {best[2].recall:.3f} at best, probing {best[0]} cells and re-ranking {best[1]} candidates"
            if best
            else f"no setting reaches recall@{k} {target}"
        )
        return _refuse(report, kind, reason)
    # Time each re-ranking depth's setting once more and keep the fastest.
    timed = []
    for probes, depth, measure in reaching:
        again = _approximate(structure, embeddings, curvature, held, k, probes, depth)
        seconds = min(measure.seconds, again.seconds)
        timed.append((probes, depth, Measure(measure.recall, measure.bound, measure.scanned, seconds)))
    best = min(timed, key=lambda option: option[2].seconds)
    report.update(_measured(best, exact_qps, len(held.indices), kind))
    if report["speedup"] < MIN_SPEEDUP and nprobe is not None:  # the settings were given: kept, but said
        logger.warning(
            "The %s index with nprobe=%d runs at %.2fx the exact speed on held-out gallery items (under %gx)",
            kind, nprobe, report["speedup"], MIN_SPEEDUP,
        )  # fmt: skip
    elif report["speedup"] < MIN_SPEEDUP:
        return _refuse(
            report,
            kind,
            f"recall@{k} {best[2].recall:.3f} needs nprobe {best[0]} and runs at {report['speedup']:.2f}x the exact "
            "speed",
        )
    return structure, _params(structure, kind, best[0], best[1]), report


def _measured(option: tuple[int, int, Measure], exact_qps: float, queries: int, kind: str) -> dict[str, Any]:
    """The report's fields for the chosen setting `(nprobe, depth, measure)`."""
    nprobe, depth, measure = option
    qps = queries / measure.seconds
    return {
        "nprobe": int(nprobe),
        **({"rerank": int(depth)} if kind == "ivfpq" else {}),
        "recall": round(measure.recall, 4),
        "recall_lower_bound": round(measure.bound, 4),
        "scanned": round(measure.scanned, 5),
        "queries_per_s": round(qps, 2),
        "speedup": round(qps / exact_qps, 2),
    }


def _refuse(report: dict[str, Any], kind: str, reason: str):
    message = (
        f"the {kind} index cannot reach recall@{report['k']} >= {report['target_recall']} at {MIN_SPEEDUP:g}x the "
        f"exact speed on this gallery ({reason}); it keeps exact search"
    )
    logger.warning("Not building an approximate index: %s", message)
    report["refused"] = message
    report["requested_kind"] = kind
    return None, {}, report


def _params(structure, kind: str, nprobe: int | None, depth: int | None) -> dict[str, Any]:
    import faiss

    ivf = faiss.downcast_index(faiss.extract_index_ivf(structure))

    params: dict[str, Any] = {
        "nlist": int(ivf.nlist),
        "nprobe": int(nprobe if nprobe is not None else default_nprobe(ivf.nlist)),
        "cells": "radial",
    }
    if kind == "ivfpq":
        params["rerank"] = int(depth if depth is not None else RERANK_DEPTHS[3])
        params["code"] = f"PQ{ivf.pq.M}x{ivf.pq.nbits}"
    ivf.nprobe = params["nprobe"]
    return params


__all__ = [
    "DEFAULT_TARGET_RECALL",
    "MIN_SPEEDUP",
    "RECALL_K",
    "HeldOut",
    "Measure",
    "build_approximate",
    "build_structure",
    "choose_cells",
    "exact_neighbours",
    "fewest_probes",
    "held_out",
    "recall",
    "tune_structure",
]
