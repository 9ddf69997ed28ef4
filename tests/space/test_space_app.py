"""The Gradio Space (space/app.py): its setup and cache, its handlers, and the app itself in a real headless browser.

Oracles: embeddings of the gallery's PNG files from `HySACProcessor` + `encode_image`, a float64 Lorentz ranking and
the authors' reference traversal written out here, mini-ViSU's own unsafe captions, and the two pipelines loaded
with `transformers.pipeline(..., trust_remote_code=True)` for what the page must show.

The browser test drives Debian's chromium through selenium; where no chromium can be had it is skipped with the
reason, except in CI (`CI` set), where that is a failure (.ci/run installs chromium). Gradio cannot share an
environment with transformers 4 (it needs huggingface_hub >= 1, transformers 4 pins < 1), so the Space runs, and
these tests run in CI (marker main_line), on the transformers 5 line; without gradio only the browser tests skip.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image

from hysac_hf import HySACModel, HySACProcessor
from hysac_hf.data.mini_visu import DATA_DIR, apply_marker, load_photo, photo_specs
from hysac_hf.testing import REPO_ROOT, TINY_BOUNDS, free_port, stop_process

# The Space runs on the transformers 5 line only (gradio); scripts/test.sh runs main_line tests there.
pytestmark = pytest.mark.main_line

APP = REPO_ROOT / "space" / "app.py"
IN_CI = bool(os.environ.get("CI"))
TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
CHECK_TEXT = "a ginger tabby cat looking at the camera"
QUERY_TEXT = "[UNSAFE] a rocket standing on a launch pad crossed by a crimson zorblax band"
TOP_K = 5
ATOL = 1e-5  # float32 noise between batch shapes (the page shows the pipeline's own numbers: measured 0)
FAR_OFFSET = 100.0  # traversal_offset: tanh((b - offset) / c) = -1, so the traversal threshold b' equals b
WAIT_S = 180  # longest wait for the app or the page on a loaded machine
RESULT_MARKS = ("[data-label]", "[data-message]", "[data-redirected]")  # the app's verdict, message, summary


def load_app():
    spec = importlib.util.spec_from_file_location("hysac_space_app", APP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


app = load_app()


# ------------------------------------------------------------------------------------------------------------
# Independent oracles
def embed_images(model, processor, images) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_image(processor(images=list(images))["pixel_values"])


def embed_texts(model, processor, texts) -> torch.Tensor:
    batch = processor(text=list(texts))
    with torch.no_grad():
        return model.encode_text(batch["input_ids"], batch["attention_mask"])


def distance_to_root64(x: torch.Tensor, c: float) -> torch.Tensor:
    """asinh(sqrt(c) ||x||) / sqrt(c) in float64."""
    return torch.asinh(math.sqrt(c) * x.double().norm(dim=-1)) / math.sqrt(c)


def lorentz_distances64(queries: torch.Tensor, gallery: torch.Tensor, c: float) -> torch.Tensor:
    q, g = queries.double(), gallery.double()
    inner = q @ g.T - torch.outer(torch.sqrt(1 / c + q.pow(2).sum(-1)), torch.sqrt(1 / c + g.pow(2).sum(-1)))
    return torch.acosh((-c * inner).clamp(min=1.0)) / math.sqrt(c)


def reference_traversal64(query: torch.Tensor, bound: float, offset: float, c: float) -> tuple[torch.Tensor, bool]:
    """The authors' rule: beyond b' = b + tanh((b - offset) / c) + 1, rescale the space components to norm b'."""
    threshold = bound + math.tanh((bound - offset) / c) + 1
    q = query.double()
    beyond = bool(distance_to_root64(q[None], c)[0] > threshold)
    return (q / q.norm() * threshold if beyond else q), beyond


# ------------------------------------------------------------------------------------------------------------
# Fixtures: a tiny HySAC folder calibrated around the test's inputs, and the Space's cache prepared for it
def check_image() -> Image.Image:
    """The uploaded picture: mini-ViSU's cat photo with the crimson band marker (not a gallery file)."""
    return apply_marker(load_photo("cat").resize((192, 128)), "crimson_band")


