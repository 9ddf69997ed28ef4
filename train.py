#!/usr/bin/env python
"""Fine-tune HySAC (Hyperbolic Safety-Aware CLIP) with Accelerate.

    accelerate launch train.py --model_name_or_path openai/clip-vit-large-patch14 --output_dir out/hysac ...
    python train.py --model_name_or_path ... --output_dir ...          # one process (CPU or one GPU)
    hysac-train ... / python -m hysac_hf.train ...                     # the same script, from an installed wheel

The script follows the Accelerate/diffusers example scripts: `parse_args()` builds a `TrainingConfig`, `main(config)`
trains, validates every epoch, exports the best (or last) model with LoRA merged, calibrates its bounds on the
validation split and writes a Hub-ready folder to `<output_dir>/model` (`--push_to_hub` uploads it). Checkpoints
(`<output_dir>/checkpoints`) and tracker logs (`<output_dir>/logs`) stay beside it, outside the Hub folder. The
reusable pieces (model and LoRA setup, sampler, validation metrics, export) live in `hysac_hf.training`; embedding
is `hysac_hf.encode`; the losses are `hysac_hf.losses`.

Every input is checked before the model loads and before anything is written; a usage or input error prints one
line and exits 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from hysac_hf.modeling.configuration_hysac import CONTENT_KINDS

from hysac_hf.errors import UsageError

logger = logging.getLogger("train")

EXPORT_SUBDIR = "model"
IMAGE_COLUMNS = tuple(kind.column for kind in CONTENT_KINDS if kind.modality == "image")
HISTOGRAM_FILE = "bounds.png"


@dataclass
class TrainingConfig:
    """Every setting of a training run; `train.py --help` lists them with these descriptions."""

    model_name_or_path: str = field(
        metadata={
            "help": "CLIP checkpoint (converted with HySACModel.from_clip) or a HySAC checkpoint to keep training."
        }
    )
    output_dir: str = field(
        metadata={"help": "Run folder: checkpoints/, logs/, train_summary.json and the exported model in model/."}
    )
    dataset: str = field(
        default="mini-visu",
        metadata={
            "help": "'mini-visu' (bundled), 'visu:<ViSU-Text source>', a jsonl/csv/parquet file, a folder of split "
            "files, a save_to_disk folder, or a Hub dataset id."
        },
    )
    train_split: str = field(default="train", metadata={"help": "Training split name."})
    validation_split: str = field(
        default="validation", metadata={"help": "Validation split name ('none' disables validation)."}
    )
    columns: str | None = field(
        default=None,
        metadata={
            "help": "Map your dataset's columns: SOURCE=KIND pairs, KIND one of S (safe text), V (safe image), U "
            "(unsafe text), G (unsafe image), e.g. caption=S,path=V,nsfw=U,nsfw_path=G."
        },
    )
    image_root: str | None = field(
        default=None, metadata={"help": "Folder that relative image paths are resolved against."}
    )
    coco_root: str | None = field(default=None, metadata={"help": "COCO 2017 root (ViSU safe images by coco_id)."})
    visu_unsafe_images: str | None = field(
        default=None, metadata={"help": "Folder or json/csv mapping with ViSU's unsafe images (not public)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training split (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation split (debugging)."})
    per_device_train_batch_size: int = field(
        default=32, metadata={"help": "Quadruplets per process per micro-batch (reference: 32)."}
    )
    per_device_eval_batch_size: int = field(
        default=64, metadata={"help": "Quadruplets per validation forward pass and validation-loss chunk."}
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimiser step (does not enlarge the negative pool)."}
    )
    num_train_epochs: int = field(default=20, metadata={"help": "Epochs (paper: 20)."})
    max_train_steps: int | None = field(
        default=None, metadata={"help": "Stop after this many optimiser steps (overrides the epochs)."}
    )
    schedule_steps: int | None = field(
        default=None,
        metadata={
            "help": "Length of the LR schedule in optimiser steps (default: the whole run); set it when stopping "
            "early with --max_train_steps to keep the schedule of a longer run."
        },
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (reference: 1e-4)."})
    weight_decay: float = field(default=0.2, metadata={"help": "AdamW weight decay (none on norms, biases, scalars)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.98, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "transformers scheduler name (cosine: linear warmup then cosine)."}
    )
    num_warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps."})
    max_grad_norm: float = field(
        default=0.0, metadata={"help": "Clip gradients to this norm (0: off, as the reference)."}
    )
    entailment_weight: float = field(default=1.0, metadata={"help": "lambda_e of the three entailment terms."})
    aperture_scale: float = field(default=1.0, metadata={"help": "eta, scale of the entailment cones' half-aperture."})
    loss_weighting: Literal["reference", "plain"] = field(
        default="reference",
        metadata={"help": "'reference': lambdas / sum / 7 as the authors' code; 'plain': as given."},
    )
    local_negatives: bool = field(
        default=False,
        metadata={"help": "Contrastive negatives from the local batch only (the authors' per-GPU loss)."},
    )
    full_finetune: bool = field(
        default=False, metadata={"help": "Train every tower weight instead of LoRA (projections stay frozen)."}
    )
    train_projections: bool = field(default=False, metadata={"help": "Also train the two projections."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (paper: 16)."})
    lora_alpha: float = field(default=1.0, metadata={"help": "LoRA alpha (reference: 1, i.e. scaling 1/16)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout (reference: 0.1)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["k_proj", "v_proj", "out_proj", "fc1", "fc2", "patch_embedding"],
        metadata={"help": "Module names that get LoRA in both towers."},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute tower activations in backward to save memory."}
    )
    torch_compile: bool = field(
        default=False,
        metadata={"help": "Compile the two encoders with torch.compile (in place: checkpoints and export unchanged)."},
    )
    torch_compile_backend: str = field(default="inductor", metadata={"help": "torch.compile backend."})
    torch_compile_mode: str | None = field(
        default=None, metadata={"help": "torch.compile mode (e.g. max-autotune-no-cudagraphs)."}
    )
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None, metadata={"help": "Overrides the accelerate config; the hyperbolic math always runs in float32."}
    )
    cpu: bool = field(default=False, metadata={"help": "Force CPU (also ACCELERATE_USE_CPU=true)."})
    seed: int = field(default=42, metadata={"help": "Seed of initialisation, data order and dropout."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader workers (they decode the images)."})
    checkpointing_steps: int = field(default=0, metadata={"help": "Save the training state every N steps (0: never)."})
    checkpoints_total_limit: int = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' or a checkpoint folder (output_dir/checkpoints/step_N)."}
    )
    select_best: Literal["recall_sum", "val_loss", "none"] = field(
        default="recall_sum", metadata={"help": "Export the best epoch by this validation metric ('none': the last)."}
    )
    early_stopping_patience: int = field(
        default=0, metadata={"help": "Stop after this many epochs without improvement (0: off; reference: 5)."}
    )
    report_to: Literal["none", "tensorboard", "wandb", "all"] = field(
        default="none", metadata={"help": "Accelerate tracker."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Log training losses every N optimiser steps."})
    no_calibrate: bool = field(
        default=False,
        metadata={"help": "Skip calibrating the bounds and the unsafe thresholds on the validation split."},
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the exported model folder to the Hub."})
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repo for --push_to_hub (default: the output folder's name)."}
    )
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one / HF_TOKEN)."})
    log_level: str = field(default="INFO", metadata={"help": "Console log level of the main process."})
    debug: bool = field(default=False, metadata={"help": "Show full tracebacks instead of one-line errors."})

    @property
    def export_dir(self) -> Path:
        return Path(self.output_dir) / EXPORT_SUBDIR

    @property
    def repo_id(self) -> str:
        return self.hub_model_id or Path(self.output_dir).resolve().name


# Flags of the first release, replaced by --columns SOURCE=KIND; still accepted (hidden) for one release.
LEGACY_COLUMN_FLAGS = {f"--{kind.column}_column": kind.column for kind in CONTENT_KINDS}


def _translate_legacy_flags(args: list[str]) -> list[str]:
    """`--safe_text_column caption` -> `--columns caption=safe_text` (merged with an explicit --columns)."""
    out, columns = [], []
    i = 0
    while i < len(args):
        flag, _, inline = args[i].partition("=")
        if flag in LEGACY_COLUMN_FLAGS:
            value = inline or (args[i + 1] if i + 1 < len(args) else "")
            i += 1 if inline else 2
            columns.append(f"{value}={LEGACY_COLUMN_FLAGS[flag]}")
            logger.warning("%s is deprecated; use --columns %s=%s", flag, value, LEGACY_COLUMN_FLAGS[flag])
            continue
        if flag == "--columns":
            value = inline or (args[i + 1] if i + 1 < len(args) else "")
            i += 1 if inline else 2
            columns.append(value)
            continue
        out.append(args[i])
        i += 1
    return out + (["--columns", ",".join(columns)] if columns else [])


def parse_args(input_args: list[str] | None = None) -> TrainingConfig:
    """Parse the command line into a :class:`TrainingConfig` (flags spelled `--like_this`)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(TrainingConfig, description=__doc__.split("\n\n")[0])
    args = _translate_legacy_flags(list(sys.argv[1:] if input_args is None else input_args))
    (config,) = parser.parse_args_into_dataclasses(args)
    return config


