"""The `unsafe-content-detection` and `safe-retrieval` pipelines (modeling/pipeline_hysac.py).

Oracles are independent of the pipeline code: embeddings from `HySACProcessor` + `encode_*`, distances to the root
from `distance_to_root`, rankings from a float64 Lorentz distance written out here, the authors' reference
traversal written out here, and gallery index folders written here by hand from the format's description. The
end-to-end runs load a saved folder with `pipeline(..., trust_remote_code=True)` in a fresh process without
hysac_hf, on this transformers line and, when CI names it (HYSAC_OTHER_PYTHON), on the other one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from hysac_hf.modeling.lorentz import mips_pool_vectors
from hysac_hf.modeling.gallery_hysac import PROBE_TEXTS
from hysac_hf.modeling.pipeline_hysac import (
    SafeRetrievalPipeline,
    UnsafeContentDetectionPipeline,
)
from PIL import Image
from safetensors.torch import save_file

from hysac_hf.testing import run_without_hysac_hf, save_model_folder, tiny_hysac

PYTHONS = [sys.executable] + [p for p in [os.environ.get("HYSAC_OTHER_PYTHON")] if p]
IMAGE_NAMES = ["astronaut", "cat", "coffee", "rocket", "camera", "logo"]  # camera is grayscale, logo RGBA
TEXTS = [
    "a photo of a cat",
    "a rocket on a launch pad",
    "a cup of coffee on a saucer",
    "a black and white photo of a man with a camera",
    "a logo",
    "an astronaut",
    "blood everywhere in a dark alley at night after the fight",
    "two people",
]
ATOL = 1e-5  # float32 noise between batch shapes and paddings (measured: ~3e-7)


# ------------------------------------------------------------------------------------------------------------
# Independent oracles
def embed_images(model, processor, images) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_image(processor(images=list(images))["pixel_values"])


def embed_texts(model, processor, texts) -> torch.Tensor:
    batch = processor(text=list(texts))  # padded to the longest of all the texts, the pipeline to its batch's
    with torch.no_grad():
        return model.encode_text(batch["input_ids"], batch["attention_mask"])


def lorentz_distances64(queries: torch.Tensor, gallery: torch.Tensor, c: float) -> torch.Tensor:
    """d(x, y) = acosh(-c <x, y>_L) / sqrt(c) in float64, with the time components from the hyperboloid."""
    q, g = queries.double(), gallery.double()
    q_time = torch.sqrt(1 / c + q.pow(2).sum(-1))
    g_time = torch.sqrt(1 / c + g.pow(2).sum(-1))
    inner = q @ g.T - torch.outer(q_time, g_time)
    return torch.acosh((-c * inner).clamp(min=1.0)) / math.sqrt(c)


def brute_force(queries: torch.Tensor, gallery: torch.Tensor, c: float, top_k: int):
    """Per query: the `top_k` gallery indices by (float64 distance, index), and their distances."""
    distances = lorentz_distances64(queries, gallery, c)
    ranked = []
    for row in distances.tolist():
        order = sorted(range(len(row)), key=lambda j: (row[j], j))[:top_k]
        ranked.append((order, [row[j] for j in order]))
    return ranked


def traversal_threshold64(bound: float, offset: float, c: float) -> float:
    return bound + math.tanh((bound - offset) / c) + 1


def reference_traversal(queries: torch.Tensor, bound: float, offset: float, c: float):
    """The authors' rule: rows farther from the root than b' get their space components rescaled to norm b'."""
    q = queries.double()
    threshold = traversal_threshold64(bound, offset, c)
    distance = torch.asinh(math.sqrt(c) * q.norm(dim=-1)) / math.sqrt(c)
    beyond = distance > threshold
    moved = torch.where(beyond[:, None], q / q.norm(dim=-1, keepdim=True) * threshold, q)
    return moved, beyond


def curvature(model) -> float:
    return float(model.curvature.detach())


