"""A faithful rebuild of the HySAC authors' inference path, for checking conversions and for benchmarks.

The authors (``aimagelab/HySAC``) wrap transformers' ``CLIPVisionModelWithProjection`` and
``CLIPTextModelWithProjection`` with ``peft.get_peft_model`` (the published ``LoraConfig`` below), keep the
learned scalars in log space, and encode as::

    features = tower(...).image_embeds            # projected, NOT L2-normalised
    embeds = exp_map0(features * exp(alpha), c=exp(curv))

Text is fed ``input_ids`` only. This module re-implements that path from the description in docs/method.md (§3.1, §3.2, §3.6; checkpoint keys §3.7)
(written here, not copied from the CC-BY-NC code) so that a converted checkpoint can be compared with what the
authors' code computes. ``peft`` is imported lazily: converting a checkpoint never needs it.

It also knows the two key layouts of the authors' ``.pth``:

- current peft (>= 0.7): ``...k_proj.base_layer.weight`` + ``...k_proj.lora_A.default.weight``;
- legacy peft (<= 0.6, the authors pin 0.4.0): ``...k_proj.weight`` + ``...k_proj.lora_A[.default].weight``,
  plus, for peft 0.4/0.5, a random ``...patch_embedding.bias`` that the Conv2d LoRA layer added to CLIP's bias-free
  patch convolution (peft issue #1013) and that the authors' model used.

:func:`load_authors_state_dict` loads either layout into a model built with the installed peft, restoring that
legacy bias, so the rebuilt model computes what the authors' environment computed.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from typing import Any

import torch
from torch import Tensor, nn

from .modeling.modeling_hysac import LORA_TARGET_MODULES

logger = logging.getLogger(__name__)

LORA_RANK = 16
LORA_ALPHA = 1.0
LORA_DROPOUT = 0.1
VISUAL_PREFIX = "visual.base_model.model."
TEXTUAL_PREFIX = "textual.base_model.model."
PATCH_EMBEDDING = "vision_model.embeddings.patch_embedding"
# ImageNet statistics the authors register as (unused) buffers; only the checkpoint layout needs them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_LEGACY_LORA = re.compile(r"\.(lora_[AB])\.weight$")


def published_lora_config(lora_alpha: float = LORA_ALPHA, r: int = LORA_RANK):
    """The authors' `peft.LoraConfig` (`r=16, lora_alpha=1, dropout=0.1`, k/v/out_proj, fc1/fc2, patch_embedding)."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=LORA_DROPOUT,
        bias="none",
        target_modules=list(LORA_TARGET_MODULES),
    )


def exp_map0_reference(x: Tensor, curv: Tensor | float, eps: float = 1e-8) -> Tensor:
    """The exponential map at the origin as the authors compute it (space components, float32 in float32 out).

    `sinh(sqrt(c) |x|) * x / (sqrt(c) |x|)`, with the sinh argument clamped to `[eps, asinh(2**15)]`.

    Args:
        x: `(B, D)` tangent vectors at the origin.
        curv: curvature magnitude `c > 0`.
    Returns:
        `(B, D)` space components on the hyperboloid.
    """
    root_c_norm = torch.as_tensor(curv, dtype=x.dtype, device=x.device).sqrt() * x.norm(dim=-1, keepdim=True)
    sinh_arg = root_c_norm.clamp(min=eps, max=math.asinh(2**15))
    return torch.sinh(sinh_arg) * x / root_c_norm.clamp(min=eps)


def dist_to_root_reference(x: Tensor, curv: Tensor | float, eps: float = 1e-8) -> Tensor:
    """Geodesic distance from the origin, written as the authors' `pairwise_dist(zeros, x)`.

    `acosh(-c <0, x>_L) / sqrt(c)`, where `<0, x>_L = -x_t / sqrt(c)` and `x_t = sqrt(1/c + |x|^2)`.

    Args:
        x: `(B, D)` space components.
    Returns:
        `(B,)` distances.
    """
    c = torch.as_tensor(curv, dtype=x.dtype, device=x.device)
    time = torch.sqrt(1 / c + (x * x).sum(-1))
    inner = -(1 / c.sqrt()) * time
    return torch.acosh((-c * inner).clamp(min=1 + eps)) / c.sqrt()


