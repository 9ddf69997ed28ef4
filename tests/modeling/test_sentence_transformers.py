"""sentence-transformers ranks a saved HySAC folder by Lorentz distance (>= 6.0) or refuses (< 6.0); never cosine.

The loads run where a Hub user runs them: a fresh interpreter without hysac_hf (`run_without_hysac_hf`), on this
transformers line and, when CI names it, on the other one (sentence-transformers 6 on transformers 5, 5.x on 4).
"""

from __future__ import annotations

import json
import os
import sys
import textwrap

import numpy as np
import pytest
import torch

from hysac_hf.testing import run_without_hysac_hf, save_model_folder

pytest.importorskip("sentence_transformers")
pytestmark = pytest.mark.slow

PYTHONS = [sys.executable] + [p for p in [os.environ.get("HYSAC_OTHER_PYTHON")] if p]
TEXTS = ["a photo of a cat", "a rocket on a launch pad", "a cup of coffee", "a man with a camera", "a logo"]
IMAGES = ["cat", "rocket", "coffee", "camera", "logo", "astronaut"]  # includes grayscale and RGBA

CHILD = textwrap.dedent(
    """
    import json, logging
    import numpy as np
    import sentence_transformers
    from PIL import Image
    from sentence_transformers import SentenceTransformer

    folder, out_path, resaved = sys.argv[1], sys.argv[2], sys.argv[5]
    images = [Image.open(p) for p in json.loads(sys.argv[3])]
    texts = json.loads(sys.argv[4])
    result = {"version": sentence_transformers.__version__}
    try:
        model = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
    except ImportError as error:
        result["refused"] = str(error)
    else:
        text_embeds, image_embeds = model.encode(texts), model.encode(images)
        result.update(
            similarity_fn_name=model.similarity_fn_name,
            text_embeds=text_embeds.tolist(),
            image_embeds=image_embeds.tolist(),
            image_text=model.similarity(image_embeds, text_embeds).tolist(),
            text_image=model.similarity(text_embeds, image_embeds).tolist(),
            pairwise=model.similarity_pairwise(text_embeds, image_embeds[: len(texts)]).tolist(),
        )
        model.save(resaved)  # sentence-transformers' own save, then a reload: still Lorentz
        again = SentenceTransformer(resaved, trust_remote_code=True, device="cpu")
        result["resaved_image_text"] = again.similarity(again.encode(images), again.encode(texts)).tolist()
        result["resaved_similarity_fn_name"] = again.similarity_fn_name
        with open(f"{resaved}/modules.json") as f:
            result["resaved_modules"] = json.load(f)
        logging.captureWarnings(True)
        cosine = SentenceTransformer(folder, trust_remote_code=True, device="cpu", similarity_fn_name="cosine")
        result["explicit_cosine"] = cosine.similarity(image_embeds, text_embeds).tolist()
    with open(out_path, "w") as f:
        json.dump(result, f)
    """
)