@pytest.fixture(scope="module")
def space_model(tiny_clip_dir, tmp_path_factory):
    """A tiny HySAC saved with bounds and thresholds chosen from the distances of the test's inputs, so that the
    uploaded image is unsafe, the checked text safe, and the text query lies beyond the safe-image region (its
    traversal threshold b' = 0.7 x the query's distance to the root under bound up_95), so redirect moves it."""
    folder = tmp_path_factory.mktemp("space_model") / "hysac"
    model = HySACModel.from_clip(tiny_clip_dir, bounds=TINY_BOUNDS)
    with torch.no_grad():
        model.curv.fill_(math.log(1.7))
        model.visual_alpha.fill_(math.log(0.3))
        model.textual_alpha.fill_(math.log(0.25))
    model.eval()
    processor = HySACProcessor.from_pretrained(tiny_clip_dir)
    c = float(model.curvature.detach())
    d_image = float(distance_to_root64(embed_images(model, processor, [check_image()]), c)[0])
    d_text, d_query = distance_to_root64(embed_texts(model, processor, [CHECK_TEXT, QUERY_TEXT]), c).tolist()
    bounds = json.loads(json.dumps(TINY_BOUNDS))
    # b' = b with the far offset: the query lies beyond up_95 (redirected) and beyond low_05 by more.
    bounds["V"] = {"low_05": 0.5 * d_query, "avg": 0.6 * d_query, "up_95": 0.7 * d_query}
    model.config.bounds = bounds
    model.config.traversal_offset = FAR_OFFSET
    model.config.unsafe_thresholds = {"image": 0.9 * d_image, "text": 1.1 * d_text}
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prepared(space_model, tmp_path_factory):
    """The Space's cache for `space_model` (gallery photos and index), built by `app.prepare`."""
    cache = tmp_path_factory.mktemp("space_cache")
    return app.prepare(cache, model=str(space_model))


@pytest.fixture(scope="module")
def pipelines(space_model):
    from transformers import pipeline

    return (
        pipeline("unsafe-content-detection", model=str(space_model), trust_remote_code=True),
        pipeline("safe-retrieval", model=str(space_model), trust_remote_code=True),
    )


@pytest.fixture(scope="module")
def space(prepared):
    return app.HySACSpace(prepared)


def data_attributes(html_text: str, tag_class: str) -> dict[str, str]:
    """The `data-*` attributes of the first element with class `tag_class` in an HTML fragment."""
    from html.parser import HTMLParser

    found: dict[str, str] = {}

    class Parser(HTMLParser):
        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if not found and tag_class in (attrs.get("class") or "").split():
                found.update({k[5:]: v for k, v in attrs.items() if k.startswith("data-")})

    Parser().feed(html_text)
    return found


def result_rows(html_text: str) -> list[dict[str, str]]:
    from html.parser import HTMLParser

    rows: list[dict[str, str]] = []

    class Parser(HTMLParser):
        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "tr" and "hysac-result" in (attrs.get("class") or "").split():
                rows.append({k[5:]: v for k, v in attrs.items() if k.startswith("data-")})

    Parser().feed(html_text)
    return rows