def traverse_to_safe_reference(embed: Tensor, bound: float, curv: Tensor | float, alpha: float = 0.8) -> Tensor:
    """The authors' per-sample safety traversal (docs/method.md §5.3-§5.4), for ONE embedding.

    `b' = b + tanh((b - alpha) / c) + 1`; if the distance to the root exceeds `b'`, the space components are
    rescaled to Euclidean norm `b'`; otherwise the embedding is returned unchanged.

    Args:
        embed: `(D,)` space components (one sample: the authors' code only handles one).
        bound: `b`, for example `bounds["V"]["up_95"]`.
        curv: curvature magnitude `c`.
        alpha: the margin offset (0.8 in the authors' code).
    Returns:
        `(D,)` traversed embedding.
    """
    if embed.ndim != 1:
        raise ValueError(f"the authors' traversal handles one embedding of shape (D,), got {tuple(embed.shape)}")
    c = torch.as_tensor(curv, dtype=embed.dtype)
    threshold = bound + torch.tanh((bound - alpha) / c) + 1
    distance = dist_to_root_reference(embed[None], c)[0]
    if distance > threshold:
        return embed / torch.norm(embed, dim=-1) * threshold
    return embed


class AuthorsHySAC(nn.Module):
    """The authors' model layout: PEFT-wrapped CLIP towers as `visual` / `textual`, log-space scalars.

    Its `state_dict()` has exactly the keys of the published `hysac_model.pth` (current peft layout).
    """

    def __init__(self, visual: nn.Module, textual: nn.Module, projection_dim: int):
        super().__init__()
        self.visual = visual
        self.textual = textual
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.curv = nn.Parameter(torch.tensor(0.0))
        self.visual_alpha = nn.Parameter(torch.tensor(math.log(projection_dim**-0.5)))
        self.textual_alpha = nn.Parameter(torch.tensor(math.log(projection_dim**-0.5)))
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(3, 1, 1))

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """`(B, 3, H, W)` -> `(B, D)` projected features (not normalised)."""
        return self.visual(pixel_values=pixel_values).image_embeds

    def text_features(self, input_ids: Tensor) -> Tensor:
        """`(B, L)` -> `(B, D)` projected features; input_ids only, as the authors call it."""
        return self.textual(input_ids=input_ids).text_embeds

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """`(B, 3, H, W)` -> `(B, D)` hyperboloid space components, the authors' `encode_image(project=True)`."""
        return exp_map0_reference(self.image_features(pixel_values) * self.visual_alpha.exp(), self.curv.exp())

    def encode_text(self, input_ids: Tensor) -> Tensor:
        """`(B, L)` -> `(B, D)` hyperboloid space components, the authors' `encode_text(project=True)`."""
        return exp_map0_reference(self.text_features(input_ids) * self.textual_alpha.exp(), self.curv.exp())


def _tower_configs(clip_config) -> tuple[Any, Any]:
    """Tower configs whose `projection_dim` is the CLIP's (the sub-configs default to 512)."""
    vision_config = copy.deepcopy(clip_config.vision_config)
    text_config = copy.deepcopy(clip_config.text_config)
    vision_config.projection_dim = clip_config.projection_dim
    text_config.projection_dim = clip_config.projection_dim
    return vision_config, text_config


def build_authors_model(
    clip_config,
    clip_state_dict: dict[str, Tensor] | None = None,
    lora_alpha: float = LORA_ALPHA,
    rank: int = LORA_RANK,
) -> AuthorsHySAC:
    """Build the authors' PEFT-wrapped model (needs peft).

    Args:
        clip_config: a transformers `CLIPConfig` (the base CLIP's).
        clip_state_dict: optional `CLIPModel` state dict copied into the towers before wrapping (as the authors
            start from `openai/clip-vit-large-patch14`); `None` leaves them random (a `.pth` overwrites them).
        lora_alpha: LoRA alpha (published: 1).
        rank: LoRA rank (published: 16).
    Returns:
        `AuthorsHySAC` in eval mode (the authors forget `.eval()`, which leaves LoRA dropout on).
    """
    from peft import get_peft_model
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    vision_config, text_config = _tower_configs(clip_config)
    vision = CLIPVisionModelWithProjection(vision_config)
    text = CLIPTextModelWithProjection(text_config)
    if clip_state_dict is not None:
        for tower, names in (
            (vision, ("vision_model.", "visual_projection.")),
            (text, ("text_model.", "text_projection.")),
        ):
            part = {k: v for k, v in clip_state_dict.items() if k.startswith(names)}
            tower.load_state_dict(part, strict=True)
    lora_config = published_lora_config(lora_alpha=lora_alpha, r=rank)
    visual = get_peft_model(vision, lora_config)
    textual = get_peft_model(text, copy.deepcopy(lora_config))
    return AuthorsHySAC(visual, textual, clip_config.projection_dim).eval()


