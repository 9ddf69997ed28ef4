"""Conversion of the authors' checkpoint: LoRA folding vs peft's merge, embeddings / distances / traversal vs the
authors' path, strict key accounting, and failures that leave nothing behind."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hysac_hf.authors_reference import (
    dist_to_root_reference,
    merge_authors_towers,
    to_legacy_layout,
    traverse_to_safe_reference,
)
from hysac_hf.conversion_utils import (
    ConversionError,
    convert_checkpoint,
    convert_state_dict,
    fold_lora,
    is_hub_repo_id,
    load_clip_config,
    resolve_inputs,
    verify_conversion,
)

ATOL = 1e-5
REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "conversion" / "convert_hysac_original_to_hf.py"
LAYOUTS = ("current", "legacy")


def load_convert_script():
    """The CLI script as a module (it lives outside the package)."""
    spec = importlib.util.spec_from_file_location("convert_hysac_original_to_hf", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_nothing_written(output_dir: Path) -> None:
    assert not output_dir.exists(), f"{output_dir} was created by a failed conversion"
    leftovers = [p.name for p in output_dir.parent.iterdir() if p.name.startswith(f".{output_dir.name}.tmp-")]
    assert not leftovers, f"temporary folders left behind: {leftovers}"


# ----------------------------------------------------------------------------------------------------------------
# LoRA folding
def test_fold_lora_linear_and_conv_match_the_layers_they_replace():
    """W' applied to x equals base(x) + (alpha / r) * B(A(x)), for a Linear and a strided Conv2d LoRA."""
    generator = torch.Generator().manual_seed(0)
    rank, alpha = 4, 3.0
    weight = torch.randn(6, 5, generator=generator)
    a, b = torch.randn(rank, 5, generator=generator), torch.randn(6, rank, generator=generator)
    x = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    merged = fold_lora(weight, a, b, alpha).double()
    expected = x @ weight.double().T + (alpha / rank) * (x @ a.double().T) @ b.double().T
    torch.testing.assert_close(x @ merged.T, expected, rtol=1e-5, atol=1e-5)

    conv_w = torch.randn(8, 3, 4, 4, generator=generator)
    conv_a = torch.randn(rank, 3, 4, 4, generator=generator)
    conv_b = torch.randn(8, rank, 1, 1, generator=generator)
    image = torch.randn(2, 3, 12, 12, generator=generator, dtype=torch.float64)
    merged = fold_lora(conv_w, conv_a, conv_b, alpha).double()
    expected = F.conv2d(image, conv_w.double(), stride=4) + (alpha / rank) * F.conv2d(
        F.conv2d(image, conv_a.double(), stride=4), conv_b.double()
    )
    torch.testing.assert_close(F.conv2d(image, merged, stride=4), expected, rtol=1e-5, atol=1e-5)


