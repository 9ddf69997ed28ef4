"""Benchmark the evaluation suite, side by side in one process (variants interleaved, min and median).

Part 1 - the full 8-column Table 1+2 evaluation from cached embeddings (5,000 quadruplets, union pools of
10,000, dim 768): `hysac_hf.evaluation.retrieval.evaluate_retrieval` (batched) against an evaluation written
like the authors' `recalls.py`: the plain tasks from one inner-product matrix with a per-row top-k (I->T from
the transposed matrix), the four union tasks with a per-query Python loop (traverse one query, distances to
the whole pool, top-k, membership test). The loop is slow, so it runs on the first `--loop-queries` queries of
each union task and its time is extrapolated linearly to all queries (stated in the output). The hits of
both on those queries are compared.

Part 2 - 1,000 queries over a pool of 1,000,000 points, the search engine's two exact paths
(`hysac_hf.modeling.gallery_hysac`): FAISS `IndexFlatIP` on the Lorentz MIPS vectors with its candidates re-ranked in
float64 (`search` with a `flat_structure`) against the float64 torch scan (`rank_exact`): queries/s, peak resident
memory above the baseline, and top-10 agreement.

Run: `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296
      .venv/bin/python benchmarks/bench_eval.py` (the script re-executes itself with that setting if missing;
see the README's Benchmarks section on malloc page faults). `--quick` shrinks everything for a smoke run.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import subprocess
import sys
import threading
import time

TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
CHILD_FLAG = "BENCH_EVAL_MEMORY_CHILD"
if os.environ.get("GLIBC_TUNABLES") != TUNABLES and CHILD_FLAG not in os.environ and __name__ == "__main__":
    os.environ["GLIBC_TUNABLES"] = TUNABLES
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch
from hysac_hf.modeling.lorentz import exp_map0

from hysac_hf.encode import EmbeddingCache
from hysac_hf.evaluation.retrieval import TASKS, evaluate_retrieval
from hysac_hf.modeling.gallery_hysac import RANK_CHUNK, flat_structure, rank_exact, search

logger = logging.getLogger("bench_eval")
KS = (1, 5, 10, 20)
BOUNDS = {  # plausible radii for the synthetic embeddings below
    "S": {"avg": 1.0, "up_95": 1.2, "low_05": 0.8},
    "V": {"avg": 1.3, "up_95": 1.5, "low_05": 1.1},
    "U": {"avg": 1.6, "up_95": 1.8, "low_05": 1.4},
    "G": {"avg": 1.9, "up_95": 2.1, "low_05": 1.7},
}


def synthetic_cache(n: int, dim: int, curvature: float = 1.0, seed: int = 0) -> EmbeddingCache:
    """Quadruplets whose four items share a direction, at the radial order S < V < U < G."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, dim, generator=g)
    embeds = {}
    for key, radius in (("S", 1.0), ("V", 1.3), ("U", 1.6), ("G", 1.9)):
        v = base + 0.8 * torch.randn(n, dim, generator=g)
        v = v / v.norm(dim=-1, keepdim=True) * (radius + 0.3 * torch.randn(n, 1, generator=g)).abs()
        embeds[key] = exp_map0(v, curvature)
    return EmbeddingCache(embeds=embeds, curvature=curvature, bounds=BOUNDS, traversal_offset=0.8)


