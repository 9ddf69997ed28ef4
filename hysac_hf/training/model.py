"""The module to train: which weights train (LoRA or full fine-tuning), in which dtype and shape, and its optimiser.

- :func:`configure_trainable`: freeze the base, attach LoRA (the reference's settings by default), train the four
  HySAC scalars;
- :func:`hold_frozen_weights_in` (frozen towers in bf16/fp16 under mixed precision) and
  :func:`make_scalars_shardable` (FSDP);
- :func:`parameter_groups` and :func:`make_optimizer`: the AdamW of train.py (fused where this torch has it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..modeling.modeling_hysac import HySACModel

LORA_TARGET_MODULES = ("k_proj", "v_proj", "out_proj", "fc1", "fc2", "patch_embedding")
SCALAR_PARAMETERS = ("logit_scale", "curv", "visual_alpha", "textual_alpha")


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
    """Names of the parameters of `module` that train (`requires_grad`), as in its `named_parameters()`."""
    return {name for name, p in module.named_parameters() if p.requires_grad}
