"""Benchmark the gallery index: exact (flat) against approximate (IVF) search, side by side in one run.

A synthetic gallery that looks like HySAC embeddings (clustered directions around a common one, distances to the
root spread log-normally around 0.9, lifted onto the hyperboloid with `exp_map0`) and queries from the same
clusters shifted along another direction (a modality gap, as text queries against an image gallery). For each
index: build time, resident-memory growth while building and the size of the search structure; then, timed in
rounds that interleave the variants after a warm-up (min and median), the queries/s of
`GalleryIndex.knn(queries, k=10)` (FAISS search plus the float64 re-ranking) and the recall@10 of each `nprobe`
against exact search.

Run: `nice .venv/bin/python benchmarks/bench_index.py` (1,000,000 points of dim 768: about 10 GB of memory and
several minutes on 2 cores); `--points 20000 --dim 64` is a smoke run. The script re-executes itself with
`GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296` (steadier
timings on this kind of machine, see the offline-setup notes); memory is read from /proc (Linux).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
if __name__ == "__main__" and os.environ.get("GLIBC_TUNABLES") != TUNABLES and "--no_reexec" not in sys.argv:
    os.environ["GLIBC_TUNABLES"] = TUNABLES
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch
from hysac_hf.modeling.lorentz import exp_map0

GENERATE_CHUNK = 100_000
TARGET_RECALL = 0.95
TARGET_SPEEDUP = 10.0


def synthetic_embeddings(
    count: int,
    dim: int,
    curvature: float = 1.0,
    clusters: int = 2000,
    seed: int = 0,
    shift: float = 0.0,
    median_radius: float = 0.9,
    radius_spread: float = 0.35,
) -> torch.Tensor:
    """`(count, dim)` float32 hyperboloid points shaped like HySAC embeddings, generated chunk by chunk.

    Directions: `0.6 m + 0.8 c_j + 0.7 n` normalised, with `m` a direction shared by all (CLIP embeddings sit in a
    narrow cone), `c_j` one of `clusters` fixed cluster centres and `n` isotropic noise; plus `shift` times a
    fixed "modality" direction for queries of the other modality. Distances to the root: log-normal, median
    `median_radius`, log-spread `radius_spread`. The cluster centres and the shared directions depend only on
    `dim` and `clusters`, so a gallery and its queries (other `seed`s) share them.
    """
    fixed = torch.Generator().manual_seed(1234)
    common = torch.nn.functional.normalize(torch.randn(dim, generator=fixed), dim=0)
    centres = torch.nn.functional.normalize(torch.randn(clusters, dim, generator=fixed), dim=1)
    modality = torch.nn.functional.normalize(torch.randn(dim, generator=fixed), dim=0)
    generator = torch.Generator().manual_seed(seed)
    out = torch.empty(count, dim)
    for start in range(0, count, GENERATE_CHUNK):
        n = min(GENERATE_CHUNK, count - start)
        which = torch.randint(0, clusters, (n,), generator=generator)
        noise = torch.randn(n, dim, generator=generator) / math.sqrt(dim)
        directions = torch.nn.functional.normalize(0.6 * common + 0.8 * centres[which] + 0.7 * noise + shift * modality)
        radii = median_radius * torch.exp(radius_spread * torch.randn(n, 1, generator=generator))
        out[start : start + n] = exp_map0(directions * radii, curvature)
    return out


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def structure_bytes(index) -> int:
    """Bytes held by the FAISS search structure (vectors, ids, centroids), from its sizes."""
    structure = index.structure
    if index.kind == "flat":
        return structure.ntotal * structure.d * 4
    return structure.ntotal * (structure.d * 4 + 8) + structure.nlist * structure.d * 4


def recall_at(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean fraction of each query's true top-k found in its returned top-k."""
    hits = [len(set(a) & set(b)) for a, b in zip(found.tolist(), truth.tolist())]
    return sum(hits) / truth.numel()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=1_000_000, help="gallery size (default 1,000,000)")
    parser.add_argument("--dim", type=int, default=768, help="embedding dimension (default 768)")
    parser.add_argument("--queries", type=int, default=1000, help="queries per timed round")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query (recall@k)")
    parser.add_argument("--nlist", type=int, default=None, help="IVF cells (default: the index's, ~4 sqrt(N))")
    parser.add_argument("--nprobe", default="8,16,32,64", help="comma-separated nprobe values to compare")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--latency_queries", type=int, default=50, help="single-query searches timed per round")
    parser.add_argument("--threads", type=int, default=2, help="torch and FAISS threads")
    parser.add_argument("--curvature", type=float, default=1.0, help="curvature magnitude c")
    parser.add_argument("--query_shift", type=float, default=0.3, help="modality gap of the queries (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the gallery (queries use seed + 1)")
    parser.add_argument("--output_json", default=None, help="also write the results here")
    parser.add_argument("--no_reexec", action="store_true", help="do not re-run with GLIBC_TUNABLES set")
    args = parser.parse_args(argv)
    args.nprobe = [int(v) for v in args.nprobe.split(",") if v.strip()]
    if min(args.points, args.dim, args.queries, args.k, args.rounds, *args.nprobe) < 1:
        parser.error("--points, --dim, --queries, --k, --rounds and --nprobe must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    import faiss

    from hysac_hf.index import GalleryIndex

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)

    def log(message: str) -> None:  # progress on stderr; the table is the only stdout
        print(message, file=sys.stderr, flush=True)

    start = time.perf_counter()
    gallery = synthetic_embeddings(args.points, args.dim, args.curvature, seed=args.seed)
    queries = synthetic_embeddings(args.queries, args.dim, args.curvature, seed=args.seed + 1, shift=args.query_shift)
    log(f"generated {args.points:,} x {args.dim} gallery in {time.perf_counter() - start:.1f} s")

    variants, builds = {}, {}
    for name, options in (("exact (flat)", {"kind": "flat"}), ("ivf", {"kind": "ivf", "nlist": args.nlist})):
        before = rss_bytes()
        start = time.perf_counter()
        index = GalleryIndex.from_embeddings(gallery, "image", curvature=args.curvature, **options).build()
        seconds = time.perf_counter() - start
        builds[name] = {
            "build_s": seconds,
            "rss_growth_mib": (rss_bytes() - before) / 2**20,
            "structure_mib": structure_bytes(index) / 2**20,
            **({"params": index.params} if index.params else {}),
        }
        variants[name] = index
        log(f"built {name} in {seconds:.1f} s: {builds[name]}")
    exact, ivf = variants["exact (flat)"], variants["ivf"]
    probes = [p for p in args.nprobe if p <= ivf.params["nlist"]]

    def exact_search():
        return exact.knn(queries, args.k)[1]

    searches = {"exact (flat)": exact_search}
    for nprobe in probes:
        searches[f"ivf nprobe={nprobe}"] = lambda nprobe=nprobe: ivf.knn(queries, args.k, nprobe=nprobe)[1]
    truth = exact_search()  # also the warm-up of the exact index
    recalls = {name: recall_at(search(), truth) for name, search in searches.items()}  # warm-up of the others
    times: dict[str, list[float]] = {name: [] for name in searches}
    latency: dict[str, list[float]] = {name: [] for name in searches}
    singles = queries[: args.latency_queries]
    for round_index in range(args.rounds):
        for name, search in searches.items():  # interleaved: every variant sees the same machine load
            start = time.perf_counter()
            search()
            times[name].append(time.perf_counter() - start)
            if args.latency_queries:
                index, options = (exact, {}) if name.startswith("exact") else (ivf, {"nprobe": int(name.split("=")[1])})
                start = time.perf_counter()
                for row in range(singles.shape[0]):
                    index.knn(singles[row : row + 1], args.k, **options)
                latency[name].append((time.perf_counter() - start) / singles.shape[0])
        log(f"round {round_index + 1}/{args.rounds} done")

    exact_median = statistics.median(times["exact (flat)"])
    rows = []
    for name in searches:
        best, median = min(times[name]), statistics.median(times[name])
        rows.append(
            {
                "variant": name,
                "recall_at_k": recalls[name],
                "queries_per_s_best": args.queries / best,
                "queries_per_s_median": args.queries / median,
                "speedup_median": exact_median / median,
                "latency_ms_median": 1000 * statistics.median(latency[name]) if args.latency_queries else None,
            }
        )
    meeting = [r for r in rows[1:] if r["recall_at_k"] >= TARGET_RECALL and r["speedup_median"] >= TARGET_SPEEDUP]
    result = {
        "points": args.points,
        "dim": args.dim,
        "queries": args.queries,
        "k": args.k,
        "rounds": args.rounds,
        "threads": args.threads,
        "query_shift": args.query_shift,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "faiss": faiss.__version__,
        "torch": torch.__version__,
        "gallery_embeddings_mib": gallery.numel() * 4 / 2**20,
        "builds": builds,
        "search": rows,
        "target": f"recall@{args.k} >= {TARGET_RECALL} at >= {TARGET_SPEEDUP:g}x the exact queries/s",
        "target_met_by": [r["variant"] for r in meeting],
    }
    lines = [
        (
            f"{args.points:,} points, dim {args.dim}, {args.queries} queries, k={args.k}, {args.rounds} rounds, "
            f"{args.threads} threads, GLIBC_TUNABLES {'set' if os.environ.get('GLIBC_TUNABLES') else 'unset'}, "
            f"faiss {faiss.__version__}; gallery embeddings {result['gallery_embeddings_mib']:,.0f} MiB (shared)"
        ),
        "",
        "| index | build s | RSS growth MiB | structure MiB |",
        "|---|---:|---:|---:|",
    ]
    for name, build in builds.items():
        params = (
            f" ({', '.join(f'{k}={v}' for k, v in build.get('params', {}).items() if k != 'cells')})"
            if "params" in build
            else ""
        )
        lines.append(
            f"| {name}{params} | {build['build_s']:.1f} | {build['rss_growth_mib']:,.0f} | {build['structure_mib']:,.0f} |"
        )
    lines += [
        "",
        f"| search | recall@{args.k} | q/s (best) | q/s (median) | speed-up (median) | 1-query latency ms (median) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        latency_text = f"{row['latency_ms_median']:.2f}" if row["latency_ms_median"] is not None else "-"
        lines.append(
            f"| {row['variant']} | {row['recall_at_k']:.4f} | {row['queries_per_s_best']:,.0f} | "
            f"{row['queries_per_s_median']:,.0f} | {row['speedup_median']:.1f}x | {latency_text} |"
        )
    lines += ["", f"target ({result['target']}): " + (", ".join(result["target_met_by"]) or "not met")]
    print("\n".join(lines))
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(result, handle, indent=1)
    return result


if __name__ == "__main__":
    main()
