"""HySAC on every dual-encoder family (CLIP, SigLIP, SigLIP 2 NaFlex, MetaCLIP 2): the towers are the base's own, the
embeddings the exponential map of the base's own features (float64 hand math), the logits -exp(s) d_L (+ b), the
family's padding rule, the config's record of the base, and clear refusals."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import transformers
from hysac_hf.modeling.configuration_hysac import BASE_FAMILIES, SIGLIP_LOGIT_BIAS_INIT
from hysac_hf.modeling.modeling_hysac import LOGIT_BIAS, SCALAR_PARAMETERS, sigmoid_contrastive_loss

from hysac_hf import HySACConfig, HySACModel, HySACProcessor
from hysac_hf.loading import load_base_processor, load_model
from hysac_hf.testing import BASE_FAMILY_TYPES, run_without_hysac_hf, tiny_dual_encoder_config, tiny_hysac

SIGLIP_FAMILIES = ("siglip", "siglip2")
IMAGE_KEYS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")


def base_model(base_dir, family: str, dtype=torch.float64):
    """The base dual encoder itself, with transformers' own class, in `dtype`."""
    model_class = getattr(transformers, BASE_FAMILIES[family].model_class)
    return model_class.from_pretrained(base_dir).to(dtype).eval()


def features(output) -> torch.Tensor:
    """`get_*_features` output on either transformers line (5: a model output; 4: the tensor)."""
    return getattr(output, "pooler_output", output)


def image_inputs(batch, dtype=None) -> dict:
    inputs = {k: batch[k] for k in IMAGE_KEYS if k in batch}
    if dtype is not None:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def text_inputs(batch) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}


def np_lift(feats: torch.Tensor, alpha: float, curvature: float) -> np.ndarray:
    """exp_0(v) = sinh(sqrt(c)|v|) v / (sqrt(c)|v|), v = alpha * features, in float64."""
    v = feats.detach().double().numpy() * alpha
    rc = math.sqrt(curvature)
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.sinh(rc * norm) * v / (rc * norm)


def np_dist(x: np.ndarray, y: np.ndarray, c: float) -> np.ndarray:
    """Geodesic distance on the hyperboloid of curvature -c between space components, float64."""
    tx = np.sqrt(1 / c + (x**2).sum(-1))
    ty = np.sqrt(1 / c + (y**2).sum(-1))
    return np.arccosh(np.maximum(c * (np.outer(tx, ty) - x @ y.T), 1.0)) / math.sqrt(c)


@pytest.fixture(scope="module")
def family_batch(tiny_base_dir, photos, captions):
    """`family_batch(family)`: the family processor's inputs for three photos and their captions."""
    cache = {}

    def get(family):
        if family not in cache:
            model = tiny_hysac(tiny_base_dir(family))
            processor = load_base_processor(str(tiny_base_dir(family)), model)
            names = ["cat", "astronaut", "rocket"]
            cache[family] = processor(text=[captions[n] for n in names], images=[photos[n] for n in names])
        return cache[family]

    return get


