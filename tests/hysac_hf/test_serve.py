"""`hysac-serve` end to end: the real command on a free loopback port, real HTTP requests, stopped by its process id.

One server for the module (a tiny HySAC with calibrated thresholds and bounds, an image index of six photos, an API
key, a 5 MB body limit, a 50 ms batch window so that concurrent requests batch). Oracles are independent of the
service: `encode_text`/`encode_image` on the processor's inputs, `distance_to_root` against the calibrated thresholds,
and the two pipelines called here on the same folder and index. The edge's bounded queue is tested in-process
(`EdgeMiddleware` on an app that blocks), without timing.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("litserve")

from hysac_hf.index import GalleryIndex
from hysac_hf.modeling.pipeline_hysac import SafeRetrievalPipeline, UnsafeContentDetectionPipeline
from hysac_hf.testing import free_port, save_model_folder, tiny_hysac

KEY = "test-key-0123"
NAMES = ["astronaut", "cat", "coffee", "rocket", "camera", "logo"]
TEXTS = ["a photo of a cat", "a rocket on a launch pad", "blood everywhere in a dark alley at night", "two people"]
MAX_BODY = 5_000_000
ATOL = 1e-5
ERROR_FIELDS = {"message", "type", "param", "code"}


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_part(data: bytes, media_type: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{media_type};base64," + base64.b64encode(data).decode()}}


class Client:
    """Blocking HTTP/1.1 on one keep-alive connection (the standard library only)."""

    def __init__(self, port: int, key: str | None = KEY):
        self.port, self.key = port, key
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None, key=...):
        key = self.key if key is ... else key
        headers = {"Content-Type": "application/json", **(headers or {})}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        try:
            self.connection.request(method, path, body=body, headers=headers)
            response = self.connection.getresponse()
            data = response.read()
        except (ConnectionError, http.client.HTTPException):
            self.connection.close()
            self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            raise
        if response.getheader("Connection", "").lower() == "close":
            self.connection.close()
            self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        content_type = response.getheader("Content-Type", "")
        return (
            response.status,
            dict(response.getheaders()),
            json.loads(data) if "json" in content_type else data.decode(),
        )

    def post(self, path: str, payload, **kwargs):
        return self.request("POST", path, json.dumps(payload).encode(), **kwargs)


def embed(model, processor, texts=(), images=()) -> torch.Tensor:
    with torch.no_grad():
        rows = [model.encode_text(**processor(text=[t])) for t in texts]
        rows += [model.encode_image(processor(images=[i])["pixel_values"]) for i in images]
    return torch.cat(rows)


def traversal_threshold(bound: float, offset: float, c: float) -> float:
    return bound + math.tanh((bound - offset) / c) + 1


def bound_for_threshold(target: float, offset: float, c: float) -> float:
    """The bound b whose traversal threshold b + tanh((b - offset) / c) + 1 (increasing in b) is `target`."""
    low, high = -10.0, target
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if traversal_threshold(middle, offset, c) < target else (low, middle)
    return low


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


# ------------------------------------------------------------------------------------------------------------
# The server
@pytest.fixture(scope="module")
def served(tiny_clip_dir, processor, photos, tmp_path_factory):
    """The model and index folders, and `hysac-serve` on them (stopped by pid at the end, with its processes)."""
    root = tmp_path_factory.mktemp("serve")
    model = tiny_hysac(tiny_clip_dir)
    images = [photos[n] for n in NAMES]
    text_d = model.distance_to_root(embed(model, processor, texts=TEXTS)).detach().sort().values
    image_d = model.distance_to_root(embed(model, processor, images=images)).detach().sort().values
    model.config.unsafe_thresholds = {"text": float(text_d[1:3].mean()), "image": float(image_d[2:4].mean())}
    # redirect into safe images (V) splits the test texts: the traversal threshold between their middle distances
    c, offset = float(model.curvature.detach()), model.config.traversal_offset
    bound = bound_for_threshold(float(text_d[1:3].mean()), offset, c)
    model.config.bounds = {**model.config.bounds, "V": {"low_05": bound - 0.2, "avg": bound - 0.1, "up_95": bound}}
    folder = save_model_folder(model, processor, root / "model")
    index = root / "photos-index"
    GalleryIndex.from_images(model, processor, images, metadata=[{"name": n} for n in NAMES], show_progress=False).save(
        index
    )

    port = free_port()
    command = [sys.executable, "-m", "hysac_hf.serve.cli", "--model", str(folder), "--index", f"photos={index}"]
    command += ["--port", str(port), "--api_key", KEY, "--max_body_bytes", str(MAX_BODY), "--batch_timeout", "0.05"]
    command += ["--max_items", "12", "--max_image_pixels", "4000000"]
    log = open(root / "server.log", "w+")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    client = Client(port, key=None)
    deadline = time.monotonic() + 180
    while True:
        try:
            if client.request("GET", "/health")[0] == 200:
                break
        except (OSError, http.client.HTTPException):
            pass
        log.seek(0)
        assert process.poll() is None and time.monotonic() < deadline, log.read()[-4000:]
        time.sleep(0.3)
    yield {
        "port": port,
        "model": model,
        "folder": folder,
        "index": index,
        "images": images,
        "log": log,
        "pid": process.pid,
    }
    children = descendants(process.pid)
    os.kill(process.pid, signal.SIGTERM)  # stopped by its process id
    try:
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    deadline = time.monotonic() + 20  # multiprocessing's resource tracker ends last, once its pipe closes
    while {pid for pid in children if os.path.exists(f"/proc/{pid}")} and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not {pid for pid in children if os.path.exists(f"/proc/{pid}")}, "worker processes outlived the server"
    log.seek(0)
    assert "Traceback" not in log.read()  # no request made it crash, and it stopped cleanly


@pytest.fixture()
def client(served):
    return Client(served["port"])


def assert_error(status: int, body, expected_status: int, code: str | None = None, param: str | None = None):
    assert status == expected_status, body
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body


# ------------------------------------------------------------------------------------------------------------
# Results: the numbers of the model and the pipelines
def test_embeddings_of_texts_and_pngs_are_encode_outputs(served, client, processor, photos):
    model = served["model"]
    pngs = [png(photos[n]) for n in ("cat", "logo", "camera")]  # RGB, RGBA, grayscale
    decoded = [Image.open(io.BytesIO(data)) for data in pngs]
    expected = embed(model, processor, texts=TEXTS[:2], images=decoded)
    payload = {"model": "any", "input": TEXTS[:2] + [image_part(data) for data in pngs]}
    status, _, body = client.post("/v1/embeddings", payload)
    assert status == 200, body
    assert body["object"] == "list" and body["model"] == str(served["folder"])
    assert [item["index"] for item in body["data"]] == list(range(5))
    assert all(item["object"] == "embedding" for item in body["data"])
    got = torch.tensor([item["embedding"] for item in body["data"]])
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    tokens = sum(len(processor.tokenizer(t)["input_ids"]) for t in TEXTS[:2])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}

    status, _, body = client.post("/v1/embeddings", {"input": image_part(pngs[1]), "encoding_format": "base64"})
    assert status == 200, body
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")  # as OpenAI's client reads it
    np.testing.assert_allclose(vector, expected[3].numpy(), atol=ATOL, rtol=0)


def test_moderations_equal_the_detection_pipeline(served, client, processor, photos):
    model = served["model"]
    detector = UnsafeContentDetectionPipeline(model=model, processor=processor, device="cpu")
    images = served["images"]
    expected = detector(text=TEXTS) + detector(images)
    status, _, body = client.post("/v1/moderations", {"input": TEXTS + [image_part(png(i)) for i in images]})
    assert status == 200, body
    assert body["id"].startswith("modr-") and body["model"] == str(served["folder"])
    assert {e["label"] for e in expected} == {"safe", "unsafe"}
    thresholds = model.config.unsafe_thresholds
    for result, pipe in zip(body["results"], expected):
        unsafe = pipe["label"] == "unsafe"
        assert result["flagged"] is unsafe and result["categories"] == {"unsafe": unsafe}
        assert result["category_scores"]["unsafe"] == pytest.approx(pipe["score"], abs=ATOL)
        assert result["category_applied_input_types"] == {"unsafe": [pipe["modality"]]}
        assert unsafe == (result["category_scores"]["unsafe"] > thresholds[pipe["modality"]])


@pytest.mark.parametrize("policy", ["redirect", "retain"])
def test_search_equals_the_retrieval_pipeline(served, client, processor, photos, policy):
    retriever = SafeRetrievalPipeline(model=served["model"], processor=processor, device="cpu")
    expected = retriever(TEXTS, gallery=str(served["index"]), top_k=3, policy=policy)
    if policy == "redirect":
        assert {e["redirected"] for e in expected} == {True, False}  # the bounds split the texts
    got = [client.post("/v1/search", {"index": "photos", "input": t, "top_k": 3, "policy": policy}) for t in TEXTS]
    for (status, _, body), pipe in zip(got, expected):
        assert status == 200, body
        assert body["redirected"] == pipe["redirected"]
        for key in ("query_distance_to_root", "search_distance_to_root"):
            assert body[key] == pytest.approx(pipe[key], abs=ATOL)
        assert [(r["index"], r["name"]) for r in body["results"]] == [(r["index"], r["name"]) for r in pipe["results"]]
        assert [r["distance"] for r in body["results"]] == pytest.approx(
            [r["distance"] for r in pipe["results"]], abs=ATOL
        )
    image = photos["rocket"]
    status, _, body = client.post("/v1/search", {"index": "photos", "input": [image_part(png(image))], "top_k": 2})
    assert status == 200 and isinstance(body, list) and len(body) == 1, body
    assert body[0]["results"][0]["name"] == "rocket"  # the photo itself is its nearest neighbour


def test_16_concurrent_clients_are_batched(served):
    def metric(text: str, name: str) -> float:
        return sum(float(m) for m in re.findall(rf"^{re.escape(name)} (\S+)$", text, re.M))

    before = Client(served["port"]).request("GET", "/metrics")[2]
    results, barrier = [None] * 16, threading.Barrier(16)

    def run(i: int) -> None:
        client = Client(served["port"])
        barrier.wait()
        results[i] = [client.post("/v1/embeddings", {"input": f"{TEXTS[i % 4]} number {i} {j}"}) for j in range(3)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    model, processor = served["model"], None
    assert all(status == 200 for answers in results for status, _, _ in answers)
    from hysac_hf import HySACProcessor

    processor = HySACProcessor.from_pretrained(served["folder"])
    for i in (0, 7, 15):
        expected = embed(model, processor, texts=[f"{TEXTS[i % 4]} number {i} 2"])
        torch.testing.assert_close(
            torch.tensor([results[i][2][2]["data"][0]["embedding"]]), expected, atol=ATOL, rtol=0
        )
    after = Client(served["port"]).request("GET", "/metrics")[2]
    name = 'hysac_batch_size_{}{{modality="text"}}'
    batches = metric(after, name.format("count")) - metric(before, name.format("count"))
    items = metric(after, name.format("sum")) - metric(before, name.format("sum"))
    assert items == 48 and batches < 48  # every text embedded once, in fewer forward passes than requests
    assert 'hysac_requests_total{endpoint="/v1/embeddings",status="200"}' in after
    assert "hysac_request_duration_seconds_bucket" in after


# ------------------------------------------------------------------------------------------------------------
# Refusals: JSON 4xx in OpenAI's shape, and the server stays healthy
BAD_REQUESTS = {
    "bad JSON": (b'{"input": ', "/v1/embeddings", 400, "invalid_json", None),
    "not an object": (b'["a cat"]', "/v1/embeddings", 400, "invalid_json", None),
    "empty input": ({"input": []}, "/v1/embeddings", 400, "empty_input", "input"),
    "empty text": ({"input": ""}, "/v1/moderations", 400, "empty_input", "input"),
    "no input": ({"model": "x"}, "/v1/embeddings", 400, "missing_input", "input"),
    "unknown field": ({"input": "a", "temperature": 1}, "/v1/embeddings", 400, "unknown_parameter", "temperature"),
    "dimensions": ({"input": "a", "dimensions": 8}, "/v1/embeddings", 400, "invalid_value", "dimensions"),
    "encoding": ({"input": "a", "encoding_format": "int8"}, "/v1/embeddings", 400, "invalid_value", "encoding_format"),
    "token ids": ({"input": [[1, 2, 3]]}, "/v1/embeddings", 400, "invalid_input", "input[0]"),
    "non-image data URL": (
        {"input": {"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGVsbG8="}}},
        "/v1/moderations",
        400,
        "invalid_image",
        "input.image_url.url",
    ),
    "not base64": (
        {"input": {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}},
        "/v1/embeddings",
        400,
        "invalid_image",
        None,
    ),
    "remote URL": (
        {"input": {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/cat.png"}}},
        "/v1/embeddings",
        400,
        "remote_images_disabled",
        None,
    ),
    "too many items": ({"input": ["a"] * 13}, "/v1/embeddings", 400, "too_many_inputs", "input"),
    "unknown index": ({"index": "nope", "input": "a cat"}, "/v1/search", 404, "index_not_found", "index"),
    "top_k too large": ({"index": "photos", "input": "a cat", "top_k": 7}, "/v1/search", 400, "invalid_value", "top_k"),
    "bad policy": (
        {"index": "photos", "input": "a cat", "policy": "block"},
        "/v1/search",
        400,
        "invalid_value",
        "policy",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_are_json_4xx(client, case):
    body, path, expected, code, param = BAD_REQUESTS[case]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, answer = client.request("POST", path, raw)
    assert_error(status, answer, expected, code, param)


def test_images_are_refused_before_they_expand(client):
    bomb = png(Image.new("1", (3000, 3000)))  # 9 megapixels (the test server allows 4) in a few kB
    assert len(bomb) < 20_000
    status, _, body = client.post("/v1/embeddings", {"input": image_part(bomb)})
    assert_error(status, body, 400, "image_too_large")
    assert "3000 x 3000" in body["error"]["message"]
    truncated = png(Image.new("RGB", (64, 64), "red"))[:-40]  # the header is fine: the worker's decoding fails
    status, _, body = client.post("/v1/moderations", {"input": ["a cat", image_part(truncated)]})
    assert_error(status, body, 400, "invalid_image", "input[1]")


def test_oversized_bodies_are_413(served, client):
    big = json.dumps({"input": "x" * (MAX_BODY + 10)}).encode()
    status, _, body = client.request("POST", "/v1/embeddings", big)
    assert_error(status, body, 413, "request_too_large")
    # the same body without a Content-Length (chunked): refused while it is read
    connection = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=60)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}", "Transfer-Encoding": "chunked"}
    connection.request(
        "POST",
        "/v1/embeddings",
        body=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]),
        headers=headers,
        encode_chunked=True,
    )
    response = connection.getresponse()
    assert_error(response.status, json.loads(response.read()), 413)
    connection.close()


def test_the_api_key_is_required(served):
    for key in (None, "wrong-key", KEY + "x"):
        status, headers, body = Client(served["port"], key=key).post("/v1/embeddings", {"input": "a cat"})
        assert_error(status, body, 401, "invalid_api_key")
        assert headers.get("www-authenticate", headers.get("WWW-Authenticate")) == "Bearer"
    status, _, body = Client(served["port"], key=None).request("GET", "/metrics")
    assert_error(status, body, 401)
    status, _, body = Client(served["port"], key=None).request("GET", "/health")
    assert status == 200  # load balancers probe without the key


def test_unknown_routes_and_methods_are_json(client):
    status, _, body = client.request("GET", "/v1/chat/completions")
    assert_error(status, body, 404, "not_found")
    status, _, body = client.request("GET", "/v1/embeddings")
    assert_error(status, body, 405)


def test_the_server_stays_healthy_after_bad_requests(served, client):
    for case in BAD_REQUESTS.values():
        body, path = case[0], case[1]
        client.request("POST", path, body if isinstance(body, bytes) else json.dumps(body).encode())
    assert client.request("GET", "/health")[0] == 200
    status, _, body = client.post("/v1/embeddings", {"input": "still answering"})
    assert status == 200 and len(body["data"]) == 1
    metrics = client.request("GET", "/metrics")[2]
    assert 'status="500"' not in metrics  # no bad request was answered 500


# ------------------------------------------------------------------------------------------------------------
# The bounded queue, in-process
def test_the_queue_is_bounded_and_answers_503_with_retry_after():
    from hysac_hf.serve.edge import EdgeMiddleware, Metrics

    release = asyncio.Event()

    async def slow_app(scope, receive, send):
        await receive()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})

    edge = EdgeMiddleware(slow_app, Metrics(), api_key=None, max_body_bytes=1000, max_in_flight=2)

    async def call(path: str = "/v1/embeddings") -> tuple[int, dict, bytes]:
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": path,
            "headers": [(b"content-length", b"2")],
            "client": ("127.0.0.1", 1),
        }
        await edge(scope, receive, send)
        return sent[0]["status"], dict(sent[0]["headers"]), sent[1]["body"]

    async def scenario():
        admitted = [asyncio.create_task(call()) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert edge.in_flight == 2
        status, headers, body = await call()  # answered at once, while the two wait
        release.set()
        statuses = [(await task)[0] for task in admitted]
        return status, headers, json.loads(body), statuses

    status, headers, body, statuses = asyncio.run(scenario())
    assert status == 503 and headers[b"retry-after"] == b"1"
    assert_error(status, body, 503, "server_overloaded")
    assert statuses == [200, 200] and edge.in_flight == 0  # nothing admitted was lost


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "/nonexistent/hysac"], "cannot read a model config from /nonexistent/hysac"),
        (["--index", "photos"], "--index 'photos' must be NAME=DIR"),
        (["--index", "photos=/nonexistent/index"], "/nonexistent/index"),
    ],
)
def test_bad_arguments_fail_in_one_line(served, flags, message, capsys):
    from hysac_hf.serve.cli import main

    status = main(["--model", str(served["folder"]), "--port", str(free_port()), *flags])  # fails before serving
    assert status == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("hysac-serve: error: ") and message in line, line