# ------------------------------------------------------------------------------------------------------------
# The authors'-style evaluation (written from the description in docs/method.md §7, not copied)
def _pairwise_dist(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    xt = torch.sqrt(1 / c + (x * x).sum(-1, keepdim=True))
    yt = torch.sqrt(1 / c + (y * y).sum(-1, keepdim=True))  # recomputed for the whole pool on every call
    inner = x @ y.T - xt @ yt.T
    return torch.acosh((-c * inner).clamp(min=1 + 1e-8)) / math.sqrt(c)


def loop_plain(query: torch.Tensor, pool: torch.Tensor, c: float) -> tuple[dict[int, int], dict[int, int]]:
    """Plain tasks as the reference: one inner-product matrix, per-row top-k; the transpose for the reverse task."""
    qt = torch.sqrt(1 / c + (query * query).sum(-1, keepdim=True))
    pt = torch.sqrt(1 / c + (pool * pool).sum(-1, keepdim=True))
    inner = query @ pool.T - qt @ pt.T
    out = []
    for scores in (inner, inner.T):
        top = scores.topk(max(KS), dim=1).indices
        target = torch.arange(scores.shape[0])[:, None]
        out.append({k: int((top[:, :k] == target).any(dim=1).sum()) for k in KS})
    return out[0], out[1]


def loop_union(cache: EmbeddingCache, name: str, num_queries: int, bound: str = "up_95") -> dict[int, int]:
    """Union task, one query at a time: traverse, distance to the whole pool, top-k, membership."""
    task = TASKS[name]
    c = cache.curvature
    pool = torch.cat([cache.embeds[k] for k in task.pool])
    b = cache.bounds[task.traversal_key][bound]
    threshold = b + math.tanh((b - cache.traversal_offset) / c) + 1
    hits = {k: 0 for k in KS}
    root = torch.zeros(1, pool.shape[1])
    for i in range(num_queries):
        q = cache.embeds[task.query][i]
        d = _pairwise_dist(root, q[None], c).item()
        if (d < threshold) if task.direction == "outward" else (d > threshold):
            q = q / q.norm() * threshold
        top = (-_pairwise_dist(q[None], pool, c)[0]).topk(max(KS)).indices
        for k in KS:
            hits[k] += int(i in top[:k].tolist())
    return hits


# ------------------------------------------------------------------------------------------------------------
class PeakRSS:
    """Peak resident set size (MiB) above the value at entry, sampled every 5 ms from /proc/self/status."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def delta_mib(self) -> float:
        return (self.peak - self.base) / 2**20

    def _poll(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0


def fmt(times: list[float]) -> str:
    return f"min {min(times):7.3f} s   median {statistics.median(times):7.3f} s"


def bench_tables(n: int, dim: int, loop_queries: int, repeats: int) -> None:
    cache = synthetic_cache(n, dim)
    union = [t for t in TASKS if TASKS[t].traversal_key is not None]
    loop_queries = min(loop_queries, n)
    evaluate_retrieval(cache, tasks=["T->I"])  # warm-up
    batched, loop_plain_t, loop_union_t = [], [], []
    for _ in range(repeats):  # round-robin: the variants see the same machine state
        t0 = time.perf_counter()
        result = evaluate_retrieval(cache, ks=KS, per_tag=False)
        batched.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        loop_plain(cache.embeds["S"], cache.embeds["V"], cache.curvature)
        loop_plain(cache.embeds["U"], cache.embeds["G"], cache.curvature)
        loop_plain_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        loop_hits = {name: loop_union(cache, name, loop_queries) for name in union}
        loop_union_t.append(time.perf_counter() - t0)
    scale = n / loop_queries
    loop_total = [p + u * scale for p, u in zip(loop_plain_t, loop_union_t)]
    print(f"\n== Table 1+2 evaluation: {n} quadruplets, dim {dim}, union pools of {2 * n}, 8 tasks, R@{KS} ==")
    print(f"batched evaluate_retrieval (8 tasks, all queries) : {fmt(batched)}")
    print(f"reference-style, plain tasks (full matrices)        : {fmt(loop_plain_t)}")
    print(f"reference-style, union tasks, {loop_queries} queries each (measured): {fmt(loop_union_t)}")
    print(f"reference-style total, union loop extrapolated x{scale:.0f} : {fmt(loop_total)}")
    print(
        f"speed-up (reference total / batched): min-based {min(loop_total) / min(batched):.0f}x, "
        f"median-based {statistics.median(loop_total) / statistics.median(batched):.0f}x"
    )
    union_batched = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        evaluate_retrieval(cache, tasks=union, ks=KS, per_tag=False)
        union_batched.append(time.perf_counter() - t0)
    print(
        f"union tasks only: batched {fmt(union_batched)} vs loop extrapolated "
        f"{min(loop_union_t) * scale:.1f} s (min) -> {min(loop_union_t) * scale / min(union_batched):.0f}x"
    )
    # agreement on the looped queries (the batched run's hits recomputed on the same subset)
    sub = EmbeddingCache(
        embeds=cache.embeds,
        curvature=cache.curvature,
        bounds=cache.bounds,
        traversal_offset=0.8,
        tags=["looped" if i < loop_queries else "rest" for i in range(n)],
    )
    per_tag = evaluate_retrieval(sub, tasks=union, ks=KS)["per_tag"]["looped"]
    agree = all(abs(per_tag[t][f"R@{k}"] - 100 * loop_hits[t][k] / loop_queries) < 1e-9 for t in union for k in KS)
    print(f"hits on the {loop_queries} looped queries identical to the batched evaluation: {agree}")
    print("batched results (%):", {t: round(result["tasks"][t]["R@1"], 1) for t in result["tasks"]})


def bench_large(num_queries: int, pool_size: int, dim: int, k: int, chunk: int, repeats: int) -> None:
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    g = torch.Generator().manual_seed(1)
    pool = torch.empty(pool_size, dim)
    for start in range(0, pool_size, chunk):  # filled in chunks: no full-size temporaries
        rows = min(chunk, pool_size - start)
        pool[start : start + rows] = exp_map0(torch.randn(rows, dim, generator=g) * 0.05, 1.0)
    queries = exp_map0(torch.randn(num_queries, dim, generator=g) * 0.05, 1.0)
    print(
        f"\n== {num_queries} queries over a pool of {pool_size:,} (dim {dim}, top-{k}); pool tensor "
        f"{pool.numel() * 4 / 2**30:.2f} GiB =="
    )
    with PeakRSS() as mem_build:
        t0 = time.perf_counter()
        structure = flat_structure(pool, 1.0)
        build = time.perf_counter() - t0
    print(f"FAISS IndexFlatIP build: {build:.1f} s, +{mem_build.delta_mib:,.0f} MiB (its own float32 copy of the pool)")
    faiss_t, torch_t, faiss_mem, torch_mem = [], [], [], []
    rank_exact(queries[:10], pool, 1.0, k)  # warm-up
    for _ in range(repeats):
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            idx_faiss, _ = search(queries, pool, 1.0, k, structure)
            faiss_t.append(time.perf_counter() - t0)
        faiss_mem.append(mem.delta_mib)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            idx_torch, _ = rank_exact(queries, pool, 1.0, k)
            torch_t.append(time.perf_counter() - t0)
        torch_mem.append(mem.delta_mib)
    same_rows = (idx_faiss == idx_torch).all(dim=1).float().mean().item()
    same_sets = sum(set(a) == set(b) for a, b in zip(idx_faiss.tolist(), idx_torch.tolist())) / num_queries
    print(
        f"FAISS search : {fmt(faiss_t)}   {num_queries / min(faiss_t):7.1f} q/s (best)   peak +{max(faiss_mem):,.0f} MiB"
    )
    print(
        f"torch float64: {fmt(torch_t)}   {num_queries / min(torch_t):7.1f} q/s (best)   peak +{max(torch_mem):,.0f} MiB"
        f" (pool chunks of {RANK_CHUNK:,})"
    )
    print(
        f"FAISS / torch speed (min): {min(torch_t) / min(faiss_t):.2f}x; identical top-{k} rows: "
        f"{100 * same_rows:.1f} %, identical top-{k} sets: {100 * same_sets:.1f} % (both re-ranked in float64)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quadruplets", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--loop-queries", type=int, default=200, help="union-task queries run by the slow loop")
    parser.add_argument("--pool", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--large-dim", type=int, default=768)
    parser.add_argument("--chunk", type=int, default=65_536)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--large-only", action="store_true", help="only part 2 (used for the memory child process)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.quadruplets, args.loop_queries, args.pool, args.queries, args.repeats = 500, 20, 20_000, 100, 1
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES')}, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    if not args.large_only:
        bench_tables(args.quadruplets, args.dim, args.loop_queries, args.repeats)
    if args.large_only:
        bench_large(args.queries, args.pool, args.large_dim, 10, args.chunk, max(1, args.repeats - 1))
    elif not args.skip_large:
        # Part 2 runs in a child with glibc's default malloc: freed large blocks go back to the OS there, so the
        # resident-memory peaks measure each variant's working memory (with the no-trim tunables they would not).
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        env[CHILD_FLAG] = "1"
        sys.stdout.flush()
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--large-only"], env=env, check=True)


if __name__ == "__main__":
    main()
