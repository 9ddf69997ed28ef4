"""HySAC model configuration. Ships to the Hub as remote code: torch + transformers only."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import transformers
from transformers import CLIPTextConfig, CLIPVisionConfig

try:  # transformers >= 5
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as _BaseConfig

from transformers.utils import logging

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class ContentKind:
    """One of the four kinds of content HySAC orders by distance from the root.

    Attributes:
        key: the one-letter key of the authors' code and of `config.bounds` (`S`, `V`, `U`, `G`).
        column: the dataset column that holds it (`safe_text`, `safe_image`, `unsafe_text`, `unsafe_image`).
        notation: the paper's notation (`T`, `I`, `T*`, `I*`).
        name: display name ("safe text", ...).
        modality: `"text"` or `"image"`.
        is_safe: whether it is the safe side of a quadruplet.
    """

    key: str
    column: str
    notation: str
    name: str
    modality: str
    is_safe: bool


# THE vocabulary of the four kinds of content, in the paper's radial order (nearest to the root first).
# Every other module imports it; no other table of these names exists.
CONTENT_KINDS: tuple[ContentKind, ...] = (
    ContentKind("S", "safe_text", "T", "safe text", "text", True),
    ContentKind("V", "safe_image", "I", "safe image", "image", True),
    ContentKind("U", "unsafe_text", "T*", "unsafe text", "text", False),
    ContentKind("G", "unsafe_image", "I*", "unsafe image", "image", False),
)
CONTENT: dict[str, ContentKind] = {kind.key: kind for kind in CONTENT_KINDS}
CONTENT_BY_COLUMN: dict[str, ContentKind] = {kind.column: kind for kind in CONTENT_KINDS}
CONTENT_BY_NOTATION: dict[str, ContentKind] = {kind.notation: kind for kind in CONTENT_KINDS}
BOUND_KEYS = tuple(kind.key for kind in CONTENT_KINDS)  # ("S", "V", "U", "G")
MODALITIES = ("image", "text")
# The safe kind of each modality: the region a traversal of that modality's gallery moves into.
SAFE_KIND = {kind.modality: kind for kind in CONTENT_KINDS if kind.is_safe}
# The unsafe kind of each modality: with SAFE_KIND, the negatives and positives of its unsafe classifier.
UNSAFE_KIND = {kind.modality: kind for kind in CONTENT_KINDS if not kind.is_safe}
BOUND_STATS = ("avg", "up_95", "low_05")
THRESHOLD_KEYS = MODALITIES

# Upper clamp of the log contrastive scale: the authors' (and MERU's) literal, a hair above log(100) = 4.6051702.
# Kept as written so that training from the released checkpoint follows the released code.
MAX_LOGIT_SCALE = 4.6052

# The initial SigLIP bias `b` of the pairwise sigmoid loss (Zhai et al., 2023, "Sigmoid Loss for Language Image
# Pre-Training", §3.3: t' = log 10, b = -10): very negative, because almost every pair in a batch is a negative one.
SIGLIP_LOGIT_BIAS_INIT = -10.0


@dataclass(frozen=True)
class BaseFamily:
    """A family of transformers dual encoders that HySAC lifts onto the hyperboloid.

    Attributes:
        model_type: transformers' `model_type` of the base checkpoint (`config.json`) and `config.base_model_type`.
        name: display name.
        model_class: the transformers dual encoder (`CLIPModel`, ...), whose weight names HySAC keeps.
        text_config_class, vision_config_class: the towers' config classes.
        text_model_class, vision_model_class: the towers, built from transformers' own classes.
        has_projections: the features are the towers' pooled outputs through `text_projection`/`visual_projection`
            (CLIP, MetaCLIP 2); otherwise the towers end in their own heads (SigLIP: last-token pooling and a linear
            head for text, an attention-pooling head for images) and there is no projection.
        fixed_text_length: texts must be padded to the text tower's full length (`max_position_embeddings`, 64 for
            SigLIP): the tower pools the last position, so padding to the longest text of a batch changes every
            embedding. CLIP and MetaCLIP 2 pool at the end-of-text token under a causal mask, so any padding after it
            is irrelevant.
        is_naflex: images arrive as patch sequences with `pixel_attention_mask` and `spatial_shapes` (SigLIP 2
            NaFlex) instead of `(B, 3, H, W)` pixels.
        default_contrastive: the contrastive loss the family was trained with, the default of `train.py`
            (`"softmax"`: CLIP's InfoNCE; `"sigmoid"`: SigLIP's pairwise loss, with a learned `logit_bias`).
        since: the first transformers release that has the family (for the refusal on older releases).
        no_split_modules: modules `device_map` must not split.
        lora_target_modules: the modules HySAC's LoRA adapts in both towers (peft suffix matching).
    """

    model_type: str
    name: str
    model_class: str
    text_config_class: str
    vision_config_class: str
    text_model_class: str
    vision_model_class: str
    has_projections: bool
    fixed_text_length: bool
    is_naflex: bool
    default_contrastive: str
    since: str
    no_split_modules: tuple[str, ...]
    lora_target_modules: tuple[str, ...]


# CLIP's LoRA targets: the published setting (attention keys/values/outputs, MLPs, patch embedding).
CLIP_LORA_TARGET_MODULES = ("k_proj", "v_proj", "out_proj", "fc1", "fc2", "patch_embedding")
# SigLIP's: the same layers, named with their parents so that the attention-pooling head's `nn.MultiheadAttention`
# is left out: its forward reads `out_proj.weight` directly, so a LoRA wrapped around `out_proj` would be ignored in
# training and then merged into the export, which would no longer be the model that was trained. The head's MLP
# (`head.mlp.fc1`/`fc2`) is adapted like every other MLP.
SIGLIP_LORA_TARGET_MODULES = (
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
    "patch_embedding",
)

BASE_FAMILIES: dict[str, BaseFamily] = {
    family.model_type: family
    for family in (
        BaseFamily(
            "clip", "CLIP", "CLIPModel", "CLIPTextConfig", "CLIPVisionConfig", "CLIPTextModel", "CLIPVisionModel",
            has_projections=True, fixed_text_length=False, is_naflex=False, default_contrastive="softmax",
            since="4.0", no_split_modules=("CLIPTextEmbeddings", "CLIPEncoderLayer", "CLIPVisionEmbeddings"),
            lora_target_modules=CLIP_LORA_TARGET_MODULES,
        ),
        BaseFamily(
            "siglip", "SigLIP", "SiglipModel", "SiglipTextConfig", "SiglipVisionConfig", "SiglipTextModel",
            "SiglipVisionModel", has_projections=False, fixed_text_length=True, is_naflex=False,
            default_contrastive="sigmoid", since="4.37",
            no_split_modules=(
                "SiglipTextEmbeddings", "SiglipEncoderLayer", "SiglipVisionEmbeddings",
                "SiglipMultiheadAttentionPoolingHead",
            ),
            lora_target_modules=SIGLIP_LORA_TARGET_MODULES,
        ),
        BaseFamily(
            "siglip2", "SigLIP 2 (NaFlex)", "Siglip2Model", "Siglip2TextConfig", "Siglip2VisionConfig",
            "Siglip2TextModel", "Siglip2VisionModel", has_projections=False, fixed_text_length=True, is_naflex=True,
            default_contrastive="sigmoid", since="4.49",
            no_split_modules=(
                "Siglip2TextEmbeddings", "Siglip2EncoderLayer", "Siglip2VisionEmbeddings",
                "Siglip2MultiheadAttentionPoolingHead",
            ),
            lora_target_modules=SIGLIP_LORA_TARGET_MODULES,
        ),
        BaseFamily(
            "metaclip_2", "MetaCLIP 2", "MetaClip2Model", "MetaClip2TextConfig", "MetaClip2VisionConfig",
            "MetaClip2TextModel", "MetaClip2VisionModel", has_projections=True, fixed_text_length=False,
            is_naflex=False, default_contrastive="softmax", since="4.56",
            no_split_modules=("MetaClip2TextEmbeddings", "MetaClip2EncoderLayer", "MetaClip2VisionEmbeddings"),
            lora_target_modules=CLIP_LORA_TARGET_MODULES,
        ),
    )
}


def base_family(model_type: str | None) -> BaseFamily:
    """The family of a base `model_type` (`None`: CLIP, what folders saved before families existed hold).

    Raises:
        ValueError: naming the supported families.
    """
    family = BASE_FAMILIES.get("clip" if model_type is None else model_type)
    if family is None:
        raise ValueError(
            f"HySAC has no base family {model_type!r}; it lifts "
            + ", ".join(f"{f.name} ({f.model_type!r}, {f.model_class})" for f in BASE_FAMILIES.values())
        )
    return family


def family_class(family: BaseFamily, attribute: str) -> type:
    """The transformers class named by `family.<attribute>` (for example `"text_model_class"`).

    Raises:
        ImportError: when the installed transformers lacks it, naming the release that has it.
    """
    name = getattr(family, attribute)
    cls = getattr(transformers, name, None)
    if cls is None:
        raise ImportError(
            f"HySAC on {family.name} builds its towers from transformers' {name}, which transformers "
            f"{transformers.__version__} does not have ({family.model_class} arrived in transformers {family.since}). "
            f"Upgrade: pip install -U 'transformers>={family.since}'"
        )
    return cls


# Config keys renamed after folders were published; old folders and old keyword arguments still load.
RENAMED_CONFIG_KEYS = {"alpha_init": "feature_scale_init", "traversal_alpha": "traversal_offset"}


def content_kind(name: str) -> ContentKind:
    """The kind named by a key (`S`), a column (`safe_text`) or a paper notation (`T`).

    Raises:
        ValueError: listing the accepted names.
    """
    for table in (CONTENT, CONTENT_BY_COLUMN, CONTENT_BY_NOTATION):
        if name in table:
            return table[name]
    raise ValueError(
        f"unknown kind of content {name!r}; use a key {list(CONTENT)}, a column {list(CONTENT_BY_COLUMN)} "
        f"or a paper notation {list(CONTENT_BY_NOTATION)}"
    )


def _distance(value: Any, where: str) -> float:
    """`value` as a float if it is a finite real number >= 0 (a distance to the root); else a ValueError naming `where`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where} = {value!r} ({type(value).__name__}) is not a number; expected a distance >= 0")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where} = {value} is not a finite distance >= 0")
    return value


