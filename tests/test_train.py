"""train.py end to end on mini-ViSU with a tiny model: resume, NaN guard, LoRA export, the export folder and its
card, logs on the console, --push_to_hub (mocked), and bad inputs that must fail early and leave nothing behind."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hysac_hf import HySACModel, train
from hysac_hf.encode import QuadrupletEncoder
from hysac_hf.testing import REPO_ROOT
from hysac_hf.training import (
    NonFiniteLossError,
    build_module,
    configure_trainable,
    export_model,
    list_checkpoints,
    parameter_groups,
)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # each test builds its own Accelerator


def argv(tiny_clip_dir, output_dir, *extra: str) -> list[str]:
    return [
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


def run(tiny_clip_dir, output_dir, *extra: str) -> dict:
    return train.main(train.parse_args(argv(tiny_clip_dir, output_dir, *extra)))


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
    full = load_file(tmp_path / "full" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "split" / "model" / "model.safetensors")
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
    from hysac_hf import losses

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

    original_forward = QuadrupletEncoder.forward

    def spy(self, *args, **kwargs):
        if not modules:
            modules.append(self)
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(losses.HySACLoss, "forward", poisoned)
    monkeypatch.setattr(QuadrupletEncoder, "forward", spy)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at optimiser step 1.*not updated"):
        run(tiny_clip_dir, tmp_path / "nan", "--max_train_steps", "3", "--checkpointing_steps", "1")
    saved = load_file(list_checkpoints(tmp_path / "nan")[-1] / "model.safetensors")
    state = modules[0].state_dict()
    assert all(torch.isfinite(v).all() for v in state.values())
    assert all(torch.equal(state[k], saved[k]) for k in saved)


def test_lora_setup_and_export_merges_into_a_plain_model(tiny_clip_dir):
    module = QuadrupletEncoder(configure_trainable(HySACModel.from_clip(tiny_clip_dir)))
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
        image_peft = module.hysac.encode_image(pixels)
        text_peft = module.hysac.encode_text(ids)
        plain = export_model(module)
        assert type(plain) is HySACModel and not any("lora" in k for k in plain.state_dict())
        torch.testing.assert_close(plain.encode_image(pixels), image_peft, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(plain.encode_text(ids), text_peft, atol=1e-5, rtol=1e-5)
    # LoRA actually changed the outputs: the merge is not a no-op.
    base = HySACModel.from_clip(tiny_clip_dir).eval()
    with torch.no_grad():
        assert not torch.allclose(base.encode_image(pixels), image_peft, atol=1e-4)


def test_make_optimizer_is_the_configured_adamw_whose_fused_step_obeys_found_inf():
    """train.py's optimizer (`make_optimizer`): the config's hyper-parameters, decay on matrices only, and, fused,
    a step skipped on the device when `found_inf` is set (what the non-finite guard relies on)."""
    from types import SimpleNamespace

    from hysac_hf.training import fused_adamw_supported, make_optimizer

    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    config = SimpleNamespace(weight_decay=0.2, learning_rate=1e-2, adam_beta1=0.8, adam_beta2=0.9, adam_epsilon=1e-6)
    optimizer, fused = make_optimizer(module, config, "cpu")
    assert fused == fused_adamw_supported("cpu") and optimizer.defaults["fused"] == (fused or None)
    decayed, plain = optimizer.param_groups
    assert [tuple(p.shape) for p in decayed["params"]] == [(2, 3)] and len(plain["params"]) == 3
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.2, 0.0)
    assert {(g["lr"], g["betas"], g["eps"]) for g in optimizer.param_groups} == {(1e-2, (0.8, 0.9), 1e-6)}
    if not fused:
        pytest.skip("this torch has no fused AdamW on the CPU")
    before = [p.detach().clone() for p in module.parameters()]
    for param in module.parameters():
        param.grad = torch.ones_like(param)
    optimizer.found_inf = torch.ones(())
    optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(module.parameters(), before))  # skipped
    optimizer.found_inf = torch.zeros(())
    optimizer.step()
    assert all(not torch.equal(p, b) for p, b in zip(module.parameters(), before))  # taken


@pytest.mark.slow
def test_export_is_a_hub_folder_with_calibrated_bounds_and_a_card_for_this_run(tiny_clip_dir, tmp_path):
    from huggingface_hub import ModelCard
    from transformers import AutoModel

    out = tmp_path / "run"
    config = train.parse_args(
        argv(tiny_clip_dir, out, "--max_train_samples", "8", "--num_train_epochs", "1", "--select_best", "recall_sum")
        + ["--validation_split", "validation", "--max_eval_samples", "24"]
    )
    summary = train.main(config)
    assert len(summary["history"]) == 1 and 0 <= summary["history"][0]["recall_sum"] <= 600
    export = out / "model"
    model = AutoModel.from_pretrained(export, trust_remote_code=True)
    assert type(model).__name__ == "HySACModel"
    assert model.config.bounds == summary["bounds"] and set(model.config.bounds) == {"S", "V", "U", "G"}
    # The unsafe thresholds are the best-accuracy cuts between the safe and unsafe validation rows.
    assert set(model.config.unsafe_thresholds) == {"image", "text"}
    from hysac_hf.calibration import calibrate_thresholds
    from hysac_hf.data import load_mini_visu
    from hysac_hf.encode import encode_quadruplets
    from hysac_hf.evaluation.classification import classification_metrics

    cache = encode_quadruplets(model, processor_of(export), load_mini_visu("validation", max_samples=24))
    assert calibrate_thresholds(cache) == pytest.approx(model.config.unsafe_thresholds, abs=1e-5)
    image = classification_metrics(
        torch.cat([model.distance_to_root(cache.embeds[k]) for k in "VG"]),
        torch.cat([torch.zeros(24), torch.ones(24)]),
        model.config.unsafe_thresholds["image"],
    )
    assert image["accuracy"] >= 0.5  # never worse than a constant answer: it is the best cut
    assert math.isfinite(model.config.bounds["G"]["avg"])
    # Only what a Hub repo holds: no checkpoints, logs, summaries or scratch models.
    names = {p.name for p in export.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "bounds.png", "modeling_hysac.py"} <= names
    assert all(n.endswith((".json", ".safetensors", ".py", ".txt", ".md", ".png", ".model")) for n in names), names
    assert not any(p.is_dir() for p in export.iterdir())
    assert (out / "train_summary.json").is_file() and not (export / "train_summary.json").exists()
    # The card describes this run: its data, settings, bounds and validation metrics, not the converter's story.
    card = ModelCard.load(export / "README.md")
    text = card.text
    assert "fine-tuned with `train.py`" in text and "hysac_model.pth" not in text
    assert f"`{tiny_clip_dir}`" in text and "`mini-visu`" in text
    assert f"{summary['bounds']['V']['up_95']:.4f}" in text
    assert f"{summary['history'][0]['recall_sum']:.1f}" in text
    assert "![Distance to the root" in text
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results["T→I R@1 (%)"] == pytest.approx(summary["history"][0]["R1_t2i_S_V"], abs=0.01)


def processor_of(folder):
    from hysac_hf import HySACProcessor

    return HySACProcessor.from_pretrained(folder)


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """Exit status and the error line; the error must be the one and only error line, with no traceback (progress
    bars of the data loading may precede it)."""
    code = train.cli(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) <= 1, err
    return code, errors[0] if errors else ""


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--per_device_train_batch_size", "1"], "negatives"),
        (["--validation_split", "none", "--select_best", "val_loss"], "validation split"),
        (["--max_train_samples", "3"], "fewer than one global batch"),
        (["--resume_from_checkpoint", "latest"], "no checkpoint in"),
        (["--resume_from_checkpoint", "/no/such/step_3"], "does not exist"),
        (["--dataset", "train.jsonl"], "train.jsonl is empty"),
        (["--dataset", "images.jsonl"], "missing or cannot be decoded"),
        (["--columns", "caption=X"], "unknown kind of content 'X'"),
        (["--max_eval_samples", "5", "--validation_split", "validation", "--select_best", "none"], "at least 20"),
        (["--checkpointing_steps", "-5"], "--checkpointing_steps must be >= 0"),
        (["--validation_split_percentage", "80"], "between 1 and 50"),
    ],
)
def test_bad_inputs_fail_early_with_one_line_and_leave_nothing(tiny_clip_dir, tmp_path, capsys, extra, message):
    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    row = {"safe_image": str(tmp_path / "bad.png"), "unsafe_image": str(tmp_path / "bad.png")}
    row |= {"safe_text": "a", "unsafe_text": "b"}
    (tmp_path / "images.jsonl").write_text("\n".join(json.dumps(row) for _ in range(8)))
    extra = [str(tmp_path / e) if e.endswith(".jsonl") else e for e in extra]
    out = tmp_path / "run"
    code, err = run_cli(argv(tiny_clip_dir, out, *extra), capsys)
    assert code == 2, err
    assert err.startswith("train.py: error: ") and message in err
    assert not out.exists()


def test_output_dir_that_is_a_file_and_debug_traceback(tiny_clip_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = run_cli(argv(tiny_clip_dir, tmp_path / "file"), capsys)
    assert code == 2 and "is a file; pass a folder" in err
    from hysac_hf.errors import UsageError

    with pytest.raises(UsageError, match="is a file"):
        train.cli(argv(tiny_clip_dir, tmp_path / "file", "--debug"))


def test_a_truncated_model_is_one_clear_line(model_dir, tmp_path, capsys):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    code, err = run_cli(argv(model_dir, tmp_path / "run"), capsys)
    assert code == 2 and f"cannot load a HySAC model from {model_dir}" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_push_to_hub_needs_a_token_before_training(tiny_clip_dir, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    code, err = run_cli(argv(tiny_clip_dir, tmp_path / "run", "--push_to_hub"), capsys)
    assert code == 2 and "needs a Hugging Face token" in err and "hf auth login" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_push_to_hub_uploads_the_export_in_one_commit(tiny_clip_dir, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, **kwargs):
            calls.append(("create_repo", kwargs))
            return f"https://huggingface.co/{kwargs['repo_id']}"

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs, sorted(os.listdir(kwargs["folder_path"]))))
            return type("Commit", (), {"commit_url": "https://huggingface.co/me/tiny/commit/abc"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    summary = run(
        tiny_clip_dir,
        tmp_path / "run",
        "--max_train_steps",
        "1",
        "--push_to_hub",
        "--hub_model_id",
        "me/tiny",
        "--hub_private_repo",
        "--hub_token",
        "hf_test",
    )
    assert summary["hub_commit"].endswith("/commit/abc")
    assert calls[0] == ("token", "hf_test")
    assert calls[1][1] == {"repo_id": "me/tiny", "repo_type": "model", "private": True, "exist_ok": True}
    kind, kwargs, files = calls[2]
    assert kind == "upload_folder" and Path(kwargs["folder_path"]) == (tmp_path / "run" / "model").resolve()
    assert "model.safetensors" in files and "README.md" in files and "checkpoints" not in files
    assert len([c for c in calls if c[0] == "upload_folder"]) == 1


@pytest.mark.slow
@pytest.mark.main_line
def test_accelerate_launch_prints_the_epoch_summary_on_the_console(tiny_clip_dir, tmp_path):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", str(REPO_ROOT / "train.py")]
    command += argv(tiny_clip_dir, tmp_path / "run", "--max_train_samples", "8", "--num_train_epochs", "1")
    command += ["--validation_split", "validation", "--max_eval_samples", "20", "--select_best", "val_loss"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"}, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr
    epoch_lines = [line for line in log.splitlines() if "epoch 1:" in line]
    assert len(epoch_lines) == 1 and "val_loss" in epoch_lines[0] and "recall_sum" in epoch_lines[0], log[-2000:]
    assert "exported the model to" in log and "AutoModel.from_pretrained" in log
    assert "bounds.png" in log
    # Third-party INFO noise stays off.
    assert not any(" INFO datasets" in line or " INFO accelerate" in line for line in log.splitlines())


# ----------------------------------------------------------------------------------------------------------------
# Speed-related behaviour (issue 12): same maths, fewer casts, no per-step host syncs, compilation.
def test_bf16_lora_holds_frozen_weights_in_bf16_and_trains_float32(tiny_clip_dir):
    from accelerate import Accelerator

    config = train.parse_args(argv(tiny_clip_dir, "unused", "--mixed_precision", "bf16"))
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    module, _ = build_module(config, accelerator)
    hysac = module.hysac
    frozen = {n: p.dtype for n, p in module.named_parameters() if not p.requires_grad}
    trained = {n: p.dtype for n, p in module.named_parameters() if p.requires_grad}
    assert set(frozen.values()) == {torch.bfloat16}, frozen  # towers and projections: no per-step weight casts
    assert set(trained.values()) == {torch.float32}  # LoRA weights and the four scalars
    assert hysac.curv.dtype == hysac.logit_scale.dtype == torch.float32
    optimizer = torch.optim.AdamW(parameter_groups(module, 0.2), lr=1e-3)
    batch = {"pixel_values": torch.randn(4, 3, 224, 224), "input_ids": torch.randint(1, 49000, (4, 9))}
    batch["input_ids"][:, -1] = 49407
    from hysac_hf.losses import HySACLoss

    with accelerator.autocast():
        out = module(**batch)
        loss = HySACLoss()(out, curvature=out["curvature"], logit_scale=out["logit_scale"])["loss"]
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and out["V"].dtype == torch.float32
    states = [s for group in optimizer.param_groups for p in group["params"] for s in optimizer.state[p].values()]
    assert {s.dtype for s in states if s.is_floating_point() and s.ndim > 0} == {torch.float32}


@pytest.mark.slow
def test_bf16_run_exports_float32_weights(tiny_clip_dir, tmp_path):
    summary = run(tiny_clip_dir, tmp_path / "bf16", "--max_train_steps", "2", "--mixed_precision", "bf16")
    weights = load_file(tmp_path / "bf16" / "model" / "model.safetensors")
    assert summary["global_step"] == 2 and {v.dtype for v in weights.values()} == {torch.float32}
    start = HySACModel.from_clip(tiny_clip_dir).state_dict()
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    # The export merges the trained LoRA into the float32 base (not into its bf16 training copy): unchanged
    # weights stay exactly the base's, trained ones move by the LoRA update only.
    assert torch.equal(
        weights["vision_model.embeddings.class_embedding"], start["vision_model.embeddings.class_embedding"]
    )
    assert 0 < (weights[key] - start[key]).abs().max() < 1e-2


def _count_host_syncs(monkeypatch) -> dict[str, int]:
    """Count tensor -> Python conversions (each one is a host-device synchronisation on an accelerator)."""
    counts = {"n": 0}
    for name in ("item", "__bool__", "__int__", "__float__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            counts["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


@pytest.mark.slow
@pytest.mark.main_line
def test_training_steps_do_not_synchronise_with_the_host(tiny_clip_dir, tmp_path, monkeypatch):
    """The syncs of a run do not grow with its number of steps: loss terms, the non-finite guard and the
    progress bar reach the host only at logging steps, checkpoints and epoch ends (none in between here)."""
    monkeypatch.setattr(train, "write_export", lambda *args, **kwargs: None)  # the export is not a training step
    counts = _count_host_syncs(monkeypatch)
    syncs = {}
    for rows in (12, 24):  # one epoch of 3 and of 6 steps (batch 4)
        counts["n"] = 0
        run(tiny_clip_dir, tmp_path / f"r{rows}", "--max_train_samples", str(rows), "--num_train_epochs", "1")
        syncs[rows] = counts["n"]
    assert syncs[12] > 0  # the counter works: the epoch's summary reads the loss
    assert syncs[24] == syncs[12], syncs  # twice the steps, not one synchronisation more


@pytest.mark.slow
@pytest.mark.main_line
def test_compiled_training_matches_eager(tiny_clip_dir, tmp_path):
    """--torch_compile (dynamo + AOTAutograd; inductor's code generation takes minutes on 2 CPU cores) trains the
    same model as eager, resumes like it, and exports no compile wrapper."""
    compiled = ["--torch_compile", "--torch_compile_backend", "aot_eager"]
    exports = {}
    for name, extra in (("eager", []), ("compiled", compiled)):
        out = tmp_path / name
        args = [*extra, "--max_train_steps", "2", "--schedule_steps", "4", "--checkpointing_steps", "2"]
        run(tiny_clip_dir, out, *args)
        run(tiny_clip_dir, out, *extra, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
        exports[name] = load_file(out / "model" / "model.safetensors")
    assert exports["eager"].keys() == exports["compiled"].keys()
    assert not any("_orig_mod" in k for k in exports["compiled"])
    diff = max((exports["eager"][k] - exports["compiled"][k]).abs().max().item() for k in exports["eager"])
    assert diff < 1e-5, diff
    start = HySACModel.from_clip(tiny_clip_dir).state_dict()
    moved = max((exports["eager"][k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-4  # training changed the weights: the equality is not trivial


def test_first_release_column_flags_still_work():
    config = train.parse_args(
        ["--model_name_or_path", "m", "--output_dir", "o", "--safe_text_column", "caption", "--columns", "p=V",
         "--unsafe_image_column=nsfw_path"]
    )  # fmt: skip
    from hysac_hf.data import parse_columns

    assert parse_columns(config.columns) == {"safe_text": "caption", "safe_image": "p", "unsafe_image": "nsfw_path"}


# ----------------------------------------------------------------------------------------------------------------
# The script's shape: the library never imports it; it imports everything at the top.
SCRIPT_MODULES = {"hysac_hf.train", "train"}  # the script, from the wheel and from a checkout


def script_imports(source: str, module: str) -> list[str]:
    """The import statements of `source` (the module named `module`) that import the training script."""
    package = module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] if node.level else [])
            parent = ".".join(part for part in (base, node.module or "") if part)
            targets = [parent] + [f"{parent}.{alias.name}" for alias in node.names]
        else:
            continue
        if any(t in SCRIPT_MODULES or t.startswith(tuple(f"{m}." for m in SCRIPT_MODULES)) for t in targets):
            found.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_library_module_imports_the_training_script():
    # The check itself finds the ways the script can be imported (the demo used the first one).
    for bad in ("def run():\n    from .train import main", "from . import train", "import hysac_hf.train as t"):
        assert script_imports(bad, "hysac_hf.demo"), bad
    assert script_imports("from .. import train", "hysac_hf.training.config")
    assert not script_imports("from .training import TrainingConfig\nfrom .. import training", "hysac_hf.demo")
    offenders = []
    for root, package in ((REPO_ROOT / "hysac_hf", "hysac_hf"), (REPO_ROOT / "modeling", "hysac_hf.modeling")):
        for path in sorted(root.rglob("*.py")):
            if path in (REPO_ROOT / "hysac_hf" / "train.py", REPO_ROOT / "hysac_hf" / "convert.py"):
                continue  # the links to the scripts themselves
            parts = path.relative_to(root).with_suffix("").parts
            module = ".".join([package, *parts[:-1]] + ([] if parts[-1] == "__init__" else [parts[-1]]))
            if parts[-1] == "__init__":
                module += ".__init__"  # relative imports of a package resolve against the package itself
            offenders += script_imports(path.read_text(), module)
    assert not offenders, offenders


def test_the_script_imports_everything_at_the_top():
    tree = ast.parse((REPO_ROOT / "train.py").read_text())
    functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    assert {"parse_args", "main", "cli"} <= {function.name for function in functions}
    inside = [
        f"train.py:{node.lineno}: {ast.unparse(node)}"
        for function in functions
        for node in ast.walk(function)
        if isinstance(node, (ast.Import, ast.ImportFrom))
    ]
    assert not inside, inside


# ----------------------------------------------------------------------------------------------------------------
# No silent wrong answers (issue 17): held-out validation, threshold quality, resume, logs, help, the card.
def write_rows(path, count: int, image) -> list[str]:
    """`count` quadruplets with unique captions and no `split` column, as a user's data file; returns the captions."""
    image.save(path.parent / "photo.png")
    captions = [f"caption number {i}" for i in range(count)]
    rows = [
        {"safe_text": t, "unsafe_text": f"[UNSAFE] {t}", "safe_image": "photo.png", "unsafe_image": "photo.png"}
        for t in captions
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return captions


def test_a_data_file_without_splits_holds_out_a_seeded_validation_part(tmp_path, photos):
    from hysac_hf.training import TrainingConfig, load_training_data

    captions = write_rows(tmp_path / "rows.jsonl", 100, photos["cat"])
    options = {"model_name_or_path": "m", "output_dir": str(tmp_path / "run"), "dataset": str(tmp_path / "rows.jsonl")}
    options |= {"image_root": str(tmp_path), "per_device_train_batch_size": 4, "validation_split_percentage": 25}
    data = load_training_data(TrainingConfig(**options), num_processes=1)
    train_texts, held_texts = set(data.train["safe_text"]), set(data.validation["safe_text"])
    assert len(held_texts) == 25 and len(train_texts) == 75 and train_texts | held_texts == set(captions)
    assert not train_texts & held_texts  # the validation rows are never trained on
    assert data.summary["train_rows"] == 75 and data.summary["validation_rows"] == 25
    assert "held out: 25 of the 100 rows" in data.summary["validation"] and "no 'validation' split" in data.summary["validation"]
    again = load_training_data(TrainingConfig(**options), num_processes=1)
    assert again.validation["safe_text"] == data.validation["safe_text"]  # deterministic
    other = load_training_data(TrainingConfig(**options, seed=7), num_processes=1)
    assert set(other.validation["safe_text"]) != held_texts
    assert again.summary["train_rows_sha256"] == data.summary["train_rows_sha256"] != other.summary["train_rows_sha256"]
    # A dataset with a validation split uses it, and says so
    named = load_training_data(TrainingConfig(model_name_or_path="m", output_dir="o", max_eval_samples=20), 1)
    assert named.summary["validation"] == "the 'validation' split of mini-visu" and named.summary["validation_rows"] == 20


def test_threshold_quality_is_reported_and_a_useless_threshold_warned_about(caplog):
    from hysac_hf.calibration import report_threshold_quality, threshold_quality
    from hysac_hf.encode import EmbeddingCache
    from hysac_hf.modeling.lorentz import exp_map0

    directions = torch.nn.functional.normalize(torch.randn(40, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    radii = {"S": 0.2, "U": 0.9, "V": 0.5, "G": 0.5}  # texts separate; images lie at one distance
    cache = EmbeddingCache({k: exp_map0(directions * r, 1.0) for k, r in radii.items()}, curvature=1.0)
    quality = threshold_quality(cache, {"text": 0.5, "image": 0.3})
    assert quality["text"]["accuracy"] == 1.0 and quality["text"]["f1"] == 1.0 and quality["text"]["separates"]
    # the image threshold flags all 40 safe and all 40 unsafe images: accuracy 1/2, F1 2/3, FPR 1
    assert (quality["image"]["fp"], quality["image"]["tp"], quality["image"]["separates"]) == (40, 40, False)
    assert quality["image"]["f1"] == pytest.approx(2 / 3) and quality["image"]["fpr"] == 1.0
    with caplog.at_level("INFO", logger="hysac_hf"):
        report_threshold_quality(quality, "the validation rows")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "THE IMAGE THRESHOLD SEPARATES NOTHING" in warnings[0] and "40/40 safe" in warnings[0]


@pytest.mark.slow
def test_a_resumed_run_keeps_every_epoch_and_refuses_other_settings(tiny_clip_dir, tmp_path, capsys):
    """12 rows / batch 4 = 3 steps per epoch, validated each epoch: stopped at step 4 (in epoch 2) and resumed, the
    run's history, summary and card hold both epochs, as an uninterrupted run's do; a resume that would take other
    steps is refused before any training."""
    validate = ["--validation_split", "validation", "--max_eval_samples", "20", "--no_calibrate"]
    full = run(tiny_clip_dir, tmp_path / "full", "--max_train_steps", "6", *validate)
    run(tiny_clip_dir, tmp_path / "split", "--max_train_steps", "4", "--schedule_steps", "6", "--checkpointing_steps",
        "2", *validate)  # fmt: skip
    code, err = run_cli(
        argv(tiny_clip_dir, tmp_path / "split", "--resume_from_checkpoint", "latest", "--per_device_train_batch_size",
             "6", "--max_train_steps", "6", *validate), capsys)  # fmt: skip
    assert code == 2 and "cannot resume from" in err and "per_device_train_batch_size 4 (this run: 6)" in err
    code, err = run_cli(
        argv(tiny_clip_dir, tmp_path / "split", "--resume_from_checkpoint", "latest", "--max_train_samples", "16",
             "--max_train_steps", "6", *validate), capsys)  # fmt: skip
    assert code == 2 and "train_rows 12 (this run: 16)" in err
    resumed = run(tiny_clip_dir, tmp_path / "split", "--resume_from_checkpoint", "latest", "--max_train_steps", "6",
                  *validate)  # fmt: skip
    assert [row["epoch"] for row in resumed["history"]] == [1, 2] == [row["epoch"] for row in full["history"]]
    assert resumed["history"] == full["history"]  # the resumed run is the same run, bit for bit
    saved = json.loads((tmp_path / "split" / "train_summary.json").read_text())
    assert saved["history"] == full["history"] and saved["data"]["train_rows"] == 12
    card = (tmp_path / "split" / "model" / "README.md").read_text()
    assert all(f"| {row['epoch']} | {row['val_loss']:.4f} |" in card for row in full["history"])


@pytest.mark.slow
def test_logs_are_whole_lines_in_a_log_file_and_on_a_terminal(tiny_clip_dir, tmp_path):
    """No log line is glued to the progress bar: in a file (no bar: a line per logging step instead) and on a
    terminal (each log line starts on its own line above the bar)."""
    import fcntl
    import pty
    import struct
    import termios

    command = [sys.executable, str(REPO_ROOT / "train.py")]
    command += argv(tiny_clip_dir, tmp_path / "file", "--max_train_samples", "8", "--num_train_epochs", "2")
    command += ["--logging_steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "COLUMNS": "100"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert not any("Training:" in line or "\r" in line for line in lines), result.stderr[-2000:]
    assert sum(" INFO train: step " in line for line in lines) == 4  # 2 epochs x 2 steps, one line each
    assert [line.split(" INFO train: ")[1][:8] for line in lines if "train: epoch" in line] == ["epoch 1:", "epoch 2:"]

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # tqdm sizes the bar to it
    command[command.index(str(tmp_path / "file"))] = str(tmp_path / "tty")
    process = subprocess.Popen(command, stdout=follower, stderr=follower, env=env, cwd=tmp_path)
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process ended
            break
        if not chunk:
            break
        output += chunk
    assert process.wait(timeout=600) == 0, output[-3000:]
    text = output.decode(errors="replace")
    assert "Training:" in text  # a terminal gets the bar
    for marker in ("INFO train: epoch 1:", "INFO train: epoch 2:"):
        start = text.index(marker)
        line_start = max(text.rfind("\n", 0, start), text.rfind("\r", 0, start))
        assert "Training" not in text[line_start + 1 : start], repr(text[max(0, start - 200) : start + 40])


def test_help_shows_each_flag_once_and_the_dashed_spelling_still_parses(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--per_device_train_batch_size" in out and "--per-device-train-batch-size" not in out
    assert "--validation_split_percentage" in out and "(default: 10)" in out
    config = train.parse_args(["--model-name-or-path", "m", "--output-dir", "o", "--per-device-train-batch-size", "8"])
    assert config.per_device_train_batch_size == 8 and config.model_name_or_path == "m"


def test_the_cards_snippet_loads_the_export_folder_with_its_embedding_size(tiny_clip_dir, tmp_path):
    import re

    from hysac_hf.training import TrainingConfig, write_export

    model = HySACModel.from_clip(tiny_clip_dir)
    config = TrainingConfig(model_name_or_path=str(tiny_clip_dir), output_dir=str(tmp_path / "run"))
    summary = {"global_step": 1, "history": [], "data": {"train_rows": 9, "validation_rows": 3, "validation": "x"}}
    write_export(config, model, processor_of(tiny_clip_dir), summary)
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert f'AutoModel.from_pretrained("{tmp_path / "run" / "model"}"' in card
    assert re.search(rf"\(1, {model.config.projection_dim}\) space components", card) and "(1, 768)" not in card
    assert "9 training rows" in card and "Validation: 3 rows, x." in card
    pushed = TrainingConfig(model_name_or_path=str(tiny_clip_dir), output_dir=str(tmp_path / "r2"), hub_model_id="me/h")
    write_export(pushed, model, processor_of(tiny_clip_dir), summary)
    assert 'AutoModel.from_pretrained("me/h"' in (tmp_path / "r2" / "model" / "README.md").read_text()
