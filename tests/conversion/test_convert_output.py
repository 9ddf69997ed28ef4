"""The converted folder: its files, loading in a fresh process without `hysac_hf`, dtypes, and the Hub push
(with the `HfApi` boundary mocked; everything before it is real)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open

from hysac_hf.testing import run_without_hysac_hf

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "conversion" / "convert_hysac_original_to_hf.py"
SCALARS = ("logit_scale", "curv", "visual_alpha", "textual_alpha")


def load_convert_script():
    spec = importlib.util.spec_from_file_location("convert_hysac_original_to_hf_output", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# CI sets HYSAC_OTHER_PYTHON to the interpreter of the other transformers line (4.x <-> 5.x): a folder converted
# with one line must load in the other.
PYTHONS = {"this": sys.executable, "other": os.environ.get("HYSAC_OTHER_PYTHON")}


@pytest.fixture(scope="module")
def converted_folder(authors_checkpoints, tiny_clip_dir, tmp_path_factory):
    checkpoint = authors_checkpoints["legacy"]  # the harder layout: LoRA + the folded patch bias
    output_dir = tmp_path_factory.mktemp("converted") / "hysac-tiny"
    code = load_convert_script().main(
        [
            "--checkpoint_path",
            str(checkpoint.checkpoint),
            "--bounds_path",
            str(checkpoint.bounds),
            "--clip_config",
            str(tiny_clip_dir),
            "--output_dir",
            str(output_dir),
            "--verify",
        ]
    )
    assert code == 0
    return output_dir


def test_output_folder_contents(converted_folder, authors_checkpoints):
    files = {p.name for p in converted_folder.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert converted_folder.stat().st_mode & 0o777 == 0o777 & ~umask  # not the private mode of a temp folder
    assert {
        "model.safetensors",
        "config.json",
        "README.md",
        "preprocessor_config.json",
        "tokenizer_config.json",
        "configuration_hysac.py",
        "modeling_hysac.py",
        "processing_hysac.py",
        "lorentz.py",
        "traversal.py",
        "pipeline_hysac.py",
        "handler.py",  # the Inference Endpoints handler
    } <= files
    assert not any(name.endswith((".pth", ".bin")) for name in files)
    config = json.loads((converted_folder / "config.json").read_text())
    assert config["model_type"] == "hysac"
    assert config["bounds"] == json.loads(authors_checkpoints["legacy"].bounds.read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_hysac.HySACModel"
    assert config["auto_map"]["AutoModelForZeroShotImageClassification"] == "modeling_hysac.HySACModel"
    pipelines = config["custom_pipelines"]  # conversion saves through HySACModel.save_pretrained: both pipelines
    assert pipelines["unsafe-content-detection"]["impl"] == "pipeline_hysac.UnsafeContentDetectionPipeline"
    assert pipelines["safe-retrieval"]["impl"] == "pipeline_hysac.SafeRetrievalPipeline"
    with safe_open(converted_folder / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
        assert not any(
            "lora" in k or "base_layer" in k or k.startswith(("visual.", "textual.", "pixel_")) for k in keys
        )
        assert "vision_model.embeddings.patch_embedding.bias" not in keys
        assert set(SCALARS) <= keys
    card = ModelCard.load(converted_folder / "README.md")
    assert card.data.license == "cc-by-nc-4.0" and card.data.base_model == "openai/clip-vit-large-patch14"
    assert "differ by at most" in card.text  # --verify's result is reported


def test_bfloat16_output_keeps_scalars_in_float32(authors_checkpoints, tiny_clip_dir, tmp_path):
    checkpoint = authors_checkpoints["current"]
    output_dir = tmp_path / "bf16"
    load_convert_script().main(
        [
            "--checkpoint_path",
            str(checkpoint.checkpoint),
            "--clip_config",
            str(tiny_clip_dir),
            "--output_dir",
            str(output_dir),
            "--dtype",
            "bfloat16",
        ]
    )
    with safe_open(output_dir / "model.safetensors", "pt") as weights:
        dtypes = {k: weights.get_tensor(k).dtype for k in weights.keys()}
    assert {dtypes[k] for k in SCALARS} == {torch.float32}
    assert {d for k, d in dtypes.items() if k not in SCALARS} == {torch.bfloat16}


@pytest.mark.slow
@pytest.mark.parametrize("python", sorted(PYTHONS))
def test_converted_folder_loads_without_hysac_hf(converted_folder, authors_checkpoints, fixed_batch, tmp_path, python):
    """`AutoModel`/`AutoProcessor` with trust_remote_code in a fresh process, float32/float16/bfloat16; also with
    the other transformers line when CI names its interpreter."""
    reference = authors_checkpoints["legacy"].reference
    pixel_values, input_ids = fixed_batch
    with torch.no_grad():
        expected = {"image": reference.encode_image(pixel_values), "text": reference.encode_text(input_ids)}
    torch.save({"pixel_values": pixel_values, "input_ids": input_ids}, tmp_path / "inputs.pt")
    code = f"""
        import torch, transformers
        from PIL import Image
        import numpy as np
        from transformers import AutoModel, AutoProcessor
        folder = {str(converted_folder)!r}
        inputs = torch.load("inputs.pt", weights_only=True)
        dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        results = {{}}
        for name in ("float32", "float16", "bfloat16"):
            dtype = getattr(torch, name)
            model = AutoModel.from_pretrained(folder, trust_remote_code=True, **{{dtype_arg: dtype}}).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            with torch.no_grad():
                image = model.encode_image(inputs["pixel_values"].to(dtype))
                text = model.encode_text(inputs["input_ids"])
                results[name] = {{
                    "image": image, "text": text,
                    "tower_dtype": str(model.vision_model.embeddings.patch_embedding.weight.dtype),
                    "curv_dtype": str(model.curv.dtype),
                    "distance": model.distance_to_root(image),
                    "traversed": model.traverse_to_safe(image, target="image"),
                }}
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        batch = processor(text=["a photo of a cat"], images=[Image.fromarray(np.zeros((32, 48, 3), dtype=np.uint8))])
        results["processor"] = {{"class": type(processor).__name__, "input_ids": batch["input_ids"],
                                 "pixel_shape": tuple(batch["pixel_values"].shape)}}
        torch.save(results, "results.pt")
        """
    if PYTHONS[python] is None:
        pytest.skip("HYSAC_OTHER_PYTHON (the other transformers line's interpreter) is not set")
    result = run_without_hysac_hf(code, tmp_path, python=PYTHONS[python])
    assert result.returncode == 0, result.stderr[-4000:]
    results = torch.load(tmp_path / "results.pt", weights_only=True)
    fp32 = results["float32"]
    torch.testing.assert_close(fp32["image"], expected["image"], rtol=0, atol=1e-5)
    torch.testing.assert_close(fp32["text"], expected["text"], rtol=0, atol=1e-5)
    for name, tolerance in (("float16", 1e-2), ("bfloat16", 5e-2)):  # measured: ~1e-3 and ~1e-2
        got = results[name]
        assert got["tower_dtype"] == f"torch.{name}" and got["curv_dtype"] == "torch.float32"
        assert got["image"].dtype == torch.float32  # the lift and everything after it run in float32
        for modality in ("image", "text"):
            error = (got[modality] - expected[modality]).norm(dim=-1) / expected[modality].norm(dim=-1)
            assert float(error.max()) < tolerance, (name, modality, float(error.max()))
        assert torch.isfinite(got["distance"]).all() and torch.isfinite(got["traversed"]).all()
    assert results["processor"]["class"] == "HySACProcessor"
    assert results["processor"]["input_ids"][0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert results["processor"]["pixel_shape"] == (1, 3, 224, 224)


# ----------------------------------------------------------------------------------------------------------------
# Push to the Hub (HfApi mocked)
def test_push_creates_repo_and_uploads_in_one_commit(authors_checkpoints, tiny_clip_dir, tmp_path, capsys):
    checkpoint = authors_checkpoints["current"]
    output_dir = tmp_path / "pushed"
    commit_url = "https://huggingface.co/org/hysac-test/commit/0123abcd"
    uploaded = {}

    def upload_folder(**kwargs):
        uploaded.update(kwargs, files=sorted(p.name for p in Path(kwargs["folder_path"]).iterdir()))
        return mock.Mock(commit_url=commit_url)

    api = mock.Mock()
    api.upload_folder.side_effect = upload_folder
    with (
        mock.patch("huggingface_hub.HfApi", return_value=api) as api_class,
        mock.patch("huggingface_hub.get_token", return_value="hf_fake"),
    ):
        code = load_convert_script().main(
            [
                "--checkpoint_path",
                str(checkpoint.checkpoint),
                "--clip_config",
                str(tiny_clip_dir),
                "--output_dir",
                str(output_dir),
                "--push_to_hub",
                "org/hysac-test",
                "--private",
                "--commit_message",
                "Add HySAC",
            ]
        )
    assert code == 0
    api_class.assert_called_once_with(token="hf_fake")
    api.create_repo.assert_called_once_with(repo_id="org/hysac-test", repo_type="model", private=True, exist_ok=True)
    assert api.upload_folder.call_count == 1
    assert uploaded["repo_id"] == "org/hysac-test" and uploaded["commit_message"] == "Add HySAC"
    assert Path(uploaded["folder_path"]) == output_dir.resolve()
    assert {"model.safetensors", "config.json", "README.md", "modeling_hysac.py"} <= set(uploaded["files"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == commit_url
    assert 'AutoModel.from_pretrained("org/hysac-test"' in (output_dir / "README.md").read_text()


def test_push_without_token_is_refused_before_converting(authors_checkpoints, tiny_clip_dir, tmp_path, capsys):
    checkpoint = authors_checkpoints["current"]
    output_dir = tmp_path / "no_token"
    with mock.patch("huggingface_hub.HfApi") as api_class, mock.patch("huggingface_hub.get_token", return_value=None):
        code = load_convert_script().main(
            [
                "--checkpoint_path",
                str(checkpoint.checkpoint),
                "--clip_config",
                str(tiny_clip_dir),
                "--output_dir",
                str(output_dir),
                "--push_to_hub",
                "org/hysac-test",
            ]
        )
    assert code == 2
    assert "hf auth login" in capsys.readouterr().err
    api_class.assert_not_called()
    assert not output_dir.exists()  # checked before the (slow) conversion: nothing written


def test_private_without_push_is_rejected(tmp_path):
    with pytest.raises(SystemExit):
        load_convert_script().parse_args(["--checkpoint_path", "x.pth", "--output_dir", str(tmp_path), "--private"])