def split_point(distances) -> float:
    """A threshold halfway between the two middle distances: both sides non-empty, no input near it."""
    ordered = sorted(float(d) for d in distances)
    low, high = ordered[len(ordered) // 2 - 1], ordered[len(ordered) // 2]
    assert high - low > 1e-3, "inputs too close to split robustly"
    return (low + high) / 2


def bounds_splitting(model, key: str, distances) -> dict:
    """The model's bounds with `key`'s up_95 solved (bisection) so that the traversal threshold b' splits `distances`."""
    target, offset, c = split_point(distances), model.config.traversal_offset, curvature(model)
    low, high = 0.0, target  # b + tanh((b - offset) / c) + 1 is increasing in b, and exceeds b
    assert traversal_threshold64(low, offset, c) < target
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if traversal_threshold64(middle, offset, c) < target else (low, middle)
    bounds = copy.deepcopy(model.config.bounds)
    bounds[key] = {"low_05": 0.8 * low, "avg": 0.9 * low, "up_95": low}
    return bounds


def write_index(folder, embeddings, modality, model, processor, metadata=None, with_faiss=False, **overrides):
    """A gallery index folder in format 1, written from the format's description (not by the code under test)."""
    folder.mkdir(parents=True)
    save_file({"embeddings": embeddings.float().contiguous()}, str(folder / "embeddings.safetensors"))
    probe = embed_texts(model, processor, PROBE_TEXTS)
    info = {
        "format": 1,
        "modality": modality,
        "count": embeddings.shape[0],
        "dim": embeddings.shape[1],
        "curvature": curvature(model),
        "model": "tiny-hysac",
        "model_probe": [[round(v, 6) for v in row] for row in probe.tolist()],
        "faiss": None,
        "embeddings_sha256": hashlib.sha256((folder / "embeddings.safetensors").read_bytes()).hexdigest(),
        "metadata": None,
    }
    if metadata is not None:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metadata), encoding="utf-8")
        info["metadata"] = "metadata.jsonl"
    if with_faiss:  # an IVF over the MIPS vectors, probing every cell (so its candidates are exact)
        import faiss

        vectors = mips_pool_vectors(embeddings.float(), curvature(model)).numpy()
        quantizer = faiss.IndexFlatIP(vectors.shape[1])
        index = faiss.IndexIVFFlat(quantizer, vectors.shape[1], 2, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.add(vectors)
        faiss.write_index(index, str(folder / "faiss.index"))
        info["faiss"] = {
            "type": "ivf",
            "params": {"nlist": 2, "nprobe": 2},
            "sha256": hashlib.sha256((folder / "faiss.index").read_bytes()).hexdigest(),
        }
    info.update(overrides)
    (folder / "index.json").write_text(json.dumps(info), encoding="utf-8")
    return folder


def folder_bytes(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------------------------------------
# Fixtures
@pytest.fixture(scope="module")
def model(tiny_clip_dir, processor, photos):
    """A tiny HySAC whose calibrated thresholds split the standard images and texts (both labels occur), and whose
    bounds make the traversal into safe images (V) split the standard text queries."""
    hysac = tiny_hysac(tiny_clip_dir)
    image_d = hysac.distance_to_root(embed_images(hysac, processor, [photos[n] for n in IMAGE_NAMES]))
    text_d = hysac.distance_to_root(embed_texts(hysac, processor, TEXTS))
    hysac.config.unsafe_thresholds = {"image": split_point(image_d), "text": split_point(text_d)}
    hysac.config.bounds = bounds_splitting(hysac, "V", text_d)
    return hysac


@pytest.fixture(scope="module")
def folder(model, processor, tmp_path_factory):
    return save_model_folder(model, processor, tmp_path_factory.mktemp("pipelines") / "hysac-tiny")


@pytest.fixture()
def detector(model, processor):
    return UnsafeContentDetectionPipeline(model=model, processor=processor, device="cpu")


@pytest.fixture()
def retriever(model, processor):
    return SafeRetrievalPipeline(model=model, processor=processor, device="cpu")


@pytest.fixture(scope="module")
def gallery_images(photos):
    """12 images: the six photos and their mirror images."""
    images = [photos[n] for n in IMAGE_NAMES]
    return images + [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in images]


# ------------------------------------------------------------------------------------------------------------
# Registration
def test_saved_folder_declares_both_pipelines(folder):
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"] == {
        "unsafe-content-detection": {
            "impl": "pipeline_hysac.UnsafeContentDetectionPipeline",
            "pt": ["AutoModel"],
            "tf": [],
            "type": "multimodal",
        },
        "safe-retrieval": {
            "impl": "pipeline_hysac.SafeRetrievalPipeline",
            "pt": ["AutoModel"],
            "tf": [],
            "type": "multimodal",
        },
    }
    # pipeline() resolves "pt" with getattr(transformers, name) and "impl" inside the folder.
    assert all(isinstance(getattr(transformers, name), type) for name in ("AutoModel",))
    source = (folder / "pipeline_hysac.py").read_text()
    assert "class UnsafeContentDetectionPipeline(" in source and "class SafeRetrievalPipeline(" in source
    for sibling in ("lorentz.py", "processing_hysac.py", "configuration_hysac.py", "traversal.py"):
        assert (folder / sibling).is_file(), sibling  # the pipeline file's relative imports ship too


def test_saving_a_pipeline_model_again_writes_class_names(folder, tmp_path):
    """`pipeline()` swaps the `pt` names for classes in the config it loaded (it may be the model's); saving the
    pipeline's model again still writes names."""
    pipe = transformers.pipeline("safe-retrieval", model=str(folder), trust_remote_code=True, device="cpu")
    pipe.model.config.custom_pipelines["safe-retrieval"]["pt"] = (
        transformers.AutoModel,
    )  # as transformers 4 leaves it
    pipe.model.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())["custom_pipelines"]
    assert saved["safe-retrieval"]["pt"] == ["AutoModel"]


def test_pipeline_file_imports_only_what_modeling_imports():
    """transformers 4 copies a local folder's remote code one relative import deep from the loaded file, then reads
    every file those import: a sibling that only pipeline_hysac.py imported would break `AutoModel.from_pretrained`."""
    import hysac_hf.modeling
    from transformers.dynamic_module_utils import get_relative_imports

    modeling_dir = Path(hysac_hf.modeling.__file__).parent
    pipeline_imports = set(get_relative_imports(modeling_dir / "pipeline_hysac.py"))
    assert pipeline_imports <= set(get_relative_imports(modeling_dir / "modeling_hysac.py"))
    assert "pipeline_hysac" in get_relative_imports(modeling_dir / "modeling_hysac.py")
    # pipeline() loads pipeline_hysac.py first: what the search engine imports must be one import deep from it too
    assert "gallery_hysac" in pipeline_imports
    assert set(get_relative_imports(modeling_dir / "gallery_hysac.py")) <= pipeline_imports


def test_images_need_the_hysac_processor(model, processor):
    """Without the HySACProcessor (the one reading of a picture) images are refused; texts need the tokenizer only."""
    texts_only = UnsafeContentDetectionPipeline(model=model, tokenizer=processor.tokenizer, device="cpu")
    assert texts_only(text="a cat", threshold=1.0)["modality"] == "text"
    with pytest.raises(ValueError, match=r"no processor \(a HySACProcessor\).*processor.save_pretrained"):
        texts_only(Image.new("RGB", (8, 8)), threshold=1.0)