@pytest.mark.parametrize("family", BASE_FAMILY_TYPES)
def test_embeddings_are_the_exp_map_of_the_base_models_own_features(family, tiny_base_dir, family_batch):
    base = base_model(tiny_base_dir(family), family, torch.float32)  # transformers 4's CLIP masks fail in float64
    model = HySACModel.from_dual_encoder(base, curv_init=1.7, feature_scale_init=0.3)
    assert model.config.base_model_type == family and not model.training
    batch = family_batch(family)
    with torch.no_grad():
        base_image = features(base.get_image_features(**image_inputs(batch)))
        base_text = features(base.get_text_features(**text_inputs(batch)))
        ours_image = model.encode_image(**image_inputs(batch), lift=False)
        ours_text = model.encode_text(**text_inputs(batch), lift=False)
        image = model.encode_image(**image_inputs(batch))
        text = model.encode_text(**text_inputs(batch))
    # The towers are the base's own: its features, bit for bit.
    assert torch.equal(ours_image, base_image) and torch.equal(ours_text, base_text)
    # The embeddings: the exponential map of exp(alpha) x the base's features, in float64 hand math.
    np.testing.assert_allclose(image.numpy(), np_lift(base_image, 0.3, 1.7), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(text.numpy(), np_lift(base_text, 0.3, 1.7), rtol=1e-5, atol=1e-6)
    # Not a tautology: the lift moves the features.
    assert not np.allclose(image.numpy(), base_image.numpy() * 0.3, atol=1e-3)


@pytest.mark.parametrize("family", BASE_FAMILY_TYPES)
def test_forward_logits_are_the_scaled_negative_distance_plus_the_bias(family, tiny_base_dir, family_batch):
    model = tiny_hysac(tiny_base_dir(family))
    batch = family_batch(family)
    with torch.no_grad():
        out = model(**batch, return_loss=True)
        text = model.encode_text(**text_inputs(batch))
        image = model.encode_image(**image_inputs(batch))
    assert torch.equal(out.text_embeds, text) and torch.equal(out.image_embeds, image)
    bias = -3.5 if family in SIGLIP_FAMILIES else 0.0
    assert model.has_logit_bias == (family in SIGLIP_FAMILIES)
    expected = -20.0 * np_dist(text.double().numpy(), image.double().numpy(), 1.7) + bias
    np.testing.assert_allclose(out.logits_per_text.numpy(), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(out.logits_per_image, out.logits_per_text.t())
    z = torch.from_numpy(expected)
    if family in SIGLIP_FAMILIES:  # SigLIP's pairwise loss, written out
        signs = 2 * torch.eye(3, dtype=torch.float64) - 1
        loss = -torch.log(torch.sigmoid(signs * z)).sum(1).mean()
    else:  # symmetric InfoNCE
        labels = torch.arange(3)
        loss = 0.5 * (torch.nn.functional.cross_entropy(z, labels) + torch.nn.functional.cross_entropy(z.t(), labels))
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-5)


def test_sigmoid_loss_matches_siglip_models_own_loss():
    logits = torch.randn(5, 5, dtype=torch.float64) * 4
    eye = torch.eye(5, dtype=torch.float64)
    # SiglipModel.forward(return_loss=True), as transformers writes it
    reference = -torch.nn.functional.logsigmoid((2 * eye - 1) * logits).sum(dim=-1).mean()
    assert sigmoid_contrastive_loss(logits).item() == pytest.approx(reference.item(), rel=1e-12)


@pytest.mark.parametrize("family", BASE_FAMILY_TYPES)
def test_config_records_the_base_family_and_its_tower_configs(family, tiny_base_dir, tmp_path):
    model = HySACModel.from_dual_encoder(str(tiny_base_dir(family)))
    config = model.config
    family_spec = BASE_FAMILIES[family]
    assert config.base_model_type == family
    assert config.base_model_name_or_path == str(tiny_base_dir(family))
    assert type(config.text_config).__name__ == family_spec.text_config_class
    assert type(config.vision_config).__name__ == family_spec.vision_config_class
    assert config.projection_dim == 32
    bias = SIGLIP_LOGIT_BIAS_INIT if family in SIGLIP_FAMILIES else None
    assert config.logit_bias_init_value == bias
    names = set(dict(model.named_parameters()))
    assert (LOGIT_BIAS in names) == (bias is not None)
    assert model.scalar_parameter_names == SCALAR_PARAMETERS + ((LOGIT_BIAS,) if bias is not None else ())
    if bias is not None:
        assert model.logit_bias.item() == bias and model.logit_bias.dtype == torch.float32
    # CLIP and MetaCLIP 2 keep their projections; SigLIP's heads sit inside the towers.
    assert hasattr(model, "text_projection") == family_spec.has_projections
    base_keys = set(base_model(tiny_base_dir(family), family).state_dict()) - {"logit_scale", LOGIT_BIAS}
    assert set(model.state_dict()) - set(model.scalar_parameter_names) == base_keys
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["base_model_type"] == family
    assert saved["text_config"]["model_type"] == config.text_config.model_type
    reloaded = HySACModel.from_pretrained(tmp_path)
    assert type(reloaded.text_model) is type(model.text_model) and reloaded.config.base_model_type == family


@pytest.mark.parametrize("family", BASE_FAMILY_TYPES)
def test_saved_folder_reloads_with_the_same_embeddings_and_processor_rule(
    family, tiny_base_dir, tiny_family_model_dir, family_batch
):
    model, processor = load_model(tiny_family_model_dir(family))
    in_memory = tiny_hysac(tiny_base_dir(family))  # what the folder was saved from
    batch = family_batch(family)
    with torch.no_grad():
        assert torch.equal(model.encode_text(**text_inputs(batch)), in_memory.encode_text(**text_inputs(batch)))
        assert torch.equal(model.encode_image(**image_inputs(batch)), in_memory.encode_image(**image_inputs(batch)))
    assert type(processor.image_processor).__name__.startswith(
        {"clip": "CLIP", "metaclip_2": "CLIP", "siglip": "Siglip", "siglip2": "Siglip2"}[family]
    )
    assert processor.is_fixed_length == (family in SIGLIP_FAMILIES)
    assert processor.max_length == (64 if family in SIGLIP_FAMILIES else 77)
    fresh = processor(text=["a photo of a cat"], images=[np.zeros((20, 30, 3), np.uint8)])
    naflex = {"pixel_values", "pixel_attention_mask", "spatial_shapes"}
    assert set(image_inputs(fresh)) == (naflex if family == "siglip2" else {"pixel_values"})


@pytest.mark.parametrize("family", SIGLIP_FAMILIES)
def test_siglip_texts_are_always_padded_to_64_and_pad_to_longest_would_be_wrong(family, tiny_base_dir, captions):
    model = tiny_hysac(tiny_base_dir(family))
    processor = load_base_processor(str(tiny_base_dir(family)), model)
    base = base_model(tiny_base_dir(family), family, torch.float32)
    texts = [captions["cat"], captions["astronaut"]]
    longest = processor.tokenizer(texts, padding="longest", return_tensors="pt")
    assert longest["input_ids"].shape[1] < 64
    fixed = processor(text=texts)
    assert fixed["input_ids"].shape == (2, 64)
    # Whatever a caller asks, the processor pads to 64 (sentence-transformers asks for padding=True).
    for padding in (True, "longest", False, "max_length"):
        assert torch.equal(processor(text=texts, padding=padding)["input_ids"], fixed["input_ids"])
    with torch.no_grad():
        base_fixed = features(base.get_text_features(**text_inputs(fixed)))
        base_longest = features(base.get_text_features(**text_inputs(longest)))
        ours = model.encode_text(**text_inputs(fixed), lift=False)
    # The base tower pools the last position: padding to the longest text silently changes its features.
    assert (base_fixed - base_longest).abs().max() > 1e-3
    torch.testing.assert_close(ours, base_fixed, rtol=0, atol=0)
    # HySAC refuses such input instead of embedding it wrongly.
    with pytest.raises(ValueError, match="exactly 64 tokens"):
        model.encode_text(**text_inputs(longest))
    with pytest.raises(ValueError, match="drop max_length"):
        processor(text=texts, max_length=16)


@pytest.mark.parametrize("family", ("clip", "metaclip_2"))
def test_causal_families_pad_to_the_longest_with_the_same_embeddings(family, tiny_base_dir, captions):
    model = tiny_hysac(tiny_base_dir(family))
    processor = load_base_processor(str(tiny_base_dir(family)), model)
    texts = [captions["cat"], captions["astronaut"]]
    longest, full = processor(text=texts), processor(text=texts, padding="max_length")
    assert longest["input_ids"].shape[1] < full["input_ids"].shape[1] == 77
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_text(**text_inputs(longest)), model.encode_text(**text_inputs(full)), rtol=0, atol=1e-6
        )