def to_legacy_layout(state_dict: dict[str, Tensor], patch_bias: Tensor | None = None, adapter_name: bool = True):
    """Rewrite a current-layout authors' state dict the way peft <= 0.6 saved it (for tests).

    `X.base_layer.weight` -> `X.weight`; with `adapter_name=False` also `lora_A.default.weight` ->
    `lora_A.weight`; `patch_bias` (if given) becomes the spurious `patch_embedding.bias` of peft 0.4/0.5.
    """
    legacy: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        key = key.replace(".base_layer.", ".")
        if not adapter_name:
            key = re.sub(r"\.(lora_[AB])\.default\.", r".\1.", key)
        legacy[key] = value
    if patch_bias is not None:
        legacy[f"{VISUAL_PREFIX}{PATCH_EMBEDDING}.bias"] = patch_bias
    return legacy


def load_authors_state_dict(model: AuthorsHySAC, state_dict: dict[str, Tensor]) -> None:
    """Load a `.pth` state dict of either peft layout strictly, restoring the legacy patch bias if present.

    A legacy checkpoint's keys are moved to the installed peft's `base_layer` layout. A legacy
    `patch_embedding.bias` is attached to the (bias-free) base convolution, which is how peft 0.4 computed
    the patch embeddings.

    Raises:
        RuntimeError: from `load_state_dict(strict=True)` when keys do not match.
    """
    expected = model.state_dict()
    adapted: dict[str, Tensor] = {}
    bias_key = f"{VISUAL_PREFIX}{PATCH_EMBEDDING}.bias"
    legacy_bias = None
    for key, value in state_dict.items():
        if key == bias_key and f"{VISUAL_PREFIX}{PATCH_EMBEDDING}.base_layer.bias" not in expected:
            legacy_bias = value
            continue
        if key not in expected:
            # legacy: lora_A.weight -> lora_A.default.weight, X.weight -> X.base_layer.weight
            candidate = _LEGACY_LORA.sub(r".\1.default.weight", key)
            if candidate not in expected:
                candidate = re.sub(r"\.(weight|bias)$", r".base_layer.\1", key)
            key = candidate if candidate in expected else key
        adapted[key] = value
    model.load_state_dict(adapted, strict=True)
    if legacy_bias is not None:
        conv = model.visual.base_model.model.vision_model.embeddings.patch_embedding.base_layer
        conv.bias = nn.Parameter(legacy_bias.detach().clone().to(conv.weight.dtype), requires_grad=False)
        logger.info("restored the legacy peft Conv2d LoRA bias on the patch embedding")


def merge_authors_towers(model: AuthorsHySAC) -> dict[str, Tensor]:
    """peft's own `merge_and_unload()` of both towers, as a `CLIPModel`-named state dict (a test oracle).

    Works on a deep copy; the model is left untouched.
    """
    merged: dict[str, Tensor] = {}
    for tower in (model.visual, model.textual):
        base = copy.deepcopy(tower).merge_and_unload()
        merged.update(base.state_dict())
    return merged


__all__ = [
    "LORA_TARGET_MODULES",
    "AuthorsHySAC",
    "build_authors_model",
    "dist_to_root_reference",
    "exp_map0_reference",
    "load_authors_state_dict",
    "merge_authors_towers",
    "published_lora_config",
    "to_legacy_layout",
    "traverse_to_safe_reference",
]
