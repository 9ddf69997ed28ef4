"""train.py on other base families: a tiny SigLIP trains with the sigmoid loss under `accelerate launch` on two CPU
processes exactly as one process with the global batch, exports, calibrates and answers both pipelines; SigLIP 2
NaFlex and MetaCLIP 2 train with their own LoRA targets and export."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from hysac_hf import HySACModel, train
from hysac_hf.loading import load_model
from hysac_hf.testing import REPO_ROOT, run_on_cpu_processes

pytestmark = pytest.mark.slow


def common(base_dir, output_dir, batch: int, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(base_dir), "--output_dir", str(output_dir), "--cpu",
        "--max_train_samples", "16", "--per_device_train_batch_size", str(batch), "--lora_dropout", "0",
        "--validation_split", "validation", "--max_eval_samples", "20", "--per_device_eval_batch_size", "8",
        "--select_best", "none", "--learning_rate", "1e-2", "--seed", "5", "--max_train_steps", "2", *extra,
    ]  # fmt: skip


def launch(args: list[str], processes: int, cwd) -> str:
    result = run_on_cpu_processes(
        [REPO_ROOT / "train.py", *args], num_processes=processes, env={"PYTHONPATH": str(REPO_ROOT)}, cwd=cwd
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


@pytest.mark.main_line
def test_siglip_trains_with_the_sigmoid_loss_on_two_processes_as_on_one(tiny_base_dir, tmp_path, photos, captions):
    base = tiny_base_dir("siglip")
    # 2 processes x 4 quadruplets under accelerate launch, against 1 process x 8: the same global batches.
    launch(common(base, tmp_path / "two", 4), 2, tmp_path)
    launch(common(base, tmp_path / "one", 8), 1, tmp_path)
    two, one = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("two", "one"))
    assert two.keys() == one.keys() and "logit_bias" in two
    diff = max((two[k] - one[k]).abs().max().item() for k in one)
    assert diff <= 1e-5, diff
    start = HySACModel.from_dual_encoder(base).state_dict()
    assert max((two[k] - start[k]).abs().max().item() for k in start) > 1e-4  # training moved the weights
    assert two["logit_bias"].item() != pytest.approx(-10.0, abs=1e-6)  # the sigmoid loss trained the bias
    # Calibrated on the validation split, under two processes as under one.
    folder = tmp_path / "two" / "model"
    config = json.loads((folder / "config.json").read_text())
    other = json.loads((tmp_path / "one" / "model" / "config.json").read_text())
    assert config["base_model_type"] == "siglip" and config["logit_bias_init_value"] == -10.0
    for key in "SVUG":
        for stat in ("avg", "up_95", "low_05"):
            assert config["bounds"][key][stat] == pytest.approx(other["bounds"][key][stat], abs=1e-5)
    assert set(config["unsafe_thresholds"]) == {"image", "text"}
    card = (folder / "README.md").read_text()
    assert "HySAC on SigLIP" in card and "contrastive loss: sigmoid" in card and "siglip" in card.split("---")[1]

    # Both pipelines answer from the exported folder, with its calibrated threshold and bounds.
    from transformers import pipeline

    model, processor = load_model(folder)
    detector = pipeline("unsafe-content-detection", model=str(folder), trust_remote_code=True)
    found = detector(photos["cat"])
    with torch.no_grad():
        embeds = model.encode_image(**processor(images=[photos["cat"]]))
    assert found["score"] == pytest.approx(float(model.distance_to_root(embeds)[0]), rel=1e-5)
    assert found["threshold"] == pytest.approx(config["unsafe_thresholds"]["image"])
    retriever = pipeline("safe-retrieval", model=str(folder), trust_remote_code=True)
    gallery = [photos[name] for name in ("cat", "rocket", "coffee")]
    hit = retriever(captions["rocket"], gallery=gallery, top_k=3, policy="redirect")
    assert sorted(h["index"] for h in hit["results"]) == [0, 1, 2]
    assert hit["results"][0]["distance"] <= hit["results"][-1]["distance"]


@pytest.mark.parametrize("family", ["siglip2", "metaclip_2"])
def test_naflex_and_metaclip_2_train_with_their_lora_targets_and_export(family, tiny_base_dir, tmp_path, photos):
    base = tiny_base_dir(family)
    summary = train.main(
        train.parse_args(
            [
                *common(base, tmp_path / "run", 4),
                "--validation_split", "none", "--max_train_steps", "2",
            ]  # fmt: skip
        )
    )
    assert summary["global_step"] == 2
    exported = HySACModel.from_pretrained(tmp_path / "run" / "model")
    start = HySACModel.from_dual_encoder(base)
    moved = {
        name
        for name, tensor in exported.state_dict().items()
        if not torch.equal(tensor, start.state_dict()[name])
    }
    # LoRA merged into the family's targets, the scalars trained; the projections/text head stayed frozen.
    assert any(".self_attn.v_proj." in name for name in moved) and any("mlp.fc2" in name for name in moved)
    assert {"curv", "visual_alpha", "textual_alpha"} <= moved
    frozen = ["text_projection.weight", "visual_projection.weight"] if family == "metaclip_2" else ["text_model.head.weight"]
    assert not moved & set(frozen)
    if family == "siglip2":
        assert "logit_bias" in moved  # sigmoid by default
        assert not any("head.attention" in name for name in moved)  # the pooling head's MultiheadAttention: no LoRA
    else:
        assert not exported.has_logit_bias  # softmax by default
    model, processor = load_model(tmp_path / "run" / "model")
    with torch.no_grad():
        embeds = model.encode_image(**processor(images=[photos["cat"]]))
    assert embeds.shape == (1, 32) and bool(torch.isfinite(embeds).all())
    assert math.isfinite(float(model.curvature))
