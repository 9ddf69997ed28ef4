"""HySACModel: exact CLIP towers, the Lorentz lift, logits and loss against float64 hand math, PreTrainedModel features."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import CLIPModel

from hysac_hf import HySACConfig, HySACModel, HySACOutput


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    return CLIPModel.from_pretrained(tiny_clip_dir).eval()


@pytest.fixture(scope="module")
def batch(processor, photos, captions):
    names = list(photos)
    return processor(text=[captions[n] for n in names], images=[photos[n] for n in names])


def np_lift(features: torch.Tensor, log_alpha: float, log_curv: float) -> np.ndarray:
    """Hand formula in float64: exp_0(v) = sinh(sqrt(c)|v|) v / (sqrt(c)|v|), v = features * exp(alpha)."""
    v = features.detach().double().numpy() * math.exp(log_alpha)
    rc = math.sqrt(math.exp(log_curv))
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.sinh(rc * norm) * v / (rc * norm)


def np_dist(x: np.ndarray, y: np.ndarray, c: float) -> np.ndarray:
    tx = np.sqrt(1 / c + (x**2).sum(-1))
    ty = np.sqrt(1 / c + (y**2).sum(-1))
    return np.arccosh(np.maximum(-c * (x @ y.T - np.outer(tx, ty)), 1.0)) / math.sqrt(c)


def test_from_clip_copies_towers_exactly(tiny_clip_dir, clip, batch):
    model = HySACModel.from_clip(tiny_clip_dir)
    assert not model.training
    with torch.no_grad():
        clip_image = clip.visual_projection(clip.vision_model(pixel_values=batch["pixel_values"]).pooler_output)
        clip_text = clip.text_projection(clip.text_model(input_ids=batch["input_ids"]).pooler_output)
        ours_image = model.get_image_features(batch["pixel_values"], lift=False)
        ours_text = model.get_text_features(batch["input_ids"], lift=False)
    assert torch.equal(ours_image, clip_image)
    assert torch.equal(ours_text, clip_text)
    clip_state = clip.state_dict()
    for name, tensor in model.state_dict().items():
        if name in ("logit_scale", "curv", "visual_alpha", "textual_alpha"):
            continue
        assert torch.equal(tensor, clip_state[name]), name
    # HySAC's own scalars come from its config, not from CLIP's logit scale (ln 100 for OpenAI CLIP).
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07), abs=1e-6)
    assert model.curv.item() == pytest.approx(0.0) and model.visual_alpha.item() == pytest.approx(math.log(32**-0.5))


def test_from_clip_accepts_a_model_object_and_config_overrides(clip):
    model = HySACModel.from_clip(clip, curv_init=2.0, learn_curv=False)
    assert model.curvature.item() == pytest.approx(2.0)
    assert model.curv.requires_grad is False
    with pytest.raises(TypeError, match="CLIPModel"):
        HySACModel.from_clip(torch.nn.Linear(2, 2))


def test_embeddings_are_the_lorentz_lift_of_the_projected_features(hysac, batch):
    with torch.no_grad():
        image = hysac.get_image_features(batch["pixel_values"])
        text = hysac.get_text_features(batch["input_ids"], batch["attention_mask"])
        image_feats = hysac.get_image_features(batch["pixel_values"], lift=False)
        text_feats = hysac.get_text_features(batch["input_ids"], lift=False)
    assert image.shape == (6, 32) and image.dtype == torch.float32
    np.testing.assert_allclose(image.numpy(), np_lift(image_feats, hysac.visual_alpha.item(), hysac.curv.item()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(text.numpy(), np_lift(text_feats, hysac.textual_alpha.item(), hysac.curv.item()), rtol=1e-5, atol=1e-6)
    # distance_to_root is asinh(sqrt(c)|x|)/sqrt(c) = sqrt(c)|v|/sqrt(c) = |v|: the scaled feature norm.
    expected = (image_feats.double() * math.exp(hysac.visual_alpha.item())).norm(dim=-1)
    np.testing.assert_allclose(hysac.distance_to_root(image).numpy(), expected.numpy(), rtol=1e-5)


def test_forward_logits_and_loss_match_float64_hand_computation(hysac, batch):
    with torch.no_grad():
        out = hysac(**batch, return_loss=True)
    assert isinstance(out, HySACOutput)
    c = math.exp(hysac.curv.item())
    dist = np_dist(out.text_embeds.double().numpy(), out.image_embeds.double().numpy(), c)
    logits = -math.exp(hysac.logit_scale.item()) * dist
    np.testing.assert_allclose(out.logits_per_text.numpy(), logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.logits_per_image, out.logits_per_text.t())
    n = logits.shape[0]

    def ce(lg: np.ndarray) -> float:
        lg = lg - lg.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(lg).sum(axis=1)) - lg[np.arange(n), np.arange(n)]))

    assert out.loss.item() == pytest.approx(0.5 * (ce(logits) + ce(logits.T)), rel=1e-5, abs=1e-5)
    assert out.text_model_output.pooler_output.shape == (n, 64)
    as_tuple = hysac(**batch, return_dict=False)
    assert torch.equal(as_tuple[0], hysac(**batch).logits_per_image)


def test_either_modality_alone(hysac, batch):
    with torch.no_grad():
        images_only = hysac(pixel_values=batch["pixel_values"])
        text_only = hysac(input_ids=batch["input_ids"])
        both = hysac(**batch)
    assert images_only.text_embeds is None and images_only.logits_per_image is None
    assert text_only.image_embeds is None
    assert torch.equal(images_only.image_embeds, both.image_embeds)
    assert torch.equal(text_only.text_embeds, both.text_embeds)


def test_attention_mask_and_padding_do_not_change_text_embeddings(hysac, processor, captions):
    texts = list(captions.values())
    padded = processor(text=texts)  # 77 tokens, padded with the end-of-text token
    longest = processor(text=texts, padding="longest")
    with torch.no_grad():
        a = hysac.get_text_features(padded["input_ids"])
        b = hysac.get_text_features(padded["input_ids"], padded["attention_mask"])
        c = hysac.get_text_features(longest["input_ids"], longest["attention_mask"])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_save_and_load_round_trip_is_exact(hysac, batch, tmp_path):
    hysac.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = HySACModel.from_pretrained(tmp_path)
    assert not loaded.training
    for name, tensor in hysac.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits_per_image, hysac(**batch).logits_per_image)
    assert loaded.config.bounds == hysac.config.bounds


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_dtype_loading_keeps_scalars_precise(hysac, batch, tmp_path, dtype):
    hysac.save_pretrained(tmp_path)
    loaded = HySACModel.from_pretrained(tmp_path, torch_dtype=dtype)
    assert loaded.vision_model.embeddings.patch_embedding.weight.dtype == dtype
    assert loaded.curv.dtype == torch.float32  # _keep_in_fp32_modules
    if dtype == torch.bfloat16:  # CPU fp16 matmuls are not supported everywhere; bf16 is
        with torch.no_grad():
            half = loaded.get_image_features(batch["pixel_values"].to(dtype))
            full = hysac.get_image_features(batch["pixel_values"])
        assert half.dtype == torch.float32
        torch.testing.assert_close(half, full, atol=0.05 * float(full.abs().max()), rtol=0.05)


def test_attn_implementation_device_map_and_no_split_modules(hysac, batch, tmp_path):
    hysac.save_pretrained(tmp_path)
    eager = HySACModel.from_pretrained(tmp_path, attn_implementation="eager", device_map="cpu")
    sdpa = HySACModel.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert eager.text_model.config._attn_implementation == "eager"
    assert sdpa.vision_model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(eager(**batch).logits_per_image, sdpa(**batch).logits_per_image, atol=1e-4, rtol=1e-4)
    assert "CLIPEncoderLayer" in HySACModel._no_split_modules


def test_gradient_checkpointing_gives_the_same_gradients(hysac, batch):
    def grads(model):
        model.zero_grad()
        model.train()
        torch.manual_seed(0)
        model(**batch, return_loss=True).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads(hysac)
    hysac.gradient_checkpointing_enable()
    assert hysac.is_gradient_checkpointing
    checkpointed = grads(hysac)
    assert plain.keys() == checkpointed.keys() and {"curv", "visual_alpha", "logit_scale"} <= plain.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_clamp_parameters_applies_the_reference_clamps(hysac):
    with torch.no_grad():
        hysac.curv.fill_(5.0)
        hysac.visual_alpha.fill_(0.5)
        hysac.textual_alpha.fill_(-0.5)
        hysac.logit_scale.fill_(1.0)
    hysac.clamp_parameters()
    assert hysac.curv.item() == pytest.approx(math.log(10.0))
    assert hysac.visual_alpha.item() == 0.0 and hysac.textual_alpha.item() == -0.5
    assert hysac.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        hysac.logit_scale.fill_(9.0)
        hysac.curv.fill_(-9.0)
    hysac.clamp_parameters()
    assert hysac.logit_scale.item() == pytest.approx(math.log(100))
    assert hysac.curv.item() == pytest.approx(math.log(0.1))


def test_init_weights_initialises_the_hyperbolic_scalars():
    from hysac_hf.testing import TINY_TEXT, TINY_VISION

    cfg = HySACConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=16, curv_init=3.0, alpha_init=0.2)
    model = HySACModel(cfg)
    assert model.curvature.item() == pytest.approx(3.0)
    assert math.exp(model.visual_alpha.item()) == pytest.approx(0.2)
    assert math.exp(model.textual_alpha.item()) == pytest.approx(0.2)
    assert model.visual_projection.weight.std().item() == pytest.approx(64**-0.5, rel=0.2)


# ------------------------------------------------------------------------------------------------------------
# Bad input: clear, actionable errors
def test_bad_inputs_raise_actionable_errors(hysac, batch):
    pixels, ids = batch["pixel_values"], batch["input_ids"]
    with pytest.raises(ValueError, match="empty batch"):
        hysac.get_image_features(pixels[:0])
    with pytest.raises(ValueError, match="empty batch"):
        hysac.get_text_features(ids[:0])
    with pytest.raises(ValueError, match=r"pixel_values\[None\]"):
        hysac.get_image_features(pixels[0])
    with pytest.raises(ValueError, match="channels"):
        hysac.get_image_features(pixels[:, :1])
    with pytest.raises(ValueError, match="expects 224x224"):
        hysac.get_image_features(pixels[..., :200, :200])
    bad = pixels.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        hysac(pixel_values=bad)
    with pytest.raises(ValueError, match="truncation=True"):
        hysac.get_text_features(torch.cat([ids, ids[:, :3]], dim=1))
    with pytest.raises(ValueError, match="another tokenizer"):
        hysac.get_text_features(ids + 50_000)
    with pytest.raises(ValueError, match="pass input_ids, pixel_values or both"):
        hysac()
    with pytest.raises(ValueError, match="needs both"):
        hysac(input_ids=ids, return_loss=True)
    with pytest.raises(ValueError, match="paired"):
        hysac(input_ids=ids, pixel_values=pixels[:2], return_loss=True)
    with pytest.raises(ValueError, match=r"shape \(batch, 32\)"):
        hysac.distance_to_root(torch.zeros(3, 7))


def test_bounds_dependent_calls_without_bounds_explain_how_to_calibrate(tiny_clip_dir):
    model = HySACModel.from_clip(tiny_clip_dir)
    embeds = torch.zeros(2, 32)
    with pytest.raises(ValueError, match="hysac-calibrate"):
        model.traverse_to_safe(embeds)
    with pytest.raises(ValueError, match="unsafe_thresholds"):
        model.classify_unsafe(embeds)
    assert model.classify_unsafe(embeds + 1.0, threshold=0.5).all()