def test_fold_lora_rejects_factors_that_do_not_fit():
    with pytest.raises(ConversionError, match="do not fit"):
        fold_lora(torch.zeros(6, 5), torch.zeros(4, 3), torch.zeros(6, 4), 1.0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_converted_weights_equal_peft_merge_and_unload(authors_checkpoints, layout):
    checkpoint = authors_checkpoints[layout]
    converted, report = convert_state_dict(checkpoint.state_dict)
    merged = merge_authors_towers(checkpoint.reference)  # peft's own merge (legacy bias restored on the conv)
    assert report.layout == layout and report.lora_modules > 0 and report.ranks == {16}
    assert sorted(report.dropped) == ["pixel_mean", "pixel_std"]
    bias = merged.pop("vision_model.embeddings.patch_embedding.bias", None)
    assert (bias is not None) == (layout == "legacy") == report.folded_patch_bias
    for key, value in merged.items():
        expected = value.clone()
        if bias is not None and key == "vision_model.embeddings.position_embedding.weight":
            expected[1:] += bias
        torch.testing.assert_close(converted[key], expected, rtol=0, atol=1e-6, msg=key)
    # Not a no-op: the adapters changed the weights.
    base = checkpoint.state_dict[
        "visual.base_model.model.vision_model.encoder.layers.0.mlp.fc1."
        + ("base_layer.weight" if layout == "current" else "weight")
    ]
    assert (converted["vision_model.encoder.layers.0.mlp.fc1.weight"] - base).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# Embeddings, distances to the root and the traversal vs the authors' path
@pytest.fixture(scope="module")
def converted_models(authors_checkpoints, tiny_clip_dir):
    return {
        layout: convert_checkpoint(c.checkpoint, c.bounds, tiny_clip_dir)[0]
        for layout, c in authors_checkpoints.items()
    }


@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_converted_model_matches_the_authors(authors_checkpoints, converted_models, fixed_batch, layout):
    checkpoint, model = authors_checkpoints[layout], converted_models[layout]
    reference = checkpoint.reference
    pixel_values, input_ids = fixed_batch
    ref_images, ref_texts = reference.encode_image(pixel_values), reference.encode_text(input_ids)
    images, texts = model.encode_image(pixel_values), model.encode_text(input_ids)
    torch.testing.assert_close(images, ref_images, rtol=0, atol=ATOL)
    torch.testing.assert_close(texts, ref_texts, rtol=0, atol=ATOL)
    # The curvature and scales came over: the lift is not the untrained one.
    assert math.isclose(float(model.curvature), 1.7, rel_tol=1e-6)
    # The authors feed input_ids only; with the processor's attention mask the result is the same.
    first_eos = (input_ids == input_ids[0, -1]).int().argmax(-1)
    attention_mask = (torch.arange(input_ids.shape[1]) <= first_eos[:, None]).long()
    torch.testing.assert_close(model.encode_text(input_ids, attention_mask), ref_texts, rtol=0, atol=ATOL)

    curv = reference.curv.exp()
    torch.testing.assert_close(
        model.distance_to_root(images), dist_to_root_reference(ref_images, curv), rtol=0, atol=ATOL
    )
    torch.testing.assert_close(
        model.distance_to_root(texts), dist_to_root_reference(ref_texts, curv), rtol=0, atol=ATOL
    )

    bound = json.loads(checkpoint.bounds.read_text())["V"]["up_95"]
    expected = torch.stack([traverse_to_safe_reference(row, bound, curv) for row in ref_images])
    traversed = model.traverse_to_safe(images, target="image", method="reference", bound="up_95")
    torch.testing.assert_close(traversed, expected, rtol=0, atol=ATOL)
    moved = (expected - ref_images).abs().amax(-1) > 0
    assert 0 < int(moved.sum()) < len(moved), "the fixture bounds should move some photos and keep others"


@torch.no_grad()
def test_legacy_patch_bias_is_needed(authors_checkpoints, fixed_batch, tiny_clip_dir):
    """Dropping the legacy bias (what a naive converter does) changes the image embeddings visibly."""
    checkpoint = authors_checkpoints["legacy"]
    state = {k: v for k, v in checkpoint.state_dict.items() if not k.endswith("patch_embedding.bias")}
    converted, report = convert_state_dict(state)
    assert not report.folded_patch_bias
    from hysac_hf.conversion_utils import build_hysac_config, load_bounds, load_into_hysac

    model = load_into_hysac(
        build_hysac_config(load_clip_config(tiny_clip_dir), load_bounds(checkpoint.bounds)), converted
    )
    pixel_values, _ = fixed_batch
    assert (model.encode_image(pixel_values) - checkpoint.reference.encode_image(pixel_values)).abs().max() > 1e-3


def test_legacy_layout_without_adapter_name_converts_identically(authors_checkpoints, trained_authors_state):
    bias = authors_checkpoints["legacy"].state_dict[
        "visual.base_model.model.vision_model.embeddings.patch_embedding.bias"
    ]
    unnamed = to_legacy_layout(trained_authors_state, patch_bias=bias, adapter_name=False)
    assert any(k.endswith("lora_A.weight") for k in unnamed)
    converted, report = convert_state_dict(unnamed)
    expected, _ = convert_state_dict(authors_checkpoints["legacy"].state_dict)
    assert report.adapter_names == {"<none>"} and converted.keys() == expected.keys()
    for key in expected:
        assert torch.equal(converted[key], expected[key]), key


# ----------------------------------------------------------------------------------------------------------------
# Strict key accounting
def test_unmapped_missing_and_mismatched_keys_are_listed(trained_authors_state, tiny_clip_dir):
    from hysac_hf.conversion_utils import build_hysac_config, load_into_hysac

    state = dict(trained_authors_state)
    state["visual.extra_head.weight"] = torch.zeros(2)
    with pytest.raises(ConversionError, match=r"visual\.extra_head\.weight"):
        convert_state_dict(state)

    state = dict(trained_authors_state)
    del state["textual.base_model.model.text_model.final_layer_norm.bias"]
    state["textual.base_model.model.text_model.final_layer_norm.gamma"] = torch.zeros(64)
    converted, _ = convert_state_dict(state)
    config = build_hysac_config(load_clip_config(tiny_clip_dir), None)
    with pytest.raises(ConversionError) as error:
        load_into_hysac(config, converted)
    assert "text_model.final_layer_norm.bias" in str(error.value)
    assert "text_model.final_layer_norm.gamma" in str(error.value)

    state = dict(trained_authors_state)
    state["curv"] = torch.zeros(3)
    converted, _ = convert_state_dict(state)
    with pytest.raises(ConversionError, match=r"shape mismatches \(1\): curv: checkpoint \(3,\) vs model \(\)"):
        load_into_hysac(config, converted)


def test_lora_factor_without_partner_is_an_error(trained_authors_state):
    state = {k: v for k, v in trained_authors_state.items() if "layers.0.mlp.fc2.lora_B" not in k}
    with pytest.raises(ConversionError, match=r"missing lora_A or lora_B for .*layers\.0\.mlp\.fc2"):
        convert_state_dict(state)


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs through the command line: a clear error and nothing in --output_dir
def _run_cli(args: list[str], capsys) -> tuple[int, str]:
    """Exit status and the error, which must be one line without a traceback (exit 2, as every command)."""
    code = load_convert_script().main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("hysac-convert: error: ")]
    assert "Traceback" not in err and len(errors) == (1 if code else 0), err
    return code, err


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "foreign", "not_a_dict"])
def test_bad_checkpoint_fails_cleanly(authors_checkpoints, tiny_clip_dir, tmp_path, capsys, damage):
    good = authors_checkpoints["current"]
    bad = tmp_path / "hysac_model.pth"
    if damage == "corrupt":
        bad.write_bytes(b"this is not a torch checkpoint at all" * 100)
    elif damage == "truncated":
        data = good.checkpoint.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "foreign":
        from transformers import CLIPModel

        torch.save(CLIPModel.from_pretrained(tiny_clip_dir).state_dict(), bad)
    else:
        torch.save([torch.zeros(3)], bad)
    output_dir = tmp_path / "out"
    code, err = _run_cli(
        [
            "--checkpoint_path",
            str(bad),
            "--bounds_path",
            str(good.bounds),
            "--clip_config",
            str(tiny_clip_dir),
            "--output_dir",
            str(output_dir),
        ],
        capsys,
    )
    assert code == 2
    expected = {
        "corrupt": "could not be read",
        "truncated": "could not be read",
        "foreign": "not a HySAC checkpoint",
        "not_a_dict": "not a non-empty state dict",
    }[damage]
    assert expected in err
    assert_nothing_written(output_dir)


