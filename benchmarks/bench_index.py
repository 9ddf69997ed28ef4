"""Benchmark the gallery index: exact (flat) against the tuned approximate kinds (ivf, ivfpq), side by side in one run.

Galleries (`--galleries`), all lifted onto the hyperboloid with distances to the root spread log-normally around 0.9:

- `isotropic`: uniformly random directions;
- `power-law`: directions with an anisotropic covariance spectrum `1/i` (the shape real embeddings have);
- `clustered`: directions around 2,000 cluster centres in a common cone (the first release's benchmark gallery),
  queried from the same clusters shifted along a "modality" direction (`--query_shift`);
- `real`: embeddings by a small trained HySAC model (`--real_model`, the README's demo model: 64 dimensions) of texts
  composed from the bundled mini-ViSU captions and markers; the only real embeddings available offline. Its size is
  `--real_points` (embedding a million texts on two CPU cores takes long).

Queries are new points from each gallery's law (seed + 1). For each gallery and kind (`--kinds`), a child process
builds the index folder through the library at its defaults (`GalleryIndex(kind=...).save` from the embeddings in
memory for flat and ivf; for ivfpq, `build_streaming` from a file of embeddings read chunk by chunk, or with
`--stream` from the generator itself, never holding the gallery) and reports its wall time and peak memory: anonymous
(what it must hold) and resident (`ru_maxrss`, which also counts pages of memory-mapped files); children run with
glibc's default malloc (the tunables below keep freed memory and would inflate the peak). The parent loads the folders and times `GalleryIndex.knn(queries, k)` for every kind in rounds that
interleave the kinds after a warm-up (min and median), recall@k against the exact kind's results, and reads the
structure's size from its FAISS file.

Run (two CPU cores; each 1M x 768 gallery needs about 12 GB of memory and 15-30 min):

    nice .venv/bin/python benchmarks/bench_index.py --work_dir /tmp/bench --output_json /tmp/bench/1m.json
    nice .venv/bin/python benchmarks/bench_index.py --points 10000000 --kinds ivfpq --stream --galleries power-law ...

`--points 3000 --dim 16` is a smoke run. The script re-executes itself with
`GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296` (steadier timings on
this kind of machine, see the offline-setup notes); memory is read from the kernel (Linux).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
if __name__ == "__main__" and os.environ.get("GLIBC_TUNABLES") != TUNABLES and "--no_reexec" not in sys.argv:
    os.environ["GLIBC_TUNABLES"] = TUNABLES
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch
from hysac_hf.modeling.lorentz import exp_map0

GENERATE_CHUNK = 100_000
GALLERIES = ("isotropic", "power-law", "clustered", "real")
KINDS = ("flat", "ivf", "ivfpq")
TARGET_RECALL = 0.95
TARGET_SPEEDUP = {1_000_000: 10.0, 10_000_000: 50.0}


# ------------------------------------------------------------------------------------------------------------
# Galleries
def synthetic_embeddings(
    count: int,
    dim: int,
    curvature: float = 1.0,
    clusters: int = 2000,
    seed: int = 0,
    shift: float = 0.0,
    median_radius: float = 0.9,
    radius_spread: float = 0.35,
    shape: str = "clustered",
    start: int = 0,
) -> torch.Tensor:
    """Rows `[start, start + count)` of a `(., dim)` float32 hyperboloid gallery, generated in chunks of
    `GENERATE_CHUNK` rows each seeded by `(seed, chunk)` (so any chunk can be made again alone: `--stream` resumes).

    Directions: `clustered`: `0.6 m + 0.8 c_j + 0.7 n` normalised, with `m` a direction shared by all (CLIP
    embeddings sit in a narrow cone), `c_j` one of `clusters` fixed centres, `n` isotropic noise, plus `shift` times a
    fixed "modality" direction; `isotropic`: `n`; `power-law`: `n` scaled by `1/sqrt(i)` along a fixed random basis.
    Distances to the root: log-normal, median `median_radius`, log-spread `radius_spread`. The fixed parts depend
    only on `dim` and `clusters`, so a gallery and its queries (other `seed`s) share them.
    """
    fixed = torch.Generator().manual_seed(1234)
    common = torch.nn.functional.normalize(torch.randn(dim, generator=fixed), dim=0)
    centres = torch.nn.functional.normalize(torch.randn(clusters, dim, generator=fixed), dim=1)
    modality = torch.nn.functional.normalize(torch.randn(dim, generator=fixed), dim=0)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=fixed))[0] if shape == "power-law" else None
    scale = torch.arange(1, dim + 1, dtype=torch.float32).rsqrt()
    out = torch.empty(count, dim)
    first, last = start // GENERATE_CHUNK, (start + count - 1) // GENERATE_CHUNK
    for chunk in range(first, last + 1):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + chunk)
        n = GENERATE_CHUNK
        noise = torch.randn(n, dim, generator=generator)
        if shape == "clustered":
            which = torch.randint(0, clusters, (n,), generator=generator)
            directions = 0.6 * common + 0.8 * centres[which] + 0.7 * noise / math.sqrt(dim) + shift * modality
        elif shape == "power-law":
            directions = (noise * scale) @ basis.T
        elif shape == "isotropic":
            directions = noise
        else:
            raise ValueError(f"shape={shape!r}")
        radii = median_radius * torch.exp(radius_spread * torch.randn(n, 1, generator=generator))
        rows = exp_map0(torch.nn.functional.normalize(directions, dim=1) * radii, curvature)
        lo, hi = max(start, chunk * n), min(start + count, (chunk + 1) * n)
        out[lo - start : hi - start] = rows[lo - chunk * n : hi - chunk * n]
    return out


def real_texts(count: int, seed: int = 0) -> list[str]:
    """`count` distinct texts composed from mini-ViSU's captions (safe and marked unsafe) and phrase fragments."""
    import random

    from hysac_hf.data.mini_visu import SPLITS, mini_visu_rows

    captions = sorted({row[key] for split in SPLITS for row in mini_visu_rows(split) for key in ("safe", "nsfw")})
    prefixes = ["", "a photo of ", "an image showing ", "a picture of ", "a close-up of ", "a drawing of ", "a scan of "]
    middles = ["", " at night", " in the rain", " on a sunny day", " indoors", " from above", " in black and white"]
    suffixes = ["", ", detailed", ", blurry", ", old photograph", ", high resolution", ", cropped", ", cartoon style"]
    rng = random.Random(seed)
    seen, texts = set(), []
    while len(texts) < count:
        caption = rng.choice(captions)
        text = f"{rng.choice(prefixes)}{caption}{rng.choice(middles)}{rng.choice(suffixes)} #{rng.randrange(10**6)}"
        if text not in seen:
            seen.add(text)
            texts.append(text)
    return texts


def gallery_and_queries(args, name: str, work: Path) -> tuple[Path, torch.Tensor, dict]:
    """The gallery's embeddings written to `work/<name>.npy` (the build children read them) and the queries."""
    import numpy as np

    path = work / f"{name}-{args.points}x{args.dim}.npy"
    if name == "real":
        count = min(args.points, args.real_points)
        path = work / f"real-{count}.npy"
        from hysac_hf.encode import encode_texts
        from hysac_hf.loading import load_model

        model, processor = load_model(args.real_model, "cpu")
        curvature = float(model.curvature.detach())
        texts = real_texts(count + args.queries, seed=args.seed)
        if not path.is_file():
            embeddings = encode_texts(model, processor, texts[:count], batch_size=512, show_progress=True)
            np.save(path, embeddings.numpy())
        queries = encode_texts(model, processor, texts[count:], batch_size=512, show_progress=False)
        return path, queries, {"curvature": curvature, "model": str(args.real_model), "points": count}
    shape = name
    shift = args.query_shift if name == "clustered" else 0.0
    if not path.is_file() and not args.stream:
        embeddings = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(args.points, args.dim))
        for start in range(0, args.points, GENERATE_CHUNK):
            stop = min(args.points, start + GENERATE_CHUNK)
            embeddings[start:stop] = synthetic_embeddings(
                stop - start, args.dim, args.curvature, seed=args.seed, shape=shape, start=start
            ).numpy()
        embeddings.flush()
        del embeddings
    queries = synthetic_embeddings(args.queries, args.dim, args.curvature, seed=args.seed + 1, shift=shift, shape=shape)
    return path, queries, {"curvature": args.curvature, "points": args.points}