def test_naflex_inputs_pass_through_every_image_method(tiny_base_dir, family_batch):
    model = tiny_hysac(tiny_base_dir("siglip2"))
    batch = family_batch("siglip2")
    inputs = image_inputs(batch)
    assert inputs["pixel_values"].ndim == 3 and inputs["spatial_shapes"].shape == (3, 2)
    with torch.no_grad():
        image = model.encode_image(**inputs)
        out = model(**inputs)
        via_features = features(model.get_image_features(**inputs))
    assert torch.equal(out.image_embeds, image) and torch.equal(via_features, image)
    with pytest.raises(ValueError, match="spatial_shapes"):
        model.encode_image(inputs["pixel_values"], pixel_attention_mask=inputs["pixel_attention_mask"])
    with pytest.raises(ValueError, match=r"\(batch, patches, 768\)"):
        model.encode_image(torch.zeros(1, 3, 64, 64), **{k: v[:1] for k, v in inputs.items() if k != "pixel_values"})
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        model.encode_image(**inputs, interpolate_pos_encoding=True)
    siglip = tiny_hysac(tiny_base_dir("siglip"))
    with pytest.raises(ValueError, match="NaFlex"):
        siglip.encode_image(torch.zeros(1, 3, 64, 64), spatial_shapes=inputs["spatial_shapes"][:1])


@pytest.mark.parametrize("family", ("siglip", "siglip2"))
def test_half_precision_loading_keeps_the_logit_bias_float32(family, tiny_family_model_dir):
    model = HySACModel.from_pretrained(tiny_family_model_dir(family), dtype=torch.bfloat16)
    assert model.logit_bias.dtype == torch.float32 and model.logit_bias.item() == -3.5
    assert model.text_model.embeddings.token_embedding.weight.dtype == torch.bfloat16
    assert model.half().logit_bias.dtype == torch.float32


