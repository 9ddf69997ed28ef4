"""Load-test `hysac-serve` on the loopback: dynamic batching against batch size 1, then an overload run.

For each round, and each variant in turn (their order alternates between rounds), a fresh `hysac-serve` starts on a
free 127.0.0.1 port with a random HySAC of `--size` (CPU: ViT-S/32-sized by default), is warmed up, and then
`--clients` concurrent clients (threads, one keep-alive connection each) send single-input requests back to back for
`--seconds` seconds: requests/s, p50/p95/p99 latency and errors. Variants: `batched` (`--max_batch_size 32`, LitServe's
dynamic batching) and `unbatched` (`--max_batch_size 1`). Reported: the median over rounds (and the minimum of
requests/s), side by side.

Then the overload run, on a batched server: requests arrive open-loop (on a fixed schedule, whatever the answers) at
`--overload` times the measured batched capacity for `--seconds` seconds, through `--max_queue + 32` connections.
The server must answer every request with 200, or 503/429 with Retry-After once `--max_queue` requests are in flight
(nothing accepted is lost: every request gets one of the two), and stay healthy: `/health` answers 200 and a request
is served right after.

Targets (CPU, 16 clients): batched >= 3x the unbatched requests/s, batched p99 <= 2x the unbatched p50.

Run: `.venv/bin/python benchmarks/bench_serve.py` (about 4 minutes on 2 cores; needs the `serve` extra);
`--size tiny --seconds 1 --rounds 1 --clients 4` is a smoke run. Clients and server share the machine: on 2 cores
the clients' own CPU time is part of what is measured. The script re-executes itself with `GLIBC_TUNABLES` set (the
servers inherit it). Bounded: every run stops after `--seconds`, every request times out after 60 s, every server is
stopped by its process id.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workload import maybe_reexec  # noqa: E402

WORDS = (
    "a photo of the cat dog rocket astronaut cup coffee street night man woman child red blue green car tree house "
    "beach mountain river city old young small large running sitting standing with on in under near"
).split()
REQUEST_TIMEOUT_S = 60
TARGET_SPEEDUP = 3.0
TARGET_P99_OVER_P50 = 2.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small", "base"], help="random HySAC geometry")
    parser.add_argument("--workload", default="text", choices=["text", "image"], help="what each request embeds")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default: 16)")
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of each run (default: 15)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before each measured run")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the variants (default: 2)")
    parser.add_argument("--max_batch_size", type=int, default=32, help="the batched variant's batch (default: 32)")
    parser.add_argument("--batch_timeout", type=float, default=0.005, help="the batched variant's wait (default: 5 ms)")
    parser.add_argument("--max_queue", type=int, default=64, help="requests in flight before 503 (default: 64)")
    parser.add_argument("--overload", type=float, default=2.0, help="overload arrival rate / capacity (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the server (default: torch's)")
    parser.add_argument("--model", default=None, help="serve this folder instead of a random model")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--no_reexec", dest="reexec", action="store_false", help="do not re-run with GLIBC_TUNABLES")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------------------
# The model and the server
def build_model(size: str, folder: Path) -> Path:
    """A random HySAC of `size` with the real CLIP tokenizer, calibrated-looking bounds and thresholds."""
    import torch
    from transformers import CLIPModel

    from hysac_hf import HySACModel, HySACProcessor
    from hysac_hf.testing import TINY_BOUNDS, build_clip_tokenizer, clip_image_processor
    from workload import clip_config

    torch.manual_seed(0)
    model = HySACModel.from_clip(CLIPModel(clip_config(size)).eval(), bounds=TINY_BOUNDS)
    model.config.unsafe_thresholds = {"image": 0.6, "text": 0.4}
    processor = HySACProcessor(image_processor=clip_image_processor(), tokenizer=build_clip_tokenizer(folder / "vocab"))
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    return folder / "model"


class Server:
    """`hysac-serve` in a subprocess on a free loopback port; `stop()` ends it by its process id."""

    def __init__(self, model: str, log: Path, *flags: str):
        from hysac_hf.testing import free_port

        self.port = free_port()
        command = [sys.executable, "-m", "hysac_hf.serve.cli", "--model", model, "--port", str(self.port)]
        command += ["--log_level", "WARNING", *flags]
        self.log = open(log, "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        started = time.monotonic()
        while not self.healthy():
            if self.process.poll() is not None or time.monotonic() - started > 300:
                self.stop()
                raise SystemExit(f"hysac-serve did not start; see {log}")
            time.sleep(0.3)
        self.startup_s = time.monotonic() - started

    def healthy(self) -> bool:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            connection.request("GET", "/health")
            return connection.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


# ------------------------------------------------------------------------------------------------------------
# Load
def request_bodies(workload: str, count: int, seed: int = 0) -> list[bytes]:
    """Single-input /v1/embeddings bodies: captions of 6-16 words, or 224-px crops of real photos as PNG data URLs."""
    rng = random.Random(seed)
    if workload == "text":
        texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))) for _ in range(count)]
        return [json.dumps({"input": text}).encode() for text in texts]
    from hysac_hf.testing import sample_images

    photos = [image.convert("RGB") for image in sample_images().values()]
    bodies = []
    for _ in range(min(count, 64)):
        photo = rng.choice(photos)
        left, top = rng.randint(0, photo.width - 224), rng.randint(0, photo.height - 224)
        buffer = io.BytesIO()
        photo.crop((left, top, left + 224, top + 224)).save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        bodies.append(json.dumps({"input": {"type": "image_url", "image_url": {"url": url}}}).encode())
    return bodies


def send(connection: http.client.HTTPConnection, body: bytes) -> tuple[int, str | None]:
    connection.request("POST", "/v1/embeddings", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    return response.status, response.getheader("Retry-After")


def closed_loop(port: int, bodies: list[bytes], clients: int, seconds: float) -> dict[str, Any]:
    """`clients` threads sending back to back until `seconds` have passed: requests/s, latency percentiles, errors."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[list[str]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(i: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
        position = i
        barrier.wait()
        while time.perf_counter() < stop_at[0]:
            started = time.perf_counter()
            try:
                status, _ = send(connection, bodies[position % len(bodies)])
            except (OSError, http.client.HTTPException) as error:
                errors[i].append(type(error).__name__)
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
                continue
            if status == 200:
                latencies[i].append(time.perf_counter() - started)
            else:
                errors[i].append(str(status))
            position += clients
        connection.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + seconds
    started = time.perf_counter()
    barrier.wait()
    for thread in threads:
        thread.join(seconds + REQUEST_TIMEOUT_S)
    elapsed = time.perf_counter() - started
    done = sorted(x for row in latencies for x in row)
    return {
        "requests_per_s": len(done) / elapsed,
        "p50_ms": percentile(done, 50) * 1e3,
        "p95_ms": percentile(done, 95) * 1e3,
        "p99_ms": percentile(done, 99) * 1e3,
        "requests": len(done),
        "errors": sum(len(row) for row in errors),
    }


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def open_loop(port: int, bodies: list[bytes], rate: float, seconds: float, connections: int) -> dict[str, Any]:
    """Requests arriving every `1 / rate` s for `seconds`, whatever the answers, through `connections` threads.

    Returns the count of each answer: `ok` (200), `refused` (503 or 429, with Retry-After),
    `refused_without_retry_after`, `other` (any other status) and `failed` (no answer: a connection error or a timeout).
    """
    total = int(rate * seconds)
    counts = {"ok": 0, "refused": 0, "refused_without_retry_after": 0, "other": 0, "failed": 0}
    late = [0.0]
    lock = threading.Lock()
    next_index = [0]
    start = time.perf_counter() + 0.2

    def worker() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
        while True:
            with lock:
                index = next_index[0]
                next_index[0] += 1
            if index >= total:
                break
            due = start + index / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            try:
                status, retry_after = send(connection, bodies[index % len(bodies)])
                key = (
                    "ok"
                    if status == 200
                    else ("refused" if retry_after else "refused_without_retry_after")
                    if status in (429, 503)
                    else "other"
                )
            except (OSError, http.client.HTTPException):
                key = "failed"
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
            with lock:
                counts[key] += 1
                late[0] = max(late[0], -delay)
        connection.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 2 * REQUEST_TIMEOUT_S)
    return {"offered_per_s": rate, "sent": total, **counts, "max_lateness_s": late[0]}


