"""The export of a training run: the trained model rebuilt in float32 as a plain `HySACModel`, LoRA merged, and
written as a Hub-ready folder.

- :func:`export_from_state`: from the base checkpoint and the trained parameters (what train.py exports);
- :func:`export_model`: from a module in memory (a `QuadrupletEncoder`, `PeftModel` or `HySACModel`);
- :func:`write_export`: `<output_dir>/model` with weights, config, processor, remote code, model card and histogram.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..calibration import plot_root_histogram, root_distances
from ..encode import EmbeddingCache, QuadrupletEncoder
from ..files import write_folder_atomically
from ..loading import load_model
from ..model_card import render_training_card
from ..modeling.modeling_hysac import HySACModel
from ..modeling.processing_hysac import HySACProcessor
from .config import TrainingConfig, tracker_settings
from .model import configure_trainable, contrastive_loss_of, trainable_names

HISTOGRAM_FILE = "bounds.png"


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


def write_export(
    config: TrainingConfig,
    model: HySACModel,
    processor: HySACProcessor,
    summary: dict[str, Any],
    calibration: EmbeddingCache | None = None,
) -> Path:
    """Write the Hub-ready folder `config.export_dir` atomically: weights, config, processor, remote code, the model
    card of this run and, when calibrated, the distance-to-root histogram.

    Args:
        config: the run's settings (the card lists them).
        model: the exported model (:func:`export_from_state`), with its calibrated bounds in `model.config`.
        processor: its processor.
        summary: the run summary (`global_step`, `history`, `best_epoch`, `data`, the thresholds and their quality)
            for the card.
        calibration: the `EmbeddingCache` the bounds were fitted on; its histogram goes into the folder.
    Returns:
        the folder written.
    """
    pushed = config.push_to_hub or config.hub_model_id is not None
    card = render_training_card(
        repo_id=config.repo_id,
        load_from=config.repo_id if pushed else str(config.export_dir),  # a local export loads from its folder
        embed_dim=int(model.config.projection_dim),
        base_model=config.model_name_or_path,
        dataset=config.dataset,
        settings=tracker_settings(config),
        bounds=model.config.bounds,
        curvature=float(model.curvature.detach()),
        summary=summary,
        histogram=HISTOGRAM_FILE if calibration is not None else None,
        base_family=model.base_family.name,
        base_checkpoint=model.config.base_model_name_or_path,
        fixed_text_length=model.config.fixed_text_length,
        contrastive=contrastive_loss_of(model, config.contrastive),
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
                title="validation rows: distance from the root",
            )

    return write_folder_atomically(config.export_dir, write)
