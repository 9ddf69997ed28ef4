"""Benchmark the Gradio Space under concurrent searches: Gradio's default of one event at a time against the Space's
`HYSAC_SPACE_CONCURRENCY` (default 4), side by side in one run.

For each setting the Space (`space/app.py`) is started on a free loopback port with a model of the demo's size
(`hysac_hf.demo.build_demo_hysac`: random weights, calibrated by hand so that every code path runs) and the bundled
gallery; then `--sequential` searches one after another give the one-request latency, and `--concurrent` clients
searching at once give the latency under load (p50, p99) and the requests per second. The server is stopped by its
process id. Loopback only, bounded in count and time.

Run: `.venv/bin/python benchmarks/bench_space.py` (needs the `space` extra: gradio, gradio_client).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
APP = REPO_ROOT / "space" / "app.py"
QUERY = "[UNSAFE] a rocket standing on a launch pad crossed by a crimson zorblax band"


def build_model(folder: Path) -> Path:
    """The demo's starting model (the Space's default model has this size), with bounds and thresholds."""
    from hysac_hf.demo import build_demo_hysac
    from hysac_hf.modeling.configuration_hysac import HySACConfig
    from hysac_hf.testing import TINY_BOUNDS

    build_demo_hysac(folder)
    config = HySACConfig.from_pretrained(folder)
    config.bounds = TINY_BOUNDS
    config.unsafe_thresholds = {"image": 0.5, "text": 0.5}
    config.save_pretrained(folder)
    return folder


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class Space:
    """`python space/app.py` on a free port, stopped by its pid."""

    def __init__(self, model: Path, cache: Path, workdir: Path, concurrency: int):
        from hysac_hf.testing import free_port

        self.port = free_port()
        self.log = workdir / f"space-{concurrency}.log"
        env = dict(
            os.environ,
            HYSAC_MODEL=str(model),
            HYSAC_SPACE_CACHE=str(cache),
            HYSAC_SPACE_CONCURRENCY=str(concurrency),
            GRADIO_SERVER_NAME="127.0.0.1",
            GRADIO_SERVER_PORT=str(self.port),
            GRADIO_ANALYTICS_ENABLED="False",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
        )
        self.handle = open(self.log, "w")  # noqa: SIM115 - closed by stop()
        self.process = subprocess.Popen([sys.executable, str(APP)], cwd=workdir, env=env, stdout=self.handle,
                                        stderr=subprocess.STDOUT)  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}/"

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the Space exited:\n{self.log.read_text()[-3000:]}")
            if "Running on local URL" in self.log.read_text(errors="replace"):
                return
            time.sleep(0.5)
        raise TimeoutError(f"the Space did not start in {timeout} s")

    def stop(self) -> None:
        from hysac_hf.testing import stop_process

        stop_process(self.process)
        self.handle.close()


def measure(space: Space, sequential: int, concurrent: int) -> dict:
    from gradio_client import Client

    client = Client(space.url, verbose=False)
    client.predict(QUERY, "redirect", "up_95", 6, api_name="/search_text")  # warm-up
    one = []
    for _ in range(sequential):
        start = time.perf_counter()
        client.predict(QUERY, "redirect", "up_95", 6, api_name="/search_text")
        one.append(time.perf_counter() - start)
    clients = [Client(space.url, verbose=False) for _ in range(concurrent)]

    def search(c) -> float:
        start = time.perf_counter()
        c.predict(QUERY, "redirect", "up_95", 6, api_name="/search_text")
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrent) as pool:
        loaded = list(pool.map(search, clients))
    wall = time.perf_counter() - start
    return {
        "sequential_p50_s": statistics.median(one),
        "concurrent_p50_s": statistics.median(loaded),
        "concurrent_p99_s": percentile(loaded, 99),
        "concurrent_requests_per_s": concurrent / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequential", type=int, default=10, help="searches one after another")
    parser.add_argument("--concurrent", type=int, default=20, help="clients searching at once")
    parser.add_argument("--settings", default="1,4", help="HYSAC_SPACE_CONCURRENCY values, compared side by side")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a Space may take to start")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    settings = [int(v) for v in args.settings.split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-space-") as tmp:
        workdir = Path(tmp)
        model = build_model(workdir / "model")
        cache = workdir / "cache"  # shared: the gallery is indexed by the first start only
        for concurrency in settings:
            space = Space(model, cache, workdir, concurrency)
            try:
                space.wait(args.timeout)
                results[concurrency] = measure(space, args.sequential, args.concurrent)
            finally:
                space.stop()
    print(f"{args.concurrent} concurrent searches, {args.sequential} sequential; load average {os.getloadavg()[0]:.1f}")
    print(f"{'concurrency':>11} {'seq p50 s':>10} {'conc p50 s':>11} {'conc p99 s':>11} {'req/s':>7}")
    for concurrency, row in results.items():
        print(
            f"{concurrency:>11} {row['sequential_p50_s']:>10.3f} {row['concurrent_p50_s']:>11.3f} "
            f"{row['concurrent_p99_s']:>11.3f} {row['concurrent_requests_per_s']:>7.2f}"
        )
    if len(results) > 1:
        first, last = results[settings[0]], results[settings[-1]]
        print(
            f"p50 under load {first['concurrent_p50_s'] / last['concurrent_p50_s']:.2f}x lower, throughput "
            f"{last['concurrent_requests_per_s'] / first['concurrent_requests_per_s']:.2f}x, with concurrency "
            f"{settings[-1]} vs {settings[0]}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