def check_config(config: TrainingConfig) -> None:
    """Refuse impossible settings before any slow work (usage errors)."""
    if config.per_device_train_batch_size < 2:
        raise UsageError("--per_device_train_batch_size must be >= 2: the contrastive loss needs negatives")
    for name in ("per_device_eval_batch_size", "gradient_accumulation_steps", "num_train_epochs", "logging_steps"):
        if getattr(config, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(config, name)}")
    for name in ("max_train_steps", "schedule_steps", "max_train_samples", "max_eval_samples"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(config, name)}")
    if config.learning_rate <= 0:
        raise UsageError(f"--learning_rate must be > 0, got {config.learning_rate}")
    if config.validation_split == "none":
        config.validation_split = None
    if config.validation_split is None and (config.select_best != "none" or config.early_stopping_patience):
        raise UsageError("--select_best/--early_stopping_patience need a validation split; pass --select_best none")
    if config.full_finetune and config.lora_r != 16:
        raise UsageError("--lora_r has no effect with --full_finetune; drop one of them")
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output_dir {output_dir} is a file; pass a folder")
    if config.resume_from_checkpoint and config.resume_from_checkpoint != "latest":
        path = Path(config.resume_from_checkpoint)
        if not path.is_dir():
            raise UsageError(f"--resume_from_checkpoint {path} does not exist (or is not a folder)")
    elif config.resume_from_checkpoint == "latest":
        from hysac_hf.training import list_checkpoints

        if not list_checkpoints(output_dir):
            raise UsageError(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}/checkpoints")
    if config.push_to_hub:
        from hysac_hf.hub import require_token

        require_token(config.repo_id, config.hub_token)
    from hysac_hf.errors import require

    if not config.full_finetune:
        require("peft", purpose="LoRA training (drop it with --full_finetune)")
    if config.report_to in ("tensorboard", "all"):
        require("tensorboard", purpose="--report_to tensorboard")
    if config.report_to in ("wandb", "all"):
        require("wandb", purpose="--report_to wandb")
    if config.validation_split and not config.no_calibrate:
        require("matplotlib", purpose="the bounds histogram")