# ------------------------------------------------------------------------------------------------------------
# unsafe-content-detection
def test_image_labels_are_distance_above_threshold(detector, model, processor, photos, tmp_path):
    images = [photos[n] for n in IMAGE_NAMES]
    distances = model.distance_to_root(embed_images(model, processor, images)).tolist()
    threshold = model.config.unsafe_thresholds["image"]
    paths = []
    for name, image in zip(IMAGE_NAMES, images):
        paths.append(str(tmp_path / f"{name}.png"))  # lossless: a path reads as the same picture
        image.save(paths[-1])
    for inputs in (images, [np.asarray(image) for image in images], paths):
        results = detector(inputs)
        assert isinstance(results, list) and len(results) == len(images)
        for result, distance in zip(results, distances):
            assert set(result) == {"label", "score", "threshold", "modality"}
            assert result["modality"] == "image" and result["threshold"] == threshold
            assert result["score"] == pytest.approx(distance, abs=ATOL)
            assert result["label"] == ("unsafe" if distance > threshold else "safe")
    labels = {result["label"] for result in results}
    assert labels == {"safe", "unsafe"}  # the threshold splits them: both branches are checked
    single = detector(images[4])  # grayscale, one input -> one dict
    assert isinstance(single, dict) and single["score"] == pytest.approx(distances[4], abs=ATOL)


def test_text_labels_are_distance_above_threshold(detector, model, processor):
    distances = model.distance_to_root(embed_texts(model, processor, TEXTS)).tolist()
    threshold = model.config.unsafe_thresholds["text"]
    results = detector(text=TEXTS)
    assert [r["modality"] for r in results] == ["text"] * len(TEXTS)
    for result, distance in zip(results, distances):
        assert result["score"] == pytest.approx(distance, abs=ATOL)
        assert result["label"] == ("unsafe" if distance > threshold else "safe")
    assert {r["label"] for r in results} == {"safe", "unsafe"}
    single = detector(text=TEXTS[-2])
    assert isinstance(single, dict) and single["score"] == pytest.approx(distances[-2], abs=ATOL)


def test_detection_batched_equals_unbatched(detector, photos):
    images = [photos[n] for n in IMAGE_NAMES]
    for kwargs in ({"inputs": images}, {"text": TEXTS}):  # texts of different lengths: padding in the batches
        one = detector(**kwargs)
        batched = detector(**kwargs, batch_size=3)
        assert [r["label"] for r in batched] == [r["label"] for r in one]
        np.testing.assert_allclose([r["score"] for r in batched], [r["score"] for r in one], rtol=0, atol=ATOL)


def test_threshold_override(detector, model, processor):
    distances = model.distance_to_root(embed_texts(model, processor, TEXTS)).tolist()
    threshold = sorted(distances)[1] + 1e-4  # only the two closest texts are safe
    results = detector(text=TEXTS, threshold=threshold)
    assert [r["label"] for r in results] == ["unsafe" if d > threshold else "safe" for d in distances]
    assert [r["label"] for r in results].count("safe") == 2
    assert {r["threshold"] for r in results} == {threshold}


def test_model_without_threshold_says_how_to_calibrate(detector, model, monkeypatch):
    monkeypatch.setattr(model.config, "unsafe_thresholds", None)
    with pytest.raises(
        ValueError, match=r"no calibrated unsafe threshold for images.*hysac-eval classify.*--calibrate accuracy --save"
    ):
        detector(Image.new("RGB", (40, 30)))
    with pytest.raises(ValueError, match="threshold for texts"):
        detector(text="a cat")
    assert detector(text="a cat", threshold=0.0)["label"] == "unsafe"  # an explicit threshold needs no calibration
    monkeypatch.setattr(model.config, "unsafe_thresholds", {"image": 1.0})
    with pytest.raises(ValueError, match="threshold for texts"):  # one modality calibrated is not the other
        detector(text="a cat")


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda d: d(), ValueError, "got neither"),
        (lambda d: d(Image.new("RGB", (8, 8)), text="a cat"), ValueError, "got both"),
        (lambda d: d([]), ValueError, "empty list"),
        (lambda d: d(text=[]), ValueError, "empty list"),
        (lambda d: d(text=["a cat", 3]), ValueError, "a text must be a string, got the int 3"),
        (lambda d: d([Image.new("RGB", (8, 8)), 3.5]), ValueError, "cannot read an image from the float 3.5"),
        (lambda d: d("no/such/file.png"), ValueError, "not an image file, an http.s. URL or a base64 image"),
        (lambda d: d(text="a cat", threshold="high"), ValueError, "must be a finite number"),
        (lambda d: d(text="a cat", threshold=float("nan")), ValueError, "must be a finite number"),
        (lambda d: d(text="a cat", top_k=3), TypeError, "unexpected arguments"),
    ],
)
def test_detection_refusals(detector, call, error, match):
    with pytest.raises(error, match=match):
        call(detector)


