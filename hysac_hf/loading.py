"""Loading models: the one place that turns a folder or Hub id into a HySAC model and its processor.

- :func:`load_model`: a saved HySAC folder or Hub repo -> `(HySACModel, HySACProcessor)`, with one clear
  :class:`~hysac_hf.errors.UsageError` for anything that is not a loadable HySAC model;
- :func:`load_base_model`: where training starts, a HySAC checkpoint or a dual encoder's (CLIP, SigLIP, SigLIP 2,
  MetaCLIP 2; converted with `HySACModel.from_dual_encoder`), and :func:`load_base_processor`, a dual encoder's own
  image processor and tokenizer with its family's padding rule.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UsageError, one_line
from .modeling.configuration_hysac import BASE_FAMILIES, HySACConfig
from .modeling.modeling_hysac import HySACModel
from .modeling.processing_hysac import HySACProcessor


def checkpoint_model_type(name_or_path: str) -> str | None:
    """The `model_type` in the `config.json` of a folder or Hub repo."""
    from transformers import PretrainedConfig

    config_dict, _ = PretrainedConfig.get_config_dict(name_or_path)
    return config_dict.get("model_type")


def load_base_model(name_or_path: str, **config_overrides) -> HySACModel:
    """A HySAC model from a HySAC checkpoint (config `model_type == "hysac"`) or from a dual encoder's: CLIP
    (`"clip"`), SigLIP and the fixed-resolution SigLIP 2 (`"siglip"`), SigLIP 2 NaFlex (`"siglip2"`), MetaCLIP 2
    (`"metaclip_2"`), converted with `HySACModel.from_dual_encoder`.

    Raises:
        ValueError: a checkpoint of another model type.
    """
    model_type = checkpoint_model_type(name_or_path)
    if model_type == HySACConfig.model_type:
        return HySACModel.from_pretrained(name_or_path, **config_overrides)
    if model_type in BASE_FAMILIES:
        return HySACModel.from_dual_encoder(name_or_path, **config_overrides)
    raise ValueError(
        f"{name_or_path} is a {model_type!r} checkpoint; expected a HySAC ('hysac') checkpoint or a dual encoder's: "
        + ", ".join(f"{family.name} ({family.model_type!r})" for family in BASE_FAMILIES.values())
    )


def load_base_processor(name_or_path: str, model: HySACModel) -> HySACProcessor:
    """The `HySACProcessor` of a dual-encoder checkpoint: its own image processor and tokenizer
    (`AutoImageProcessor`, `AutoTokenizer`), with the padding rule and text length of `model`'s family (SigLIP: always
    64 tokens). A CLIP checkpoint's processor loads as `HySACProcessor.from_pretrained` always loaded it."""
    from transformers import AutoImageProcessor, AutoTokenizer

    if model.config.base_model_type == "clip":
        return HySACProcessor.from_pretrained(name_or_path)
    fixed = model.config.fixed_text_length
    return HySACProcessor(
        image_processor=AutoImageProcessor.from_pretrained(name_or_path),
        tokenizer=AutoTokenizer.from_pretrained(name_or_path),
        text_padding="max_length" if fixed else "longest",
        text_max_length=fixed or model.config.text_config.max_position_embeddings,
    )


def load_model(path: str | Path, device: str | None = None, allow_clip: bool = False):
    """`(HySACModel, HySACProcessor)` from a saved folder or Hub id, with one clear error for a folder that is not a
    loadable HySAC model (missing, truncated or foreign weights, a bad config).

    Args:
        device: move the model there.
        allow_clip: also accept a dual encoder's checkpoint, CLIP's or another family's (converted with
            `HySACModel.from_dual_encoder`, with :func:`load_base_processor`; training starts there).
    Raises:
        UsageError: naming the folder and the cause (a path that names no folder here and cannot be a Hub repo id is
            "no such folder", not the Hub's complaint about repo ids).
    """
    local = Path(path).expanduser()
    if not local.exists():
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(str(path))
        except HFValidationError:
            raise UsageError(
                f"the model folder {path} does not exist; pass an existing folder (written by train.py / "
                "save_pretrained / the converter) or a Hub repo id such as org/name"
            ) from None
    elif not local.is_dir():
        raise UsageError(f"{path} is a file; pass the model folder that holds config.json and the weights")
    try:
        is_base = allow_clip and checkpoint_model_type(str(path)) in BASE_FAMILIES
        model = load_base_model(str(path)) if allow_clip else HySACModel.from_pretrained(path)
        processor = load_base_processor(str(path), model) if is_base else HySACProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as error:
        where = "" if local.exists() else f" (there is no folder {path} here, so it was looked up on the Hub)"
        raise UsageError(
            f"cannot load a HySAC model from {path}{where}: {type(error).__name__}: {one_line(error).rstrip('.')}. "
            "Pass a folder written by train.py / save_pretrained / the converter (re-export or re-download it if it "
            "is truncated)"
        ) from error
    except Exception as error:  # safetensors raises its own error type for corrupt files
        if type(error).__name__ != "SafetensorError":
            raise
        raise UsageError(
            f"cannot load a HySAC model from {path}: corrupt weights file ({error}); re-export it"
        ) from error
    if device:
        model.to(device)
    return model, processor


__all__ = ["checkpoint_model_type", "load_base_model", "load_base_processor", "load_model"]
