"""`handler.py`: the Inference Endpoints handler every saved folder ships, and the request path it shares with
`hysac-serve` (modeling/handler.py).

The end-to-end test loads a saved folder's `handler.py` the way huggingface-inference-toolkit does (a top-level module
from the file, the folder on `sys.path`, `EndpointHandler(folder)`, then `handler({"inputs": ..., "parameters":
...})`, with a PIL image as inputs for an image body), in a fresh process where hysac_hf cannot be imported, on this
transformers line and, when CI names it, the other. Oracles: `encode_*`, `distance_to_root` against the calibrated
threshold, and a float64 Lorentz ranking written out here.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import sys
import textwrap

import pytest
import torch
from PIL import Image

from hysac_hf.index import GalleryIndex
from hysac_hf.modeling.handler import (
    InputError,
    InputLimits,
    Request,
    RequestRunner,
    open_image,
    read_inputs,
)
from hysac_hf.modeling.pipeline_hysac import SafeRetrievalPipeline, UnsafeContentDetectionPipeline
from hysac_hf.testing import REPO_ROOT, run_without_hysac_hf, save_model_folder

PYTHONS = [sys.executable] + [p for p in [os.environ.get("HYSAC_OTHER_PYTHON")] if p]
NAMES = ["cat", "rocket", "camera", "logo"]  # grayscale and RGBA included
TEXTS = ["a photo of a cat", "a rocket on a launch pad", "blood everywhere in a dark alley at night", "a logo"]
ATOL = 1e-5


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def lorentz64(queries: torch.Tensor, gallery: torch.Tensor, c: float) -> torch.Tensor:
    q, g = queries.double(), gallery.double()
    inner = q @ g.T - torch.outer(torch.sqrt(1 / c + q.pow(2).sum(-1)), torch.sqrt(1 / c + g.pow(2).sum(-1)))
    return torch.acosh((-c * inner).clamp(min=1.0)) / math.sqrt(c)


def embed(model, processor, texts=(), images=()):
    with torch.no_grad():
        rows = [model.encode_text(**{k: v for k, v in processor(text=[t]).items()}) for t in texts]
        rows += [model.encode_image(processor(images=[image])["pixel_values"]) for image in images]
    return torch.cat(rows)


@pytest.fixture(scope="module")
def calibrated(tiny_clip_dir, processor, photos):
    """A tiny HySAC whose thresholds sit at the median distances of the test texts and photos (both labels occur)."""
    from hysac_hf.testing import tiny_hysac

    model = tiny_hysac(tiny_clip_dir)
    text_d = model.distance_to_root(embed(model, processor, texts=TEXTS)).sort().values
    image_d = model.distance_to_root(embed(model, processor, images=[photos[n] for n in NAMES])).sort().values
    model.config.unsafe_thresholds = {"text": float(text_d[1:3].mean()), "image": float(image_d[1:3].mean())}
    return model


# ------------------------------------------------------------------------------------------------------------
# Inputs
LIMITS = InputLimits(max_items=3, max_image_pixels=10_000, max_text_chars=50)


@pytest.mark.parametrize(
    ("inputs", "code", "param"),
    [
        ([], "empty_input", "input"),
        ("   ", "empty_input", "input"),
        (["a", "b", "c", "d"], "too_many_inputs", "input"),
        ("x" * 51, "text_too_long", "input"),
        ([1, 2, 3], "invalid_input", "input[0]"),
        (
            {"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}},
            "invalid_image",
            "input.image_url.url",
        ),
        (
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}},
            "invalid_image",
            "input.image_url.url",
        ),
        (
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}},
            "invalid_image",
            "input.image_url.url",
        ),
        (
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}},
            "remote_images_disabled",
            "input.image_url.url",
        ),
        ({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, "invalid_image", "input.image_url.url"),
        ({"type": "audio", "data": "..."}, "invalid_input", "input"),
        (["ok", 7], "invalid_input", "input[1]"),
    ],
)
def test_inputs_are_refused_with_the_field_and_a_code(inputs, code, param):
    with pytest.raises(InputError) as caught:
        read_inputs(inputs, LIMITS)
    assert caught.value.code == code and caught.value.param == param and caught.value.status == 400


def test_images_are_checked_from_their_header_before_decoding():
    bomb = png_bytes(Image.new("1", (1000, 1000)))  # 1,000,000 pixels in a few kB
    assert len(bomb) < 5_000
    with pytest.raises(InputError, match="1000 x 1000 image, more than 10000 pixels") as caught:
        read_inputs({"type": "image_url", "image_url": {"url": data_url(bomb)}}, LIMITS)
    assert caught.value.code == "image_too_large"
    truncated = png_bytes(Image.new("RGB", (50, 50), "red"))[:-40]  # a sound header, a broken stream
    ((kind, data),) = read_inputs({"type": "image_url", "image_url": {"url": data_url(truncated)}}, LIMITS)
    assert kind == "image" and data == truncated  # the header is fine: decoding is what fails
    with pytest.raises(InputError, match="cannot be decoded"):
        open_image(data, LIMITS)


def test_content_parts_read_as_the_texts_and_images_they_hold(photos):
    png = png_bytes(photos["logo"])
    items = read_inputs(
        ["plain", {"type": "text", "text": "part"}, {"type": "image_url", "image_url": data_url(png)}],
        InputLimits(),
    )
    assert items[:2] == [("text", "plain"), ("text", "part")]
    assert items[2] == ("image", png)
    decoded = open_image(items[2][1], InputLimits())
    assert decoded.size == photos["logo"].size and decoded.mode == photos["logo"].mode


# ------------------------------------------------------------------------------------------------------------
# The batched request path
def test_one_bad_request_does_not_disturb_the_batch(calibrated, processor, photos):
    detector = UnsafeContentDetectionPipeline(model=calibrated, processor=processor, device="cpu")
    retriever = SafeRetrievalPipeline(model=calibrated, processor=processor, device="cpu")
    runner = RequestRunner(detector, retriever, forward_batch=3)
    images = [photos[n] for n in NAMES]
    requests = [
        Request("feature-extraction", [("text", TEXTS[0]), ("image", images[0])]),
        Request("unsafe-content-detection", [("text", t) for t in TEXTS[1:]] + [("image", i) for i in images[1:]]),
        Request("safe-retrieval", [("text", "a cat")], {"index": "missing"}),
        Request("unsafe-content-detection", [("text", "a cat")], {"threshold": "high"}),
        Request("feature-extraction", [("text", "a cat")], {"top_k": 2}),
    ]
    results, forwards = runner.run(requests)
    # texts (4) in forwards of at most 3, then images (4): every item of the valid requests, once
    assert forwards == [("text", 3), ("text", 1), ("image", 3), ("image", 1)]
    expected = embed(calibrated, processor, texts=TEXTS[:1], images=images[:1])
    torch.testing.assert_close(results[0]["embeddings"], expected, atol=ATOL, rtol=0)
    assert results[0]["tokens"] == len(processor.tokenizer(TEXTS[0])["input_ids"])
    distances = calibrated.distance_to_root(embed(calibrated, processor, texts=TEXTS[1:], images=images[1:]))
    thresholds = calibrated.config.unsafe_thresholds
    for result, distance, modality in zip(results[1], distances.tolist(), ["text"] * 3 + ["image"] * 3):
        assert result["score"] == pytest.approx(distance, abs=ATOL) and result["modality"] == modality
        assert result["label"] == ("unsafe" if distance > thresholds[modality] else "safe")
    assert isinstance(results[2], InputError) and results[2].status == 404 and results[2].param == "index"
    assert isinstance(results[3], InputError) and "threshold='high' must be a finite number" in str(results[3])
    assert isinstance(results[4], InputError) and results[4].code == "unknown_parameter"


# ------------------------------------------------------------------------------------------------------------
# handler.py in every saved folder, loaded as Inference Endpoints loads it
def test_every_saved_folder_ships_the_handler(model_dir):
    shipped = (model_dir / "handler.py").read_bytes()
    assert shipped == (REPO_ROOT / "modeling" / "handler.py").read_bytes()
    assert "from ." not in shipped.decode()  # the toolkit imports it as a top-level file


TOOLKIT = textwrap.dedent(
    """
    import base64, importlib.util, json, sys
    from PIL import Image

    folder, out_path, paths, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    # what huggingface_inference_toolkit.utils.check_and_register_custom_pipeline_from_directory does
    spec = importlib.util.spec_from_file_location("handler.EndpointHandler", folder + "/handler.py")
    sys.path.insert(0, folder)
    module = importlib.util.module_from_spec(spec)
    sys.modules["handler.EndpointHandler"] = module
    spec.loader.exec_module(module)
    handler = module.EndpointHandler(folder)

    def url(path):
        data = base64.b64encode(open(path, "rb").read()).decode()
        return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + data}}

    search = {"task": "safe-retrieval", "index": "photos", "top_k": 3, "policy": "retain"}
    EMBED = "feature-extraction"
    result = {
        "one_text": handler({"inputs": texts[0]}),
        "image_body": handler({"inputs": Image.open(paths[0])}),  # an image/png request body, decoded by the toolkit
        "texts": handler({"inputs": texts, "parameters": {"task": "unsafe-content-detection"}}),
        "images": handler({"inputs": [url(p) for p in paths]}),
        "embeddings": handler({"inputs": texts + [url(p) for p in paths], "parameters": {"task": EMBED}}),
        "search": handler({"inputs": texts, "parameters": search}),
    }
    for bad in ({"inputs": []}, {"inputs": "a", "parameters": {"task": "safe-retrieval", "index": "nope"}}):
        try:
            handler(bad)
        except ValueError as error:
            result.setdefault("errors", []).append([type(error).__name__, str(error), error.status])
    with open(out_path, "w") as handle:
        json.dump(result, handle)
    """
)


@pytest.mark.slow
@pytest.mark.main_line  # it runs both lines itself (PYTHONS): once is enough
@pytest.mark.parametrize("python", PYTHONS, ids=lambda p: "this-python" if p == sys.executable else "other-line")
def test_endpoint_handler_without_hysac_hf(calibrated, processor, photos, tmp_path, python):
    folder = save_model_folder(calibrated, processor, tmp_path / "repo")
    images = [photos[n] for n in NAMES]
    GalleryIndex.from_images(
        calibrated, processor, images, metadata=[{"name": n} for n in NAMES], show_progress=False
    ).save(folder / "photos")
    paths = []
    for name, image in zip(NAMES, images):
        paths.append(str(tmp_path / f"{name}.png"))
        image.save(paths[-1])
    out = tmp_path / "out.json"
    run = run_without_hysac_hf(
        TOOLKIT, tmp_path, python=python, args=[str(folder), str(out), json.dumps(paths), json.dumps(TEXTS)]
    )
    assert run.returncode == 0, run.stderr[-4000:]
    got = json.loads(out.read_text())

    opened = [Image.open(p) for p in paths]
    text_embeds = embed(calibrated, processor, texts=TEXTS)
    image_embeds = embed(calibrated, processor, images=opened)
    thresholds = calibrated.config.unsafe_thresholds
    text_d = calibrated.distance_to_root(text_embeds).tolist()
    image_d = calibrated.distance_to_root(image_embeds).tolist()
    assert got["one_text"]["score"] == pytest.approx(text_d[0], abs=ATOL)
    assert got["image_body"]["score"] == pytest.approx(image_d[0], abs=ATOL)
    for results, distances, modality in ((got["texts"], text_d, "text"), (got["images"], image_d, "image")):
        assert [r["modality"] for r in results] == [modality] * len(distances)
        assert [r["score"] for r in results] == pytest.approx(distances, abs=ATOL)
        assert [r["label"] for r in results] == ["unsafe" if d > thresholds[modality] else "safe" for d in distances]
    assert {r["label"] for r in got["texts"] + got["images"]} == {"safe", "unsafe"}
    torch.testing.assert_close(
        torch.tensor(got["embeddings"]), torch.cat([text_embeds, image_embeds]), atol=ATOL, rtol=0
    )

    distances = lorentz64(text_embeds, image_embeds, float(calibrated.curvature.detach()))
    for result, row in zip(got["search"], distances):
        order = sorted(range(len(NAMES)), key=lambda j: (float(row[j]), j))[:3]
        assert [r["index"] for r in result["results"]] == order and not result["redirected"]
        assert [r["name"] for r in result["results"]] == [NAMES[j] for j in order]
        assert [r["distance"] for r in result["results"]] == pytest.approx([float(row[j]) for j in order], abs=ATOL)
    assert got["errors"][0][0] == "InputError" and "inputs is empty" in got["errors"][0][1]
    assert got["errors"][1][2] == 404 and "no index named 'nope'; this service searches: photos" in got["errors"][1][1]
