"""HySACModel: exact CLIP towers, the Lorentz lift, logits and loss against float64 hand math, PreTrainedModel features."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hysac_hf.modeling.configuration_hysac import MAX_LOGIT_SCALE
from hysac_hf.modeling.modeling_hysac import FEATURES_ARE_MODEL_OUTPUTS, SCALAR_PARAMETERS
from transformers import CLIPModel

from hysac_hf import HySACConfig, HySACModel, HySACOutput
from hysac_hf.testing import TINY_TEXT, TINY_VISION, tiny_clip_config

SCALARS = ("logit_scale", "curv", "visual_alpha", "textual_alpha")


def float32(value: float) -> float:
    """`value` rounded to float32, as a Python float (what an exact float32 parameter holds)."""
    return torch.tensor(value, dtype=torch.float32).item()


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
        ours_image = model.encode_image(batch["pixel_values"], lift=False)
        ours_text = model.encode_text(batch["input_ids"], lift=False)
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
        image = hysac.encode_image(batch["pixel_values"])
        text = hysac.encode_text(batch["input_ids"], batch["attention_mask"])
        image_feats = hysac.encode_image(batch["pixel_values"], lift=False)
        text_feats = hysac.encode_text(batch["input_ids"], lift=False)
    assert image.shape == (6, 32) and image.dtype == torch.float32
    np.testing.assert_allclose(
        image.numpy(), np_lift(image_feats, hysac.visual_alpha.item(), hysac.curv.item()), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        text.numpy(), np_lift(text_feats, hysac.textual_alpha.item(), hysac.curv.item()), rtol=1e-5, atol=1e-6
    )
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
        a = hysac.encode_text(padded["input_ids"])
        b = hysac.encode_text(padded["input_ids"], padded["attention_mask"])
        c = hysac.encode_text(longest["input_ids"], longest["attention_mask"])
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
            half = loaded.encode_image(batch["pixel_values"].to(dtype))
            full = hysac.encode_image(batch["pixel_values"])
        assert half.dtype == torch.float32
        torch.testing.assert_close(half, full, atol=0.05 * float(full.abs().max()), rtol=0.05)


def test_attn_implementation_device_map_and_no_split_modules(hysac, batch, tmp_path):
    hysac.save_pretrained(tmp_path)
    eager = HySACModel.from_pretrained(tmp_path, attn_implementation="eager", device_map="cpu")
    sdpa = HySACModel.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert eager.text_model.config._attn_implementation == "eager"
    assert sdpa.vision_model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(
            eager(**batch).logits_per_image, sdpa(**batch).logits_per_image, atol=1e-4, rtol=1e-4
        )
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
    # The authors' (and MERU's) literal 4.6052, not log(100) = 4.6051702 (they differ in float32 too).
    assert hysac.logit_scale.item() == float32(MAX_LOGIT_SCALE) != float32(math.log(100))
    assert hysac.curv.item() == pytest.approx(math.log(0.1))


def test_init_weights_initialises_the_hyperbolic_scalars():
    cfg = HySACConfig(
        text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=16, curv_init=3.0, feature_scale_init=0.2
    )
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
        hysac.encode_image(pixels[:0])
    with pytest.raises(ValueError, match="empty batch"):
        hysac.encode_text(ids[:0])
    with pytest.raises(ValueError, match=r"pixel_values\[None\]"):
        hysac.encode_image(pixels[0])
    with pytest.raises(ValueError, match="channels"):
        hysac.encode_image(pixels[:, :1])
    with pytest.raises(ValueError, match="expects 224x224"):
        hysac.encode_image(pixels[..., :200, :200])
    bad = pixels.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        hysac(pixel_values=bad)
    with pytest.raises(ValueError, match="truncation=True"):
        hysac.encode_text(torch.full((2, 80), 320))  # more than 77 tokens
    with pytest.raises(ValueError, match="another tokenizer"):
        hysac.encode_text(ids + 50_000)
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


# ------------------------------------------------------------------------------------------------------------
# The learned scalars are float32 and exact whatever the dtype (issue 10)
def assert_scalars_exact(model: HySACModel, expected: dict[str, float]) -> None:
    for name in SCALARS:
        param = getattr(model, name)
        assert param.dtype == torch.float32, (name, param.dtype)
        assert param.item() == float32(expected[name]), (name, param.item(), expected[name])


def test_scalars_are_float32_and_exact_when_built_under_a_half_default_dtype():
    cfg = HySACConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=32, curv_init=1.3)
    model = HySACModel._from_config(cfg, dtype=torch.bfloat16)
    assert model.text_projection.weight.dtype == torch.bfloat16
    log_scale = math.log(32**-0.5)
    assert_scalars_exact(
        model,
        {
            "curv": math.log(1.3),
            "logit_scale": math.log(1 / 0.07),
            "visual_alpha": log_scale,
            "textual_alpha": log_scale,
        },
    )
    assert torch.get_default_dtype() == torch.float32


def test_from_clip_of_a_half_precision_clip_keeps_the_scalars_exact(tiny_clip_dir):
    clip_bf16 = CLIPModel.from_pretrained(tiny_clip_dir, dtype=torch.bfloat16)
    model = HySACModel.from_clip(clip_bf16, curv_init=1.3, feature_scale_init=0.2)
    assert model.vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert torch.equal(model.text_projection.weight, clip_bf16.text_projection.weight)
    expected = {"curv": math.log(1.3), "logit_scale": math.log(1 / 0.07)}
    assert_scalars_exact(model, {**expected, "visual_alpha": math.log(0.2), "textual_alpha": math.log(0.2)})


@pytest.mark.parametrize(
    "cast, dtype",
    [
        (lambda m: m.half(), torch.float16),
        (lambda m: m.to(torch.float16), torch.float16),
        (lambda m: m.bfloat16(), torch.bfloat16),
        (lambda m: m.to(dtype=torch.bfloat16), torch.bfloat16),
    ],
    ids=["half", "to-float16", "bfloat16", "to-bfloat16"],
)
def test_casting_the_model_casts_the_towers_and_keeps_the_scalars(hysac, cast, dtype):
    expected = {name: getattr(hysac, name).item() for name in SCALARS}
    assert expected["curv"] == float32(math.log(1.7))
    hysac.logit_scale.grad = torch.tensor(0.125)
    curv_param = hysac.curv
    cast(hysac)
    assert hysac.text_projection.weight.dtype == dtype
    assert hysac.vision_model.encoder.layers[0].mlp.fc1.weight.dtype == dtype
    assert_scalars_exact(hysac, expected)
    assert hysac.curv is curv_param and hysac.curv.requires_grad  # the same Parameter (optimiser references)
    assert hysac.logit_scale.grad.dtype == torch.float32 and hysac.logit_scale.grad.item() == 0.125
    assert hysac.curvature.item() == float32(1.7) or hysac.curvature.item() == pytest.approx(1.7, rel=1e-7)
    hysac.float()
    assert_scalars_exact(hysac, expected)


def test_keep_in_fp32_lists_are_disjoint_and_cover_the_scalars():
    assert set(SCALAR_PARAMETERS) == set(SCALARS)
    keep = set(HySACModel._keep_in_fp32_modules or [])
    strict = set(HySACModel._keep_in_fp32_modules_strict or [])
    assert not keep & strict
    assert strict == set(SCALARS)  # strict: kept float32 under fp16 AND bf16 loading, on transformers 4 and 5


# ------------------------------------------------------------------------------------------------------------
# Missing tower weights get CLIP's initialisation (issue 10)
TOWER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def tower_weight_stds(model) -> dict[tuple[str, str], float]:
    """Per tower and per module type, the std of all encoder-layer weights of that type."""
    stds = {}
    for tower in ("text_model", "vision_model"):
        layers = getattr(model, tower).encoder.layers
        for kind in TOWER_LINEARS:
            weights = torch.cat([layer.get_submodule(kind).weight.detach().flatten() for layer in layers])
            stds[tower, kind] = weights.float().std().item()
    return stds


def test_weights_missing_from_a_checkpoint_get_clips_initialisation():
    # Text width 64 == projection_dim 64, as ViT-L/14's text width 768 == its projection 768.
    text = {**TINY_TEXT, "num_hidden_layers": 3}
    cfg = HySACConfig(text_config=text, vision_config=TINY_VISION, projection_dim=64)
    torch.manual_seed(0)
    ours = HySACModel.from_pretrained(None, config=cfg, state_dict={})
    torch.manual_seed(1)
    clip = CLIPModel.from_pretrained(None, config=tiny_clip_config(64, text_config=text), state_dict={})
    ours_stds, clip_stds = tower_weight_stds(ours), tower_weight_stds(clip)
    for key, clip_std in clip_stds.items():
        assert ours_stds[key] == pytest.approx(clip_std, rel=0.1), (key, ours_stds[key], clip_std)
    # CLIP's formulas, independently: out_proj = width^-0.5, fc1 = (2 width)^-0.5, q/k/v = width^-0.5 (2 layers)^-0.5
    assert ours_stds["text_model", "self_attn.out_proj"] == pytest.approx(64**-0.5, rel=0.1)
    assert ours_stds["vision_model", "mlp.fc1"] == pytest.approx(128**-0.5, rel=0.1)
    assert ours_stds["text_model", "self_attn.q_proj"] == pytest.approx(64**-0.5 * 6**-0.5, rel=0.1)
    # The projections by identity: CLIP's projection init, and no text-tower Linear mistaken for one
    # (biases zeroed, as CLIP does for every Linear).
    assert ours.text_projection.weight.std().item() == pytest.approx(64**-0.5, rel=0.1)
    for layer in ours.text_model.encoder.layers:
        for kind in TOWER_LINEARS:
            assert not layer.get_submodule(kind).bias.any(), kind
    assert_scalars_exact(
        ours,
        {
            "curv": 0.0,
            "logit_scale": math.log(1 / 0.07),
            "visual_alpha": math.log(64**-0.5),
            "textual_alpha": math.log(64**-0.5),
        },
    )


def test_a_partial_checkpoint_initialises_only_what_is_missing(hysac, tmp_path):
    from safetensors.torch import load_file, save_file

    hysac.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = "text_model.encoder.layers.0.mlp.fc1.weight"
    del weights[dropped]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = HySACModel.from_pretrained(tmp_path)
    for name, tensor in hysac.state_dict().items():
        if name != dropped:
            assert torch.equal(loaded.state_dict()[name], tensor), name  # loaded scalars and projections untouched
    fresh = loaded.get_parameter(dropped)
    assert not torch.equal(fresh, hysac.get_parameter(dropped))
    assert fresh.std().item() == pytest.approx(128**-0.5, rel=0.1)  # CLIP's fc1 std, (2 * width)^-0.5


# ------------------------------------------------------------------------------------------------------------
# get_*_features follow CLIPModel's contract; encode_* give the plain tensor (issue 10)
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"output_hidden_states": True}, {"return_dict": False}, {"output_hidden_states": True, "return_dict": True}],
    ids=["plain", "hidden-states", "tuple", "dict"],
)
def test_get_features_return_what_clipmodel_returns(hysac, clip, batch, kwargs):
    pixels, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        expected = {"image": hysac.encode_image(pixels), "text": hysac.encode_text(ids, mask)}
        pairs = {
            "image": (hysac.get_image_features(pixels, **kwargs), clip.get_image_features(pixels, **kwargs)),
            "text": (hysac.get_text_features(ids, mask, **kwargs), clip.get_text_features(ids, mask, **kwargs)),
        }
    for modality, (ours, theirs) in pairs.items():
        assert type(ours) is type(theirs), (modality, type(ours), type(theirs))
        if isinstance(ours, torch.Tensor):  # transformers 4
            assert not FEATURES_ARE_MODEL_OUTPUTS
            assert torch.equal(ours, expected[modality])
            continue
        assert FEATURES_ARE_MODEL_OUTPUTS
        if isinstance(ours, tuple):
            assert len(ours) == len(theirs)
            assert torch.equal(ours[0], theirs[0])  # last_hidden_state: the same tower
            assert torch.equal(ours[1], expected[modality])  # pooler_output: the hyperboloid embedding
            continue
        assert list(ours.keys()) == list(theirs.keys())
        assert ours.pooler_output.shape == theirs.pooler_output.shape
        assert torch.equal(ours.pooler_output, expected[modality])
        assert torch.equal(ours.last_hidden_state, theirs.last_hidden_state)
        if kwargs.get("output_hidden_states"):
            assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
            for a, b in zip(ours.hidden_states, theirs.hidden_states):
                assert torch.equal(a, b)


def test_get_features_pass_output_attentions_like_clipmodel(tiny_clip_dir, batch):
    model = HySACModel.from_clip(tiny_clip_dir)
    clip = CLIPModel.from_pretrained(tiny_clip_dir, attn_implementation="eager").eval()
    model.set_attn_implementation("eager") if hasattr(model, "set_attn_implementation") else None
    with torch.no_grad():
        ours = model.get_image_features(batch["pixel_values"], output_attentions=True)
        theirs = clip.get_image_features(batch["pixel_values"], output_attentions=True)
    assert type(ours) is type(theirs)
    if FEATURES_ARE_MODEL_OUTPUTS:
        assert len(ours.attentions) == len(theirs.attentions) == 2
        for a, b in zip(ours.attentions, theirs.attentions):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_encode_is_the_plain_tensor_api_and_get_features_refuse_lift(hysac, clip, batch):
    pixels, ids = batch["pixel_values"], batch["input_ids"]
    with torch.no_grad():
        image, text = hysac.encode_image(pixels), hysac.encode_text(ids)
        image_feats = hysac.encode_image(pixels, lift=False)
        clip_feats = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
    assert isinstance(image, torch.Tensor) and image.shape == (6, 32) and image.dtype == torch.float32
    assert isinstance(text, torch.Tensor) and text.shape == (6, 32) and text.dtype == torch.float32
    assert torch.equal(image_feats, clip_feats)
    with pytest.raises(TypeError):  # keyword-only options
        hysac.encode_image(pixels, False)
    with pytest.raises(TypeError, match=r"encode_image\(pixel_values, lift=False\)"):
        hysac.get_image_features(pixels, lift=False)
    with pytest.raises(TypeError, match=r"encode_text\(input_ids, lift=False\)"):
        hysac.get_text_features(ids, lift=False)


def test_check_inputs_false_skips_only_the_value_checks(hysac, batch):
    pixels = batch["pixel_values"].clone()
    pixels[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        hysac.encode_image(pixels)
    with torch.no_grad():
        out = hysac.encode_image(pixels, check_inputs=False)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()
    with pytest.raises(ValueError, match="expects 224x224"):  # shape checks cost nothing and stay on
        hysac.encode_image(pixels[..., :200, :200], check_inputs=False)
    with pytest.raises(ValueError, match="empty batch"):
        hysac.encode_text(batch["input_ids"][:0], check_inputs=False)
    ids = batch["input_ids"].clone()
    ids[0, 1] = -1
    with pytest.raises(ValueError, match="another tokenizer"):  # value checks stay on in eager calls
        hysac.encode_text(ids)


# ------------------------------------------------------------------------------------------------------------
# Non-finite learned scalars are refused at load time (issue 10)
@pytest.mark.parametrize("name", SCALARS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scalars_in_the_weights_are_refused_naming_parameter_and_file(hysac, tmp_path, name, value):
    from safetensors.torch import load_file, save_file

    hysac.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    weights = load_file(path)
    weights[name] = torch.tensor(value)
    save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"^{name} = .*{path}.* is not finite") as err:
        HySACModel.from_pretrained(tmp_path)
    assert str(value) in str(err.value)
    with pytest.raises(ValueError, match=name):
        from transformers import AutoModel

        AutoModel.from_pretrained(tmp_path)


def test_finite_checkpoint_still_loads_with_loading_info(hysac, tmp_path):
    hysac.save_pretrained(tmp_path)
    model, info = HySACModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and torch.equal(model.curv, hysac.curv)


# ------------------------------------------------------------------------------------------------------------
# Renames (issue 11): old config keys
def test_a_folder_saved_with_the_old_config_keys_loads(hysac, tmp_path):
    import json

    hysac.config.feature_scale_init = 0.125
    hysac.config.traversal_offset = 0.6
    hysac.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    data = json.loads(config_path.read_text())
    data["alpha_init"] = data.pop("feature_scale_init")  # what folders saved before the rename hold
    data["traversal_alpha"] = data.pop("traversal_offset")
    config_path.write_text(json.dumps(data))
    loaded = HySACModel.from_pretrained(tmp_path)
    assert loaded.config.feature_scale_init == 0.125 and loaded.config.traversal_offset == 0.6
    assert not hasattr(loaded.config, "alpha_init") and not hasattr(loaded.config, "traversal_alpha")
    assert torch.equal(loaded.traversal_threshold("image"), hysac.traversal_threshold("image"))
    # A fresh model from that config initialises its feature scales from the old key.
    fresh = HySACModel(loaded.config)
    assert fresh.visual_alpha.item() == float32(math.log(0.125))
    loaded.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["feature_scale_init"] == 0.125 and saved["traversal_offset"] == 0.6
    assert "alpha_init" not in saved and "traversal_alpha" not in saved