def load_data(config: TrainingConfig, num_processes: int):
    """The training and validation splits, checked (sizes, image files) before the model loads."""
    from hysac_hf.calibration import MIN_CALIBRATION_ROWS
    from hysac_hf.data import parse_columns
    from hysac_hf.data import load_dataset_split
    from hysac_hf.data import bad_image_rows, bad_images_or_skip

    kwargs = {
        "columns": parse_columns(config.columns),
        "coco_root": config.coco_root,
        "visu_unsafe_images": config.visu_unsafe_images,
    }
    train_set = load_dataset_split(config.dataset, config.train_split, max_samples=config.max_train_samples, **kwargs)
    eval_set = None
    if config.validation_split:
        eval_set = load_dataset_split(
            config.dataset, config.validation_split, max_samples=config.max_eval_samples, **kwargs
        )
        if not config.no_calibrate and len(eval_set) < MIN_CALIBRATION_ROWS:
            raise UsageError(
                f"the validation split has {len(eval_set)} rows; calibrating bounds needs at least "
                f"{MIN_CALIBRATION_ROWS}. Use more validation rows, or --no_calibrate"
            )
    global_batch = config.per_device_train_batch_size * num_processes
    if len(train_set) < global_batch:
        raise UsageError(
            f"the training split has {len(train_set)} rows, fewer than one global batch ({global_batch} = "
            f"{config.per_device_train_batch_size} x {num_processes} processes); lower --per_device_train_batch_size"
        )
    for name, data in (("training", train_set), ("validation", eval_set)):
        if data is None:
            continue
        bad_images_or_skip(bad_image_rows(data, IMAGE_COLUMNS, config.image_root), len(data), f"the {name} split", False)
    return train_set, eval_set


def setup_logging(accelerator, level: str) -> None:
    """Console logs on the main process only; third-party INFO noise off; library verbosity lowered elsewhere."""
    import datasets
    import transformers

    from hysac_hf.cli import setup_logging as setup_cli_logging

    if accelerator.is_local_main_process:
        setup_cli_logging(level)
    else:
        setup_cli_logging(logging.ERROR)
        transformers.utils.logging.set_verbosity_error()
        datasets.utils.logging.set_verbosity_error()


def _tracker_config(config: TrainingConfig) -> dict[str, Any]:
    return {
        k: (v if isinstance(v, (int, float, str, bool)) else str(v))
        for k, v in asdict(config).items()
        if k != "hub_token"
    }


def main(config: TrainingConfig, accelerator=None) -> dict[str, Any]:
    """Train, select, export, calibrate and (optionally) push. Returns the run summary (also in train_summary.json).

    `accelerator`: an `accelerate.Accelerator` to use instead of the one built from `config` (for callers that
    configure Accelerate themselves).

    A run that fails before its first checkpoint or export removes the `output_dir` it created, so a mistake found
    late (an undecodable image, a NaN loss at step 1) leaves nothing behind.
    """
    output_dir = Path(config.output_dir)
    created = not output_dir.exists()
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():  # log lines above the progress bar, not glued to it
            return _train(config, accelerator)
    except BaseException:
        if created and output_dir.is_dir() and not (output_dir / EXPORT_SUBDIR).exists():
            from hysac_hf.training import list_checkpoints

            if not list_checkpoints(output_dir):
                shutil.rmtree(output_dir, ignore_errors=True)
        raise


def _trainable_kwargs(config: TrainingConfig) -> dict[str, Any]:
    return {
        "full_finetune": config.full_finetune,
        "train_projections": config.train_projections,
        "lora_r": config.lora_r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "lora_target_modules": config.lora_target_modules,
    }


def build_accelerator(config: TrainingConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    output_dir = Path(config.output_dir)
    return Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        log_with=None if config.report_to == "none" else config.report_to,
        **({"mixed_precision": config.mixed_precision} if config.mixed_precision else {}),
        **({"cpu": True} if config.cpu else {}),
    )


def build_module(config: TrainingConfig, accelerator):
    """The module to train and the processor.

    Under mixed precision with LoRA the frozen tower weights are held in bf16/fp16 (no per-step weight casts); the
    LoRA weights, the HySAC scalars and so the optimiser state stay float32. Under FSDP the scalars get shape `(1,)`.
    With `--torch_compile` the two encoders are compiled in place (parameter names, checkpoints and the export are
    unchanged), unless Accelerate's own dynamo backend already compiles the whole model.
    """
    import torch
    from accelerate.utils import DistributedType

    from hysac_hf.loading import load_model
    from hysac_hf.encode import QuadrupletEncoder
    from hysac_hf.training import configure_trainable, hold_frozen_weights_in, make_scalars_shardable

    base, processor = load_model(config.model_name_or_path, allow_clip=True)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision))
    if half is not None and not config.full_finetune:
        hold_frozen_weights_in(base, half)
    if accelerator.distributed_type == DistributedType.FSDP:
        make_scalars_shardable(base)
    module = QuadrupletEncoder(
        configure_trainable(base, gradient_checkpointing=config.gradient_checkpointing, **_trainable_kwargs(config))
    )
    n_trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    logger.info("trainable parameters: %s / %s", f"{n_trainable:,}", f"{sum(p.numel() for p in module.parameters()):,}")
    if config.torch_compile and accelerator.state.dynamo_plugin.backend.value == "NO":
        for tower in (module.hysac.vision_model, module.hysac.text_model):
            tower.compile(backend=config.torch_compile_backend, mode=config.torch_compile_mode)
    elif config.torch_compile:
        logger.info("accelerate's dynamo backend compiles the whole model; --torch_compile adds nothing")
    return module, processor