# ------------------------------------------------------------------------------------------------------------
# safe-retrieval
@pytest.mark.parametrize("policy", ["redirect", "retain"])
@pytest.mark.parametrize(
    ("query_modality", "gallery_modality"), [("text", "image"), ("image", "text"), ("image", "image")]
)
def test_retrieval_equals_brute_force(
    retriever, model, processor, photos, gallery_images, monkeypatch, policy, query_modality, gallery_modality
):
    if query_modality == "text":
        queries = TEXTS
        query_embeds = embed_texts(model, processor, queries)
    else:
        queries = [photos[n] for n in IMAGE_NAMES]
        query_embeds = embed_images(model, processor, queries)
    gallery = gallery_images if gallery_modality == "image" else TEXTS
    gallery_embeds = (
        embed_images(model, processor, gallery)
        if gallery_modality == "image"
        else embed_texts(model, processor, gallery)
    )
    key = "V" if gallery_modality == "image" else "S"  # the gallery's safe region
    root = model.distance_to_root(query_embeds)
    monkeypatch.setattr(model.config, "bounds", bounds_splitting(model, key, root))
    c = curvature(model)
    moved, beyond = reference_traversal(
        query_embeds, model.config.bounds[key]["up_95"], model.config.traversal_offset, c
    )
    assert 0 < int(beyond.sum()) < len(queries)  # some queries are redirected, some are not
    searched = moved if policy == "redirect" else query_embeds.double()
    top_k = 5
    expected = brute_force(searched, gallery_embeds, c, top_k)

    results = retriever(queries, gallery=gallery, top_k=top_k, policy=policy)
    assert len(results) == len(queries)
    for result, (indices, distances), is_beyond, distance, query_vector in zip(
        results, expected, beyond.tolist(), root.tolist(), searched
    ):
        assert result["redirected"] == (policy == "redirect" and is_beyond)
        assert result["query_distance_to_root"] == pytest.approx(distance, abs=ATOL)
        search_root = float(torch.asinh(math.sqrt(c) * query_vector.norm()) / math.sqrt(c))
        assert result["search_distance_to_root"] == pytest.approx(search_root, abs=ATOL)
        assert [r["index"] for r in result["results"]] == indices
        np.testing.assert_allclose([r["distance"] for r in result["results"]], distances, rtol=0, atol=ATOL)
        assert all(set(r) == {"index", "distance"} for r in result["results"])


def test_retain_never_moves_the_query(retriever, model, processor, gallery_images, monkeypatch):
    """Even queries far beyond every bound are searched as they are under 'retain'."""
    query_embeds = embed_texts(model, processor, TEXTS)
    tiny = {key: {"low_05": 0.0, "avg": 0.0, "up_95": 0.0} for key in "SVUG"}  # b' < every distance
    monkeypatch.setattr(model.config, "bounds", tiny)
    c = curvature(model)
    expected = brute_force(query_embeds, embed_images(model, processor, gallery_images), c, len(gallery_images))
    retained = retriever(TEXTS, gallery=gallery_images, top_k=len(gallery_images), policy="retain")
    redirected = retriever(TEXTS, gallery=gallery_images, top_k=len(gallery_images), policy="redirect")
    for result, moved, (indices, _) in zip(retained, redirected, expected):
        assert result["redirected"] is False
        assert result["search_distance_to_root"] == result["query_distance_to_root"]
        assert [r["index"] for r in result["results"]] == indices
        assert moved["redirected"] is True
        assert moved["search_distance_to_root"] < moved["query_distance_to_root"]


def test_retrieval_batched_equals_unbatched(retriever, gallery_images):
    one = retriever(TEXTS, gallery=gallery_images, top_k=4)
    batched = retriever(TEXTS, gallery=gallery_images, top_k=4, batch_size=3)  # queries and gallery in threes
    for a, b in zip(one, batched):
        assert a["redirected"] == b["redirected"]
        assert [r["index"] for r in a["results"]] == [r["index"] for r in b["results"]]
        np.testing.assert_allclose(
            [r["distance"] for r in a["results"]], [r["distance"] for r in b["results"]], rtol=0, atol=ATOL
        )
    single = retriever(TEXTS[0], gallery=gallery_images, top_k=4)
    assert isinstance(single, dict) and [r["index"] for r in single["results"]] == [
        r["index"] for r in one[0]["results"]
    ]


def test_gallery_as_images_embeddings_or_index_agree(retriever, model, processor, gallery_images, tmp_path):
    embeddings = embed_images(model, processor, gallery_images)
    metadata = [{"path": f"photo_{i}.png", "caption": f"item {i}", "index": -1} for i in range(len(embeddings))]
    index = write_index(tmp_path / "index", embeddings, "image", model, processor, metadata=metadata)
    as_images = retriever(TEXTS, gallery=gallery_images, top_k=6)
    as_embeddings = retriever(TEXTS, gallery=embeddings, gallery_modality="image", top_k=6)
    as_numpy = retriever(TEXTS, gallery=embeddings.numpy(), gallery_modality="image", top_k=6)
    as_index = retriever(TEXTS, gallery=str(index), top_k=6)
    for other in (as_embeddings, as_numpy, as_index):
        for a, b in zip(as_images, other):
            assert a["redirected"] == b["redirected"]
            assert [r["index"] for r in a["results"]] == [r["index"] for r in b["results"]]
            np.testing.assert_allclose(
                [r["distance"] for r in a["results"]], [r["distance"] for r in b["results"]], rtol=0, atol=ATOL
            )
    for result in as_index:  # the index's metadata joins its results; the ranking's own keys win
        for item in result["results"]:
            assert item["path"] == f"photo_{item['index']}.png" and item["caption"] == f"item {item['index']}"
            assert item["index"] >= 0
    assert all(set(r) == {"index", "distance"} for result in as_images for r in result["results"])


def test_gallery_given_at_construction(model, processor, gallery_images, tmp_path):
    embeddings = embed_images(model, processor, gallery_images)
    index = write_index(tmp_path / "index", embeddings, "image", model, processor)
    common = {"processor": processor, "device": "cpu"}
    built = SafeRetrievalPipeline(model=model, gallery=str(index), top_k=3, policy="retain", **common)
    per_call = SafeRetrievalPipeline(model=model, **common)
    expected = per_call(TEXTS, gallery=embeddings, gallery_modality="image", top_k=3, policy="retain")
    got = built(TEXTS)
    assert [[r["index"] for r in g["results"]] for g in got] == [[r["index"] for r in e["results"]] for e in expected]
    assert built(TEXTS, top_k=1)[0]["results"][0]["index"] == expected[0]["results"][0]["index"]  # call overrides


