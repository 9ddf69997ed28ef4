"""HySAC fine-tuning with Accelerate: arguments, model/LoRA setup, the training loop, validation and export.

`train.py` at the repository root is a thin entry point over :func:`main`; run it with
``accelerate launch train.py ...`` on any number of processes, or ``python train.py ...`` on a CPU.

Determinism: the data order is a per-epoch permutation seeded by ``--seed`` (same on every process), rows are
pre-augmented (no random transforms), and the global RNG that drives LoRA dropout is reseeded before every
micro-batch from ``(seed, micro_step, rank)``. A run resumed from a checkpoint therefore replays exactly the
steps an uninterrupted run would take: on CPU the final weights are bitwise identical.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .losses import LOSS_TERMS, HySACLoss
from .modeling.configuration_hysac import HySACConfig
from .modeling.lorentz import pairwise_dist
from .modeling.modeling_hysac import HySACModel
from .modeling.processing_hysac import HySACProcessor

LORA_TARGET_MODULES = ("k_proj", "v_proj", "out_proj", "fc1", "fc2", "patch_embedding")
SCALAR_PARAMETERS = ("logit_scale", "curv", "visual_alpha", "textual_alpha")
CHECKPOINT_PREFIX = "step_"


# --------------------------------------------------------------------------------------------------------
# Arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fine-tune HySAC (Hyperbolic Safety-Aware CLIP) with Accelerate.")
    a = p.add_argument
    a(
        "--model_name_or_path",
        required=True,
        help="CLIP checkpoint (converted with HySACModel.from_clip) or a HySAC checkpoint to keep fine-tuning.",
    )
    a("--output_dir", required=True, help="Where checkpoints (output_dir/checkpoints) and the exported model go.")
    a(
        "--dataset",
        default="mini-visu",
        help="'mini-visu' (bundled), 'visu:<ViSU-Text source>', a jsonl/csv/parquet file, a folder of split files, or a Hub dataset id.",
    )
    a("--train_split", default="train", help="Training split name.")
    a("--validation_split", default="validation", help="Validation split name ('none' disables validation).")
    a(
        "--safe_image_column",
        default="safe_image",
        help="Column with the safe image (path, PIL image or datasets.Image).",
    )
    a("--unsafe_image_column", default="unsafe_image", help="Column with the unsafe image.")
    a("--safe_text_column", default="safe_text", help="Column with the safe caption.")
    a("--unsafe_text_column", default="unsafe_text", help="Column with the unsafe caption.")
    a("--image_root", default=None, help="Folder that relative image paths are resolved against.")
    a("--coco_root", default=None, help="COCO 2017 root (ViSU safe images are found by coco_id).")
    a(
        "--visu_unsafe_images",
        default=None,
        help="Folder or json/csv mapping with ViSU's unsafe images (not public; bring your own).",
    )
    a("--max_train_samples", type=int, default=None, help="Truncate the training split (debugging).")
    a("--max_eval_samples", type=int, default=None, help="Truncate the validation split (debugging).")
    a(
        "--per_device_train_batch_size",
        type=int,
        default=32,
        help="Quadruplets per process per micro-batch (reference: 32).",
    )
    a(
        "--per_device_eval_batch_size",
        type=int,
        default=64,
        help="Quadruplets per validation loss chunk and encoding batch.",
    )
    a(
        "--gradient_accumulation_steps",
        type=int,
        default=1,
        help="Micro-batches per optimiser step (does not enlarge the negative pool).",
    )
    a("--num_train_epochs", type=int, default=20, help="Epochs (paper: 20).")
    a(
        "--max_train_steps",
        type=int,
        default=None,
        help="Stop after this many optimiser steps (overrides epochs for the schedule if --schedule_steps is unset).",
    )
    a(
        "--schedule_steps",
        type=int,
        default=None,
        help="Length of the LR schedule in optimiser steps (default: the full run). Set it when stopping early with --max_train_steps to keep the same schedule as a longer run.",
    )
    a("--learning_rate", type=float, default=1e-4, help="Peak learning rate (reference: 1e-4).")
    a(
        "--weight_decay",
        type=float,
        default=0.2,
        help="AdamW weight decay (none on norms, biases and the HySAC scalars).",
    )
    a("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    a("--adam_beta2", type=float, default=0.98, help="AdamW beta2.")
    a("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    a("--lr_scheduler_type", default="cosine", help="transformers scheduler name (cosine: linear warmup then cosine).")
    a("--num_warmup_steps", type=int, default=0, help="Linear warmup steps.")
    a(
        "--max_grad_norm",
        type=float,
        default=0.0,
        help="Clip gradients to this norm (0: no clipping, as the reference).",
    )
    a("--entailment_weight", type=float, default=1.0, help="lambda_e of the three entailment terms.")
    a("--aperture_scale", type=float, default=1.0, help="eta, scale of the entailment cone half-aperture.")
    a(
        "--loss_weighting",
        choices=("reference", "plain"),
        default="reference",
        help="'reference': lambdas/sum/7 as the authors' code; 'plain': lambdas as given.",
    )
    a(
        "--local_negatives",
        action="store_true",
        help="Contrastive negatives from the local batch only (the authors' per-GPU loss) instead of all processes.",
    )
    a(
        "--full_finetune",
        action="store_true",
        help="Train every tower weight instead of LoRA (projections stay frozen unless --train_projections).",
    )
    a("--train_projections", action="store_true", help="Also train visual_projection and text_projection.")
    a("--lora_r", type=int, default=16, help="LoRA rank (paper: 16).")
    a("--lora_alpha", type=float, default=1.0, help="LoRA alpha (reference: 1, i.e. scaling 1/16).")
    a("--lora_dropout", type=float, default=0.1, help="LoRA dropout (reference: 0.1).")
    a(
        "--lora_target_modules",
        nargs="+",
        default=list(LORA_TARGET_MODULES),
        help="Module names that get LoRA in both towers.",
    )
    a("--gradient_checkpointing", action="store_true", help="Recompute tower activations in backward to save memory.")
    a(
        "--mixed_precision",
        choices=("no", "fp16", "bf16"),
        default=None,
        help="Overrides the accelerate config; the hyperbolic math always runs in float32.",
    )
    a("--cpu", action="store_true", help="Force CPU (also via ACCELERATE_USE_CPU=true).")
    a("--seed", type=int, default=42, help="Seed for initialisation, data order and dropout.")
    a(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="DataLoader workers (images are decoded and preprocessed there).",
    )
    a(
        "--checkpointing_steps",
        type=int,
        default=0,
        help="Save the full training state every N optimiser steps (0: never).",
    )
    a("--checkpoints_total_limit", type=int, default=2, help="Keep at most this many checkpoints.")
    a("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder to resume from.")
    a(
        "--select_best",
        choices=("recall_sum", "val_loss", "none"),
        default="recall_sum",
        help="Export the best epoch by this validation metric ('none': the last weights).",
    )
    a(
        "--early_stopping_patience",
        type=int,
        default=0,
        help="Stop after this many epochs without improvement (0: off; reference: 5).",
    )
    a("--report_to", choices=("none", "tensorboard", "wandb", "all"), default="none", help="Accelerate tracker.")
    a("--logging_steps", type=int, default=10, help="Log training losses every N optimiser steps.")
    a("--no_calibrate", action="store_true", help="Skip bounds calibration on the validation split after training.")
    a("--calibration_histogram", default=None, help="Write a histogram PNG of the calibrated distances here.")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.per_device_train_batch_size < 2:
        raise ValueError("--per_device_train_batch_size must be >= 2: the contrastive loss needs negatives")
    if args.gradient_accumulation_steps < 1:
        raise ValueError("--gradient_accumulation_steps must be >= 1")
    if args.validation_split == "none":
        args.validation_split = None
    if args.validation_split is None and (args.select_best != "none" or args.early_stopping_patience):
        raise ValueError("--select_best/--early_stopping_patience need a validation split; pass --select_best none")
    if args.full_finetune and args.lora_r != 16:
        raise ValueError("--lora_r has no effect with --full_finetune; drop one of them")
    return args


# --------------------------------------------------------------------------------------------------------
# Model
def load_base_model(name_or_path: str, **config_overrides) -> HySACModel:
    """A HySAC model from a HySAC checkpoint (config `model_type == "hysac"`) or from a CLIP checkpoint."""
    from transformers import PretrainedConfig

    config_dict, _ = PretrainedConfig.get_config_dict(name_or_path)
    model_type = config_dict.get("model_type")
    if model_type == HySACConfig.model_type:
        return HySACModel.from_pretrained(name_or_path, **config_overrides)
    if model_type == "clip":
        return HySACModel.from_clip(name_or_path, **config_overrides)
    raise ValueError(
        f"{name_or_path} is a {model_type!r} checkpoint; expected a CLIP ('clip') or HySAC ('hysac') checkpoint"
    )


def configure_trainable(model: HySACModel, args: argparse.Namespace) -> nn.Module:
    """Freeze/unfreeze and attach LoRA. Returns the module to train (a `PeftModel` with LoRA)."""
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.requires_grad_(args.full_finetune)
    if not args.full_finetune:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            bias="none",
            target_modules=list(args.lora_target_modules),
        )
        trainable: nn.Module = get_peft_model(model, lora)
    else:
        trainable = model
    model.visual_projection.requires_grad_(args.train_projections)
    model.text_projection.requires_grad_(args.train_projections)
    for name in SCALAR_PARAMETERS:
        getattr(model, name).requires_grad_(name != "curv" or model.config.learn_curv)
    return trainable


class HySACTrainingModule(nn.Module):
    """What Accelerate wraps: one forward encodes a quadruplet batch (so DDP/FSDP hooks and autocast apply).

    Args:
        model: a `HySACModel`, or a `PeftModel` around one.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def hysac(self) -> HySACModel:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(self, pixel_values: Tensor, input_ids: Tensor) -> dict[str, Tensor]:
        """Encode `(2B, 3, H, W)` images and `(2B, L)` texts (safe rows first, then unsafe).

        Returns:
            dict of `(B, D)` float32 space components `image`, `unsafe_image`, `text`, `unsafe_text`, plus the
            `()` curvature `curv` (not its log) and `logit_scale` (log).
        """
        hysac = self.hysac
        image_embeds = hysac.get_image_features(pixel_values)
        text_embeds = hysac.get_text_features(input_ids)
        image, unsafe_image = image_embeds.chunk(2)
        text, unsafe_text = text_embeds.chunk(2)
        return {
            "image": image,
            "unsafe_image": unsafe_image,
            "text": text,
            "unsafe_text": unsafe_text,
            "curv": hysac.curv.float().exp(),
            "logit_scale": hysac.logit_scale.float(),
        }

    def clamp_parameters(self) -> None:
        self.hysac.clamp_parameters()


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices and convolution kernels only (not norms, biases, HySAC scalars)."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or name.split(".")[-1] in SCALAR_PARAMETERS:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def export_model(module: HySACTrainingModule, save_directory: str | Path | None = None) -> HySACModel:
    """A plain `HySACModel` with LoRA merged (a copy; training can continue), optionally saved.

    The saved folder loads with `AutoModel.from_pretrained(dir, trust_remote_code=True)`, without peft.
    """
    model = copy.deepcopy(module.model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.requires_grad_(False)
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        model.gradient_checkpointing_disable()
    model = model.eval()
    if save_directory is not None:
        model.save_pretrained(save_directory)
    return model


# --------------------------------------------------------------------------------------------------------
# Data order and progress
class EpochPermutationSampler(torch.utils.data.Sampler):
    """A permutation of `range(n)` seeded by `(seed, epoch)`: identical on every process and after a resume.

    The epoch is set with `use_epoch`, deliberately not `set_epoch`: Accelerate's dataloader calls `set_epoch`
    with its own iteration counter, which restarts at 0 for the loader that `skip_first_batches` builds.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


@dataclass
class TrainingProgress:
    """Counters saved with every checkpoint (`accelerator.register_for_checkpointing`)."""

    micro_step: int = 0
    global_step: int = 0
    best_metric: float | None = None
    bad_epochs: int = 0
    epochs_done: int = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def step_seed(seed: int, micro_step: int, rank: int) -> int:
    """Seed of the global RNG for one micro-batch (LoRA dropout): a function of the position in training only."""
    return (seed * 1_000_003 + micro_step * 1_009 + rank) % (2**63)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


class NonFiniteLossError(FloatingPointError):
    """Raised before the backward pass when the loss is NaN or Inf, so the weights stay as they were."""


# --------------------------------------------------------------------------------------------------------
# Validation metrics
def recall_at_1(query: Tensor, pool: Tensor, curv: Tensor) -> float:
    """Percentage of queries whose nearest pool item (Lorentz distance) is the paired one (same row)."""
    nearest = pairwise_dist(query, pool, curv).argmin(dim=1)
    return 100.0 * (nearest == torch.arange(len(query), device=query.device)).float().mean().item()


def validation_metrics(embeds: dict[str, Tensor], curv: Tensor, loss_fn: HySACLoss, chunk: int) -> dict[str, float]:
    """Validation loss (mean over chunks of `chunk` quadruplets) and the reference's recall_sum.

    recall_sum = R@1 (text->image + image->text) of S->V, S->G and U->V (method doc §3.4), in percent.
    """
    n = embeds["image"].shape[0]
    losses = []
    for start in range(0, n - 1, chunk):
        rows = {
            k: v[start : start + chunk]
            for k, v in embeds.items()
            if k in ("image", "unsafe_image", "text", "unsafe_text")
        }
        if rows["image"].shape[0] < 2:
            continue
        losses.append(loss_fn(**rows, curv=curv, logit_scale=embeds["logit_scale"])["loss"].item())
    pairs = {"S_V": ("text", "image"), "S_G": ("text", "unsafe_image"), "U_V": ("unsafe_text", "image")}
    metrics = {"val_loss": float(sum(losses) / max(len(losses), 1))}
    for name, (text, image) in pairs.items():
        metrics[f"R1_t2i_{name}"] = recall_at_1(embeds[text], embeds[image], curv)
        metrics[f"R1_i2t_{name}"] = recall_at_1(embeds[image], embeds[text], curv)
    metrics["recall_sum"] = sum(v for k, v in metrics.items() if k.startswith("R1_"))
    return metrics


@torch.no_grad()
def encode_split(accelerator, module: nn.Module, dataloader) -> dict[str, Tensor]:
    """Embed a split with the prepared module on every process and gather the full result."""
    from tqdm.auto import tqdm

    was_training = module.training
    module.eval()
    parts: dict[str, list[Tensor]] = {k: [] for k in ("image", "unsafe_image", "text", "unsafe_text")}
    out = None
    for batch in tqdm(dataloader, desc="Validation", disable=not accelerator.is_local_main_process, leave=False):
        out = module(**batch)
        for key in parts:
            parts[key].append(accelerator.gather_for_metrics(out[key].float().contiguous()))
    module.train(was_training)
    embeds = {k: torch.cat(v) for k, v in parts.items()}
    embeds["curv"], embeds["logit_scale"] = out["curv"].detach(), out["logit_scale"].detach()
    return embeds


# --------------------------------------------------------------------------------------------------------
# Main
def _tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, select, export and calibrate. Returns a summary dict (also written to `output_dir/train_summary.json`)."""
    import datasets
    import transformers
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from .calibration import calibrate_model
    from .data import QuadrupletCollator, load_dataset_split

    args = parse_args(argv)
    logger = get_logger(__name__)
    output_dir = Path(args.output_dir)
    accelerator_kwargs: dict[str, Any] = {
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "project_config": ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        "log_with": None if args.report_to == "none" else args.report_to,
    }
    if args.mixed_precision is not None:
        accelerator_kwargs["mixed_precision"] = args.mixed_precision
    if args.cpu:
        accelerator_kwargs["cpu"] = True
    accelerator = Accelerator(**accelerator_kwargs)
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        datasets.utils.logging.set_verbosity_warning()
    else:
        transformers.utils.logging.set_verbosity_error()
        datasets.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    # Model
    base = load_base_model(args.model_name_or_path)
    # A HySAC folder names HySACProcessor in auto_map; trust_remote_code only silences the interactive prompt
    # (the tokenizer and image processor it loads are transformers' own CLIP classes).
    processor = HySACProcessor.from_pretrained(args.model_name_or_path, trust_remote_code=True)
    module = HySACTrainingModule(configure_trainable(base, args))
    n_trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    logger.info(f"trainable parameters: {n_trainable:,} / {sum(p.numel() for p in module.parameters()):,}")

    # Data
    columns = {
        "safe_image": args.safe_image_column,
        "unsafe_image": args.unsafe_image_column,
        "safe_text": args.safe_text_column,
        "unsafe_text": args.unsafe_text_column,
    }
    data_kwargs = {"columns": columns, "coco_root": args.coco_root, "visu_unsafe_images": args.visu_unsafe_images}
    with accelerator.main_process_first():
        train_set = load_dataset_split(
            args.dataset, args.train_split, max_samples=args.max_train_samples, **data_kwargs
        )
        eval_set = (
            load_dataset_split(args.dataset, args.validation_split, max_samples=args.max_eval_samples, **data_kwargs)
            if args.validation_split
            else None
        )
    global_batch = args.per_device_train_batch_size * accelerator.num_processes
    if len(train_set) < global_batch:
        raise ValueError(
            f"the training split has {len(train_set)} rows, fewer than one global batch ({global_batch}); "
            "lower --per_device_train_batch_size or use more data"
        )
    collator = QuadrupletCollator(processor, image_root=args.image_root)
    sampler = EpochPermutationSampler(len(train_set), args.seed)
    train_loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=args.per_device_train_batch_size,
        sampler=sampler,
        collate_fn=collator,
        num_workers=args.dataloader_num_workers,
        drop_last=True,
    )
    eval_loader = (
        torch.utils.data.DataLoader(
            eval_set,
            batch_size=args.per_device_eval_batch_size,
            shuffle=False,
            collate_fn=collator,
            num_workers=args.dataloader_num_workers,
        )
        if eval_set is not None
        else None
    )

    # Optimiser and schedule
    optimizer = torch.optim.AdamW(
        parameter_groups(module, args.weight_decay),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )
    batches_per_process = len(train_set) // global_batch
    steps_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
    total_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    schedule_steps = args.schedule_steps or total_steps
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps, num_training_steps=schedule_steps
    )
    if eval_loader is not None:
        module, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
            module, optimizer, train_loader, eval_loader, scheduler
        )
    else:
        module, optimizer, train_loader, scheduler = accelerator.prepare(module, optimizer, train_loader, scheduler)
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(progress)
    loss_fn = HySACLoss(
        entailment_weight=args.entailment_weight,
        aperture_scale=args.aperture_scale,
        min_radius=accelerator.unwrap_model(module).hysac.config.min_radius,
        weighting=args.loss_weighting,
        local_negatives=args.local_negatives,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )
    eval_loss_fn = HySACLoss(
        entailment_weight=args.entailment_weight,
        aperture_scale=args.aperture_scale,
        min_radius=loss_fn.min_radius,
        weighting=args.loss_weighting,
    )
    if args.report_to != "none":
        accelerator.init_trackers("hysac", config=_tracker_config(args))

    # Resume
    if args.resume_from_checkpoint:
        if args.resume_from_checkpoint == "latest":
            found = list_checkpoints(output_dir)
            if not found:
                raise FileNotFoundError(
                    f"--resume_from_checkpoint latest: no {CHECKPOINT_PREFIX}* in {output_dir}/checkpoints"
                )
            resume_path = found[-1]
        else:
            resume_path = Path(args.resume_from_checkpoint)
            if not resume_path.is_dir():
                raise FileNotFoundError(f"checkpoint folder {resume_path} does not exist")
        logger.info(f"resuming from {resume_path}")
        accelerator.load_state(str(resume_path))

    def save_checkpoint() -> None:
        path = output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{progress.global_step}"
        accelerator.save_state(str(path))
        if accelerator.is_main_process:
            for old in list_checkpoints(output_dir)[: -args.checkpoints_total_limit]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()

    def unwrapped() -> HySACTrainingModule:
        return accelerator.unwrap_model(module)

    best_dir = output_dir / "best"
    history: list[dict[str, float]] = []
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
        running: dict[str, float] = {}
        for batch in loader:
            torch.manual_seed(step_seed(args.seed, progress.micro_step, accelerator.process_index))
            with accelerator.accumulate(module):
                out = module(**batch)
                terms = loss_fn(
                    out["image"], out["unsafe_image"], out["text"], out["unsafe_text"], out["curv"], out["logit_scale"]
                )
                loss = terms["loss"]
                finite = torch.isfinite(loss.detach()).float()
                if accelerator.num_processes > 1:
                    finite = accelerator.reduce(finite, reduction="min")
                if finite.item() < 1:
                    values = {k: f"{v.item():.4g}" for k, v in terms.items()}
                    raise NonFiniteLossError(
                        f"non-finite loss at optimiser step {progress.global_step} (micro-batch {progress.micro_step}): "
                        f"{values}. The weights were not updated; the last checkpoint is in {output_dir}/checkpoints. "
                        "Lower --learning_rate, use --mixed_precision no or bf16, or check the data."
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(module.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            progress.micro_step += 1
            for name in LOSS_TERMS + ("loss",):
                running[name] = running.get(name, 0.0) + terms[name].item()
            if accelerator.sync_gradients:
                unwrapped().clamp_parameters()
                progress.global_step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if progress.global_step % args.logging_steps == 0:
                    count = progress.micro_step - epoch * batches_per_process - max(skip, 0)
                    logs = {f"train/{k}": v / max(count, 1) for k, v in running.items()}
                    logs["train/lr"] = scheduler.get_last_lr()[0]
                    logs["train/curvature"] = unwrapped().hysac.curvature.item()
                    accelerator.log(logs, step=progress.global_step)
                if args.checkpointing_steps and progress.global_step % args.checkpointing_steps == 0:
                    save_checkpoint()
                if progress.global_step >= total_steps:
                    stop = True
                    break
        epoch_finished = progress.micro_step >= (epoch + 1) * batches_per_process
        if eval_loader is None or not epoch_finished:
            continue
        progress.epochs_done = epoch + 1
        embeds = encode_split(accelerator, module, eval_loader)
        metrics = validation_metrics(embeds, embeds["curv"], eval_loss_fn, args.per_device_eval_batch_size)
        metrics["epoch"] = epoch + 1
        history.append(metrics)
        accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=progress.global_step)
        logger.info(f"epoch {epoch + 1}: val_loss {metrics['val_loss']:.4f}, recall_sum {metrics['recall_sum']:.1f}")
        if args.select_best != "none":
            value = metrics[args.select_best]
            better = progress.best_metric is None or (
                value > progress.best_metric if args.select_best == "recall_sum" else value < progress.best_metric
            )
            if better:
                progress.best_metric, progress.bad_epochs = value, 0
                if accelerator.is_main_process:
                    export_model(unwrapped(), best_dir)
                accelerator.wait_for_everyone()
            else:
                progress.bad_epochs += 1
                if args.early_stopping_patience and progress.bad_epochs >= args.early_stopping_patience:
                    logger.info(
                        f"early stopping after epoch {epoch + 1}: no improvement for {progress.bad_epochs} epochs"
                    )
                    break
    bar.close()
    accelerator.wait_for_everyone()

    # Export (best epoch or last weights), then calibrate bounds on the validation split.
    summary: dict[str, Any] = {
        "global_step": progress.global_step,
        "history": history,
        "best_metric": progress.best_metric,
    }
    if accelerator.is_main_process:
        if args.select_best != "none" and best_dir.is_dir():
            final = HySACModel.from_pretrained(best_dir).eval()
            shutil.rmtree(best_dir)
        else:
            final = export_model(unwrapped())
        if eval_set is not None and not args.no_calibrate:
            bounds = calibrate_model(
                final,
                processor,
                eval_set,
                batch_size=args.per_device_eval_batch_size,
                image_root=args.image_root,
                histogram_path=args.calibration_histogram,
            )
            final.config.bounds = bounds
            summary["bounds"] = bounds
        final.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        logger.info(f"exported HySAC to {output_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary
