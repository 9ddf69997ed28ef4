"""FSDP2 (full shard) end to end on two CPU processes with gloo: a few steps, a sharded checkpoint, a resume, and an
export equal to the unsharded model's. See fsdp_train_script.py for how FSDP is switched on for CPU processes."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from hysac_hf import HySACModel
from hysac_hf.testing import REPO_ROOT, run_on_cpu_processes

pytestmark = [pytest.mark.slow, pytest.mark.main_line]

SCRIPT = Path(__file__).with_name("fsdp_train_script.py")
FSDP_CPU_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: CLIPEncoderLayer
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
  fsdp_offload_params: false
mixed_precision: 'no'
num_machines: 1
num_processes: 2
rdzv_backend: static
same_network: true
use_cpu: true
"""


def common(tiny_clip_dir, output_dir, batch: int) -> list[str]:
    return [
        "--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(output_dir), "--cpu",
        "--max_train_samples", "16", "--per_device_train_batch_size", str(batch), "--lora_dropout", "0",
        "--validation_split", "validation", "--max_eval_samples", "20", "--per_device_eval_batch_size", "8",
        "--select_best", "none", "--learning_rate", "1e-3", "--seed", "5", "--schedule_steps", "4",
    ]  # fmt: skip


def launch(config_file: Path | None, args: list[str], cwd: Path) -> str:
    """`accelerate launch` on 2 CPU processes: FSDP through fsdp_train_script.py, or plain DDP with train.py."""
    script = REPO_ROOT / "train.py" if config_file is None else SCRIPT
    result = run_on_cpu_processes(
        [script, *args], config_file=config_file, env={"PYTHONPATH": str(REPO_ROOT)}, cwd=cwd, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


def test_fsdp_trains_checkpoints_resumes_and_exports_like_the_unsharded_model(tiny_clip_dir, tmp_path):
    config_file = tmp_path / "fsdp_cpu.yaml"
    config_file.write_text(FSDP_CPU_CONFIG)
    args = common(tiny_clip_dir, tmp_path / "fsdp", 4)
    # FSDP: 2 steps with a checkpoint, then a resume to step 4 (2 processes x 4 quadruplets).
    log = launch(config_file, [*args, "--max_train_steps", "2", "--checkpointing_steps", "2"], tmp_path)
    assert "val_loss" in log  # validation ran under FSDP (every process the same number of forward passes)
    assert (tmp_path / "fsdp" / "checkpoints" / "step_2" / "pytorch_model_fsdp_0").is_dir()  # sharded state
    launch(config_file, [*args, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"], tmp_path)
    # The unsharded reference: the same two processes with plain DDP, 4 steps without interruption.
    launch(None, [*common(tiny_clip_dir, tmp_path / "ddp", 4), "--max_train_steps", "4"], tmp_path)
    fsdp = load_file(tmp_path / "fsdp" / "model" / "model.safetensors")
    ddp = load_file(tmp_path / "ddp" / "model" / "model.safetensors")
    assert fsdp.keys() == ddp.keys()
    assert fsdp["curv"].shape == ddp["curv"].shape == ()  # the (1,) shape FSDP needs stays inside training
    diff = max((fsdp[k] - ddp[k]).abs().max().item() for k in ddp)
    assert diff <= 1e-6, diff
    base = HySACModel.from_clip(tiny_clip_dir).state_dict()
    assert max((ddp[k] - base[k]).abs().max().item() for k in base) > 1e-4  # training moved the weights
    # Bounds calibrated from the validation embeddings made under FSDP equal the unsharded ones.
    for key in "SVUG":
        for stat in ("avg", "up_95", "low_05"):
            a = HySACModel.config_class.from_pretrained(tmp_path / "fsdp" / "model").bounds[key][stat]
            b = HySACModel.config_class.from_pretrained(tmp_path / "ddp" / "model").bounds[key][stat]
            assert abs(a - b) <= 1e-6
