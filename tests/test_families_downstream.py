"""Everything downstream of the model on every non-CLIP base family (SigLIP, SigLIP 2 NaFlex, MetaCLIP 2): both
pipelines, the gallery index, calibration, evaluation, sentence-transformers, the Space and the service's request
path (handler.py). (CLIP is covered by the suites of each of these.) Oracles: the in-process model's own `encode_*` on its processor's inputs, float64 Lorentz
distances written out here, and, for the index, a brute-force ranking."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from hysac_hf.loading import load_model
from hysac_hf.testing import TINY_BOUNDS

FAMILIES = ("siglip", "siglip2", "metaclip_2")
PHOTOS = ("cat", "astronaut", "rocket", "coffee")


def lorentz64(x: torch.Tensor, y: torch.Tensor, c: float) -> np.ndarray:
    """Geodesic distances between space components on the hyperboloid of curvature -c, float64."""
    x, y = x.double().numpy(), y.double().numpy()
    tx, ty = np.sqrt(1 / c + (x**2).sum(-1)), np.sqrt(1 / c + (y**2).sum(-1))
    return np.arccosh(np.maximum(c * (np.outer(tx, ty) - x @ y.T), 1.0)) / math.sqrt(c)


def embed(model, processor, images=None, texts=None) -> torch.Tensor:
    """The oracle: the model's own encoders on its own processor's inputs, one call."""
    with torch.no_grad():
        if images is not None:
            inputs = processor(images=list(images))
            return model.encode_image(**{k: v for k, v in inputs.items() if k != "input_ids"})
        inputs = processor(text=list(texts))
        return model.encode_text(inputs["input_ids"], inputs.get("attention_mask"))


@pytest.fixture(scope="module")
def pipelines(tiny_family_model_dir):
    from transformers import pipeline

    cache = {}

    def get(family):
        if family not in cache:
            folder = str(tiny_family_model_dir(family))
            cache[family] = (
                pipeline("unsafe-content-detection", model=folder, trust_remote_code=True),
                pipeline("safe-retrieval", model=folder, trust_remote_code=True),
            )
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_both_pipelines_answer_with_the_models_own_embeddings(family, tiny_family_model_dir, pipelines, photos, captions):
    model, processor = load_model(tiny_family_model_dir(family))
    detector, retriever = pipelines(family)
    c = float(model.curvature.detach())
    images = [photos[name] for name in PHOTOS]
    texts = [captions[name] for name in PHOTOS]
    image_embeds, text_embeds = embed(model, processor, images=images), embed(model, processor, texts=texts)
    # Detection: the score is the distance to the root; batches of 2 stack the family's inputs (NaFlex patches, 64
    # tokens) as a single call would.
    expected = np.arcsinh(math.sqrt(c) * image_embeds.double().norm(dim=-1).numpy()) / math.sqrt(c)
    threshold = float(np.sort(expected)[1:3].mean())  # between two of them: two safe, two unsafe
    found = detector(images, threshold=threshold, batch_size=2)
    np.testing.assert_allclose([r["score"] for r in found], expected, rtol=1e-5, atol=1e-5)
    assert [r["label"] for r in found] == ["unsafe" if d > threshold else "safe" for d in expected]
    found_text = detector(text=texts, threshold=0.4, batch_size=3)
    expected_text = np.arcsinh(math.sqrt(c) * text_embeds.double().norm(dim=-1).numpy()) / math.sqrt(c)
    np.testing.assert_allclose([r["score"] for r in found_text], expected_text, rtol=1e-5, atol=1e-5)
    # Retrieval: text queries against the image gallery, ranked by float64 Lorentz distance.
    results = retriever(texts, gallery=images, top_k=4, policy="retain", batch_size=2)
    distances = lorentz64(text_embeds, image_embeds, c)
    for row, result in zip(distances, results):
        assert [hit["index"] for hit in result["results"]] == np.argsort(row, kind="stable").tolist()
        np.testing.assert_allclose([hit["distance"] for hit in result["results"]], np.sort(row), rtol=1e-5)
    # Redirect moves a query beyond the safe-image region (the traversal is the model's own).
    far = retriever(images[0], gallery=texts, top_k=2, policy="redirect", bound="low_05")
    moved = model.traverse_to_safe(image_embeds[:1], target="text", bound="low_05")
    assert far["redirected"] == (not torch.equal(moved, image_embeds[:1]))
    assert far["search_distance_to_root"] == pytest.approx(float(model.distance_to_root(moved)[0]), rel=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_gallery_index_builds_saves_and_searches(family, tiny_family_model_dir, pipelines, photos, captions, tmp_path):
    from hysac_hf.encode import encode_texts
    from hysac_hf.index import GalleryIndex

    model, processor = load_model(tiny_family_model_dir(family))
    images = [photos[name] for name in PHOTOS]
    index = GalleryIndex.from_images(model, processor, images, show_progress=False)
    index.save(tmp_path / "index")
    loaded = GalleryIndex.load(tmp_path / "index", model=model, processor=processor)  # the model probe agrees
    queries = encode_texts(model, processor, [captions["rocket"], captions["cat"]], show_progress=False)
    hits = loaded.search(queries, k=4, policy="retain")
    distances = lorentz64(queries, embed(model, processor, images=images), float(model.curvature.detach()))
    for row, found in zip(distances, hits):
        assert [hit["index"] for hit in found["results"]] == np.argsort(row, kind="stable").tolist()
    _, retriever = pipelines(family)
    via_pipeline = retriever(captions["rocket"], gallery=str(tmp_path / "index"), top_k=4, policy="retain")
    assert [h["index"] for h in via_pipeline["results"]] == [h["index"] for h in hits[0]["results"]]


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_and_evaluation_commands(family, tiny_family_model_dir, tmp_path, capsys):
    from hysac_hf.calibration import main as calibrate_main
    from hysac_hf.encode import EmbeddingCache
    from hysac_hf.evaluation.cli import main as eval_main

    folder = tmp_path / "model"
    shutil.copytree(tiny_family_model_dir(family), folder)
    args = ["--model", str(folder), "--dataset", "mini-visu", "--split", "validation", "--max_samples", "20"]
    assert calibrate_main([*args, "--overwrite", "--batch_size", "8"]) == 0
    bounds = json.loads((folder / "config.json").read_text())["bounds"]
    assert bounds != TINY_BOUNDS and all(bounds[k]["low_05"] <= bounds[k]["up_95"] for k in "SVUG")
    capsys.readouterr()
    cache_dir = tmp_path / "cache"
    assert eval_main(["embed", *args, "--output", str(cache_dir), "--batch_size", "8"]) == 0
    cache = EmbeddingCache.load(cache_dir)
    model, processor = load_model(folder)
    # The cache holds the model's own embeddings of mini-ViSU's texts (64 tokens for SigLIP families).
    from hysac_hf.data import load_mini_visu

    rows = load_mini_visu("validation", max_samples=3)
    np.testing.assert_allclose(
        cache.embeds["S"][:3].numpy(), embed(model, processor, texts=rows["safe_text"]).numpy(), rtol=0, atol=1e-5
    )
    if family in ("siglip", "siglip2"):
        assert cache.logit_bias == pytest.approx(-3.5)
    capsys.readouterr()
    assert eval_main(["retrieval", "--cache", str(cache_dir), "--no_traversal"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report and json.dumps(report)  # the tables computed from this family's embeddings


@pytest.mark.slow
@pytest.mark.main_line  # sentence-transformers 6 needs transformers 5
@pytest.mark.parametrize("family", FAMILIES)
def test_sentence_transformers_embeds_as_the_model_and_ranks_by_lorentz(family, tiny_family_model_dir, photos, captions):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    if int(sentence_transformers.__version__.split(".")[0]) < 6:
        pytest.skip("sentence-transformers < 6 refuses HySAC (tests/modeling/test_sentence_transformers.py)")
    folder = tiny_family_model_dir(family)
    st = sentence_transformers.SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    model, processor = load_model(folder)
    texts = [captions[name] for name in PHOTOS]
    images = [photos[name] for name in PHOTOS]
    st_texts, st_images = st.encode(texts), st.encode(images)
    # sentence-transformers asks for padding=True: the SigLIP processor still pads to 64, so the embeddings agree.
    np.testing.assert_allclose(st_texts, embed(model, processor, texts=texts).numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(st_images, embed(model, processor, images=images).numpy(), rtol=0, atol=1e-5)
    assert st.similarity_fn_name == "lorentz"
    expected = -lorentz64(torch.from_numpy(st_images), torch.from_numpy(st_texts), float(model.curvature.detach()))
    np.testing.assert_allclose(st.similarity(st_images, st_texts).numpy(), expected, rtol=0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.main_line  # gradio runs on the transformers 5 line only
def test_space_serves_a_siglip_model_named_by_hysac_model(tiny_family_model_dir, photos, monkeypatch, tmp_path):
    """`HYSAC_MODEL=<a HySAC-on-SigLIP folder> python space/app.py`: the Space indexes its gallery with that model and
    its Check and Search tabs answer with its embeddings (64-token texts, SigLIP preprocessing)."""
    import importlib.util
    import re
    import sys

    pytest.importorskip("gradio")
    from hysac_hf.testing import REPO_ROOT

    spec = importlib.util.spec_from_file_location("hysac_space_app_families", REPO_ROOT / "space" / "app.py")
    app = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = app  # dataclasses look their module up there
    spec.loader.exec_module(app)

    folder = tmp_path / "siglip-model"
    shutil.copytree(tiny_family_model_dir("siglip"), folder)
    model, processor = load_model(folder)
    image = photos["cat"]
    distance = float(model.distance_to_root(embed(model, processor, images=[image]))[0])
    config = json.loads((folder / "config.json").read_text())
    config["unsafe_thresholds"] = {"image": distance / 2, "text": 100.0}
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv(app.MODEL_ENV, str(folder))
    assets = app.prepare(tmp_path / "cache")
    assert assets.model == str(folder)
    space = app.HySACSpace(assets)
    image.save(tmp_path / "upload.png")
    verdict, _ = space.check_image(str(tmp_path / "upload.png"))
    assert 'data-label="unsafe"' in verdict
    assert float(re.search(r'data-score="([^"]+)"', verdict).group(1)) == pytest.approx(distance, rel=1e-5)
    query = "a rocket on a launch pad"
    summary, pictures, table = space.search_text(query, "retain", "up_95", 3)
    from PIL import Image

    gallery = [Image.open(assets.gallery / item["path"]) for item in assets.items]
    gallery_embeds = embed(model, processor, images=gallery)
    distances = lorentz64(embed(model, processor, texts=[query]), gallery_embeds, float(model.curvature.detach()))[0]
    shown = [int(i) for i in re.findall(r'data-index="(\d+)"', table)]
    assert shown == np.argsort(distances, kind="stable")[:3].tolist() and len(pictures) == 3
    assert 'data-redirected="false"' in summary


@pytest.mark.parametrize("family", FAMILIES)
def test_the_service_request_path_answers_as_the_model(family, tiny_family_model_dir, photos, captions, tmp_path):
    """`hysac-serve` and Inference Endpoints run `handler.py` (the folder's own copy, loaded through its remote
    code): on every family its embeddings are the model's own, its detection scores the distances to the root, and its
    search over an index folder shipped inside the repository a float64 Lorentz ranking."""
    from hysac_hf.encode import encode_images
    from hysac_hf.index import GalleryIndex
    from hysac_hf.modeling.handler import EndpointHandler

    folder = tmp_path / "repo"
    shutil.copytree(tiny_family_model_dir(family), folder)
    model, processor = load_model(folder)
    images = [photos[name] for name in PHOTOS]
    GalleryIndex.from_embeddings(
        encode_images(model, processor, images, show_progress=False), "image", model=model, processor=processor
    ).save(folder / "photos")
    handler = EndpointHandler(str(folder))
    texts = [captions[name] for name in PHOTOS]
    text_embeds, image_embeds = embed(model, processor, texts=texts), embed(model, processor, images=images)
    got = torch.tensor(handler({"inputs": texts, "parameters": {"task": "feature-extraction"}}))
    torch.testing.assert_close(got, text_embeds, rtol=0, atol=1e-5)  # a batch of 4 texts: 64 tokens for SigLIP too
    c = float(model.curvature.detach())
    found = handler({"inputs": images[0], "parameters": {"threshold": 0.5}})
    expected = math.asinh(math.sqrt(c) * float(image_embeds[0].double().norm())) / math.sqrt(c)
    assert found["score"] == pytest.approx(expected, abs=1e-5) and found["label"] == ("unsafe" if expected > 0.5 else "safe")
    hits = handler({"inputs": texts[2], "parameters": {"task": "safe-retrieval", "index": "photos", "top_k": 4, "policy": "retain"}})
    row = lorentz64(text_embeds[2:3], image_embeds, c)[0]
    assert [hit["index"] for hit in hits["results"]] == np.argsort(row, kind="stable").tolist()
    np.testing.assert_allclose([hit["distance"] for hit in hits["results"]], np.sort(row), rtol=1e-5)