def test_bounds_with_missing_keys_fail_cleanly(authors_checkpoints, tiny_clip_dir, tmp_path, capsys):
    good = authors_checkpoints["current"]
    bounds = json.loads(good.bounds.read_text())
    del bounds["G"]
    del bounds["V"]["up_95"]
    bad_bounds = tmp_path / "bounds.json"
    bad_bounds.write_text(json.dumps(bounds))
    output_dir = tmp_path / "out"
    code, err = _run_cli(
        [
            "--checkpoint_path",
            str(good.checkpoint),
            "--bounds_path",
            str(bad_bounds),
            "--clip_config",
            str(tiny_clip_dir),
            "--output_dir",
            str(output_dir),
        ],
        capsys,
    )
    assert code == 2 and "'G'" in err and "V.up_95" in err
    assert_nothing_written(output_dir)


def test_clip_config_that_does_not_fit_fails_cleanly(authors_checkpoints, tmp_path, capsys):
    from hysac_hf.testing import tiny_clip_config

    other = tmp_path / "other_clip"
    tiny_clip_config(projection_dim=48, vision_config={"hidden_size": 96}).save_pretrained(other)
    good = authors_checkpoints["current"]
    output_dir = tmp_path / "out"
    code, err = _run_cli(
        ["--checkpoint_path", str(good.checkpoint), "--clip_config", str(other), "--output_dir", str(output_dir)],
        capsys,
    )
    assert code == 2
    assert "shape mismatches (39)" in err and "text_projection.weight: checkpoint (32, 64) vs model (48, 64)" in err
    assert_nothing_written(output_dir)