# ------------------------------------------------------------------------------------------------------------
# The Space's files
def test_readme_metadata_block_is_a_valid_space_card():
    """The README's metadata block, as the Hub reads it (huggingface_hub's SpaceCard), names this app and a gradio
    version that requirements.txt and the installed gradio (on the 5.x line) agree with."""
    from huggingface_hub import SpaceCard
    from packaging.requirements import Requirement
    from packaging.version import Version

    card = SpaceCard.load(APP.parent / "README.md")
    data = card.data.to_dict()
    for key in ("title", "emoji", "colorFrom", "colorTo", "sdk", "sdk_version", "app_file", "pinned", "license"):
        assert key in data, key
    assert data["sdk"] == "gradio" and (APP.parent / data["app_file"]) == APP
    assert data["colorFrom"] in {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
    assert data["colorTo"] in {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
    assert data["pinned"] is False and data["license"] == "apache-2.0"
    requirements = {}
    for line in (APP.parent / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            requirements[requirement.name] = requirement
    assert set(requirements) == {"torch", "hysac-hf", "gradio"}
    assert requirements["gradio"].specifier.contains(Version(data["sdk_version"]))
    if importlib.util.find_spec("gradio") is not None:
        import gradio

        assert Version(gradio.__version__).major == Version(data["sdk_version"]).major


# ------------------------------------------------------------------------------------------------------------
# Setup and cache
def test_gallery_items_are_the_photos_plain_and_marked_with_mini_visus_captions():
    specs = photo_specs()
    items = app.gallery_items()
    markers = [m["tag"] for m in specs["markers"]]
    assert len(items) == len(specs["photos"]) * (1 + len(markers))
    assert len({item["path"] for item in items}) == len(items)
    for photo in specs["photos"]:
        rows = [item for item in items if item["photo"] == photo["name"]]
        assert [row["marker"] for row in rows] == ["", *markers]
        assert [row["safe"] for row in rows] == [True] + [False] * len(markers)
        assert rows[0]["caption"] == photo["captions"][0]
    # A marked photo's caption is what mini-ViSU itself writes as the unsafe caption of that photo and marker.
    pairs = {}
    for line in (DATA_DIR / "mini_visu.jsonl").read_text().splitlines():
        row = json.loads(line)
        pairs[(row["safe"], row["tag"])] = row["nsfw"]
    checked = 0
    for item in items:
        first_caption = next(p["captions"][0] for p in specs["photos"] if p["name"] == item["photo"])
        if item["marker"] and (first_caption, item["marker"]) in pairs:
            assert item["caption"] == pairs[(first_caption, item["marker"])]
            checked += 1
    assert checked >= len(markers)


def test_train_epochs_reads_the_environment(monkeypatch):
    monkeypatch.delenv(app.EPOCHS_ENV, raising=False)
    assert app.train_epochs() == app.DEFAULT_EPOCHS == 10
    monkeypatch.setenv(app.EPOCHS_ENV, "3")
    assert app.train_epochs() == 3
    for bad in ("0", "-2", "two", "1.5"):
        monkeypatch.setenv(app.EPOCHS_ENV, bad)
        with pytest.raises(ValueError, match=app.EPOCHS_ENV):
            app.train_epochs()


def test_prepared_index_holds_the_gallery_photos(prepared, space_model):
    """The saved index is the gallery's PNG files embedded by this model, row for row, with their metadata."""
    from hysac_hf.index import GalleryIndex

    model = HySACModel.from_pretrained(space_model).eval()
    processor = HySACProcessor.from_pretrained(space_model)
    files = sorted(p.name for p in prepared.gallery.glob("*.png"))
    assert files == sorted(item["path"] for item in prepared.items)
    index = GalleryIndex.load(prepared.index, model=model, processor=processor)
    assert index.metadata == prepared.items
    images = []
    for item in prepared.items:
        with Image.open(prepared.gallery / item["path"]) as image:
            images.append(image.convert("RGB"))
    assert max(max(image.size) for image in images) == app.GALLERY_SIDE
    expected = embed_images(model, processor, images)
    torch.testing.assert_close(index.embeddings, expected, atol=ATOL, rtol=0)
    assert prepared.modality == "image"


def test_prepare_reuses_the_cache_and_rebuilds_for_another_model(space_model, tiny_clip_dir, tmp_path, caplog):
    import logging

    model_dir = tmp_path / "model"
    shutil.copytree(space_model, model_dir)
    cache = tmp_path / "cache"
    first = app.prepare(cache, model=str(model_dir))
    embeddings = first.index / "embeddings.safetensors"
    photo = first.gallery / first.items[0]["path"]
    stamps = (embeddings.stat().st_ino, embeddings.stat().st_mtime_ns, photo.stat().st_mtime_ns)

    with caplog.at_level(logging.INFO, logger="hysac_space"):
        again = app.prepare(cache, model=str(model_dir))
    assert again.index == first.index
    assert (embeddings.stat().st_ino, embeddings.stat().st_mtime_ns, photo.stat().st_mtime_ns) == stamps
    assert "Reusing the gallery index" in caplog.text and "Reusing the 80 gallery photos" in caplog.text

    # Another model at the same path (other weights and curvature): its probe differs, so the index is rebuilt.
    other = HySACModel.from_pretrained(model_dir)
    with torch.no_grad():
        other.visual_alpha.fill_(math.log(0.5))
        other.curv.fill_(math.log(1.3))
    other.save_pretrained(model_dir)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hysac_space"):
        rebuilt = app.prepare(cache, model=str(model_dir))
    assert "Rebuilding the gallery index" in caplog.text
    processor = HySACProcessor.from_pretrained(model_dir)
    images = [Image.open(rebuilt.gallery / item["path"]).convert("RGB") for item in rebuilt.items[:4]]
    from hysac_hf.index import GalleryIndex

    index = GalleryIndex.load(rebuilt.index, model=other.eval(), processor=processor)
    torch.testing.assert_close(index.embeddings[:4], embed_images(other, processor, images), atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------------------
# Handlers (what the tabs show), against the oracles and the pipelines
def test_check_matches_the_distance_to_the_root_and_the_threshold(space, space_model, tmp_path, pipelines):
    detector, _ = pipelines
    model = HySACModel.from_pretrained(space_model).eval()
    processor = HySACProcessor.from_pretrained(space_model)
    c = float(model.curvature.detach())
    path = tmp_path / "upload.png"
    check_image().save(path)

    verdict, figure = space.check_image(str(path))
    shown = data_attributes(verdict, "hysac-verdict")
    distance = float(distance_to_root64(embed_images(model, processor, [check_image()]), c)[0])
    threshold = model.config.unsafe_thresholds["image"]
    assert shown["label"] == "unsafe" == ("unsafe" if distance > threshold else "safe")
    assert float(shown["score"]) == pytest.approx(distance, abs=ATOL)
    assert float(shown["threshold"]) == threshold
    expected = detector(Image.open(path))
    assert (shown["label"], float(shown["score"])) == (expected["label"], pytest.approx(expected["score"], abs=ATOL))
    assert figure is not None

    verdict, _ = space.check_text(CHECK_TEXT)
    shown = data_attributes(verdict, "hysac-verdict")
    distance = float(distance_to_root64(embed_texts(model, processor, [CHECK_TEXT]), c)[0])
    assert shown["label"] == "safe" == ("unsafe" if distance > model.config.unsafe_thresholds["text"] else "safe")
    assert float(shown["score"]) == pytest.approx(distance, abs=ATOL)
    assert shown["modality"] == "text"


def test_check_refuses_empty_text_and_files_that_are_not_images(space, tmp_path):
    for empty in ("", "   \n", None):
        verdict, figure = space.check_text(empty)
        assert figure is None and "Type a text first" in verdict
    fake = tmp_path / "holiday.png"
    fake.write_text("this is not a picture")
    verdict, figure = space.check_image(str(fake))
    assert figure is None
    assert "holiday.png is not an image" in verdict and "upload a PNG" in verdict
    # Gradio's raw upload payload names the file by its original name.
    verdict, _ = space.check_image({"path": str(fake), "orig_name": "my-photo.jpg"})
    assert "my-photo.jpg is not an image" in verdict
    verdict, figure = space.check_image(None)
    assert figure is None and "Upload an image first" in verdict


def test_user_text_is_escaped_in_the_page(space):
    hostile = '<img src=x onerror="alert(1)"> & friends'
    verdict, _ = space.check_text(hostile)
    assert "<img" not in verdict and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt; &amp; friends" in verdict
    summary, _, _ = space.search_text(hostile, "retain", "up_95", 3)
    assert "<img" not in summary


@pytest.mark.parametrize("policy", ["redirect", "retain"])
def test_search_ranks_the_gallery_by_lorentz_distance(space, prepared, space_model, policy, pipelines):
    """Text search over the index: a float64 brute-force ranking of the gallery files' embeddings after the
    reference traversal under redirect (the query lies beyond b' by construction), the query as it is under retain."""
    _, retriever = pipelines
    model = HySACModel.from_pretrained(space_model).eval()
    processor = HySACProcessor.from_pretrained(space_model)
    c = float(model.curvature.detach())
    summary, pictures, table = space.search_text(QUERY_TEXT, policy, "up_95", TOP_K)

    query = embed_texts(model, processor, [QUERY_TEXT])[0]
    moved, beyond = reference_traversal64(query, model.config.bounds["V"]["up_95"], FAR_OFFSET, c)
    assert beyond  # the fixture's calibration puts the query beyond the safe-image region
    search = moved if policy == "redirect" else query.double()
    gallery = embed_images(model, processor, [Image.open(prepared.gallery / i["path"]) for i in prepared.items])
    distances = lorentz_distances64(search[None], gallery, c)[0].tolist()
    order = sorted(range(len(distances)), key=lambda j: (distances[j], j))[:TOP_K]

    rows = result_rows(table)
    assert [int(row["index"]) for row in rows] == order
    assert [float(row["distance"]) for row in rows] == pytest.approx([distances[j] for j in order], abs=1e-4)
    assert [row["caption"] for row in rows] == [prepared.items[j]["caption"] for j in order]
    assert [caption for _, caption in pictures] == [
        f"{rank}. {prepared.items[j]['caption']}  (d = {distances[j]:.3f})" for rank, j in enumerate(order, 1)
    ]
    assert [Path(path).name for path, _ in pictures] == [prepared.items[j]["path"] for j in order]

    shown = data_attributes(summary, "hysac-summary")
    assert shown["redirected"] == ("true" if policy == "redirect" else "false")
    assert float(shown["before"]) == pytest.approx(float(distance_to_root64(query[None], c)[0]), abs=ATOL)
    assert float(shown["after"]) == pytest.approx(float(distance_to_root64(search[None], c)[0]), abs=ATOL)
    expected = retriever(QUERY_TEXT, gallery=str(prepared.index), top_k=TOP_K, policy=policy)
    assert [r["index"] for r in expected["results"]] == order
    assert expected["redirected"] == (policy == "redirect")


def test_concurrent_events_give_the_sequential_answers(space):
    """Gradio runs several events at once (`concurrency()`); the handlers, called from many threads together, give
    exactly what they give one at a time (each pipeline is guarded by its own lock)."""
    from concurrent.futures import ThreadPoolExecutor

    calls = [("search", QUERY_TEXT, policy) for policy in ("redirect", "retain")] * 4 + [("check", CHECK_TEXT, None)] * 4
    def run(call):
        kind, text, policy = call
        return space.search_text(text, policy, "up_95", TOP_K) if kind == "search" else space.check_text(text)[0]

    sequential = [run(call) for call in calls]
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        concurrent = list(pool.map(run, calls))
    assert concurrent == sequential


def test_events_are_queued_several_at_once(space, monkeypatch):
    require_gradio()
    assert app.concurrency() == app.DEFAULT_CONCURRENCY > 1
    demo = app.build_ui(space)
    limits = {dependency.concurrency_limit for dependency in demo.fns.values()}
    assert limits == {"default"} and demo._queue.default_concurrency_limit == app.DEFAULT_CONCURRENCY
    monkeypatch.setenv("HYSAC_SPACE_CONCURRENCY", "0")
    with pytest.raises(ValueError, match="HYSAC_SPACE_CONCURRENCY='0' must be a positive integer"):
        app.concurrency()


def test_search_refusals_are_messages(space, tmp_path):
    summary, pictures, table = space.search_text("  ", "redirect", "up_95", 3)
    assert "Type a text query first" in summary and pictures == [] and table == ""
    fake = tmp_path / "query.webp"
    fake.write_bytes(b"RIFF\x00\x00\x00\x00WEBPnot really")
    summary, pictures, _ = space.search_image(str(fake), "redirect", "up_95", 3)
    assert "query.webp is not an image" in summary and pictures == []


def test_a_model_without_calibration_gets_the_pipelines_messages(tiny_clip_dir, tmp_path):
    """HYSAC_MODEL may name a folder without thresholds or bounds: Check and redirect say how to calibrate, retain
    still searches."""
    folder = tmp_path / "uncalibrated"
    model = HySACModel.from_clip(tiny_clip_dir)
    assert model.config.bounds is None and not model.config.unsafe_thresholds
    model.save_pretrained(folder)
    HySACProcessor.from_pretrained(tiny_clip_dir).save_pretrained(folder)
    space = app.HySACSpace(app.prepare(tmp_path / "cache", model=str(folder)))
    verdict, figure = space.check_text(CHECK_TEXT)
    assert figure is None and "no calibrated unsafe threshold" in verdict and "calibrate" in verdict
    summary, pictures, _ = space.search_text(QUERY_TEXT, "redirect", "up_95", 3)
    assert pictures == [] and "config.bounds is None" in summary and "policy=&#x27;retain&#x27;" in summary
    summary, pictures, table = space.search_text(QUERY_TEXT, "retain", "up_95", 3)
    assert len(pictures) == 3 and len(result_rows(table)) == 3
    assert data_attributes(summary, "hysac-summary")["redirected"] == "false" and "threshold b'" not in summary


def test_bounds_figure_draws_the_calibrated_bounds_and_the_item():
    from hysac_hf.modeling.configuration_hysac import CONTENT_KINDS
    from matplotlib.colors import to_hex

    figure = app.bounds_figure(TINY_BOUNDS, distance=0.83, threshold=0.77, modality="text")
    (ax,) = figure.axes
    bars = ax.patches
    assert len(bars) == len(CONTENT_KINDS)
    for bar, kind in zip(bars, CONTENT_KINDS):
        stats = TINY_BOUNDS[kind.key]
        assert bar.get_x() == pytest.approx(stats["low_05"])
        assert bar.get_width() == pytest.approx(stats["up_95"] - stats["low_05"])
        assert to_hex(bar.get_facecolor()) == (app.SAFE_COLOR if kind.is_safe else app.UNSAFE_COLOR)
        assert bar.get_alpha() == (0.75 if kind.modality == "text" else 0.2)
    vertical = {
        round(line.get_xdata()[0], 6): line for line in ax.get_lines() if line.get_xdata()[0] == line.get_xdata()[1]
    }
    assert to_hex(vertical[0.83].get_color()) == app.UNSAFE_COLOR  # beyond the threshold
    assert vertical[0.77].get_linestyle() == "--"
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"{k.key} {k.name}" for k in CONTENT_KINDS]
    low, high = ax.get_xlim()
    assert low < 0.15 and high > 1.20  # every bound and the item are visible
    safe = app.bounds_figure(None, distance=0.2, threshold=0.5, modality="image")
    assert not safe.axes[0].patches
    assert any(to_hex(line.get_color()) == app.SAFE_COLOR for line in safe.axes[0].get_lines())


# ------------------------------------------------------------------------------------------------------------
# The app in a real headless browser
def require_browser():
    """selenium + Debian's chromium and chromedriver, or a skip with the reason (a failure in CI)."""
    problems = []
    if importlib.util.find_spec("selenium") is None:
        problems.append("selenium is not installed (pip install selenium)")
    binary = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None
    )
    if binary is None or driver is None:
        problems.append("no chromium/chromedriver (apt-get install -y chromium chromium-driver)")
    if problems:
        message = "browser test needs " + "; ".join(problems)
        if IN_CI:
            pytest.fail(message + " — .ci/run installs them; CI must not skip this test")
        pytest.skip(message)
    return binary, driver


def require_gradio():
    if importlib.util.find_spec("gradio") is not None:
        return
    if TRANSFORMERS_MAJOR >= 5:
        message = "gradio is not installed: pip install -e '.[space]'"
        if IN_CI:
            pytest.fail(message + " (scripts/test.sh installs the space extra on the transformers 5 line)")
        pytest.skip(message)
    pytest.skip(
        "the Space runs on the transformers 5 line: gradio needs huggingface_hub >= 1, which transformers 4 excludes"
    )


class RunningApp:
    """`python space/app.py` in a subprocess on a free port; its output goes to a log file."""

    def __init__(self, workdir: Path, cache: Path, model: str | None = None, epochs: int | None = None):
        self.port = free_port()
        self.log = workdir / f"app-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if k not in (app.MODEL_ENV, app.EPOCHS_ENV)}
        env.update(
            HYSAC_SPACE_CACHE=str(cache),
            GRADIO_SERVER_NAME="127.0.0.1",
            GRADIO_SERVER_PORT=str(self.port),
            GRADIO_TEMP_DIR=str(workdir / "gradio"),
            HF_MODULES_CACHE=str(workdir / "hf_modules"),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
        )
        if model is not None:
            env[app.MODEL_ENV] = model
        if epochs is not None:
            env[app.EPOCHS_ENV] = str(epochs)
        self.handle = open(self.log, "w")  # noqa: SIM115 - the app writes to it until stop() closes it
        self.process = subprocess.Popen(
            [sys.executable, str(APP)], cwd=workdir, env=env, stdout=self.handle, stderr=subprocess.STDOUT
        )
        self.url = f"http://127.0.0.1:{self.port}/"

    def wait_ready(self, timeout: float) -> None:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the Space exited with {self.process.returncode}:\n{self.output()[-4000:]}")
            if "Running on local URL" in self.output():
                return
            time.sleep(0.5)
        pytest.fail(f"the Space was not serving after {timeout} s:\n{self.output()[-4000:]}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.process)
        self.handle.close()


class Page:
    """The Space in headless chromium (selenium): actions and what the page shows."""

    def __init__(self, url: str, binary: str, driver: str, profile: Path):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = binary
        for flag in (
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,1700",
            f"--user-data-dir={profile}",
        ):
            options.add_argument(flag)
        self.driver = webdriver.Chrome(service=Service(driver), options=options)
        self.driver.get(url)
        self.find("#check-text textarea", timeout=WAIT_S)

    def find(self, css: str, timeout: float = WAIT_S):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout).until(lambda d: d.find_element(By.CSS_SELECTOR, css))

    def xpath(self, path: str):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, WAIT_S).until(lambda d: d.find_element(By.XPATH, path))

    def html(self, css: str) -> str:
        from selenium.webdriver.common.by import By

        found = self.driver.find_elements(By.CSS_SELECTOR, css)
        return found[0].get_attribute("innerHTML") if found else ""

    def result(self, css: str) -> str:
        """The outer HTML of the app's result or message inside the component `css` ("" before the first)."""
        from selenium.webdriver.common.by import By

        selector = ", ".join(f"{css} {mark}" for mark in RESULT_MARKS)
        found = self.driver.find_elements(By.CSS_SELECTOR, selector)
        return found[0].get_attribute("outerHTML") if found else ""

    def after(self, css: str, action) -> str:
        """Run `action` (a click), then wait until the app's result or message in `css` is replaced; return it.
        (Consecutive steps of the tests always expect a different result.)"""
        from selenium.webdriver.support.ui import WebDriverWait

        before = self.result(css)
        action()
        WebDriverWait(self.driver, WAIT_S).until(lambda d: self.result(css) not in ("", before))
        return self.result(css)

    def upload(self, component: str, path: Path) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.find(f"#{component} input[type=file]").send_keys(str(path))
        WebDriverWait(self.driver, WAIT_S).until(  # the preview shows once the file is on the server
            lambda d: d.find_elements(By.CSS_SELECTOR, f"#{component} img")
        )

    def type(self, component: str, text: str) -> None:
        box = self.find(f"#{component} textarea")
        box.clear()
        box.send_keys(text)

    def click(self, element_id: str):
        return lambda: self.find(f"#{element_id}").click()

    def choose(self, component: str, value: str) -> None:
        self.xpath(f"//*[@id='{component}']//label[contains(., '{value}')]").click()

    def tab(self, name: str) -> None:
        self.xpath(f"//button[@role='tab' and contains(., '{name}')]").click()

    def screenshot(self, path: Path) -> Path:
        self.driver.save_screenshot(str(path))
        return path

    def close(self) -> None:
        self.driver.quit()


def test_space_in_a_headless_browser(prepared, space_model, pipelines, tmp_path):
    """Start the app on the prepared cache, upload an image, type texts, search with both policies, try hostile
    inputs, and check every number the page shows against the pipelines' own output for the same inputs."""
    require_gradio()
    binary, driver = require_browser()
    detector, retriever = pipelines
    cache = Path(prepared.index).parents[1]
    upload = tmp_path / "marked-cat.png"
    check_image().save(upload)
    not_image = tmp_path / "notes.png"
    not_image.write_text("a text file with an image name")

    running = RunningApp(tmp_path, cache, model=str(space_model))
    page = None
    try:
        running.wait_ready(WAIT_S)
        assert "Reusing the gallery index" in running.output()  # the test's cache, not a new build
        page = Page(running.url, binary, driver, tmp_path / "chromium-profile")
        assert str(space_model) in page.find("#model-info").text

        # Check tab: an image, a text, an empty text.
        page.upload("check-image", upload)
        shown = data_attributes(page.after("#check-result", page.click("check-image-button")), "hysac-verdict")
        expected = detector(Image.open(upload))
        assert shown["label"] == expected["label"] == "unsafe"
        assert float(shown["score"]) == pytest.approx(expected["score"], abs=ATOL)
        assert float(shown["threshold"]) == expected["threshold"]
        page.find("#check-plot img")  # the bounds plot is drawn
        page.screenshot(tmp_path / "space-check.png")

        page.type("check-text", CHECK_TEXT)
        shown = data_attributes(page.after("#check-result", page.click("check-text-button")), "hysac-verdict")
        expected = detector(text=CHECK_TEXT)
        assert (shown["label"], shown["modality"]) == (expected["label"], "text") == ("safe", "text")
        assert float(shown["score"]) == pytest.approx(expected["score"], abs=ATOL)

        page.type("check-text", " ")
        message = page.after("#check-result", page.click("check-text-button"))
        assert "Type a text first" in message

        # Search tab: the same unsafe text query, redirected then retained.
        page.tab("Search")
        page.type("search-text", QUERY_TEXT)
        for policy in ("redirect", "retain"):
            page.choose("search-policy", policy)
            summary = page.after("#search-summary", page.click("search-text-button"))
            shown = data_attributes(summary, "hysac-summary")
            rows = result_rows(page.html("#search-results"))
            expected = retriever(QUERY_TEXT, gallery=str(prepared.index), top_k=app.DEFAULT_TOP_K, policy=policy)
            assert shown["redirected"] == str(expected["redirected"]).lower() == str(policy == "redirect").lower()
            assert float(shown["before"]) == pytest.approx(expected["query_distance_to_root"], abs=ATOL)
            assert float(shown["after"]) == pytest.approx(expected["search_distance_to_root"], abs=ATOL)
            if policy == "redirect":
                assert float(shown["after"]) < float(shown["before"])
                page.screenshot(tmp_path / "space-search.png")
            else:
                assert shown["after"] == shown["before"]
            assert [int(row["index"]) for row in rows] == [r["index"] for r in expected["results"]]
            assert [row["caption"] for row in rows] == [r["caption"] for r in expected["results"]]
            assert [float(row["distance"]) for row in rows] == pytest.approx(
                [r["distance"] for r in expected["results"]], abs=ATOL
            )
            assert len(page.driver.find_elements("css selector", "#search-gallery img")) >= 1

        # A file that is not an image, as the image query.
        page.upload("search-image", not_image)
        summary = page.after("#search-summary", page.click("search-image-button"))
        assert "notes.png is not an image" in summary
        page.screenshot(tmp_path / "space-search-error.png")
    finally:
        if page is not None:
            page.close()
        running.stop()
    assert "Traceback" not in running.output(), running.output()[-4000:]


@pytest.mark.slow
def test_first_start_without_arguments_trains_caches_and_reuses(tmp_path, pipelines):
    """No HYSAC_MODEL: the first start trains the main job's tiny HySAC (1 epoch here; the Space's default is 10)
    and indexes the gallery; the page checks a text as the exported model's pipeline does; a second start reuses
    the trained model and the index without training."""
    require_gradio()
    binary, driver = require_browser()
    from transformers import pipeline

    cache = tmp_path / "cache"
    running = RunningApp(tmp_path, cache, epochs=1)
    page = None
    try:
        running.wait_ready(900)
        page = Page(running.url, binary, driver, tmp_path / "chromium-profile")
        page.type("check-text", QUERY_TEXT)
        shown = data_attributes(page.after("#check-result", page.click("check-text-button")), "hysac-verdict")
    finally:
        if page is not None:
            page.close()
        running.stop()
    first_log = running.output()
    assert "First start: training the tiny HySAC" in first_log and "epoch 1:" in first_log
    model_dir = cache / app.DEMO_FOLDER / "model"
    detector = pipeline("unsafe-content-detection", model=str(model_dir), trust_remote_code=True)
    expected = detector(text=QUERY_TEXT)
    assert shown["label"] == expected["label"]
    assert float(shown["score"]) == pytest.approx(expected["score"], abs=ATOL)
    assert float(shown["threshold"]) == expected["threshold"]

    weights = model_dir / "model.safetensors"
    stamp = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    again = RunningApp(tmp_path, cache, epochs=1)
    try:
        again.wait_ready(WAIT_S)
    finally:
        again.stop()
    log = again.output()
    assert "Reusing the tiny HySAC" in log and "Reusing the gallery index" in log
    assert "First start" not in log and "epoch 1:" not in log
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == stamp