def test_a_clip_can_get_a_logit_bias_and_a_siglip_can_drop_it(tiny_base_dir):
    clip = HySACModel.from_dual_encoder(tiny_base_dir("clip"), logit_bias_init_value=-10.0)
    assert clip.has_logit_bias and clip.logit_bias.item() == -10.0
    siglip = HySACModel.from_dual_encoder(tiny_base_dir("siglip"), logit_bias_init_value=None)
    assert not siglip.has_logit_bias


def test_from_dual_encoder_and_from_clip_refuse_what_they_cannot_lift(tiny_base_dir, tiny_family_model_dir):
    with pytest.raises(TypeError, match="SiglipModel"):
        HySACModel.from_dual_encoder(torch.nn.Linear(2, 2))
    vision_only = transformers.SiglipVisionModel(tiny_dual_encoder_config("siglip").vision_config)
    with pytest.raises(TypeError, match="SiglipVisionModel"):
        HySACModel.from_dual_encoder(vision_only)
    with pytest.raises(ValueError, match="already a HySAC model"):
        HySACModel.from_dual_encoder(str(tiny_family_model_dir("siglip")))
    with pytest.raises(TypeError, match="from_dual_encoder"):
        HySACModel.from_clip(base_model(tiny_base_dir("siglip"), "siglip"))
    with pytest.raises(ValueError, match="use HySACModel.from_dual_encoder"):
        HySACModel.from_clip(str(tiny_base_dir("siglip")))
    with pytest.raises(TypeError, match="from the base model"):
        HySACModel.from_dual_encoder(str(tiny_base_dir("siglip")), projection_dim=8)
    config = tiny_dual_encoder_config("siglip")
    config.vision_config.vision_use_head = False
    headless = transformers.SiglipModel(config)
    with pytest.raises(ValueError, match="no pooling head"):
        HySACModel.from_dual_encoder(headless)


def test_config_refuses_towers_of_another_family_and_unknown_families():
    siglip = tiny_dual_encoder_config("siglip")
    with pytest.raises(ValueError, match="takes a CLIPTextConfig"):
        HySACConfig(text_config=siglip.text_config, vision_config=siglip.vision_config)
    with pytest.raises(ValueError, match="no base family 'align'"):
        HySACConfig(base_model_type="align")


@pytest.mark.parametrize("family", ("siglip", "siglip2", "metaclip_2"))
def test_a_transformers_release_without_the_family_is_refused_naming_the_release(family, monkeypatch):
    spec = BASE_FAMILIES[family]
    monkeypatch.setattr(transformers, spec.text_config_class, None, raising=False)
    with pytest.raises(ImportError, match=rf"{spec.text_config_class}.*transformers>={spec.since}"):
        HySACConfig(base_model_type=family)


def test_a_clip_folder_saved_before_families_existed_loads_as_clip(hysac, processor, tmp_path):
    hysac.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    for key in ("base_model_type", "base_model_name_or_path", "logit_bias_init_value"):
        config.pop(key)
    config_path.write_text(json.dumps(config))
    for name in ("processor_config.json",):
        path = tmp_path / name
        if path.is_file():
            saved = json.loads(path.read_text())
            saved.pop("text_padding", None), saved.pop("text_max_length", None)
            path.write_text(json.dumps(saved))
    model, old_processor = load_model(tmp_path)
    assert model.config.base_model_type == "clip" and not model.has_logit_bias
    assert old_processor.text_padding == "longest" and old_processor.max_length == 77
    ids = processor(text=["a cat"])["input_ids"]
    with torch.no_grad():
        assert torch.equal(model.encode_text(ids), hysac.encode_text(ids))


def test_lora_targets_per_family_leave_the_attention_pooling_head_alone(tiny_base_dir):
    peft = pytest.importorskip("peft")
    model = tiny_hysac(tiny_base_dir("siglip"))
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=list(model.lora_target_modules)))
    wrapped = {name for name, module in adapted.named_modules() if hasattr(module, "lora_A")}
    assert any(".self_attn.k_proj" in name for name in wrapped) and any("patch_embedding" in name for name in wrapped)
    assert any("head.mlp.fc1" in name for name in wrapped)
    # nn.MultiheadAttention reads out_proj.weight directly: a LoRA there would be ignored, then merged on export.
    assert not any("head.attention" in name for name in wrapped)
    assert HySACModel.from_dual_encoder(tiny_base_dir("clip")).lora_target_modules == (
        "k_proj", "v_proj", "out_proj", "fc1", "fc2", "patch_embedding"
    )


