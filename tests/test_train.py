"""train.py / hysac_hf.training end to end on mini-ViSU with a tiny model: resume, NaN guard, LoRA export."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from hysac_hf import HySACModel
from hysac_hf.training import (
    HySACTrainingModule,
    NonFiniteLossError,
    build_parser,
    configure_trainable,
    export_model,
    list_checkpoints,
    main,
    parameter_groups,
)


def run(tiny_clip_dir, output_dir, *extra: str) -> dict:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    argv = [
        "--model_name_or_path",
        str(tiny_clip_dir),
        "--output_dir",
        str(output_dir),
        "--cpu",
        "--max_train_samples",
        "12",
        "--per_device_train_batch_size",
        "4",
        "--validation_split",
        "none",
        "--select_best",
        "none",
        "--learning_rate",
        "1e-3",
        "--num_warmup_steps",
        "1",
        "--seed",
        "3",
        *extra,
    ]
    return main(argv)


@pytest.mark.slow
def test_resumed_run_is_bitwise_identical_to_an_uninterrupted_run(tiny_clip_dir, tmp_path):
    # 12 rows / batch 4 = 3 steps per epoch; stopping at step 2 resumes mid-epoch (skips 2 batches), then
    # crosses into the next epoch (a new permutation).
    run(tiny_clip_dir, tmp_path / "full", "--max_train_steps", "4")
    run(
        tiny_clip_dir,
        tmp_path / "split",
        "--max_train_steps",
        "2",
        "--schedule_steps",
        "4",
        "--checkpointing_steps",
        "1",
    )
    assert [p.name for p in list_checkpoints(tmp_path / "split")] == ["step_1", "step_2"]
    summary = run(tiny_clip_dir, tmp_path / "split", "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert summary["global_step"] == 4
    full = load_file(tmp_path / "full" / "model.safetensors")
    resumed = load_file(tmp_path / "split" / "model.safetensors")
    start = HySACModel.from_clip(tiny_clip_dir).state_dict()
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    # Training changed the weights (through LoRA merges and the scalars): the equality is not trivial.
    assert not torch.equal(
        full["vision_model.encoder.layers.0.mlp.fc1.weight"], start["vision_model.encoder.layers.0.mlp.fc1.weight"]
    )
    assert full["visual_alpha"].item() != pytest.approx(start["visual_alpha"].item(), abs=1e-6)


@pytest.mark.slow
def test_nan_loss_stops_before_the_weights_change(tiny_clip_dir, tmp_path, monkeypatch):
    from hysac_hf import losses, training

    calls = {"n": 0}
    original = losses.HySACLoss.forward
    modules = []

    def poisoned(self, *args, **kwargs):
        terms = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # the second optimiser step
            terms["entailment_safety"] = terms["entailment_safety"] * float("nan")
            terms["loss"] = terms["loss"] + terms["entailment_safety"]
        return terms

    original_forward = training.HySACTrainingModule.forward

    def spy(self, *args, **kwargs):
        if not modules:
            modules.append(self)
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(losses.HySACLoss, "forward", poisoned)
    monkeypatch.setattr(training.HySACTrainingModule, "forward", spy)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at optimiser step 1.*not updated"):
        run(tiny_clip_dir, tmp_path / "nan", "--max_train_steps", "3", "--checkpointing_steps", "1")
    saved = load_file(list_checkpoints(tmp_path / "nan")[-1] / "model.safetensors")
    state = modules[0].state_dict()
    assert all(torch.isfinite(v).all() for v in state.values())
    assert all(torch.equal(state[k], saved[k]) for k in saved)


def test_lora_setup_and_export_merges_into_a_plain_model(tiny_clip_dir):
    args = build_parser().parse_args(["--model_name_or_path", "x", "--output_dir", "x"])
    module = HySACTrainingModule(configure_trainable(HySACModel.from_clip(tiny_clip_dir), args))
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert all(
        ("lora_" in n) or n.split(".")[-1] in ("logit_scale", "curv", "visual_alpha", "textual_alpha")
        for n in trainable
    )
    targets = {n.split(".lora_")[0].split(".")[-1] for n in trainable if "lora_A" in n}
    assert targets == {"k_proj", "v_proj", "out_proj", "fc1", "fc2", "patch_embedding"}
    assert any("text_model" in n for n in trainable) and any("vision_model" in n for n in trainable)
    assert not any("projection" in n for n in trainable)
    lora = module.model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (16, 1, 0.1)
    # Scalars and norms/biases get no weight decay.
    groups = parameter_groups(module, 0.2)
    no_decay = {id(p) for p in groups[1]["params"]}
    assert id(module.hysac.curv) in no_decay and id(module.hysac.logit_scale) in no_decay
    assert all(p.ndim >= 2 for p in groups[0]["params"])

    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    module.eval()
    pixels = torch.randn(2, 3, 224, 224)
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407, 49407]] * 2)
    with torch.no_grad():
        image_peft = module.hysac.get_image_features(pixels)
        text_peft = module.hysac.get_text_features(ids)
        plain = export_model(module)
        assert type(plain) is HySACModel and not any("lora" in k for k in plain.state_dict())
        torch.testing.assert_close(plain.get_image_features(pixels), image_peft, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(plain.get_text_features(ids), text_peft, atol=1e-5, rtol=1e-5)
    # LoRA actually changed the outputs: the merge is not a no-op.
    base = HySACModel.from_clip(tiny_clip_dir).eval()
    with torch.no_grad():
        assert not torch.allclose(base.get_image_features(pixels), image_peft, atol=1e-4)


def test_bad_arguments_are_rejected():
    from hysac_hf.training import parse_args

    base = ["--model_name_or_path", "x", "--output_dir", "y"]
    with pytest.raises(ValueError, match="negatives"):
        parse_args(base + ["--per_device_train_batch_size", "1"])
    with pytest.raises(ValueError, match="validation split"):
        parse_args(base + ["--validation_split", "none"])


@pytest.mark.slow
def test_export_loads_with_plain_automodel_and_has_calibrated_bounds(tiny_clip_dir, tmp_path):
    from accelerate.state import AcceleratorState
    from transformers import AutoModel

    AcceleratorState._reset_state(True)
    out = tmp_path / "exported"
    summary = main(
        [
            "--model_name_or_path",
            str(tiny_clip_dir),
            "--output_dir",
            str(out),
            "--cpu",
            "--max_train_samples",
            "8",
            "--max_eval_samples",
            "8",
            "--per_device_train_batch_size",
            "4",
            "--num_train_epochs",
            "1",
            "--select_best",
            "recall_sum",
        ]
    )
    assert len(summary["history"]) == 1 and 0 <= summary["history"][0]["recall_sum"] <= 600
    model = AutoModel.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "HySACModel"
    assert model.config.bounds == summary["bounds"]
    assert set(model.config.bounds) == {"S", "V", "U", "G"}
    assert math.isfinite(model.config.bounds["G"]["avg"])
