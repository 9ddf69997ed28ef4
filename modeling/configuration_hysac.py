"""HySAC model configuration. Ships to the Hub as remote code: torch + transformers only."""

from __future__ import annotations

import math
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
BOUND_STATS = ("avg", "up_95", "low_05")
THRESHOLD_KEYS = MODALITIES


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


def validate_bounds(bounds: Any) -> dict[str, dict[str, float]] | None:
    """Check a bounds mapping `{"S"|"V"|"U"|"G": {"avg"|"up_95"|"low_05": float}}` and return it as floats.

    Raises:
        ValueError: naming every missing key or non-finite value.
    """
    if bounds is None:
        return None
    if not isinstance(bounds, dict):
        raise ValueError(f"bounds must be a dict keyed by {list(BOUND_KEYS)}, got {type(bounds).__name__}")
    missing = [k for k in BOUND_KEYS if k not in bounds]
    missing += [f"{k}.{s}" for k in BOUND_KEYS if k in bounds for s in BOUND_STATS if s not in bounds[k]]
    if missing:
        raise ValueError(
            f"bounds lacks {missing}; expected keys {list(BOUND_KEYS)} ({', '.join(kind.name for kind in CONTENT_KINDS)}) "
            f"each with {list(BOUND_STATS)}. Run 'hysac-calibrate' or pass a complete bounds dict."
        )
    clean: dict[str, dict[str, float]] = {}
    for key in BOUND_KEYS:
        clean[key] = {}
        for stat in BOUND_STATS:
            value = float(bounds[key][stat])
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"bounds[{key!r}][{stat!r}] = {value} is not a finite distance >= 0")
            clean[key][stat] = value
    return clean


def validate_thresholds(thresholds: Any) -> dict[str, float] | None:
    """Check unsafe-classification thresholds `{"image": float, "text": float}` (either key may be absent)."""
    if thresholds is None:
        return None
    if not isinstance(thresholds, dict):
        raise ValueError(f"unsafe_thresholds must be a dict with keys {list(THRESHOLD_KEYS)}, got {thresholds!r}")
    unknown = sorted(set(thresholds) - set(THRESHOLD_KEYS))
    if unknown:
        raise ValueError(f"unsafe_thresholds has unknown keys {unknown}; expected a subset of {list(THRESHOLD_KEYS)}")
    clean = {}
    for key, value in thresholds.items():
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"unsafe_thresholds[{key!r}] = {value} is not finite")
        clean[key] = value
    return clean


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
        max_logit_scale (`float`, defaults to log(100)): upper clamp of the log scale during training.
        alpha_init (`float`, *optional*): initial multiplier applied to the projected features before the
            exponential map; stored in log space. Defaults to `projection_dim ** -0.5` as in the released code.
        min_radius (`float`, defaults to 0.1): `K` of the entailment-cone half-aperture.
        traversal_alpha (`float`, defaults to 0.8): `alpha` of the traversal threshold
            `b + tanh((b - alpha) / c) + 1`.
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
        max_logit_scale: float = math.log(100),
        alpha_init: float | None = None,
        min_radius: float = 0.1,
        traversal_alpha: float = 0.8,
        bounds: dict | None = None,
        unsafe_thresholds: dict | None = None,
        initializer_factor: float = 1.0,
        **kwargs,
    ):
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
        if alpha_init is None:
            alpha_init = projection_dim**-0.5
        if alpha_init <= 0:
            raise ValueError(f"alpha_init ({alpha_init}) must be > 0: it is stored as its logarithm")

        self.text_config = text_config
        self.vision_config = vision_config
        self.projection_dim = projection_dim
        self.curv_init = float(curv_init)
        self.learn_curv = learn_curv
        self.curv_clamp_factor = float(curv_clamp_factor)
        self.logit_scale_init_value = float(logit_scale_init_value)
        self.max_logit_scale = float(max_logit_scale)
        self.alpha_init = float(alpha_init)
        self.min_radius = float(min_radius)
        self.traversal_alpha = float(traversal_alpha)
        self.bounds = validate_bounds(bounds)
        self.unsafe_thresholds = validate_thresholds(unsafe_thresholds)
        self.initializer_factor = initializer_factor
        super().__init__(**kwargs)

    @classmethod
    def from_text_vision_configs(
        cls, text_config: CLIPTextConfig, vision_config: CLIPVisionConfig, **kwargs
    ) -> "HySACConfig":
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
    "MODALITIES",
    "SAFE_KIND",
    "ContentKind",
    "HySACConfig",
    "content_kind",
    "validate_bounds",
    "validate_thresholds",
]