def validate_bounds(bounds: Any) -> dict[str, dict[str, float]] | None:
    """Check a bounds mapping `{"S"|"V"|"U"|"G": {"avg"|"up_95"|"low_05": float}}` and return it as floats.

    Every value must be a finite real number >= 0, and per key `low_05 <= avg <= up_95`.

    Raises:
        ValueError: naming every missing key, or the first non-numeric, non-finite or out-of-order value
            (as `bounds['V']['up_95']`).
    """
    if bounds is None:
        return None
    if not isinstance(bounds, dict):
        raise ValueError(f"bounds must be a dict keyed by {list(BOUND_KEYS)}, got {type(bounds).__name__}")
    not_dicts = [k for k in BOUND_KEYS if k in bounds and not isinstance(bounds[k], dict)]
    if not_dicts:
        raise ValueError(
            f"bounds[{not_dicts[0]!r}] = {bounds[not_dicts[0]]!r} must be a dict with keys {list(BOUND_STATS)}"
        )
    missing = [k for k in BOUND_KEYS if k not in bounds]
    missing += [f"{k}.{s}" for k in BOUND_KEYS if k in bounds for s in BOUND_STATS if s not in bounds[k]]
    if missing:
        raise ValueError(
            f"bounds lacks {missing}; expected keys {list(BOUND_KEYS)} ({', '.join(kind.name for kind in CONTENT_KINDS)}) "
            f"each with {list(BOUND_STATS)}. Run 'hysac-calibrate' or pass a complete bounds dict."
        )
    clean: dict[str, dict[str, float]] = {}
    for key in BOUND_KEYS:
        clean[key] = {stat: _distance(bounds[key][stat], f"bounds[{key!r}][{stat!r}]") for stat in BOUND_STATS}
        low, avg, up = (clean[key][stat] for stat in ("low_05", "avg", "up_95"))
        if not low <= avg <= up:
            raise ValueError(
                f"bounds[{key!r}] is out of order: low_05 = {low}, avg = {avg}, up_95 = {up}; the 5th percentile, "
                "the mean and the 95th percentile of the distances to the root satisfy low_05 <= avg <= up_95. "
                "Were two statistics swapped? Recalibrate with 'hysac-calibrate'."
            )
    return clean


