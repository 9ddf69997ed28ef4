"""hysac_hf/training/config.py: the run's settings are checked without being changed, and spelled as a command line
that train.py's parse_args reads back into an equal config."""

from __future__ import annotations

import dataclasses

import pytest

from hysac_hf import train
from hysac_hf.training import TrainingConfig, check_config, config_to_argv

# A value different from the default for every field of TrainingConfig, of every kind the parser reads: strings,
# None, ints, floats, booleans, Literal choices and a list.
EVERY_FIELD_CHANGED = {
    "model_name_or_path": "openai/clip-vit-base-patch32",
    "output_dir": "runs/every field",
    "dataset": "data/quadruplets.jsonl",
    "train_split": "training",
    "validation_split": None,  # spelled --validation_split none
    "validation_split_percentage": 20,
    "columns": "caption=S,path=V,nsfw=U,nsfw_path=G",
    "image_root": "images",
    "coco_root": "coco",
    "visu_unsafe_images": "unsafe.json",
    "skip_bad_images": True,
    "max_train_samples": 100,
    "max_eval_samples": 30,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "gradient_accumulation_steps": 3,
    "num_train_epochs": 2,
    "max_train_steps": 7,
    "schedule_steps": 50,
    "learning_rate": 3.3e-05,
    "weight_decay": 0.05,
    "adam_beta1": 0.85,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-07,
    "lr_scheduler_type": "linear",
    "num_warmup_steps": 4,
    "max_grad_norm": 1.5,
    "entailment_weight": 0.25,
    "aperture_scale": 1.2,
    "loss_weighting": "plain",
    "local_negatives": True,
    "full_finetune": True,
    "train_projections": True,
    "lora_r": 8,
    "lora_alpha": 2.0,
    "lora_dropout": 0.0,
    "lora_target_modules": ["q_proj", "fc1"],
    "contrastive": "sigmoid",
    "gradient_checkpointing": True,
    "torch_compile": True,
    "torch_compile_backend": "aot_eager",
    "torch_compile_mode": "max-autotune-no-cudagraphs",
    "mixed_precision": "bf16",
    "cpu": True,
    "seed": 7,
    "dataloader_num_workers": 2,
    "checkpointing_steps": 5,
    "checkpoints_total_limit": 3,
    "resume_from_checkpoint": "latest",
    "select_best": "none",
    "early_stopping_patience": 2,
    "report_to": "tensorboard",
    "logging_steps": 1,
    "no_calibrate": True,
    "push_to_hub": True,
    "hub_model_id": "me/hysac",
    "hub_private_repo": True,
    "hub_token": "hf_test",
    "log_level": "DEBUG",
    "debug": True,
}


def test_every_field_is_changed_by_the_round_trip_case():
    """Adding a field to TrainingConfig means adding it above, so the round trip covers it."""
    assert set(EVERY_FIELD_CHANGED) == {spec.name for spec in dataclasses.fields(TrainingConfig)}
    defaults = TrainingConfig(model_name_or_path="m", output_dir="o")
    assert all(getattr(defaults, name) != value for name, value in EVERY_FIELD_CHANGED.items())


@pytest.mark.parametrize(
    "values",
    [
        {"model_name_or_path": "m", "output_dir": "o"},  # every default: only the required flags
        EVERY_FIELD_CHANGED,
        {"model_name_or_path": "m", "output_dir": "o", "validation_split": "none", "lora_target_modules": ["fc2"]},
    ],
    ids=["defaults", "every-field", "none-and-one-module"],
)
def test_config_to_argv_round_trips_through_parse_args(values):
    config = TrainingConfig(**values)
    argv = config_to_argv(config)
    assert train.parse_args(argv) == config
    assert all(isinstance(arg, str) for arg in argv)
    if values is EVERY_FIELD_CHANGED:
        assert argv[argv.index("--validation_split") + 1] == "none"
        modules = argv.index("--lora_target_modules")
        assert argv[modules + 1 : modules + 3] == ["q_proj", "fc1"]
    else:
        assert argv[:4] == ["--model_name_or_path", "m", "--output_dir", "o"]


@pytest.mark.parametrize(("name", "value"), [("dataset", None), ("lora_target_modules", [])])
def test_config_to_argv_refuses_what_the_command_line_cannot_spell(name, value):
    config = dataclasses.replace(TrainingConfig(model_name_or_path="m", output_dir="o"), **{name: value})
    with pytest.raises(ValueError, match=f"{name}=.* has no command-line spelling"):
        config_to_argv(config)


def test_check_config_reads_the_config_and_changes_nothing(tmp_path):
    config = train.parse_args(
        ["--model_name_or_path", "m", "--output_dir", str(tmp_path / "run"), "--validation_split", "none"]
        + ["--select_best", "none", "--lora_target_modules", "k_proj", "v_proj"]
    )
    before = dataclasses.asdict(config)
    check_config(config)
    assert dataclasses.asdict(config) == before
    # "none" means no validation split from construction on, for every reader.
    assert config.validation_split is None
    assert not (tmp_path / "run").exists()
