"""Loading models: the one place that turns a folder or Hub id into a HySAC model and its processor.

- :func:`load_model`: a saved HySAC folder or Hub repo -> `(HySACModel, HySACProcessor)`, with one clear
  :class:`~hysac_hf.errors.UsageError` for anything that is not a loadable HySAC model;
- :func:`load_base_model`: where training starts, a HySAC checkpoint or a CLIP one (converted with
  `HySACModel.from_clip`).
"""

from __future__ import annotations

from pathlib import Path

from .errors import UsageError, one_line
from .modeling.configuration_hysac import HySACConfig
from .modeling.modeling_hysac import HySACModel
from .modeling.processing_hysac import HySACProcessor


def load_base_model(name_or_path: str, **config_overrides) -> HySACModel:
    """A HySAC model from a HySAC checkpoint (config `model_type == "hysac"`) or from a CLIP checkpoint.

    Raises:
        ValueError: a checkpoint of another model type.
    """
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


def load_model(path: str | Path, device: str | None = None, allow_clip: bool = False):
    """`(HySACModel, HySACProcessor)` from a saved folder or Hub id, with one clear error for a folder that is not a
    loadable HySAC model (missing, truncated or foreign weights, a bad config).

    Args:
        device: move the model there.
        allow_clip: also accept a CLIP checkpoint (converted with `HySACModel.from_clip`; training starts there).
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
        model = load_base_model(str(path)) if allow_clip else HySACModel.from_pretrained(path)
        processor = HySACProcessor.from_pretrained(path)
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


__all__ = ["load_base_model", "load_model"]