def test_a_list_gallery_given_at_construction_is_embedded_once(model, processor, gallery_images, monkeypatch):
    """Embedded when the pipeline is built (a copy, as documented): calls reuse it and never embed it again."""
    built = SafeRetrievalPipeline(model=model, processor=processor, device="cpu", gallery=list(gallery_images), top_k=2)
    calls = []
    monkeypatch.setattr(built, "embed", lambda *args, **kwargs: calls.append(args) or None)
    results = built(TEXTS, policy="retain")
    expected = built(TEXTS, gallery=embed_images(model, processor, gallery_images), gallery_modality="image",
                     policy="retain")  # fmt: skip
    assert calls == [] and [r["results"] for r in results] == [r["results"] for r in expected]


@pytest.mark.parametrize("task", ["detector", "retriever"])
def test_call_checks_its_options_once_and_delegates_to_pipeline(task, detector, retriever, gallery_images, monkeypatch):
    """transformers' shape: `__call__` routes to `Pipeline.__call__`, which sanitizes the options once per call."""
    from transformers import Pipeline

    pipe = detector if task == "detector" else retriever
    counts = {"sanitize": 0, "base_call": 0}
    sanitize, base_call = type(pipe)._sanitize_parameters, Pipeline.__call__

    def counted_sanitize(self, **kwargs):
        counts["sanitize"] += 1
        return sanitize(self, **kwargs)

    def counted_call(self, *args, **kwargs):
        counts["base_call"] += 1
        return base_call(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "_sanitize_parameters", counted_sanitize)
    monkeypatch.setattr(Pipeline, "__call__", counted_call)
    if task == "detector":
        pipe(text=TEXTS[:3], threshold=0.5, batch_size=2)
    else:
        pipe(TEXTS[:3], gallery=gallery_images, top_k=2, batch_size=2)
    assert counts == {"sanitize": 1, "base_call": 1}


def test_detection_streams_generators_like_every_transformers_pipeline(detector, photos):
    images = [photos[name] for name in IMAGE_NAMES[:3]]
    as_list = detector(images)
    streamed = detector(image for image in images)
    assert not isinstance(streamed, list) and list(streamed) == as_list
    assert list(detector(text=(t for t in TEXTS[:2]))) == detector(text=TEXTS[:2])


def test_image_paths_and_urls_are_images_in_queries_and_galleries(retriever, gallery_images, tmp_path, monkeypatch):
    """A string naming an existing file (or an http(s) URL) is an image, ranked exactly as the loaded image; any
    other string is a text."""
    paths = []
    for number, image in enumerate(gallery_images):
        paths.append(str(tmp_path / f"photo_{number}.png"))
        image.save(paths[-1])  # PNG: lossless, the file reads back as the same pixels
    loaded = [Image.open(path) for path in paths]
    options = {"top_k": 3, "policy": "retain"}
    assert retriever(TEXTS[:3], gallery=paths, **options) == retriever(TEXTS[:3], gallery=loaded, **options)
    by_path = retriever(paths[1], gallery=gallery_images, **options)
    assert by_path == retriever(loaded[1], gallery=gallery_images, **options)
    assert by_path["results"][0]["index"] == 1 and by_path["results"][0]["distance"] < 1e-3
    assert retriever(Path(paths[2]), gallery=gallery_images, **options) == retriever(loaded[2], gallery=gallery_images, **options)
    fetched = []
    monkeypatch.setattr(
        "transformers.image_utils.load_image", lambda source, *args, **kwargs: fetched.append(source) or loaded[0]
    )  # no network in tests: the URL is fetched by transformers' load_image, as its image pipelines do
    url = retriever("https://example.org/cat.png", gallery=gallery_images, **options)
    assert fetched == ["https://example.org/cat.png"] and url == retriever(loaded[0], gallery=gallery_images, **options)
    # a string that names no file is a text: ranked as the caption it is
    text = retriever("photos/no-such-cat.png", gallery=gallery_images, **options)
    assert text["query_distance_to_root"] == retriever(["photos/no-such-cat.png"], gallery=gallery_images, **options)[0]["query_distance_to_root"]
    with pytest.raises(ValueError, match="the gallery mixes images"):
        retriever(TEXTS[0], gallery=[paths[0], "a caption"], **options)


def test_a_gallery_list_changed_after_construction_is_never_served_stale(model, processor, gallery_images):
    """The list given at construction is embedded then (a copy, as documented); the same list object passed again
    in a call is read again, so a changed list gives its new content."""
    gallery = list(gallery_images[:3])
    built = SafeRetrievalPipeline(model=model, processor=processor, device="cpu", gallery=gallery, policy="retain")
    before = built(TEXTS[0], top_k=3)
    gallery.append(gallery_images[3])
    gallery[0] = gallery_images[4]
    fresh = built(TEXTS[0], gallery=gallery, top_k=4)
    expected = built(TEXTS[0], gallery=list(gallery), top_k=4)
    assert fresh == expected and len(fresh["results"]) == 4
    assert built(TEXTS[0], top_k=3) == before  # the construction's copy, unchanged
    assert built(TEXTS[0], top_k=np.int64(2))["results"] == before["results"][:2]  # numpy integers are integers


def test_index_folder_change_is_seen(retriever, model, processor, gallery_images, tmp_path):
    """A reused index folder is read again when its files change (atomic replacement), and re-checked."""
    embeddings = embed_images(model, processor, gallery_images)
    index = write_index(tmp_path / "index", embeddings, "image", model, processor)
    first = retriever(TEXTS[0], gallery=index, top_k=3)
    replacement = tmp_path / "embeddings.tmp"
    save_file({"embeddings": embeddings.flip(0).contiguous()}, str(replacement))
    os.replace(replacement, index / "embeddings.safetensors")
    with pytest.raises(ValueError, match="is corrupt: the SHA-256 of embeddings.safetensors differs"):
        retriever(TEXTS[0], gallery=index, top_k=3)
    info = json.loads((index / "index.json").read_text())
    info["embeddings_sha256"] = hashlib.sha256((index / "embeddings.safetensors").read_bytes()).hexdigest()
    (index / "index.json").write_text(json.dumps(info))
    flipped = retriever(TEXTS[0], gallery=index, top_k=3)
    n = len(gallery_images)
    assert [r["index"] for r in flipped["results"]] == [n - 1 - r["index"] for r in first["results"]]