# Runs in a fresh interpreter where hysac_hf and the repo's modeling/ cannot be imported (what a Hub user has).
REMOTE_CHILD = """
import json
import numpy as np
import torch
from PIL import Image
import transformers
from transformers import AutoModel, AutoProcessor, pipeline

folder, out_path, family = sys.argv[1], sys.argv[2], sys.argv[3]
images = [Image.open(p) for p in json.loads(sys.argv[4])]
texts = json.loads(sys.argv[5])
model = AutoModel.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
assert "transformers_modules" in type(model).__module__, type(model).__module__
assert model.config.base_model_type == family, model.config.base_model_type
batch = processor(text=texts, images=images)
with torch.no_grad():
    out = model(**batch)
classifier = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
# transformers' zero-shot pipeline pads the labels to the longest unless the model type says "siglip". HySAC on SigLIP
# refuses such text (it would embed it wrongly); transformers 4 takes tokenizer_kwargs to pad to 64, transformers 5
# drops them, so there the pipeline must fail with HySAC's message.
fixed = model.config.fixed_text_length
kwargs = {"tokenizer_kwargs": {"padding": "max_length", "max_length": fixed}} if fixed else {}
try:
    scores = classifier(images[0], candidate_labels=["cat", "rocket"], **kwargs)
    zs_error = ""
except ValueError as error:
    scores, zs_error = [{"score": 0.5}, {"score": 0.5}], str(error)
np.savez(
    out_path,
    image_embeds=out.image_embeds.numpy(),
    text_embeds=out.text_embeds.numpy(),
    logits=out.logits_per_image.numpy(),
    zs=np.array(sorted(s["score"] for s in scores)),
    zs_error=np.array(zs_error),
    major=np.array(int(transformers.__version__.split(".")[0])),
    tower=np.array(type(model.text_model).__name__),
)
"""

REMOTE_PYTHONS = [sys.executable] + [p for p in [os.environ.get("HYSAC_OTHER_PYTHON")] if p]


# Every family on this line; on the other line (CI names it) SigLIP 2 NaFlex, the family with the most to carry
# across (patch inputs, a tokenizer transformers 5 renames): one subprocess less per family keeps CI short.
REMOTE_CASES = [(family, sys.executable) for family in ("siglip", "siglip2", "metaclip_2")] + [
    ("siglip2", python) for python in REMOTE_PYTHONS[1:]
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, python", REMOTE_CASES, ids=lambda v: {sys.executable: "this-python"}.get(v, "other-line" if "/" in v else v)
)
def test_saved_folder_loads_through_remote_code_without_hysac_hf(family, python, tiny_family_model_dir, photos, tmp_path):
    folder = tiny_family_model_dir(family)
    paths = []
    for name in ("cat", "camera", "logo"):  # RGB, grayscale, RGBA
        photos[name].save(tmp_path / f"{name}.png")
        paths.append(str(tmp_path / f"{name}.png"))
    texts = ["a photo of a cat", "a black and white photo of a man with a camera", "a logo with a snake"]
    out_path = tmp_path / "out.npz"
    args = [str(folder), str(out_path), family, json.dumps(paths), json.dumps(texts)]
    result = run_without_hysac_hf(REMOTE_CHILD, tmp_path, python=python, args=args)
    assert result.returncode == 0, result.stderr[-4000:]
    child = np.load(out_path)
    model, processor = load_model(folder)
    from PIL import Image

    batch = processor(text=texts, images=[Image.open(p) for p in paths])
    with torch.no_grad():
        out = model(**batch)
    assert str(child["tower"]) == type(model.text_model).__name__ or python != sys.executable
    # Identical in the same environment; across transformers lines the towers may differ in the last bits.
    check = (
        np.testing.assert_array_equal
        if python == sys.executable
        else (lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5))
    )
    check(child["image_embeds"], out.image_embeds.numpy())
    check(child["text_embeds"], out.text_embeds.numpy())
    check(child["logits"], out.logits_per_image.numpy())
    assert child["zs"].shape == (2,) and np.all(np.isfinite(child["zs"]))
    if family in SIGLIP_FAMILIES and int(child["major"]) >= 5:
        assert "padded to exactly 64 tokens" in str(child["zs_error"])
    else:
        assert str(child["zs_error"]) == ""
