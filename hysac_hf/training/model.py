"""The module to train: which weights train (LoRA or full fine-tuning), in which dtype and shape, and its optimiser.

- :func:`build_module`: train.py's module (a `QuadrupletEncoder`) and processor, built from the run's settings;
- :func:`configure_trainable`: freeze the base, attach LoRA (the reference's settings by default; per base family),
  train the four HySAC scalars (and the logit bias of the sigmoid loss, :func:`contrastive_loss_of`);
- :func:`hold_frozen_weights_in` (frozen towers in bf16/fp16 under mixed precision) and
  :func:`make_scalars_shardable` (FSDP);
- :func:`parameter_groups` and :func:`make_optimizer`: the AdamW of train.py (fused where this torch has it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from ..encode import QuadrupletEncoder
from ..loading import load_model
from ..losses import CONTRASTIVE_LOSSES
from ..modeling.modeling_hysac import SCALAR_PARAMETERS, HySACModel
from ..modeling.processing_hysac import HySACProcessor

if TYPE_CHECKING:
    from .config import TrainingConfig

logger = logging.getLogger(__name__)

def build_module(config: TrainingConfig, accelerator: Accelerator) -> tuple[QuadrupletEncoder, HySACProcessor]:
    """The module to train and the processor, from `config.model_name_or_path` (a HySAC checkpoint or a dual encoder's:
    CLIP, SigLIP, SigLIP 2, MetaCLIP 2).

    Under mixed precision with LoRA the frozen tower weights are held in bf16/fp16 (no per-step weight casts); the
    LoRA weights, the HySAC scalars and so the optimiser state stay float32. Under FSDP the scalars get shape `(1,)`.
    With `--torch_compile` the two encoders are compiled in place (parameter names, checkpoints and the export are
    unchanged), unless Accelerate's own dynamo backend already compiles the whole model.

    Returns:
        the `QuadrupletEncoder` to hand to `accelerator.prepare`, and the checkpoint's processor.
    """
    base, processor = load_model(config.model_name_or_path, allow_clip=True)
    if contrastive_loss_of(base, config.contrastive) == "sigmoid" and not base.has_logit_bias:
        base.add_logit_bias()  # before the scalars are made shardable
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision))
    if half is not None and not config.full_finetune:
        hold_frozen_weights_in(base, half)
    if accelerator.distributed_type == DistributedType.FSDP:
        make_scalars_shardable(base)
    module = QuadrupletEncoder(
        configure_trainable(base, gradient_checkpointing=config.gradient_checkpointing, **trainable_kwargs(config))
    )
    if config.torch_compile and accelerator.state.dynamo_plugin.backend.value == "NO":
        for tower in (module.hysac.vision_model, module.hysac.text_model):
            tower.compile(backend=config.torch_compile_backend, mode=config.torch_compile_mode)
    elif config.torch_compile:
        logger.info("accelerate's dynamo backend compiles the whole model; --torch_compile adds nothing")
    return module, processor


def trainable_kwargs(config: TrainingConfig) -> dict[str, Any]:
    """The :func:`configure_trainable` settings of a run (what :func:`build_module` and the export build with)."""
    return {
        "full_finetune": config.full_finetune,
        "train_projections": config.train_projections,
        "lora_r": config.lora_r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "lora_target_modules": config.lora_target_modules,
        "contrastive": config.contrastive,
    }


def contrastive_loss_of(model: HySACModel, contrastive: str | None = None) -> str:
    """The contrastive loss a run trains `model` with: `contrastive` when given, else the model's own, `"sigmoid"`
    when it has a `logit_bias` (SigLIP families, as `from_dual_encoder` builds them) and `"softmax"` otherwise."""
    if contrastive is not None:
        if contrastive not in CONTRASTIVE_LOSSES:
            raise ValueError(f"contrastive must be one of {list(CONTRASTIVE_LOSSES)}, got {contrastive!r}")
        return contrastive
    return "sigmoid" if model.has_logit_bias else "softmax"


def configure_trainable(
    model: HySACModel,
    *,
    full_finetune: bool = False,
    train_projections: bool = False,
    lora_r: int = 16,
    lora_alpha: float = 1.0,
    lora_dropout: float = 0.1,
    lora_target_modules: Sequence[str] | None = None,
    gradient_checkpointing: bool = False,
    contrastive: str | None = None,
) -> nn.Module:
    """Freeze/unfreeze and attach LoRA (the reference's settings by default).

    Args:
        lora_target_modules: the modules LoRA adapts; None: the model's family's (`model.lora_target_modules`; CLIP:
            `LORA_TARGET_MODULES`, the reference's).
        contrastive: the run's contrastive loss (:func:`contrastive_loss_of`): `"sigmoid"` gives a model without a
            `logit_bias` one (`HySACModel.add_logit_bias`, SigLIP's -10) and trains it; under `"softmax"`, on which
            no constant shift of the logits acts, a model's bias stays frozen.
    Returns:
        the module to train: a `PeftModel` around `model` with LoRA, or `model` itself with `full_finetune`.
        The projections (`model.projections`) stay frozen unless `train_projections`; the four HySAC scalars always
        train (the curvature only if `config.learn_curv`), and so does the logit bias under the sigmoid loss.
    """
    contrastive = contrastive_loss_of(model, contrastive)
    if contrastive == "sigmoid" and not model.has_logit_bias:
        model.add_logit_bias()
    if lora_target_modules is None:
        lora_target_modules = model.lora_target_modules
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
    for projection in model.projections:
        projection.requires_grad_(train_projections)
    for name in SCALAR_PARAMETERS:
        getattr(model, name).requires_grad_(name != "curv" or model.config.learn_curv)
    if model.has_logit_bias:
        model.logit_bias.requires_grad_(contrastive == "sigmoid")
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
    projections = [getattr(model, name) for name in ("visual_projection", "text_projection") if hasattr(model, name)]
    for part in (model.vision_model, model.text_model, *projections):  # SigLIP's heads are inside the towers
        part.to(dtype)
    return model


def make_scalars_shardable(model: HySACModel) -> HySACModel:
    """Give the scalar parameters (four, five with a logit bias) shape `(1,)`: FSDP refuses 0-dim parameters. The
    maths broadcasts unchanged; :func:`export_from_state` restores shape `()`, so checkpoints of the exported model
    keep the usual layout."""
    for name in model.scalar_parameter_names:
        param = getattr(model, name)
        if param.ndim == 0:
            setattr(model, name, nn.Parameter(param.detach().reshape(1).clone(), requires_grad=param.requires_grad))
    return model


def trainable_names(module: nn.Module) -> set[str]:
    """Names of the parameters of `module` that train (`requires_grad`), as in its `named_parameters()`."""
    return {name for name, p in module.named_parameters() if p.requires_grad}