def validate_thresholds(thresholds: Any) -> dict[str, float] | None:
    """Check unsafe-classification thresholds `{"image": float, "text": float}` (either key may be absent).

    Each value is a distance to the root: a finite real number >= 0.

    Raises:
        ValueError: naming unknown keys, or the first non-numeric or non-finite value (as
            `unsafe_thresholds['image']`).
    """
    if thresholds is None:
        return None
    if not isinstance(thresholds, dict):
        raise ValueError(f"unsafe_thresholds must be a dict with keys {list(THRESHOLD_KEYS)}, got {thresholds!r}")
    unknown = sorted(set(thresholds) - set(THRESHOLD_KEYS))
    if unknown:
        raise ValueError(f"unsafe_thresholds has unknown keys {unknown}; expected a subset of {list(THRESHOLD_KEYS)}")
    return {key: _distance(value, f"unsafe_thresholds[{key!r}]") for key, value in thresholds.items()}


def _renamed_value(old: str, old_value: Any, new_value: Any, default: Any) -> Any:
    """The value of a renamed config key given under its old name (folders saved before the rename)."""
    new = RENAMED_CONFIG_KEYS[old]
    if new_value != default and new_value != old_value:
        raise ValueError(f"config has both {old}={old_value!r} and {new}={new_value!r}; {old} is the old name of {new}")
    logger.warning_once(
        f"HySACConfig: {old!r} is the old name of {new!r}; reading it as {new} (save the config again to update it)"
    )
    return old_value