def _train(config: TrainingConfig, accelerator=None) -> dict[str, Any]:
    import torch
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from hysac_hf.calibration import calibrate, calibrate_thresholds
    from hysac_hf.data import QuadrupletCollator
    from hysac_hf.encode import encode_quadruplets
    from hysac_hf.losses import HySACLoss
    from hysac_hf.training import (
        CHECKPOINT_PREFIX,
        EpochPermutationSampler,
        TrainingProgress,
        export_from_state,
        list_checkpoints,
        TrainStep,
        make_optimizer,
        trainable_names,
        validation_metrics,
    )

    check_config(config)
    output_dir = Path(config.output_dir)
    accelerator = accelerator or build_accelerator(config)
    setup_logging(accelerator, config.log_level)
    set_seed(config.seed)
    train_set, eval_set = load_data(config, accelerator.num_processes)  # before the model, before any write

    module, processor = build_module(config, accelerator)
    trainable_kwargs = _trainable_kwargs(config)

    # Data
    sampler = EpochPermutationSampler(len(train_set), config.seed)
    train_loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=config.per_device_train_batch_size,
        sampler=sampler,
        collate_fn=QuadrupletCollator(processor, image_root=config.image_root),
        num_workers=config.dataloader_num_workers,
        drop_last=True,
    )

    # Optimiser and schedule. The fused AdamW skips a step on the device when told the loss was not finite
    # (`found_inf`), so the guard needs no host-device synchronisation per step.
    optimizer, fused = make_optimizer(module, config, accelerator.device)
    batches_per_process = len(train_set) // (config.per_device_train_batch_size * accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_process / config.gradient_accumulation_steps)
    total_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = get_scheduler(
        config.lr_scheduler_type,
        optimizer,
        num_warmup_steps=config.num_warmup_steps,
        num_training_steps=config.schedule_steps or total_steps,
    )
    module, optimizer, train_loader, scheduler = accelerator.prepare(module, optimizer, train_loader, scheduler)
    progress = TrainingProgress()
    min_radius = accelerator.unwrap_model(module).hysac.config.min_radius
    loss_kwargs = dict(
        entailment_weight=config.entailment_weight,
        aperture_scale=config.aperture_scale,
        min_radius=min_radius,
        weighting=config.loss_weighting,
    )
    loss_fn = HySACLoss(
        **loss_kwargs,
        local_negatives=config.local_negatives,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )
    eval_loss_fn = HySACLoss(**loss_kwargs)
    if config.report_to != "none":
        accelerator.init_trackers("hysac", config=_tracker_config(config))
    names = trainable_names(accelerator.unwrap_model(module))

    def gather_trained() -> dict[str, torch.Tensor] | None:
        """The trained parameters, whole, on the main process (a collective under FSDP: every process calls it)."""
        state = accelerator.get_state_dict(module)
        if not accelerator.is_main_process:
            return None
        return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in state.items() if k in names}

    # Resume
    best_state = None  # the trained parameters of the best epoch so far, on the main process
    if config.resume_from_checkpoint:
        resume_path = (
            list_checkpoints(output_dir)[-1]
            if config.resume_from_checkpoint == "latest"
            else Path(config.resume_from_checkpoint)
        )
        logger.info("resuming from %s", resume_path)
        accelerator.load_state(str(resume_path))
        best_state = progress.load(resume_path)
        logger.info("resumed at optimiser step %d (epoch %d)", progress.global_step, progress.epochs_done)

    step = TrainStep(
        module,
        optimizer,
        scheduler,
        accelerator,
        loss_fn=lambda out: loss_fn(out, curvature=out["curvature"], logit_scale=out["logit_scale"]),
        clamp=lambda: accelerator.unwrap_model(module).hysac.clamp_parameters(),
        seed=config.seed,
        max_grad_norm=config.max_grad_norm,
        skip_on_device=fused,
    )

    def check_finite() -> None:
        step.check_finite(progress.global_step, note=f"; the last checkpoint is in {output_dir}/checkpoints")

    def save_checkpoint() -> None:
        check_finite()
        path = output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{progress.global_step}"
        accelerator.save_state(str(path))
        if accelerator.is_main_process:
            progress.save(path, best_state)
            for old in list_checkpoints(output_dir)[: -config.checkpoints_total_limit]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()

    def validate(epoch: int):
        """One embedding pass of the validation split on every process (each embeds its share)."""
        return encode_quadruplets(
            module,
            processor,
            eval_set,
            image_root=config.image_root,
            batch_size=config.per_device_eval_batch_size,
            num_workers=config.dataloader_num_workers,
            accelerator=accelerator,
            show_progress=False,
            source={"dataset": config.dataset, "split": config.validation_split, "epoch": epoch},
        )

    history: list[dict[str, float]] = []
    best_cache, last_cache = None, None
    bar = tqdm(
        total=total_steps, initial=progress.global_step, desc="Training", disable=not accelerator.is_local_main_process
    )
    stop = progress.global_step >= total_steps
    first_epoch = progress.micro_step // batches_per_process
    module.train()
    for epoch in range(first_epoch, num_epochs):
        if stop:
            break
        sampler.use_epoch(epoch)
        skip = progress.micro_step - epoch * batches_per_process
        loader = accelerator.skip_first_batches(train_loader, skip) if skip > 0 else train_loader
        step.reset_running()
        for batch in loader:
            out = step(batch, progress.micro_step, progress.global_step)
            progress.micro_step += 1
            if accelerator.sync_gradients:
                progress.global_step += 1
                bar.update(1)
                if progress.global_step % config.logging_steps == 0:
                    check_finite()
                    logs = {f"train/{k}": v for k, v in step.running_means().items()}
                    logs["train/lr"] = scheduler.get_last_lr()[0]
                    logs["train/curvature"] = float(out["curvature"].detach().reshape(-1)[0])
                    bar.set_postfix(loss=f"{logs['train/loss']:.4f}")
                    accelerator.log(logs, step=progress.global_step)
                if config.checkpointing_steps and progress.global_step % config.checkpointing_steps == 0:
                    save_checkpoint()
                if progress.global_step >= total_steps:
                    stop = True
                    break
        check_finite()
        epoch_finished = progress.micro_step >= (epoch + 1) * batches_per_process
        train_loss = step.running_means().get("loss", float("nan"))
        if eval_set is None or not epoch_finished:
            logger.info("epoch %d: train_loss %.4f", epoch + 1, train_loss)
            continue
        progress.epochs_done = epoch + 1
        last_cache = validate(epoch + 1)
        metrics = validation_metrics(
            last_cache, last_cache.logit_scale, eval_loss_fn, config.per_device_eval_batch_size
        )
        metrics["epoch"] = epoch + 1
        history.append(metrics)
        accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=progress.global_step)
        logger.info(
            "epoch %d: train_loss %.4f, val_loss %.4f, recall_sum %.1f (R@1 %s)",
            epoch + 1,
            train_loss,
            metrics["val_loss"],
            metrics["recall_sum"],
            ", ".join(f"{k[3:]} {v:.1f}" for k, v in metrics.items() if k.startswith("R1_")),
        )
        if config.select_best != "none":
            value = metrics[config.select_best]
            better = progress.best_metric is None or (
                value > progress.best_metric if config.select_best == "recall_sum" else value < progress.best_metric
            )
            if better:
                progress.best_metric, progress.best_epoch, progress.bad_epochs = value, epoch + 1, 0
                best_state, best_cache = gather_trained(), last_cache
            else:
                progress.bad_epochs += 1
                if config.early_stopping_patience and progress.bad_epochs >= config.early_stopping_patience:
                    logger.info(
                        "early stopping after epoch %d: no improvement for %d epochs", epoch + 1, progress.bad_epochs
                    )
                    break
    bar.close()
    check_finite()
    accelerator.wait_for_everyone()

    # Export (best epoch or last weights): rebuilt in float32 from the base and the trained parameters; the bounds
    # come from the exported weights' validation embeddings.
    summary: dict[str, Any] = {
        "global_step": progress.global_step,
        "history": history,
        "best_metric": progress.best_metric,
        "best_epoch": progress.best_epoch,
    }
    # Every process takes the same branch (gather_trained is a collective under FSDP).
    if config.select_best != "none" and progress.best_epoch is not None:
        trained, calibration_cache = best_state, best_cache  # best_cache is None if the best epoch predates a resume
    else:
        trained, calibration_cache = gather_trained(), last_cache
    if accelerator.is_main_process:
        final = export_from_state(config.model_name_or_path, trained, **trainable_kwargs)
        if eval_set is not None and not config.no_calibrate and calibration_cache is None:
            calibration_cache = encode_quadruplets(
                final, processor, eval_set, image_root=config.image_root, batch_size=config.per_device_eval_batch_size
            )
        export_dir = config.export_dir
        calibration = None if config.no_calibrate else calibration_cache
        if calibration is not None:
            final.config.bounds = calibrate(calibration)
            final.config.unsafe_thresholds = calibrate_thresholds(calibration)
            summary["bounds"] = final.config.bounds
            summary["unsafe_thresholds"] = final.config.unsafe_thresholds
        write_export(config, final, processor, summary, calibration)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        logger.info(
            "exported the model to %s; load it with AutoModel.from_pretrained(%r, trust_remote_code=True)",
            export_dir,
            str(export_dir),
        )
        if calibration is not None:
            logger.info(
                "bounds and unsafe thresholds (%s) calibrated on the %s split; distance-to-root histogram: %s",
                ", ".join(f"{k} {v:.4f}" for k, v in final.config.unsafe_thresholds.items()),
                config.validation_split,
                export_dir / HISTOGRAM_FILE,
            )
        if config.push_to_hub:
            from hysac_hf.hub import push_folder_to_hub

            url = push_folder_to_hub(
                export_dir,
                config.repo_id,
                private=config.hub_private_repo,
                commit_message=f"HySAC trained with train.py ({progress.global_step} steps)",
                token=config.hub_token,
            )
            summary["hub_commit"] = url
            logger.info("pushed to the Hub: %s", url)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def write_export(config: TrainingConfig, model, processor, summary: dict[str, Any], calibration=None) -> Path:
    """Write the Hub-ready folder (weights, config, processor, remote code, model card, histogram) atomically.

    Args:
        calibration: the `EmbeddingCache` the bounds were fitted on; its histogram goes into the folder.
    """
    from hysac_hf.files import write_folder_atomically
    from hysac_hf.calibration import plot_root_histogram, root_distances
    from hysac_hf.model_card import render_training_card

    card = render_training_card(
        repo_id=config.repo_id,
        base_model=config.model_name_or_path,
        dataset=config.dataset,
        settings=_tracker_config(config),
        bounds=model.config.bounds,
        curvature=float(model.curvature.detach()),
        summary=summary,
        histogram=HISTOGRAM_FILE if calibration is not None else None,
    )

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        card.save(folder / "README.md")
        if calibration is not None:
            plot_root_histogram(
                root_distances(calibration),
                folder / HISTOGRAM_FILE,
                bounds=model.config.bounds,
                title=f"{config.validation_split} split: distance from the root",
            )

    return write_folder_atomically(config.export_dir, write)


def cli(input_args: list[str] | None = None) -> int:
    """Entry point: exit status 0, or 2 with one line on a usage or input error (`--debug` shows the traceback)."""
    from hysac_hf.cli import run

    config = parse_args(input_args)
    prog = Path(sys.argv[0]).name if input_args is None else "train.py"  # hysac-train, train.py, ...
    return run(main, config, prog if prog not in ("", "-c", "__main__.py") else "train.py")


if __name__ == "__main__":
    sys.exit(cli())
