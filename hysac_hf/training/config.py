"""The settings of a training run: :class:`TrainingConfig`, its checks (:func:`check_config`), its command line
(:func:`config_to_argv`, :func:`translate_legacy_flags`) and what it builds directly (:func:`build_accelerator`).

`train.py --help` lists every field with its description; `train.py`'s `parse_args` reads the command line into a
:class:`TrainingConfig` with `transformers.HfArgumentParser`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from ..errors import UsageError, require
from ..hub import require_token
from ..modeling.configuration_hysac import CONTENT_KINDS, SIGLIP_LORA_TARGET_MODULES
from ..modeling.modeling_hysac import LORA_TARGET_MODULES
from .checkpoints import list_checkpoints

logger = logging.getLogger(__name__)

EXPORT_SUBDIR = "model"
NO_VALIDATION = "none"  # --validation_split none: no validation split (TrainingConfig.validation_split is None)


@dataclass
class TrainingConfig:
    """Every setting of a training run; `train.py --help` lists them with these descriptions."""

    model_name_or_path: str = field(
        metadata={
            "help": "A dual encoder to start from (CLIP, SigLIP, SigLIP 2 or MetaCLIP 2, converted with "
            "HySACModel.from_dual_encoder) or a HySAC checkpoint to keep training."
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
    validation_split: str | None = field(
        default="validation",
        metadata={
            "help": "Validation split name ('none' disables validation). A dataset without it (e.g. a data file "
            "with no 'split' column) holds out --validation_split_percentage of the training rows instead."
        },
    )
    validation_split_percentage: int = field(
        default=10,
        metadata={
            "help": "Percentage of the training rows held out for validation when the dataset has no validation "
            "split (deterministic: seeded by --seed)."
        },
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
    skip_bad_images: bool = field(
        default=False,
        metadata={
            "help": "Leave out rows whose images are missing or cannot be decoded (counted in the log and "
            "train_summary.json) instead of stopping; every image is checked in one pass before the model loads."
        },
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
    contrastive: Literal["softmax", "sigmoid"] | None = field(
        default=None,
        metadata={
            "help": "Contrastive loss: 'softmax' (CLIP's InfoNCE, the reference) or 'sigmoid' (SigLIP's pairwise loss "
            "on the logits plus a learned logit_bias). Default: the model's, sigmoid for SigLIP and SigLIP 2 bases, "
            "softmax for CLIP and MetaCLIP 2."
        },
    )
    full_finetune: bool = field(
        default=False, metadata={"help": "Train every tower weight instead of LoRA (projections stay frozen)."}
    )
    train_projections: bool = field(default=False, metadata={"help": "Also train the two projections."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (paper: 16)."})
    lora_alpha: float = field(default=1.0, metadata={"help": "LoRA alpha (reference: 1, i.e. scaling 1/16)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout (reference: 0.1)."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names that get LoRA in both towers. Default: the base family's; CLIP and MetaCLIP 2: "
            f"{' '.join(LORA_TARGET_MODULES)}; SigLIP and SigLIP 2: {' '.join(SIGLIP_LORA_TARGET_MODULES)} (which "
            "leaves the attention-pooling head's nn.MultiheadAttention alone)."
        },
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

    def __post_init__(self) -> None:
        # The command line spells "no validation" `--validation_split none`; the config holds None, from the start,
        # so that every reader (and check_config, which changes nothing) sees one meaning.
        if self.validation_split == NO_VALIDATION:
            self.validation_split = None

    @property
    def export_dir(self) -> Path:
        """`<output_dir>/model`: the Hub-ready export of the run."""
        return Path(self.output_dir) / EXPORT_SUBDIR

    @property
    def repo_id(self) -> str:
        """The Hub repo of `--push_to_hub`: `--hub_model_id`, else the output folder's name."""
        return self.hub_model_id or Path(self.output_dir).resolve().name


# Flags of the first release, replaced by --columns SOURCE=KIND; still accepted (hidden) for one release.
LEGACY_COLUMN_FLAGS = {f"--{kind.column}_column": kind.column for kind in CONTENT_KINDS}


def translate_legacy_flags(args: Sequence[str]) -> list[str]:
    """`--safe_text_column caption` -> `--columns caption=safe_text`, merged with an explicit `--columns`, so that
    `HfArgumentParser` sees only :class:`TrainingConfig`'s own flags."""
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


