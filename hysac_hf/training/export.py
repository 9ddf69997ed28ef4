"""The export of a training run: the trained model rebuilt in float32 as a plain `HySACModel`, LoRA merged.

- :func:`export_from_state`: from the base checkpoint and the trained parameters (what train.py exports);
- :func:`export_model`: from a module in memory (a `QuadrupletEncoder`, `PeftModel` or `HySACModel`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from ..encode import QuadrupletEncoder
from ..loading import load_model
from ..modeling.modeling_hysac import HySACModel
from .model import configure_trainable, trainable_names


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
