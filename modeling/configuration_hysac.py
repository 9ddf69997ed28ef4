"""HySAC model configuration. Ships to the Hub as remote code: torch + transformers only."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

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
    r"""Configuration of a [`HySACModel`]: two CLIP towers plus the hyperbolic (Lorentz) head.

    Args:
        text_config (`dict` or `CLIPTextConfig`, *optional*): the CLIP text tower.
        vision_config (`dict` or `CLIPVisionConfig`, *optional*): the CLIP vision tower.
        projection_dim (`int`, defaults to 768): output size of both projections = hyperbolic dimension.
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
    """

    model_type = "hysac"
    sub_configs = {"text_config": CLIPTextConfig, "vision_config": CLIPVisionConfig}
    sub_configs_defaults = {"text_config": CLIPTextConfig, "vision_config": CLIPVisionConfig}

    def __init__(
        self,
        text_config: dict | CLIPTextConfig | None = None,
        vision_config: dict | CLIPVisionConfig | None = None,
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
        **kwargs,
    ):
        renamed = {old: kwargs.pop(old) for old in RENAMED_CONFIG_KEYS if old in kwargs}
        if "alpha_init" in renamed:
            feature_scale_init = _renamed_value("alpha_init", renamed["alpha_init"], feature_scale_init, None)
        if "traversal_alpha" in renamed:
            traversal_offset = _renamed_value("traversal_alpha", renamed["traversal_alpha"], traversal_offset, 0.8)
        if text_config is None:
            text_config = CLIPTextConfig()
            logger.debug("text_config is None; using the default CLIPTextConfig.")
        elif isinstance(text_config, dict):
            text_config = CLIPTextConfig(**text_config)
        if vision_config is None:
            vision_config = CLIPVisionConfig()
            logger.debug("vision_config is None; using the default CLIPVisionConfig.")
        elif isinstance(vision_config, dict):
            vision_config = CLIPVisionConfig(**vision_config)
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
        super().__init__(**kwargs)

    @classmethod
    def from_text_vision_configs(
        cls, text_config: CLIPTextConfig, vision_config: CLIPVisionConfig, **kwargs
    ) -> HySACConfig:
        """Build a config from two CLIP tower configs (as `CLIPConfig.from_text_vision_configs`)."""
        return cls(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        for key in ("text_config", "vision_config"):
            value = getattr(self, key)
            if hasattr(value, "to_dict"):
                output[key] = value.to_dict()
        return output


__all__ = [
    "BOUND_KEYS",
    "BOUND_STATS",
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
    "content_kind",
    "validate_bounds",
    "validate_thresholds",
]