def test_failure_while_writing_leaves_nothing(authors_checkpoints, tiny_clip_dir, tmp_path, monkeypatch):
    """A crash after some files were written (here: the model card) removes the half-written folder."""
    module = load_convert_script()
    import hysac_hf.model_card as model_card

    class UnwritableCard:
        def save(self, path):
            assert Path(path).parent.joinpath("model.safetensors").is_file()  # weights were already written
            raise OSError("disk full")

    def broken_card(*args, **kwargs):
        return UnwritableCard()

    monkeypatch.setattr(model_card, "render_model_card", broken_card)
    good = authors_checkpoints["current"]
    output_dir = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        module.main(
            [
                "--checkpoint_path",
                str(good.checkpoint),
                "--clip_config",
                str(tiny_clip_dir),
                "--output_dir",
                str(output_dir),
            ]
        )
    assert_nothing_written(output_dir)


def test_existing_output_dir_is_not_overwritten(authors_checkpoints, tiny_clip_dir, tmp_path, capsys):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "keep.txt").write_text("mine")
    code, err = _run_cli(
        [
            "--checkpoint_path",
            str(authors_checkpoints["current"].checkpoint),
            "--clip_config",
            str(tiny_clip_dir),
            "--output_dir",
            str(output_dir),
        ],
        capsys,
    )
    assert code == 2 and "not empty" in err
    assert [p.name for p in output_dir.iterdir()] == ["keep.txt"]


# ----------------------------------------------------------------------------------------------------------------
# --verify
def test_verify_detects_a_wrong_conversion(authors_checkpoints, converted_models, tiny_clip_dir):
    checkpoint = authors_checkpoints["legacy"]
    config = load_clip_config(tiny_clip_dir)
    model = converted_models["legacy"]
    assert verify_conversion(model, checkpoint.state_dict, config) <= ATOL
    wrong, _, _ = convert_checkpoint(checkpoint.checkpoint, checkpoint.bounds, tiny_clip_dir, lora_alpha=2.0)
    with pytest.raises(ConversionError, match="differs from the authors' model"):
        verify_conversion(wrong, checkpoint.state_dict, config, lora_alpha=1.0)


# ----------------------------------------------------------------------------------------------------------------
# Where the checkpoint comes from
def test_hub_repo_id_vs_local_path():
    assert is_hub_repo_id("aimagelab/HySAC") and is_hub_repo_id("hysac")
    for local in ("./hysac_model.pth", "/abs/hysac_model.pth", "ckpt/hysac_model.pth", "../x/y", "a/b/c"):
        assert not is_hub_repo_id(local), local


def test_repo_id_downloads_both_files(authors_checkpoints, monkeypatch):
    calls = []
    files = {
        "hysac_model.pth": authors_checkpoints["current"].checkpoint,
        "hysac_bounds.json": authors_checkpoints["current"].bounds,
    }

    def fake_download(repo_id, filename, revision=None):
        calls.append((repo_id, filename, revision))
        return str(files[filename])

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    checkpoint, bounds = resolve_inputs("aimagelab/HySAC", revision="abc123")
    assert (checkpoint, bounds) == (files["hysac_model.pth"], files["hysac_bounds.json"])
    assert calls == [
        ("aimagelab/HySAC", "hysac_model.pth", "abc123"),
        ("aimagelab/HySAC", "hysac_bounds.json", "abc123"),
    ]


def test_missing_local_file_never_reaches_the_hub(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a local path must not be looked up on the Hub")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_network)
    with pytest.raises(FileNotFoundError, match="neither an existing file"):
        resolve_inputs(str(tmp_path / "missing" / "hysac_model.pth"))
    (tmp_path / "hysac_model.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="--bounds_path"):
        resolve_inputs(str(tmp_path / "hysac_model.pth"))


def test_unreachable_repo_id_is_a_clear_error(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("offline mode is enabled")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", offline)
    with pytest.raises(FileNotFoundError, match=r"could not be downloaded from the Hub repo .*HF_HUB_OFFLINE"):
        resolve_inputs("aimagelab/HySAC")


def test_converting_needs_no_peft(authors_checkpoints, tiny_clip_dir, monkeypatch, fixed_batch):
    """With peft unimportable, conversion (not --verify) still works and gives the same model."""
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    with pytest.raises(ImportError):
        import peft  # noqa: F401
    checkpoint = authors_checkpoints["legacy"]
    model, _, _ = convert_checkpoint(checkpoint.checkpoint, checkpoint.bounds, tiny_clip_dir)
    pixel_values, _ = fixed_batch
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(pixel_values), checkpoint.reference.encode_image(pixel_values), rtol=0, atol=ATOL
        )