# ------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    maybe_reexec("cpu", args.reexec)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    workdir = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    model = args.model or str(build_model(args.size, workdir))
    bodies = request_bodies(args.workload, 512)
    common = ["--max_queue", str(args.max_queue)] + (["--threads", str(args.threads)] if args.threads else [])
    variants = {
        "batched": ["--max_batch_size", str(args.max_batch_size), "--batch_timeout", str(args.batch_timeout)],
        "unbatched": ["--max_batch_size", "1"],
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    kept = None  # the last round's batched server, kept for the overload run
    try:
        for round_index in range(args.rounds):
            # alternating orders; the last round ends with the batched server, which stays up for the overload run
            order = list(variants) if (args.rounds - 1 - round_index) % 2 else list(reversed(variants))
            for name in order:
                server = Server(model, workdir / f"{name}-{round_index}.log", *variants[name], *common)
                try:
                    closed_loop(server.port, bodies, args.clients, args.warmup)
                    run = closed_loop(server.port, bodies, args.clients, args.seconds)
                    run["startup_s"] = server.startup_s
                    runs[name].append(run)
                    print(f"round {round_index} {name}: {format_run(run)}", file=sys.stderr, flush=True)
                finally:
                    if name == "batched" and round_index == args.rounds - 1 and args.overload > 0:
                        kept = server
                    else:
                        server.stop()
        results = report(args, runs)
        if kept is not None:
            results["overload"] = overload_run(kept, bodies, args, results["summary"]["batched"]["requests_per_s"])
    finally:
        if kept is not None:
            kept.stop()
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    shutil.rmtree(workdir, ignore_errors=True)  # kept on failure: the servers' logs are there
    return results


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:

    summary = {name: summarize(rows) for name, rows in runs.items()}
    batched, unbatched = summary["batched"], summary["unbatched"]
    return {
        "size": args.size,
        "workload": args.workload,
        "clients": args.clients,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "runs": runs,
        "summary": summary,
        "speedup": batched["requests_per_s"] / unbatched["requests_per_s"],
        "batched_p99_over_unbatched_p50": batched["p99_ms"] / unbatched["p50_ms"],
    }


def overload_run(server: Server, bodies: list[bytes], args: argparse.Namespace, capacity: float) -> dict[str, Any]:
    """Open-loop arrivals at `args.overload` x `capacity` requests/s, then the server's health."""
    overload = open_loop(server.port, bodies, args.overload * capacity, args.seconds, args.max_queue + 32)
    overload["healthy_after"] = server.healthy()
    check = closed_loop(server.port, bodies, 1, 0.5)
    overload["served_after"] = check["requests"] > 0 and check["errors"] == 0
    overload["lost"] = overload["failed"] + overload["other"] + overload["refused_without_retry_after"]
    return overload


def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    medians = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    medians["requests_per_s_min"] = min(row["requests_per_s"] for row in rows)
    medians["errors"] = sum(row["errors"] for row in rows)
    return medians


def format_run(run: dict[str, Any]) -> str:
    return (
        f"{run['requests_per_s']:.1f} req/s, p50 {run['p50_ms']:.0f} ms, p95 {run['p95_ms']:.0f} ms, "
        f"p99 {run['p99_ms']:.0f} ms, {run['errors']} errors"
    )


def format_table(results: dict[str, Any]) -> str:
    lines = [
        f"bench_serve: size={results['size']} workload={results['workload']} clients={results['clients']} "
        f"{results['seconds']:g} s x {results['rounds']} rounds (medians; req/s min in brackets)",
        "| variant | requests/s | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in results["summary"].items():
        lines.append(
            f"| {name} | {row['requests_per_s']:.1f} ({row['requests_per_s_min']:.1f}) | {row['p50_ms']:.0f} | "
            f"{row['p95_ms']:.0f} | {row['p99_ms']:.0f} | {row['errors']} |"
        )
    lines.append(
        f"batched / unbatched requests/s: {results['speedup']:.2f}x (target >= {TARGET_SPEEDUP:g}x); batched p99 / "
        f"unbatched p50: {results['batched_p99_over_unbatched_p50']:.2f} (target <= {TARGET_P99_OVER_P50:g})"
    )
    if "overload" in results:
        o = results["overload"]
        lines.append(
            f"overload at {o['offered_per_s']:.0f} req/s for {results['seconds']:g} s: {o['sent']} sent, "
            f"{o['ok']} served, "
            f"{o['refused']} refused (503/429 + Retry-After), {o['lost']} lost; healthy after: {o['healthy_after']}, "
            f"served after: {o['served_after']}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