# ------------------------------------------------------------------------------------------------------------
# One build, in a child process (its peak memory is its own)
class AnonymousPeak:
    """The peak of this process's anonymous resident memory (`RssAnon`), sampled every 0.2 s by a thread: what it must
    hold. (`ru_maxrss` also counts the pages of memory-mapped files, which the kernel drops as it needs.)"""

    def __init__(self) -> None:
        import threading

        self.peak, self._done = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(0.2):
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("RssAnon:"):
                        self.peak = max(self.peak, int(line.split()[1]) * 1024)

    def stop(self) -> int:
        """Stop sampling; the peak in MiB."""
        self._done.set()
        self._thread.join()
        return round(self.peak / 2**20)


def build_child(args) -> dict:
    """`--_build KIND`: build one index folder at the library's defaults; print its wall time and peak memory."""
    import numpy as np

    from hysac_hf.index import GalleryIndex
    from hysac_hf.index.sources import EmbedOptions, embeddings_source
    from hysac_hf.index.streaming import build_streaming

    kind, output = args._build, Path(args._output)
    anonymous = AnonymousPeak()
    start = time.perf_counter()
    target = None if args.target_recall == "none" else float(args.target_recall)
    if kind == "ivfpq":
        if args.stream:  # straight from the generator: the gallery never exists whole, not even on disk beside it
            size = GENERATE_CHUNK

            def chunks(first: int):
                for number in range(first, -(-args.points // size)):
                    lo, hi = number * size, min(args.points, (number + 1) * size)
                    rows = synthetic_embeddings(hi - lo, args.dim, args.curvature, seed=args.seed, shape=args.gallery, start=lo)
                    yield rows, [{} for _ in range(hi - lo)]

            fingerprint = {"generator": args.gallery, "points": args.points, "dim": args.dim, "seed": args.seed}
            dim = args.dim
        else:
            source = embeddings_source([args._gallery_file], "image")
            size = 262_144

            def chunks(first: int):
                for number in range(first, -(-len(source) // size)):
                    yield source.slice(number * size, min(len(source), (number + 1) * size), EmbedOptions())

            fingerprint, dim = source.fingerprint, source.dim
        build_streaming(
            output, chunks, dim=dim, modality="image", curvature=args.curvature, fingerprint=fingerprint,
            kind="ivfpq", target_recall=target, show_progress=False,
        )  # fmt: skip
    else:
        embeddings = torch.from_numpy(np.load(args._gallery_file))
        GalleryIndex(embeddings, "image", args.curvature, kind=kind, target_recall=target).save(output)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"build_s": round(seconds, 1), "peak_rss_mib": round(peak / 2**20), "peak_anon_mib": anonymous.stop()}
    print(json.dumps(result))
    return result


def run_build(args, kind: str, gallery: str, gallery_file: Path, output: Path, curvature: float) -> dict:
    command = [sys.executable, __file__, "--_build", kind, "--_output", str(output), "--_gallery_file", str(gallery_file)]
    command += ["--gallery", gallery, "--points", str(args.points), "--dim", str(args.dim), "--seed", str(args.seed)]
    command += ["--curvature", repr(curvature), "--threads", str(args.threads), "--target_recall", args.target_recall]
    command += ["--stream", "--kinds", "ivfpq", "--galleries", gallery] if args.stream else []
    # Without the malloc tunables: they keep freed memory in the heap (steadier timings), which would inflate the
    # peak memory a build needs.
    env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
    child = subprocess.run([*command, "--no_reexec"], capture_output=True, text=True, env=env)
    if child.returncode != 0:
        raise RuntimeError(f"building {kind} on {gallery} failed:\n{child.stderr[-4000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------------
def recall_at(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean fraction of each query's true top-k found in its returned top-k."""
    hits = [len(set(a) & set(b)) for a, b in zip(found.tolist(), truth.tolist())]
    return sum(hits) / truth.numel()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=1_000_000, help="gallery size (default 1,000,000)")
    parser.add_argument("--dim", type=int, default=768, help="embedding dimension (default 768)")
    parser.add_argument("--galleries", default=",".join(GALLERIES), help=f"comma-separated, of {list(GALLERIES)}")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {list(KINDS)}")
    parser.add_argument("--queries", type=int, default=1000, help="queries per timed round")
    parser.add_argument("--exact_queries", type=int, default=None, help="queries of the exact search (default: all)")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query (recall@k)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=2, help="torch and FAISS threads")
    parser.add_argument("--curvature", type=float, default=1.0, help="curvature magnitude c of the synthetic galleries")
    parser.add_argument("--query_shift", type=float, default=0.3, help="modality gap of the clustered queries")
    parser.add_argument("--seed", type=int, default=0, help="seed of the galleries (queries use seed + 1)")
    parser.add_argument("--target_recall", default="0.95", help="the builds' target (the library's default)")
    parser.add_argument("--real_model", default="hysac-demo/model", help="HySAC model of the real gallery")
    parser.add_argument("--real_points", type=int, default=200_000, help="size of the real gallery (at most --points)")
    parser.add_argument("--stream", action="store_true", help="ivfpq: build from the generator, chunk by chunk")
    parser.add_argument("--work_dir", default="bench-index", help="where galleries and index folders are written")
    parser.add_argument("--keep", action="store_true", help="keep each gallery's files (default: removed after it)")
    parser.add_argument("--output_json", default=None, help="also write the results here")
    parser.add_argument("--no_reexec", action="store_true", help="do not re-run with GLIBC_TUNABLES set")
    for hidden in ("--_build", "--_output", "--_gallery_file", "--gallery"):
        parser.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.galleries = [g for g in args.galleries.split(",") if g]
    args.kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(args.galleries) - set(GALLERIES)) + sorted(set(args.kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown galleries or kinds {unknown}")
    if min(args.points, args.dim, args.queries, args.k, args.rounds) < 1:
        parser.error("--points, --dim, --queries, --k and --rounds must be >= 1")
    if args.stream and (args.kinds != ["ivfpq"] or "real" in args.galleries):
        parser.error("--stream builds ivfpq indexes of synthetic galleries only (--kinds ivfpq)")
    return args


def bench_gallery(args, name: str, work: Path, log) -> dict:
    """Build every kind of index over one gallery, then time and compare them side by side."""
    import faiss

    from hysac_hf.index import GalleryIndex
    from hysac_hf.modeling.gallery_hysac import FAISS_FILE

    start = time.perf_counter()
    gallery_file, queries, info = gallery_and_queries(args, name, work)
    log(f"{name}: gallery and {len(queries)} queries ready in {time.perf_counter() - start:.0f} s")
    builds, indexes, outputs = {}, {}, {}
    for kind in args.kinds:  # every build first (in its child process), then the folders are loaded side by side
        outputs[kind] = work / f"{name}-{info['points']}-{kind}"
        builds[kind] = run_build(args, kind, name, gallery_file, outputs[kind], info["curvature"])
        log(f"{name}: built {kind}: {builds[kind]}")
    for kind, output in outputs.items():
        index = GalleryIndex.load(output)
        indexes[kind] = index
        structure = output / FAISS_FILE
        builds[kind].update(
            {
                "kind_built": index.kind,
                "structure_mib": round(structure.stat().st_size / 2**20, 1) if structure.is_file() else None,
                "embeddings_mib": round(info["points"] * index.dim * 4 / 2**20, 1),
                **({"params": index.params} if index.params else {}),
                **({"tuning": {k: v for k, v in index.tuning.items() if k != "candidates"}} if index.tuning else {}),
            }
        )
        log(f"{name}: {kind} {builds[kind]}")
    # The exact kind's answers are the truth; without a flat build, the exact search of another index's folder is.
    count = args.exact_queries or len(queries)
    exact_queries = queries[:count]
    if "flat" in indexes:
        searches = {"flat": (indexes["flat"], {})}
    else:
        searches = {"exact": (next(iter(indexes.values())), {"exact": True})}
    searches.update({kind: (index, {}) for kind, index in indexes.items() if kind != "flat"})
    truth = None
    times = {label: [] for label in searches}
    found = {}
    for round_index in range(args.rounds + 1):  # round 0 is the warm-up (and gives the results)
        for label, (index, options) in searches.items():
            batch = exact_queries if label in ("flat", "exact") else queries
            t0 = time.perf_counter()
            result = index.knn(batch, args.k, **options)[1]
            seconds = time.perf_counter() - t0
            if round_index == 0:
                found[label] = result
            else:
                times[label].append(seconds / len(batch))
        log(f"{name}: round {round_index}/{args.rounds} done")
    truth = found["flat" if "flat" in found else "exact"]
    exact_label = "flat" if "flat" in searches else "exact"
    exact_median = statistics.median(times[exact_label])
    rows = []
    for label in searches:
        median, best = statistics.median(times[label]), min(times[label])
        rows.append(
            {
                "index": label,
                "recall_at_k": recall_at(found[label][:count], truth),
                "queries_per_s_best": 1 / best,
                "queries_per_s_median": 1 / median,
                "speedup_median": exact_median / median,
                **builds.get(label, {}),
            }
        )
    del faiss, indexes, searches
    if not args.keep:  # the next gallery needs the disk
        import shutil

        for output in outputs.values():
            shutil.rmtree(output, ignore_errors=True)
        if name != "real":
            gallery_file.unlink(missing_ok=True)
    return {"gallery": name, **info, "dim": args.dim if name != "real" else int(queries.shape[1]), "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    import faiss

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    if args._build:
        return build_child(args)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:  # progress on stderr; the tables are the only stdout
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    results = []
    for name in args.galleries:
        results.append(bench_gallery(args, name, work, log))
        if args.output_json:  # after every gallery: a long run keeps what it measured
            Path(args.output_json).write_text(json.dumps(_summary(args, results), indent=1))
    summary = _summary(args, results)
    print(_table(summary))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(summary, indent=1))
    return summary


def _summary(args, results: list[dict]) -> dict:
    import faiss

    return {
        "points": args.points,
        "dim": args.dim,
        "queries": args.queries,
        "exact_queries": args.exact_queries or args.queries,
        "k": args.k,
        "rounds": args.rounds,
        "threads": args.threads,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "faiss": faiss.__version__,
        "torch": torch.__version__,
        "target": f"recall@{args.k} >= {TARGET_RECALL}; speed-up >= {TARGET_SPEEDUP}",
        "galleries": results,
    }


def _table(summary: dict) -> str:
    lines = [
        f"{summary['queries']} queries, k={summary['k']}, {summary['rounds']} rounds, {summary['threads']} threads, "
        f"faiss {summary['faiss']}, GLIBC_TUNABLES {'set' if summary['glibc_tunables'] else 'unset'}",
        "",
        f"| gallery | index | recall@{summary['k']} | q/s (median) | speed-up (median) | build s | peak memory MiB "
        "(anon / RSS) | structure MiB (x raw) | settings chosen |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for gallery in summary["galleries"]:
        for row in gallery["rows"]:
            size = row.get("structure_mib")
            raw = row.get("embeddings_mib")
            ratio = f" (1/{raw / size:.1f})" if size and raw else ""
            params = row.get("params", {})
            tuning = row.get("tuning", {})
            settings = ", ".join(f"{k}={v}" for k, v in params.items() if k not in ("cells",))
            if tuning.get("cells"):
                settings += f", {tuning['cells']['layout']}"
            if tuning.get("refused"):
                settings = "refused: exact search kept"
            lines.append(
                f"| {gallery['gallery']} {gallery['points']:,} x {gallery['dim']} | {row['index']} | "
                f"{row['recall_at_k']:.4f} | {row['queries_per_s_median']:,.1f} | {row['speedup_median']:.1f}x | "
                f"{row.get('build_s', '-')} | {row.get('peak_anon_mib', '-')} / {row.get('peak_rss_mib', '-')} | "
                f"{'-' if size is None else f'{size:,.0f}{ratio}'} | {settings or '-'} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