def test_faiss_index_gives_the_exact_results(retriever, model, processor, gallery_images, tmp_path):
    pytest.importorskip("faiss")
    embeddings = embed_images(model, processor, gallery_images)
    index = write_index(tmp_path / "index", embeddings, "image", model, processor, with_faiss=True)
    exact = retriever(TEXTS, gallery=index, top_k=5)
    with_faiss = retriever(TEXTS, gallery=index, top_k=5, use_faiss=True)
    for a, b in zip(exact, with_faiss):
        # candidates from FAISS, distances recomputed exactly (re-ranked together: equal to float64 rounding)
        assert [r["index"] for r in a["results"]] == [r["index"] for r in b["results"]]
        np.testing.assert_allclose(
            [r["distance"] for r in a["results"]], [r["distance"] for r in b["results"]], rtol=0, atol=1e-12
        )
    plain = write_index(tmp_path / "plain", embeddings, "image", model, processor)
    with pytest.raises(ValueError, match="this gallery has none"):
        retriever(TEXTS[0], gallery=plain, top_k=5, use_faiss=True)
    tampered = write_index(tmp_path / "tampered", embeddings, "image", model, processor, with_faiss=True)
    data = bytearray((tampered / "faiss.index").read_bytes())
    data[-10] ^= 0xFF
    (tampered / "faiss.index").write_bytes(bytes(data))
    assert len(retriever(TEXTS[0], gallery=tampered, top_k=5)["results"]) == 5  # exact search never reads it
    with pytest.raises(ValueError, match="is corrupt: the SHA-256 of faiss.index differs"):
        retriever(TEXTS[0], gallery=tampered, top_k=5, use_faiss=True)
    (tmp_path / "plain" / "index.json").write_text(
        json.dumps({**json.loads((tampered / "index.json").read_text()), "faiss": {"type": "ivf", "params": {}}})
    )
    with pytest.raises(ValueError, match="names a FAISS index but faiss.index is missing"):
        retriever(TEXTS[0], gallery=plain, top_k=5)
    with pytest.raises(ValueError, match="this gallery has none"):
        retriever(TEXTS[0], gallery=gallery_images, top_k=5, use_faiss=True)


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_index_saved_by_hysac_hf_index(retriever, model, processor, gallery_images, tmp_path, kind):
    """The library's writer (hysac_hf.index) and the pipeline's reader agree on the folder, FAISS part included."""
    index_module = pytest.importorskip("hysac_hf.index")
    assert index_module.PROBE_TEXTS is PROBE_TEXTS and index_module.INDEX_FORMAT == 1  # one definition of the format
    options = {}
    if kind != "flat":
        pytest.importorskip("faiss")
        options = {"kind": kind, "nlist": 2, "nprobe": 2}  # every cell probed: candidates are exact
        if kind == "ivfpq":  # the codes score approximately: the folder's re-ranking depth (every item) makes it exact
            options["rerank"] = len(gallery_images)
    embeddings = embed_images(model, processor, gallery_images)
    metadata = [{"name": f"item {i}"} for i in range(len(embeddings))]
    gallery = index_module.GalleryIndex.from_embeddings(
        embeddings, "image", model=model, processor=processor, metadata=metadata, **options
    )
    folder = gallery.save(tmp_path / "library-index")
    expected = retriever(TEXTS, gallery=embeddings, gallery_modality="image", top_k=5)
    for use_faiss in (False, True) if kind != "flat" else (False,):
        got = retriever(TEXTS, gallery=folder, top_k=5, use_faiss=use_faiss)
        for a, b in zip(expected, got):
            assert [r["index"] for r in a["results"]] == [r["index"] for r in b["results"]]
            np.testing.assert_allclose(
                [r["distance"] for r in a["results"]], [r["distance"] for r in b["results"]], rtol=0, atol=ATOL
            )
            assert [r["name"] for r in b["results"]] == [f"item {r['index']}" for r in b["results"]]


def test_ties_are_broken_by_gallery_index(retriever, model, processor):
    embedding = embed_images(model, processor, [Image.new("RGB", (32, 32), (200, 30, 30))])
    other = embed_images(model, processor, [Image.new("RGB", (32, 32), (30, 30, 200))])
    gallery = torch.cat([other, embedding, other, embedding, embedding])  # three equal items, two equal others
    result = retriever(TEXTS[0], gallery=gallery, gallery_modality="image", top_k=5, policy="retain")
    distances = [r["distance"] for r in result["results"]]
    assert distances == sorted(distances)
    groups = {}
    for item in result["results"]:
        groups.setdefault(item["distance"], []).append(item["index"])
    assert sorted(groups.values()) == [[0, 2], [1, 3, 4]]  # within equal distances: gallery order


# ------------------------------------------------------------------------------------------------------------
# Refusals
def _index_variants(model, processor, embeddings, root):
    """Index folders each broken in one way, with the error each must give."""
    other_model = copy.deepcopy(model)
    with torch.no_grad():
        other_model.textual_alpha.add_(0.5)
    variants = {
        "other model": (write_index(root / "other", embeddings, "image", other_model, processor), "not by this model"),
        "other curvature": (
            write_index(root / "curv", embeddings, "image", model, processor, curvature=curvature(model) * 1.001),
            "was embedded at curvature",
        ),
        "empty": (write_index(root / "empty", embeddings[:0], "image", model, processor), r"is empty \(0 items\)"),
        "other format": (write_index(root / "format", embeddings, "image", model, processor, format=2), "has format 2"),
        "short metadata": (
            write_index(root / "meta", embeddings, "image", model, processor, metadata=[{"path": "x"}]),
            "metadata.jsonl has 1 lines for",
        ),
    }
    corrupt = write_index(root / "corrupt", embeddings, "image", model, processor)
    data = bytearray((corrupt / "embeddings.safetensors").read_bytes())
    data[-3] ^= 0xFF  # one bit pattern of one float changes: the checksum no longer matches
    (corrupt / "embeddings.safetensors").write_bytes(bytes(data))
    variants["corrupt"] = (corrupt, "is corrupt: the SHA-256")
    not_index = root / "not_index"
    not_index.mkdir()
    variants["not an index"] = (not_index, "is not a saved gallery index")
    return variants


def test_bad_index_folders_are_refused(retriever, model, processor, gallery_images, tmp_path):
    embeddings = embed_images(model, processor, gallery_images)
    for name, (folder, match) in _index_variants(model, processor, embeddings, tmp_path).items():
        before = folder_bytes(folder)
        with pytest.raises(ValueError, match=match):
            retriever(TEXTS[0], gallery=str(folder), top_k=3)
        assert folder_bytes(folder) == before, name  # reading never writes


def test_index_without_probe_checks_dimension_and_curvature(retriever, model, processor, gallery_images, tmp_path):
    """An index built from bare embeddings has no probe: it is searched, with a warning, if dimension and curvature
    agree."""
    embeddings = embed_images(model, processor, gallery_images)
    write_index(tmp_path / "bare", embeddings, "image", model, processor, model_probe=None)
    expected = retriever(TEXTS[:2], gallery=embeddings, gallery_modality="image", top_k=3)
    assert retriever(TEXTS[:2], gallery=tmp_path / "bare", top_k=3) == expected
    write_index(tmp_path / "bare_curv", embeddings, "image", model, processor, model_probe=None, curvature=9.0)
    with pytest.raises(ValueError, match="was embedded at curvature 9.0"):
        retriever(TEXTS[0], gallery=tmp_path / "bare_curv", top_k=3)


def test_probe_tolerates_noise_but_not_another_model(retriever, model, processor, gallery_images, tmp_path):
    embeddings = embed_images(model, processor, gallery_images)
    probe = embed_texts(model, processor, PROBE_TEXTS)
    noisy = (probe + 1e-4).tolist()  # device/dtype noise: within 1e-3 * (1 + max |value|)
    write_index(tmp_path / "noisy", embeddings, "image", model, processor, model_probe=noisy)
    assert len(retriever(TEXTS[0], gallery=tmp_path / "noisy", top_k=2)["results"]) == 2
    shifted = (probe + 5e-3 * (1 + probe.abs().max())).tolist()
    write_index(tmp_path / "shifted", embeddings, "image", model, processor, model_probe=shifted)
    with pytest.raises(ValueError, match="rebuild the index with this model"):
        retriever(TEXTS[0], gallery=tmp_path / "shifted", top_k=2)


@pytest.mark.parametrize(
    ("query", "kwargs", "error", "match"),
    [
        ("a cat", {}, ValueError, "pass the gallery to search"),
        ("a cat", {"gallery": []}, ValueError, "the gallery is empty"),
        ("a cat", {"gallery": torch.zeros(0, 32), "gallery_modality": "image"}, ValueError, "the gallery is empty"),
        (
            "a cat",
            {"gallery": ["a dog", Image.new("RGB", (8, 8))]},
            ValueError,
            r"mixes images \(first at 1\) and texts",
        ),
        ("a cat", {"gallery": ["a dog", 7]}, ValueError, r"gallery\[1\] is a int"),
        ("a cat", {"gallery": "a dog"}, ValueError, r"is not a folder.*pass \[text\]"),
        ("a cat", {"gallery": {"a": 1}}, ValueError, "cannot search a gallery of type dict"),
        ("a cat", {"gallery": torch.zeros(3, 32)}, ValueError, "needs gallery_modality"),
        ("a cat", {"gallery": torch.zeros(3, 31), "gallery_modality": "text"}, ValueError, r"float \(N, 32\) tensor"),
        ("a cat", {"gallery": ["a dog"], "gallery_modality": "image"}, ValueError, "the gallery holds texts"),
        ("a cat", {"gallery": ["a dog", "a bird"], "top_k": 3}, ValueError, r"top_k=3 is larger than the gallery \(2"),
        ("a cat", {"gallery": ["a dog"], "top_k": 0}, ValueError, "top_k=0 must be an integer >= 1"),
        ("a cat", {"gallery": ["a dog"], "policy": "block"}, ValueError, "policy='block' must be one of"),
        ("a cat", {"gallery": ["a dog"], "bound": "max"}, ValueError, "bound='max' must be one of"),
        ("a cat", {"gallery": ["a dog"], "method": "euclid"}, ValueError, "method='euclid' must be one of"),
        ("a cat", {"gallery": ["a dog"], "threshold": 1.0}, TypeError, "unexpected arguments"),
        (torch.zeros(1, 32), {"gallery": ["a dog"], "top_k": 1}, ValueError, "is a Tensor; a query is a text"),
        (42, {"gallery": ["a dog"], "top_k": 1}, ValueError, "the query 42 is a int"),
        (["a cat", Image.new("RGB", (8, 8))], {"gallery": ["a dog"]}, ValueError, "the queries mix images"),
        ([], {"gallery": ["a dog"]}, ValueError, "query is an empty list"),
    ],
)
def test_retrieval_refusals(retriever, query, kwargs, error, match):
    with pytest.raises(error, match=match):
        retriever(query, **kwargs)


