"""Reusable parts of HySAC fine-tuning; the script itself is `train.py` (``accelerate launch train.py ...``).

- model setup: :func:`configure_trainable` (LoRA or full
  fine-tuning, frozen projections, trained scalars), :func:`parameter_groups` (weight decay);
- data order and progress: :class:`EpochPermutationSampler`, :class:`TrainingProgress`, :func:`step_seed`,
  :func:`list_checkpoints`;
- validation: :func:`validation_metrics` (loss and the reference's recall_sum from one `EmbeddingCache`);
- export: :func:`trainable_state` / :func:`export_model` (LoRA merged into a plain `HySACModel`).

Determinism: the data order is a per-epoch permutation seeded by the seed (same on every process), rows are
pre-augmented (no random transforms), and the global RNG that drives LoRA dropout is reseeded before every
micro-batch from ``(seed, micro_step, rank)``. A run resumed from a checkpoint therefore replays exactly the steps an
uninterrupted run would take: on CPU the final weights are bitwise identical.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .encode import EmbeddingCache, QuadrupletEncoder
from .evaluation.retrieval import recall_from_ranks
from .losses import HySACLoss
from .modeling.configuration_hysac import CONTENT
from .modeling.gallery_hysac import paired_ranks
from .modeling.modeling_hysac import HySACModel

LORA_TARGET_MODULES = ("k_proj", "v_proj", "out_proj", "fc1", "fc2", "patch_embedding")
SCALAR_PARAMETERS = ("logit_scale", "curv", "visual_alpha", "textual_alpha")
CHECKPOINT_PREFIX = "step_"
PROGRESS_FILE = "training_progress.json"
BEST_STATE_FILE = "best_trainable.safetensors"
# recall_sum of the reference (docs/method.md §7.6): R@1 text->image and image->text for these (text, image) pairs.
RECALL_SUM_PAIRS = (("S", "V"), ("S", "G"), ("U", "V"))


# --------------------------------------------------------------------------------------------------------
# Model
def configure_trainable(
    model: HySACModel,
    *,
    full_finetune: bool = False,
    train_projections: bool = False,
    lora_r: int = 16,
    lora_alpha: float = 1.0,
    lora_dropout: float = 0.1,
    lora_target_modules: Sequence[str] = LORA_TARGET_MODULES,
    gradient_checkpointing: bool = False,
) -> nn.Module:
    """Freeze/unfreeze and attach LoRA (the reference's settings by default).

    Returns:
        the module to train: a `PeftModel` around `model` with LoRA, or `model` itself with `full_finetune`.
        The projections stay frozen unless `train_projections`; the four HySAC scalars always train (the curvature
        only if `config.learn_curv`).
    """
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.requires_grad_(full_finetune)
    if not full_finetune:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            bias="none",
            target_modules=list(lora_target_modules),
        )
        trainable: nn.Module = get_peft_model(model, lora)
    else:
        trainable = model
    model.visual_projection.requires_grad_(train_projections)
    model.text_projection.requires_grad_(train_projections)
    for name in SCALAR_PARAMETERS:
        getattr(model, name).requires_grad_(name != "curv" or model.config.learn_curv)
    return trainable


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


def fused_adamw_supported(device: torch.device | str) -> bool:
    """Whether this torch has the fused AdamW (which can skip a step on the device) for `device`."""
    try:
        probe = torch.nn.Parameter(torch.zeros(1, device=device))
        probe.grad = torch.zeros(1, device=device)
        optimizer = torch.optim.AdamW([probe], fused=True)
        optimizer.found_inf = torch.zeros((), device=device)
        optimizer.step()
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def make_optimizer(module: nn.Module, config: Any, device: torch.device | str) -> tuple[torch.optim.AdamW, bool]:
    """The training AdamW: :func:`parameter_groups` with `config.weight_decay`, `config.learning_rate`,
    `config.adam_beta1`/`adam_beta2`/`adam_epsilon`, fused where this torch has it for `device`.

    Returns:
        the optimizer, and whether it is fused: a fused AdamW skips its step on the device when its `found_inf` is
        set, so a non-finite loss can be skipped without a host-device synchronisation per step.
    """
    fused = fused_adamw_supported(device)
    optimizer = torch.optim.AdamW(
        parameter_groups(module, config.weight_decay),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        fused=fused or None,
    )
    return optimizer, fused


def hold_frozen_weights_in(model: HySACModel, dtype: torch.dtype) -> HySACModel:
    """Store the (frozen) towers and projections in `dtype` (bf16/fp16 under mixed precision with LoRA), so that no
    step re-casts them; the HySAC scalars stay float32. Call before `configure_trainable`: peft then creates the LoRA
    weights in float32 (`autocast_adapter_dtype`)."""
    for part in (model.vision_model, model.text_model, model.visual_projection, model.text_projection):
        part.to(dtype)
    return model


def make_scalars_shardable(model: HySACModel) -> HySACModel:
    """Give the four scalar parameters shape `(1,)`: FSDP refuses 0-dim parameters. The maths broadcasts unchanged;
    :func:`export_from_state` restores shape `()`, so checkpoints of the exported model keep the usual layout."""
    for name in SCALAR_PARAMETERS:
        param = getattr(model, name)
        if param.ndim == 0:
            setattr(model, name, nn.Parameter(param.detach().reshape(1).clone(), requires_grad=param.requires_grad))
    return model


def trainable_names(module: nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


def export_from_state(name_or_path: str, state: dict[str, Tensor], **trainable_kwargs) -> HySACModel:
    """Rebuild the trained model in float32 from its base checkpoint and its trained parameters, merged.

    Training may hold the frozen weights in half precision and shard them (FSDP); the export does not inherit either:
    the base is loaded again in float32, the trained parameters (LoRA adapters, scalars; or all weights when fully
    fine-tuned) are put in, and LoRA is merged. The result carries no peft, compile or FSDP wrappers.

    Args:
        name_or_path: the base checkpoint training started from.
        state: trained parameters by name (as in the training module's `named_parameters()`), e.g. from
            `accelerator.get_state_dict`; scalars may have shape `(1,)` (FSDP).
        trainable_kwargs: the `configure_trainable` settings of the run.
    """
    from .loading import load_model

    base, _ = load_model(name_or_path, allow_clip=True)
    module = QuadrupletEncoder(configure_trainable(base, **trainable_kwargs))
    expected = trainable_names(module)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise KeyError(
            f"trained state does not fit the rebuilt model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.reshape(params[name].shape).to(params[name].dtype))
    return export_model(module, in_place=True)  # the rebuilt module serves only this export


def export_model(module: nn.Module, save_directory: str | Path | None = None, in_place: bool = False) -> HySACModel:
    """A plain `HySACModel` with LoRA merged, optionally saved.

    Args:
        module: a `QuadrupletEncoder`, a `PeftModel` or a `HySACModel` (unwrapped from Accelerate).
        in_place: merge into `module` itself (it is no longer trainable afterwards) instead of into a copy; for a
            module built only to be exported, which saves a copy of the whole model.
    The saved folder loads with `AutoModel.from_pretrained(dir, trust_remote_code=True)`, without peft.
    """
    inner = module.model if isinstance(module, QuadrupletEncoder) else module
    model = inner if in_place else copy.deepcopy(inner)
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
    """Counters saved with every checkpoint (JSON beside Accelerate's state), restored on resume."""

    micro_step: int = 0
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    epochs_done: int = 0

    def save(self, checkpoint: str | Path, best_state: dict[str, Tensor] | None = None) -> None:
        """Write the counters (JSON) and the best epoch's trained parameters (safetensors) into a checkpoint."""
        from safetensors.torch import save_file

        checkpoint = Path(checkpoint)
        (checkpoint / PROGRESS_FILE).write_text(json.dumps(asdict(self), indent=1))
        if best_state is not None:
            save_file({k: v.contiguous() for k, v in best_state.items()}, checkpoint / BEST_STATE_FILE)

    def load(self, checkpoint: str | Path) -> dict[str, Tensor] | None:
        """Restore the counters of a checkpoint; returns the best epoch's parameters saved with it, if any."""
        from safetensors.torch import load_file

        checkpoint = Path(checkpoint)
        if not (checkpoint / PROGRESS_FILE).is_file():
            raise FileNotFoundError(
                f"{checkpoint} has no {PROGRESS_FILE}: it is not a checkpoint written by train.py (or it is incomplete)"
            )
        for key, value in json.loads((checkpoint / PROGRESS_FILE).read_text()).items():
            setattr(self, key, value)
        best = checkpoint / BEST_STATE_FILE
        return load_file(best) if best.is_file() else None


def step_seed(seed: int, micro_step: int, rank: int) -> int:
    """Seed of the global RNG for one micro-batch (LoRA dropout): a function of the position in training only."""
    return (seed * 1_000_003 + micro_step * 1_009 + rank) % (2**63)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The `step_N` checkpoint folders of a run, oldest first."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


class NonFiniteLossError(FloatingPointError):
    """Raised before the optimiser step when the loss is NaN or Inf, so the weights stay as they were."""


# --------------------------------------------------------------------------------------------------------
# The training step
class TrainStep:
    """One micro-batch of training as train.py runs it, with its device-side bookkeeping (the benchmark times it too).

    forward -> loss -> backward -> (at the end of an accumulation window) the optimiser step, the scheduler step and
    the clamps. Nothing here reads a device value on the host: the loss terms are summed on the device (read them with
    :meth:`running_means` at a logging step), and a non-finite loss (on any process) makes the fused AdamW skip its
    step on the device (`found_inf`), so the weights stay those of the last good step; :meth:`check_finite` (one
    synchronisation) raises at the next logging step, checkpoint or epoch end. Without a fused optimiser (or under
    fp16's GradScaler, which skips by itself) the check runs on the host at once.

    Args:
        module, optimizer, scheduler: prepared by `accelerator.prepare`.
        accelerator: the `accelerate.Accelerator`.
        loss_fn: `module`'s output -> dict of named `()` terms with `"loss"`.
        clamp: called after every optimiser step (e.g. `HySACModel.clamp_parameters`).
        seed: the run's seed; the global RNG (LoRA dropout) is reseeded per micro-batch with :func:`step_seed`.
        max_grad_norm: clip the gradients to this norm (0: off).
        skip_on_device: the optimiser is the fused AdamW of :func:`make_optimizer` (found_inf supported).
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer,
        scheduler,
        accelerator,
        loss_fn,
        clamp,
        seed: int = 42,
        max_grad_norm: float = 0.0,
        skip_on_device: bool = True,
    ):
        self.module, self.optimizer, self.scheduler, self.accelerator = module, optimizer, scheduler, accelerator
        self.loss_fn, self.clamp, self.seed, self.max_grad_norm = loss_fn, clamp, seed, max_grad_norm
        self.skip_on_device = skip_on_device and accelerator.scaler is None
        device = accelerator.device
        self.window_bad = torch.zeros((), device=device)  # non-finite losses in the current accumulation window
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first optimiser step with one
        self.running: dict[str, Tensor] = {}
        self.last_terms: dict[str, Tensor] = {}
        self.count = 0

    def __call__(self, batch: dict[str, Any], micro_step: int, global_step: int) -> dict[str, Tensor]:
        """Train on one micro-batch; returns the module's output (detached scalars such as the curvature in it)."""
        accelerator, optimizer = self.accelerator, self.optimizer
        torch.manual_seed(step_seed(self.seed, micro_step, accelerator.process_index))
        with accelerator.accumulate(self.module):
            out = self.module(**batch)
            terms = self.loss_fn(out)
            loss = terms["loss"]
            bad = (~torch.isfinite(loss.detach())).float()
            if accelerator.num_processes > 1:
                bad = accelerator.reduce(bad, reduction="sum")  # a collective on the device, not a sync
            self.window_bad += bad
            self.first_bad = torch.where((self.first_bad < 0) & (bad > 0), global_step, self.first_bad)
            if not self.skip_on_device and bool(bad):  # no fused optimiser: check on the host, before the step
                self.check_finite(global_step)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if self.skip_on_device:
                    optimizer.optimizer.found_inf = (self.window_bad > 0).float()
                if self.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
            optimizer.step()
            self.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        self.last_terms = {name: value.detach() for name, value in terms.items()}
        for name, value in self.last_terms.items():
            self.running[name] = self.running.get(name, 0) + value
        self.count += 1
        if accelerator.sync_gradients:
            self.window_bad.zero_()
            self.clamp()
        return out

    def check_finite(self, global_step: int, note: str = "") -> None:
        """Raise :class:`NonFiniteLossError` if a step had a non-finite loss (one host-device synchronisation)."""
        step = int(self.first_bad)
        if step >= 0:
            raise NonFiniteLossError(
                f"non-finite loss at optimiser step {step}: that step was skipped, so the weights were not updated "
                f"by it (stopped at step {global_step}){note}. Lower --learning_rate, use --mixed_precision no or "
                "bf16, or check the data."
            )

    def running_means(self) -> dict[str, float]:
        """Mean of each loss term since :meth:`reset_running` (one synchronisation)."""
        return {name: (value / max(self.count, 1)).item() for name, value in self.running.items()}

    def reset_running(self) -> None:
        self.running, self.count = {}, 0


# --------------------------------------------------------------------------------------------------------
# Validation
@torch.no_grad()
def validation_metrics(
    cache: EmbeddingCache, logit_scale: float | Tensor, loss_fn: HySACLoss, chunk: int
) -> dict[str, float]:
    """Validation loss (mean over chunks of `chunk` quadruplets) and the reference's recall_sum.

    recall_sum = R@1 (text->image + image->text) of S->V, S->G and U->V (docs/method.md §7.6), in percent, with
    the library's one recall (`evaluation.retrieval.recall_from_ranks` on the search engine's pessimistic ranks).
    """
    cache.require(*CONTENT)
    n = cache.num_rows
    curvature = torch.tensor(cache.curvature)
    logit_scale = torch.as_tensor(logit_scale, dtype=torch.float32)
    losses = []
    for start in range(0, n - 1, chunk):
        rows = {key: value[start : start + chunk] for key, value in cache.embeds.items()}
        if rows["V"].shape[0] < 2:  # a contrastive loss needs a negative
            continue
        losses.append(loss_fn(rows, curvature=curvature, logit_scale=logit_scale)["loss"].item())
    metrics = {"val_loss": float(sum(losses) / max(len(losses), 1))}
    for text, image in RECALL_SUM_PAIRS:
        text_to_image, image_to_text = paired_ranks(cache.embeds[text], cache.embeds[image], curvature)  # one product
        metrics[f"R1_t2i_{text}_{image}"] = recall_from_ranks(text_to_image)["R@1"]
        metrics[f"R1_i2t_{text}_{image}"] = recall_from_ranks(image_to_text)["R@1"]
    metrics["recall_sum"] = sum(v for k, v in metrics.items() if k.startswith("R1_"))
    return metrics


__all__ = [
    "CHECKPOINT_PREFIX",
    "LORA_TARGET_MODULES",
    "SCALAR_PARAMETERS",
    "EpochPermutationSampler",
    "NonFiniteLossError",
    "TrainStep",
    "TrainingProgress",
    "configure_trainable",
    "export_model",
    "list_checkpoints",
    "export_from_state",
    "fused_adamw_supported",
    "hold_frozen_weights_in",
    "make_optimizer",
    "make_scalars_shardable",
    "parameter_groups",
    "step_seed",
    "trainable_names",
    "validation_metrics",
]


if __name__ == "__main__":  # `python -m hysac_hf.training` used to be the script; say where it went
    import sys

    print(
        "hysac_hf.training holds the reusable parts of training; run the training script with `hysac-train ...`, "
        "`python -m hysac_hf.train ...` or `accelerate launch train.py ...` (see --help)",
        file=sys.stderr,
    )
    sys.exit(2)