def lorentz_distance_float64(x: np.ndarray, y: np.ndarray, curvature: float) -> np.ndarray:
    """Geodesic distance on the hyperboloid of curvature -c, from space components, in float64."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    x_time = np.sqrt(1 / curvature + (x**2).sum(-1, keepdims=True))
    y_time = np.sqrt(1 / curvature + (y**2).sum(-1, keepdims=True))
    inner = x @ y.T - x_time @ y_time.T
    return np.arccosh(np.maximum(-curvature * inner, 1.0)) / np.sqrt(curvature)


def test_saved_folder_carries_the_sentence_transformers_files(hysac, processor, tmp_path):
    hysac.save_pretrained(tmp_path)
    modules = json.loads((tmp_path / "modules.json").read_text())
    assert modules == [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers_hysac.HySACSentenceTransformer"}
    ]
    assert (tmp_path / "sentence_transformers_hysac.py").is_file()  # shipped with the remote code
    methods = json.loads((tmp_path / "sentence_bert_config.json").read_text())["modality_config"]
    assert {m: methods[m]["method"] for m in methods} == {"text": "encode_text", "image": "encode_image"}
    assert "similarity_fn_name" not in json.loads((tmp_path / "config_sentence_transformers.json").read_text())


@pytest.mark.parametrize("python", PYTHONS, ids=lambda p: "this-python" if p == sys.executable else "other-line")
def test_sentence_transformers_ranks_as_hysac_or_refuses(hysac, processor, photos, tmp_path, python):
    folder = save_model_folder(hysac, processor, tmp_path / "hysac-tiny")
    image_paths = []
    for name in IMAGES:
        image_paths.append(str(tmp_path / f"{name}.png"))
        photos[name].save(image_paths[-1])
    out = tmp_path / "out.json"
    args = [str(folder), str(out), json.dumps(image_paths), json.dumps(TEXTS), str(tmp_path / "resaved")]
    child = run_without_hysac_hf(CHILD, tmp_path, python=python, args=args)
    assert child.returncode == 0, child.stderr[-4000:]
    result = json.loads(out.read_text())

    if int(result["version"].split(".")[0]) < 6:  # no hook to set the similarity: a clear refusal, not cosine
        assert "needs sentence-transformers >= 6.0" in result["refused"]
        assert "AutoModel.from_pretrained(folder, trust_remote_code=True)" in result["refused"]
        return

    assert "refused" not in result and result["similarity_fn_name"] == "lorentz"
    with torch.no_grad():
        batch = processor(text=TEXTS, images=[photos[name] for name in IMAGES])
        text_embeds = hysac.encode_text(batch["input_ids"], batch["attention_mask"]).numpy()
        image_embeds = hysac.encode_image(batch["pixel_values"]).numpy()
        logits_per_image = hysac(**batch).logits_per_image.numpy()  # the model's own ranking
    # The embeddings are the model's (sentence-transformers pads to the longest text, the processor to 77).
    np.testing.assert_allclose(result["text_embeds"], text_embeds, rtol=0, atol=1e-5)
    np.testing.assert_allclose(result["image_embeds"], image_embeds, rtol=0, atol=1e-5)

    curvature = float(hysac.curvature.detach())
    st_text, st_image = np.array(result["text_embeds"]), np.array(result["image_embeds"])
    expected = -lorentz_distance_float64(st_image, st_text, curvature)
    image_text = np.array(result["image_text"])
    np.testing.assert_allclose(image_text, expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.array(result["text_image"]), expected.T, rtol=0, atol=1e-4)
    np.testing.assert_allclose(
        result["pairwise"], np.diag(-lorentz_distance_float64(st_text, st_image[: len(TEXTS)], curvature)), atol=1e-4
    )
    # Same ranking as the model, row by row (images -> texts) and column by column (texts -> images).
    np.testing.assert_array_equal(np.argsort(-image_text, axis=1), np.argsort(-logits_per_image, axis=1))
    np.testing.assert_array_equal(np.argsort(-image_text, axis=0), np.argsort(-logits_per_image, axis=0))
    # ... which cosine of the space components would not give: the ranking this integration replaces.
    cosine = np.array(result["explicit_cosine"])
    norms = np.linalg.norm(st_image, axis=1)[:, None] * np.linalg.norm(st_text, axis=1)[None, :]
    np.testing.assert_allclose(cosine, st_image @ st_text.T / norms, atol=1e-5)  # only when asked for
    differing_rows = (np.argsort(-cosine, axis=1) != np.argsort(-logits_per_image, axis=1)).any(axis=1)
    assert differing_rows.sum() >= 1, "the tiny model should show why cosine is wrong"
    assert "similarity_fn_name='cosine' was asked for" in child.stderr

    # sentence-transformers' own save/reload keeps the module, hence the ranking.
    assert result["resaved_modules"][0]["type"].endswith("sentence_transformers_hysac.HySACSentenceTransformer")
    assert result["resaved_similarity_fn_name"] == "lorentz"
    np.testing.assert_allclose(result["resaved_image_text"], image_text, rtol=0, atol=1e-6)


NO_SENTENCE_TRANSFORMERS = textwrap.dedent(
    """
    import importlib.abc
    class _BlockSentenceTransformers(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "sentence_transformers":
                raise ModuleNotFoundError(f"{name} is blocked in this test", name=name)
            return None
    sys.meta_path.insert(0, _BlockSentenceTransformers())
    from transformers import AutoModel

    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
    model.save_pretrained(sys.argv[2])
    print("sentence_transformers" in sys.modules)
    """
)


def test_the_model_loads_and_saves_without_sentence_transformers(hysac, tmp_path):
    """The integration is optional: remote code loads and re-saves (with the files) where it is not installed."""
    hysac.save_pretrained(tmp_path / "a")
    child = run_without_hysac_hf(NO_SENTENCE_TRANSFORMERS, tmp_path, args=[str(tmp_path / "a"), str(tmp_path / "b")])
    assert child.returncode == 0, child.stderr[-4000:]
    assert child.stdout.split()[-1] == "False"
    for name in ("modules.json", "sentence_bert_config.json", "sentence_transformers_hysac.py"):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name