def test_redirect_without_bounds_is_refused_before_any_work(retriever, model, monkeypatch, gallery_images):
    monkeypatch.setattr(model.config, "bounds", None)
    calls = []
    monkeypatch.setattr(retriever, "embed", lambda *a, **k: calls.append(a))
    with pytest.raises(ValueError, match=r"policy='redirect' needs the model's calibrated bounds.*policy='retain'"):
        retriever("a cat", gallery=gallery_images)
    assert calls == []  # the gallery was not embedded
    monkeypatch.undo()
    monkeypatch.setattr(model.config, "bounds", None)
    assert not retriever("a cat", gallery=gallery_images, policy="retain")["redirected"]


# ------------------------------------------------------------------------------------------------------------
# End to end: pipeline() on a saved folder, in a fresh process without hysac_hf
CHILD = textwrap.dedent(
    """
    import json
    from PIL import Image
    from transformers import pipeline

    folder, index_dir, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
    paths, texts = json.loads(sys.argv[4]), json.loads(sys.argv[5])
    detector = pipeline("unsafe-content-detection", model=folder, trust_remote_code=True)
    retriever = pipeline("safe-retrieval", model=folder, trust_remote_code=True)
    result = {
        "modules": [type(detector).__module__, type(retriever).__module__],
        "one_image": detector(paths[0]),
        "images": detector(paths, batch_size=2),
        "texts": detector(text=texts, batch_size=3),
        "redirect": retriever(texts, gallery=index_dir, top_k=3),
        "retain": retriever(texts, gallery=index_dir, top_k=3, policy="retain"),
        "image_gallery": retriever(texts[0], gallery=[Image.open(p) for p in paths], top_k=2),
    }
    with open(out_path, "w") as handle:
        json.dump(result, handle)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("python", PYTHONS, ids=lambda p: "this-python" if p == sys.executable else "other-line")
def test_pipelines_load_without_hysac_hf(folder, model, processor, photos, tmp_path, python):
    paths = []
    for name in IMAGE_NAMES:
        paths.append(str(tmp_path / f"{name}.png"))
        photos[name].save(paths[-1])
    images = [Image.open(p) for p in paths]
    image_embeds = embed_images(model, processor, images)
    metadata = [{"path": p, "name": n} for p, n in zip(paths, IMAGE_NAMES)]
    index = write_index(tmp_path / "index", image_embeds, "image", model, processor, metadata=metadata)
    out = tmp_path / "out.json"
    args = [str(folder), str(index), str(out), json.dumps(paths), json.dumps(TEXTS)]
    run = run_without_hysac_hf(CHILD, tmp_path, python=python, args=args)
    assert run.returncode == 0, run.stderr[-4000:]
    got = json.loads(out.read_text())
    assert all(module.startswith("transformers_modules") for module in got["modules"]), got["modules"]

    thresholds = model.config.unsafe_thresholds
    image_d = model.distance_to_root(image_embeds).tolist()
    assert got["one_image"]["score"] == pytest.approx(image_d[0], abs=ATOL)
    for result, distance in zip(got["images"], image_d):
        assert result["score"] == pytest.approx(distance, abs=ATOL)
        assert result["label"] == ("unsafe" if distance > thresholds["image"] else "safe")
    text_embeds = embed_texts(model, processor, TEXTS)
    text_d = model.distance_to_root(text_embeds).tolist()
    for result, distance in zip(got["texts"], text_d):
        assert result["score"] == pytest.approx(distance, abs=ATOL)
        assert result["label"] == ("unsafe" if distance > thresholds["text"] else "safe")
    assert {r["label"] for r in got["images"]} == {r["label"] for r in got["texts"]} == {"safe", "unsafe"}

    c = curvature(model)
    moved, beyond = reference_traversal(
        text_embeds, model.config.bounds["V"]["up_95"], model.config.traversal_offset, c
    )
    assert 0 < int(beyond.sum()) < len(TEXTS)
    for policy, searched in (("redirect", moved), ("retain", text_embeds)):
        for result, (indices, distances), is_beyond in zip(
            got[policy], brute_force(searched, image_embeds, c, 3), beyond
        ):
            assert result["redirected"] == (policy == "redirect" and bool(is_beyond))
            assert [r["index"] for r in result["results"]] == indices
            np.testing.assert_allclose([r["distance"] for r in result["results"]], distances, rtol=0, atol=ATOL)
            assert [r["name"] for r in result["results"]] == [IMAGE_NAMES[i] for i in indices]
    assert got["image_gallery"]["results"] == [
        {"index": r["index"], "distance": pytest.approx(r["distance"], abs=ATOL)}
        for r in got["redirect"][0]["results"][:2]
    ]


def test_in_memory_models_work_with_pipeline_when_hysac_hf_is_imported(hysac, processor):
    """A model object (not a folder) has no config.custom_pipelines to read: hysac_hf registers both tasks."""
    from transformers import pipeline

    hysac.config.unsafe_thresholds = {"image": 1.0, "text": 1.0}
    detector = pipeline("unsafe-content-detection", model=hysac, processor=processor)
    texts = ["a photo of a cat", "a rocket on a launch pad"]
    labels = detector(text=texts)
    ids = processor(text=texts, return_tensors="pt")
    with torch.no_grad():
        expected = hysac.distance_to_root(hysac.encode_text(ids["input_ids"], ids["attention_mask"]))
    assert [r["score"] for r in labels] == pytest.approx(expected.tolist(), abs=1e-5)
    assert [r["label"] for r in labels] == ["unsafe" if d > 1.0 else "safe" for d in expected.tolist()]
    retriever = pipeline("safe-retrieval", model=hysac, processor=processor)
    hit = retriever("a photo of a cat", gallery=texts + ["a cup of coffee"], top_k=1, policy="retain")
    assert hit["results"][0]["index"] == 0 and hit["redirected"] is False