def config_to_argv(config: TrainingConfig) -> list[str]:
    """The command-line arguments of `config`: `train.py`'s `parse_args` reads them back into an equal config.

    For running the script as a user would (`python -m hysac_hf.train *config_to_argv(config)`). Fields at their
    default are left out; `validation_split=None` is spelled `--validation_split none`. A `hub_token` is spelled like
    any other field, so it shows in the process list: leave it None and let `HF_TOKEN` / `hf auth login` provide it.

    Raises:
        ValueError: for a value the command line cannot spell (None where the default is not None, an empty list).
    """
    argv: list[str] = []
    for spec in fields(config):
        value = getattr(config, spec.name)
        if spec.default is not MISSING:
            default = spec.default
        elif spec.default_factory is not MISSING:
            default = spec.default_factory()
        else:
            default = MISSING  # a required field: always spelled
        if value == default:
            continue
        flag = f"--{spec.name}"
        if value is None and spec.name == "validation_split":
            argv += [flag, NO_VALIDATION]
        elif value is None or (isinstance(value, (list, tuple)) and not value):
            raise ValueError(f"{spec.name}={value!r} has no command-line spelling; use its default or a value")
        elif isinstance(value, bool):  # HfArgumentParser: `--flag` is True, `--flag false` is False
            argv += [flag] if value else [flag, "false"]
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def check_config(config: TrainingConfig) -> None:
    """Refuse impossible settings before any slow work: bad values, missing checkpoints, a missing Hub token or
    optional dependency. `config` is only read.

    Raises:
        UsageError: naming the flag and the fix.
    """
    if config.per_device_train_batch_size < 2:
        raise UsageError("--per_device_train_batch_size must be >= 2: the contrastive loss needs negatives")
    for name in ("per_device_eval_batch_size", "gradient_accumulation_steps", "num_train_epochs", "logging_steps"):
        if getattr(config, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(config, name)}")
    for name in ("max_train_steps", "schedule_steps", "max_train_samples", "max_eval_samples"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(config, name)}")
    for name in (
        "checkpointing_steps",
        "dataloader_num_workers",
        "early_stopping_patience",
        "num_warmup_steps",
        "max_grad_norm",
        "weight_decay",
        "lora_dropout",
    ):
        if getattr(config, name) < 0:
            raise UsageError(f"--{name} must be >= 0, got {getattr(config, name)}")
    for name in ("checkpoints_total_limit", "lora_r"):
        if getattr(config, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(config, name)}")
    if not 1 <= config.validation_split_percentage <= 50:
        raise UsageError(
            f"--validation_split_percentage must be between 1 and 50, got {config.validation_split_percentage}"
        )
    if config.learning_rate <= 0:
        raise UsageError(f"--learning_rate must be > 0, got {config.learning_rate}")
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
    elif config.resume_from_checkpoint == "latest" and not list_checkpoints(output_dir):
        raise UsageError(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}/checkpoints")
    if config.push_to_hub:
        require_token(config.repo_id, config.hub_token)
    if not config.full_finetune:
        require("peft", purpose="LoRA training (drop it with --full_finetune)")
    if config.report_to in ("tensorboard", "all"):
        require("tensorboard", purpose="--report_to tensorboard")
    if config.report_to in ("wandb", "all"):
        require("wandb", purpose="--report_to wandb")
    if config.validation_split and not config.no_calibrate:
        require("matplotlib", purpose="the bounds histogram")


def tracker_settings(config: TrainingConfig) -> dict[str, Any]:
    """The settings as trackers and the model card take them: plain values (others as strings), no Hub token."""
    return {
        k: (v if isinstance(v, (int, float, str, bool)) else str(v))
        for k, v in asdict(config).items()
        if k != "hub_token"
    }


def build_accelerator(config: TrainingConfig) -> Accelerator:
    """The `Accelerator` the settings ask for: accumulation, the run folder's `logs/` for trackers, and
    `--mixed_precision`/`--cpu` where given (otherwise the accelerate config or launcher decides)."""
    output_dir = Path(config.output_dir)
    return Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        log_with=None if config.report_to == "none" else config.report_to,
        **({"mixed_precision": config.mixed_precision} if config.mixed_precision else {}),
        **({"cpu": True} if config.cpu else {}),
    )
