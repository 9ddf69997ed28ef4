"""The Hub path: a saved folder loads with trust_remote_code in a fresh process where hysac_hf is NOT importable."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import numpy as np
import pytest
import torch

from hysac_hf.testing import run_without_hysac_hf, save_model_folder

pytestmark = pytest.mark.slow

# Runs in a fresh interpreter, with hysac_hf and the repo's modeling/ blocked (hysac_hf.testing.run_without_hysac_hf).
CHILD = textwrap.dedent(
    """
    import json
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoModelForZeroShotImageClassification, AutoProcessor, pipeline

    folder, out_path = sys.argv[1], sys.argv[2]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert "transformers_modules" in type(model).__module__, type(model).__module__
    images = [Image.open(p) for p in json.loads(sys.argv[3])]
    texts = json.loads(sys.argv[4])
    batch = processor(text=texts, images=images)
    with torch.no_grad():
        out = model(**batch)
        dist = model.distance_to_root(out.image_embeds)
        moved = model.traverse_to_safe(out.image_embeds, target="image")
    zs_model = AutoModelForZeroShotImageClassification.from_pretrained(folder, trust_remote_code=True)
    classifier = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
    scores = classifier(images[0], candidate_labels=["cat", "rocket", "coffee"])
    np.savez(
        out_path,
        logits=out.logits_per_image.numpy(),
        image_embeds=out.image_embeds.numpy(),
        text_embeds=out.text_embeds.numpy(),
        dist=dist.numpy(),
        moved=moved.numpy(),
        training=np.array(model.training),
        zs_same=np.array(type(zs_model).__name__ == type(model).__name__),
        zs_labels=np.array([s["label"] for s in scores]),
        zs_scores=np.array([s["score"] for s in scores]),
    )
    """
)


# CI sets HYSAC_OTHER_PYTHON to the interpreter of the other transformers line (4.x <-> 5.x), so that a
# folder saved under one line is also loaded under the other, as happens with a checkpoint on the Hub.
PYTHONS = [sys.executable] + [p for p in [os.environ.get("HYSAC_OTHER_PYTHON")] if p]


def run_child(folder, tmp_path, image_paths, texts, python=sys.executable):
    out = tmp_path / "out.npz"
    args = [str(folder), str(out), json.dumps(image_paths), json.dumps(texts)]
    result = run_without_hysac_hf(CHILD, tmp_path, python=python, args=args)
    assert result.returncode == 0, result.stderr[-4000:]
    return np.load(out)


@pytest.mark.parametrize("python", PYTHONS, ids=lambda p: "this-python" if p == sys.executable else "other-line")
def test_remote_code_round_trip_without_hysac_hf(hysac, processor, photos, tmp_path, python):
    folder = save_model_folder(hysac, processor, tmp_path / "hysac-tiny")
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_hysac.HySACConfig",
        "AutoModel": "modeling_hysac.HySACModel",
        "AutoModelForZeroShotImageClassification": "modeling_hysac.HySACModel",
    }
    for name in ("modeling_hysac.py", "configuration_hysac.py", "lorentz.py", "traversal.py", "processing_hysac.py"):
        assert (folder / name).is_file(), name
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))

    names = ["cat", "rocket", "camera", "logo"]  # includes grayscale and RGBA
    image_paths = []
    for name in names:
        path = tmp_path / f"{name}.png"
        photos[name].save(path)
        image_paths.append(str(path))
    texts = ["a photo of a cat", "a rocket on a launch pad", "a camera", "a logo"]
    child = run_child(folder, tmp_path, image_paths, texts, python)

    from PIL import Image

    batch = processor(text=texts, images=[Image.open(p) for p in image_paths])
    with torch.no_grad():
        out = hysac(**batch)
        moved = hysac.traverse_to_safe(out.image_embeds, target="image")
    assert not bool(child["training"])
    # Identical in the same environment; across transformers lines the towers may differ in the last bits.
    check = (
        np.testing.assert_array_equal
        if python == sys.executable
        else (lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5))
    )
    check(child["image_embeds"], out.image_embeds.numpy())
    check(child["text_embeds"], out.text_embeds.numpy())
    check(child["logits"], out.logits_per_image.numpy())
    check(child["dist"], hysac.distance_to_root(out.image_embeds).numpy())
    check(child["moved"], moved.numpy())
    assert bool(child["zs_same"])

    # The zero-shot pipeline's scores are the softmax of logits_per_image over its hypothesis template.
    labels = ["cat", "rocket", "coffee"]
    prompts = processor(text=[f"This is a photo of {label}." for label in labels], images=Image.open(image_paths[0]))
    with torch.no_grad():
        probs = hysac(**prompts).logits_per_image.softmax(dim=-1)[0].numpy()
    expected = dict(zip(labels, probs))
    got = dict(zip(child["zs_labels"].tolist(), child["zs_scores"].tolist()))
    assert got.keys() == expected.keys()
    for label in labels:
        assert got[label] == pytest.approx(float(expected[label]), abs=1e-5)


def test_with_hysac_hf_imported_auto_classes_need_no_remote_code(hysac, processor, tmp_path, capsys):
    """Importing hysac_hf registers "hysac": no trust_remote_code prompt, the local classes are used."""
    from transformers import AutoConfig, AutoModel, AutoProcessor

    from hysac_hf import HySACConfig, HySACModel, HySACProcessor

    save_model_folder(hysac, processor, tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is HySACConfig
    model = AutoModel.from_pretrained(tmp_path)
    assert type(model) is HySACModel
    assert type(HySACProcessor.from_pretrained(tmp_path)) is HySACProcessor
    assert type(AutoProcessor.from_pretrained(tmp_path)) is HySACProcessor
    assert "custom code" not in capsys.readouterr().out
    ids = processor(text=["a photo of a cat"])["input_ids"]
    with torch.no_grad():
        assert torch.equal(model.encode_text(ids), hysac.encode_text(ids))