class HySACConfig(_BaseConfig):
    r"""Configuration of a [`HySACModel`]: the two towers of a dual encoder plus the hyperbolic (Lorentz) head.

    Args:
        text_config (`dict` or the family's text config, *optional*): the text tower (`CLIPTextConfig` for CLIP,
            `SiglipTextConfig`, `Siglip2TextConfig`, `MetaClip2TextConfig`).
        vision_config (`dict` or the family's vision config, *optional*): the vision tower.
        base_model_type (`str`, defaults to `"clip"`): the family of the dual encoder the towers come from:
            `"clip"`, `"siglip"` (SigLIP and the fixed-resolution SigLIP 2), `"siglip2"` (SigLIP 2 NaFlex) or
            `"metaclip_2"` (see `BASE_FAMILIES`). Folders saved before families existed have no key: CLIP.
        base_model_name_or_path (`str`, *optional*): the checkpoint the towers were copied from (the model card's
            base model), as given to `HySACModel.from_dual_encoder`.
        projection_dim (`int`, defaults to 768): size of the features = hyperbolic dimension (CLIP: the projections'
            output; SigLIP: the heads' output, the towers' width).
        curv_init (`float`, defaults to 1.0): initial curvature magnitude `c` (the space has curvature -c).
        learn_curv (`bool`, defaults to True): whether the curvature is trained.
        curv_clamp_factor (`float`, defaults to 10.0): training clamps `c` to `[curv_init / f, curv_init * f]`.
        logit_scale_init_value (`float`, defaults to log(1/0.07)): initial log of the contrastive scale.
        max_logit_scale (`float`, defaults to `MAX_LOGIT_SCALE` = 4.6052): upper clamp of the log scale during
            training (the authors' and MERU's literal, a hair above log(100)).
        feature_scale_init (`float`, *optional*): initial multiplier applied to the projected features before
            the exponential map (the parameters `visual_alpha`/`textual_alpha` hold its logarithm). Defaults to
            `projection_dim ** -0.5` as in the released code. Called `alpha_init` before; that key is still read.
        min_radius (`float`, defaults to 0.1): `K` of the entailment-cone half-aperture.
        traversal_offset (`float`, defaults to 0.8): the offset of the traversal threshold
            `b + tanh((b - offset) / c) + 1` (`alpha` in the authors' code). Called `traversal_alpha` before;
            that key is still read.
        bounds (`dict`, *optional*): per content type (`S` safe text, `V` safe image, `U` unsafe text, `G` unsafe
            image) the mean (`avg`), 95th (`up_95`) and 5th (`low_05`) percentile of the distance to the root.
            `None` until calibrated; the safety traversal needs it.
        unsafe_thresholds (`dict`, *optional*): `{"image": t, "text": t}` distances to the root above which
            content is classified unsafe. `None` until calibrated.
        logit_bias_init_value (`float`, *optional*): the initial `logit_bias` `b` of the logits
            `-exp(logit_scale) * d_L + b`, which SigLIP's pairwise sigmoid loss learns. `None` (CLIP's default): the
            model has no bias. `HySACModel.from_dual_encoder` gives SigLIP families `SIGLIP_LOGIT_BIAS_INIT` (-10,
            SigLIP's initialisation).
    """

    model_type = "hysac"
    sub_configs = {"text_config": CLIPTextConfig, "vision_config": CLIPVisionConfig}
    sub_configs_defaults = {"text_config": CLIPTextConfig, "vision_config": CLIPVisionConfig}

    def __init__(
        self,
        text_config: dict | _BaseConfig | None = None,
        vision_config: dict | _BaseConfig | None = None,
        projection_dim: int = 768,
        curv_init: float = 1.0,
        learn_curv: bool = True,
        curv_clamp_factor: float = 10.0,
        logit_scale_init_value: float = math.log(1 / 0.07),
        max_logit_scale: float = MAX_LOGIT_SCALE,
        feature_scale_init: float | None = None,
        min_radius: float = 0.1,
        traversal_offset: float = 0.8,
        bounds: dict | None = None,
        unsafe_thresholds: dict | None = None,
        initializer_factor: float = 1.0,
        base_model_type: str = "clip",
        base_model_name_or_path: str | None = None,
        logit_bias_init_value: float | None = None,
        **kwargs,
    ):
        renamed = {old: kwargs.pop(old) for old in RENAMED_CONFIG_KEYS if old in kwargs}
        if "alpha_init" in renamed:
            feature_scale_init = _renamed_value("alpha_init", renamed["alpha_init"], feature_scale_init, None)
        if "traversal_alpha" in renamed:
            traversal_offset = _renamed_value("traversal_alpha", renamed["traversal_alpha"], traversal_offset, 0.8)
        family = base_family(base_model_type)
        text_config_class = family_class(family, "text_config_class")
        vision_config_class = family_class(family, "vision_config_class")
        if text_config is None:
            text_config = text_config_class()
            logger.debug(f"text_config is None; using the default {text_config_class.__name__}.")
        elif isinstance(text_config, dict):
            text_config = text_config_class(**text_config)
        if vision_config is None:
            vision_config = vision_config_class()
            logger.debug(f"vision_config is None; using the default {vision_config_class.__name__}.")
        elif isinstance(vision_config, dict):
            vision_config = vision_config_class(**vision_config)
        for key, value, expected in (
            ("text_config", text_config, text_config_class),
            ("vision_config", vision_config, vision_config_class),
        ):
            if not isinstance(value, expected):
                raise ValueError(
                    f"{key} is a {type(value).__name__}, but base_model_type={family.model_type!r} ({family.name}) "
                    f"takes a {expected.__name__} (or a dict of one); pass the family's tower configs"
                )
        if logit_bias_init_value is not None and not math.isfinite(logit_bias_init_value):
            raise ValueError(f"logit_bias_init_value ({logit_bias_init_value}) must be a finite number or None")
        if curv_init <= 0:
            raise ValueError(f"curv_init ({curv_init}) must be > 0: the space has curvature -curv_init")
        if curv_clamp_factor < 1:
            raise ValueError(f"curv_clamp_factor ({curv_clamp_factor}) must be >= 1")
        if projection_dim <= 0:
            raise ValueError(f"projection_dim ({projection_dim}) must be positive")
        if feature_scale_init is None:
            feature_scale_init = projection_dim**-0.5
        if not feature_scale_init > 0:
            raise ValueError(f"feature_scale_init ({feature_scale_init}) must be > 0: the model stores its logarithm")

        self.text_config = text_config
        self.vision_config = vision_config
        self.projection_dim = projection_dim
        self.curv_init = float(curv_init)
        self.learn_curv = learn_curv
        self.curv_clamp_factor = float(curv_clamp_factor)
        self.logit_scale_init_value = float(logit_scale_init_value)
        self.max_logit_scale = float(max_logit_scale)
        self.feature_scale_init = float(feature_scale_init)
        self.min_radius = float(min_radius)
        self.traversal_offset = float(traversal_offset)
        self.bounds = validate_bounds(bounds)
        self.unsafe_thresholds = validate_thresholds(unsafe_thresholds)
        self.initializer_factor = initializer_factor
        self.base_model_type = family.model_type
        self.base_model_name_or_path = base_model_name_or_path
        self.logit_bias_init_value = None if logit_bias_init_value is None else float(logit_bias_init_value)
        super().__init__(**kwargs)

    @property
    def base_family(self) -> BaseFamily:
        """The family of the dual encoder the towers come from (`BASE_FAMILIES[base_model_type]`)."""
        return base_family(getattr(self, "base_model_type", None))

    @property
    def fixed_text_length(self) -> int | None:
        """The one text length the text tower accepts (SigLIP families: `max_position_embeddings`, 64), or None
        when texts may be padded to any length (CLIP, MetaCLIP 2)."""
        if not self.base_family.fixed_text_length:
            return None
        return int(self.text_config.max_position_embeddings)

    @classmethod
    def from_text_vision_configs(cls, text_config: _BaseConfig, vision_config: _BaseConfig, **kwargs) -> HySACConfig:
        """Build a config from two tower configs (as `CLIPConfig.from_text_vision_configs`); pass `base_model_type=`
        for towers of another family than CLIP."""
        return cls(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        for key in ("text_config", "vision_config"):
            value = getattr(self, key)
            if hasattr(value, "to_dict"):
                output[key] = value.to_dict()
        return output


__all__ = [
    "BASE_FAMILIES",
    "BOUND_KEYS",
    "BOUND_STATS",
    "BaseFamily",
    "SIGLIP_LOGIT_BIAS_INIT",
    "CONTENT",
    "CONTENT_BY_COLUMN",
    "CONTENT_BY_NOTATION",
    "CONTENT_KINDS",
    "MAX_LOGIT_SCALE",
    "MODALITIES",
    "SAFE_KIND",
    "UNSAFE_KIND",
    "ContentKind",
    "HySACConfig",
    "base_family",
    "content_kind",
    "family_class",
    "validate_bounds",
    "validate_thresholds",
]
