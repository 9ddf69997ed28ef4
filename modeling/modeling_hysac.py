"""HySAC: Hyperbolic Safety-Aware CLIP. Ships to the Hub as remote code: torch + transformers only.

The two towers of a dual encoder (CLIP by default; SigLIP, SigLIP 2 and MetaCLIP 2 too, see
`configuration_hysac.BASE_FAMILIES`), built from transformers' own classes and named as in the family's model class
(`CLIPModel`, `SiglipModel`, `Siglip2Model`, `MetaClip2Model`), whose features (what the base's `get_*_features`
return) are scaled by a learned `exp(alpha)` and lifted onto a Lorentz hyperboloid of learned curvature with the
exponential map at the origin. Similarity is the negative geodesic distance; the distance to the origin ("root")
measures how specific, and for HySAC how unsafe, a text or image is.

Two ways to embed:

- `encode_image` / `encode_text`: the same on every transformers line, a plain `(B, D)` float32 tensor of
  hyperboloid space components (`lift=False`: the Euclidean projected features). Use these.
- `get_image_features` / `get_text_features`: `CLIPModel`'s contract of the installed transformers, so that
  generic CLIP code works: on transformers 5 a `BaseModelOutputWithPooling` whose `pooler_output` is the
  hyperboloid embedding (a tuple with `return_dict=False`); on transformers 4 the plain tensor.

Input checks that read tensor values (NaN pixels, token ids out of range) run in eager calls only; they are
skipped while `torch.compile`, `torch.export`, `torch.jit` or an ONNX exporter traces the model, so all the
public methods export and compile with `fullgraph=True`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers import CLIPModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import CLIPPreTrainedModel
from transformers.utils import ModelOutput, logging

from .configuration_hysac import (
    BASE_FAMILIES,
    BOUND_KEYS,
    BOUND_STATS,
    CLIP_LORA_TARGET_MODULES,
    SAFE_KIND,
    SIGLIP_LOGIT_BIAS_INIT,
    HySACConfig,
    base_family,
    family_class,
)
from .lorentz import autocast_disabled, dist_to_origin, exp_map0, pairwise_dist
from .traversal import DIRECTIONS, METHODS, traversal_threshold, traverse

try:  # transformers >= 5: init functions that skip weights loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # transformers 4.x
    from torch.nn import init

logger = logging.get_logger(__name__)

TRAVERSAL_TARGETS = {**{modality: kind.key for modality, kind in SAFE_KIND.items()}, **{k: k for k in BOUND_KEYS}}
# The learned scalars: log contrastive scale, log curvature, log feature scales. Always float32.
SCALAR_PARAMETERS = ("logit_scale", "curv", "visual_alpha", "textual_alpha")
# The bias of the logits, a fifth float32 scalar of models trained with SigLIP's sigmoid loss
# (`config.logit_bias_init_value`).
LOGIT_BIAS = "logit_bias"
# The tower modules HySAC's LoRA adapts on CLIP (the published setting: attention keys/values/outputs, MLPs, patch
# embedding); other families have their own (`BASE_FAMILIES[...].lora_target_modules`).
LORA_TARGET_MODULES = CLIP_LORA_TARGET_MODULES
_HALF_DTYPES = (torch.float16, torch.bfloat16)
# transformers 5's CLIPModel.get_*_features return a BaseModelOutputWithPooling; transformers 4's, the tensor.
FEATURES_ARE_MODEL_OUTPUTS = int(transformers.__version__.split(".")[0]) >= 5


def is_tracing() -> bool:
    """Whether torch.compile (dynamo), torch.export, torch.jit or an ONNX exporter is tracing the caller.

    Data-dependent checks (`if torch.isfinite(x).all()`, `int(ids.min())`) cannot be traced and cost a
    host-device sync; they run only when this is False.
    """
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # also True under torch.export
    if is_compiling is not None and is_compiling():
        return True
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    if is_exporting is not None and is_exporting():
        return True
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


@dataclass
class HySACOutput(ModelOutput):
    """Output of [`HySACModel.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss=True`):
            contrastive loss over the logits: symmetric InfoNCE, or SigLIP's pairwise sigmoid loss when the model
            has a `logit_bias`.
        logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`):
            `-exp(logit_scale) * d(image, text)`, the scaled negative geodesic distance, `+ logit_bias` when the
            model has one (SigLIP families).
        logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`):
            the transpose of `logits_per_image`.
        text_embeds (`torch.FloatTensor` of shape `(text_batch_size, projection_dim)`):
            space components of the text embeddings on the hyperboloid (float32).
        image_embeds (`torch.FloatTensor` of shape `(image_batch_size, projection_dim)`):
            space components of the image embeddings on the hyperboloid (float32).
        text_model_output (`BaseModelOutputWithPooling`): output of the text tower.
        vision_model_output (`BaseModelOutputWithPooling`): output of the vision tower.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(
            self[k] if k not in ("text_model_output", "vision_model_output") else getattr(self, k).to_tuple()
            for k in self.keys()
        )


def contrastive_loss(logits_per_text: Tensor) -> Tensor:
    """Symmetric InfoNCE over a `(B, B)` logit matrix whose diagonal holds the positive pairs."""
    labels = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    return 0.5 * (F.cross_entropy(logits_per_text, labels) + F.cross_entropy(logits_per_text.t(), labels))


def sigmoid_contrastive_loss(logits_per_text: Tensor) -> Tensor:
    """SigLIP's pairwise sigmoid loss over a `(B, B)` logit matrix whose diagonal holds the positive pairs.

    `-(1/B) sum_i sum_j log sigmoid(z_ij * (2 [i == j] - 1))`, as `SiglipModel.forward(return_loss=True)`: every pair
    is an independent binary decision, so no softmax couples the rows.
    """
    signs = 2 * torch.eye(logits_per_text.shape[0], device=logits_per_text.device, dtype=logits_per_text.dtype) - 1
    return -F.logsigmoid(signs * logits_per_text).sum(dim=-1).mean()


class HySACPreTrainedModel(CLIPPreTrainedModel):
    """Weight initialisation and loading for HySAC; inherits CLIP's tower initialisation and flags
    (`_no_split_modules`, sdpa/flash attention, gradient checkpointing). Towers of other families are initialised by
    their own classes' rules."""

    config: HySACConfig
    config_class = HySACConfig
    base_model_prefix = "hysac"
    # Set explicitly: transformers 4 declares some of these on CLIPModel only. Other families set theirs per model.
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPEncoderLayer", "CLIPVisionEmbeddings"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    # Scalars live in log space; half precision would round curvature and scales visibly. Only the strict list:
    # on transformers 4 and 5 it keeps them float32 under fp16 AND bf16 loading (`_keep_in_fp32_modules` covers
    # fp16 only, and transformers expects the two lists to be disjoint).
    _keep_in_fp32_modules_strict = list(SCALAR_PARAMETERS)  # and `logit_bias`, per model, where there is one

    @classmethod
    def is_custom_code(cls) -> bool:
        """False: initialise missing weights as transformers does for its own models.

        transformers 5 assumes that a custom-code `_init_weights` writes parameters in place, and so skips every
        module whose own parameters are all loaded. `CLIPAttention` and `CLIPMLP` own no parameters (their
        `nn.Linear` children do), so CLIP's attention and MLP initialisation never ran for weights missing from a
        checkpoint (std 0.02 instead of CLIP's). Our `_init_weights` uses `transformers.initialization`, which
        leaves loaded tensors alone, exactly like the library's models.
        """
        return False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, HySACModel):
            cfg = module.config
            factor = cfg.initializer_factor
            if module.has_projections:
                init.normal_(module.visual_projection.weight, std=cfg.vision_config.hidden_size**-0.5 * factor)
                init.normal_(module.text_projection.weight, std=cfg.text_config.hidden_size**-0.5 * factor)
            init.constant_(module.logit_scale, cfg.logit_scale_init_value)
            init.constant_(module.curv, math.log(cfg.curv_init))
            init.constant_(module.visual_alpha, math.log(cfg.feature_scale_init))
            init.constant_(module.textual_alpha, math.log(cfg.feature_scale_init))
            if module.has_logit_bias:
                init.constant_(module.logit_bias, cfg.logit_bias_init_value)
        elif module is getattr(self, "visual_projection", None) or module is getattr(self, "text_projection", None):
            return  # the branch above gives them CLIP's projection init; a generic Linear init would be wasted
        else:
            owner = self._tower_owner(module)
            if owner is not None:  # transformers 4, another family than CLIP: the tower's own class's rules
                type(owner)._init_weights(owner, module)
            else:
                super()._init_weights(module)

    def _tower_owner(self, module: nn.Module) -> nn.Module | None:
        """On transformers 4 the towers are the inner transformer modules of the family's `*TextModel`/
        `*VisionModel` (kept out of the module tree in `_tower_owners`); that wrapper initialises `module` if it
        holds it. None for CLIP (CLIP's rules are inherited) and on transformers 5 (towers initialise themselves)."""
        owners = self.__dict__.get("_tower_owners")
        if not owners:
            return None
        index = self.__dict__.get("_tower_owner_index")
        if index is None:
            index = {id(m): owner for owner in owners for m in owner.modules()}
            self.__dict__["_tower_owner_index"] = index
        return index.get(id(module))


class HySACModel(HySACPreTrainedModel):
    """HySAC: the towers of a dual encoder + Lorentz lift. See the module docstring and `HySACConfig`.

    Parameters beyond the base model's: `curv` (log curvature magnitude), `visual_alpha` and `textual_alpha`
    (log feature scales), all scalars. `logit_scale` is the log contrastive scale, as in CLIP; models trained with
    SigLIP's sigmoid loss also have a scalar `logit_bias` (`config.logit_bias_init_value`). The scalars are float32
    whatever the model's dtype: `model.half()`, `.to(torch.bfloat16)` or loading with `dtype=` casts the towers
    only.

    Towers by family (`config.base_model_type`): CLIP and MetaCLIP 2 pool each tower (end-of-text token, class token)
    and project it with `text_projection`/`visual_projection`; SigLIP and SigLIP 2 have no projections, their towers
    end in heads (the text tower's last position through a linear `head`, the vision tower's attention-pooling
    `head`). SigLIP 2 NaFlex (`"siglip2"`) takes images as patch sequences with `pixel_attention_mask` and
    `spatial_shapes`, which every image method accepts and passes through.
    """

    main_input_name = "input_ids"

    def __init__(self, config: HySACConfig):
        super().__init__(config)
        text_config, vision_config = config.text_config, config.vision_config
        family = self.base_family = config.base_family
        self.projection_dim = config.projection_dim
        text_model = family_class(family, "text_model_class")._from_config(text_config)
        vision_model = family_class(family, "vision_model_class")._from_config(vision_config)
        # transformers 4 nests the transformer one level deeper; keep the base model's weight names in both.
        self.text_model = getattr(text_model, "text_model", text_model)
        self.vision_model = getattr(vision_model, "vision_model", vision_model)
        if family.model_type != "clip":
            self._no_split_modules = list(family.no_split_modules)
            # transformers 4: the wrappers hold the initialisation rules of the towers; kept outside the module tree.
            self.__dict__["_tower_owners"] = [
                owner for owner, tower in ((text_model, self.text_model), (vision_model, self.vision_model))
                if owner is not tower
            ]
        if family.has_projections:
            self.visual_projection = nn.Linear(vision_config.hidden_size, config.projection_dim, bias=False)
            self.text_projection = nn.Linear(text_config.hidden_size, config.projection_dim, bias=False)
        # float32 whatever the default dtype (`_from_config(dtype=torch.bfloat16)` sets it for construction).
        scalar = {"dtype": torch.float32}
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value, **scalar))
        self.curv = nn.Parameter(torch.tensor(math.log(config.curv_init), **scalar), requires_grad=config.learn_curv)
        self.visual_alpha = nn.Parameter(torch.tensor(math.log(config.feature_scale_init), **scalar))
        self.textual_alpha = nn.Parameter(torch.tensor(math.log(config.feature_scale_init), **scalar))
        if config.logit_bias_init_value is not None:
            self.logit_bias = nn.Parameter(torch.tensor(config.logit_bias_init_value, **scalar))
            # transformers 4 refuses names in this list that the model lacks: only models with a bias list it.
            self._keep_in_fp32_modules_strict = [*SCALAR_PARAMETERS, LOGIT_BIAS]
        self.post_init()

    @property
    def has_projections(self) -> bool:
        """Whether the features pass through `text_projection`/`visual_projection` (CLIP, MetaCLIP 2)."""
        return self.base_family.has_projections

    @property
    def has_logit_bias(self) -> bool:
        """Whether the logits carry a learned `logit_bias` (models trained with SigLIP's sigmoid loss)."""
        return LOGIT_BIAS in self._parameters

    @property
    def scalar_parameter_names(self) -> tuple[str, ...]:
        """The learned float32 scalars of this model: `SCALAR_PARAMETERS`, plus `logit_bias` where there is one."""
        return SCALAR_PARAMETERS + ((LOGIT_BIAS,) if self.has_logit_bias else ())

    @property
    def projections(self) -> tuple[nn.Module, ...]:
        """The linear maps from the towers' pooled states to the features, which training keeps frozen unless asked:
        CLIP and MetaCLIP 2: `visual_projection`, `text_projection`; SigLIP: the text tower's linear `head` (the
        vision tower's attention-pooling head is part of the tower)."""
        if self.has_projections:
            return (self.visual_projection, self.text_projection)
        return (self.text_model.head,)

    def add_logit_bias(self, value: float = SIGLIP_LOGIT_BIAS_INIT) -> None:
        """Give a model without one a learned `logit_bias` (to train it with SigLIP's sigmoid loss), set to `value`
        and recorded as `config.logit_bias_init_value`, so that the saved folder has it too.

        Raises:
            ValueError: the model has a bias already.
        """
        if self.has_logit_bias:
            raise ValueError(f"this model has a logit_bias already ({float(self.logit_bias.detach()):.4f})")
        self.config.logit_bias_init_value = float(value)
        self.logit_bias = nn.Parameter(torch.tensor(float(value), dtype=torch.float32, device=self.logit_scale.device))
        self._keep_in_fp32_modules_strict = [*SCALAR_PARAMETERS, LOGIT_BIAS]

    @property
    def lora_target_modules(self) -> tuple[str, ...]:
        """The family's LoRA targets (`BASE_FAMILIES[...].lora_target_modules`; CLIP's: `LORA_TARGET_MODULES`)."""
        return self.base_family.lora_target_modules

    def _apply(self, fn, recurse: bool = True):
        """`nn.Module._apply` (behind `.half()`, `.to(dtype)`, `.bfloat16()`, ...), keeping the learned scalars
        float32 and bit-exact: a cast to fp16/bf16 would round the curvature (1.7 -> 1.7002) and the scales."""
        saved = {}
        for name in self.scalar_parameter_names:
            param = self._parameters.get(name)
            if param is not None and param.dtype == torch.float32:
                grad = None if param.grad is None else param.grad.detach().clone()
                saved[name] = (param.detach().clone(), grad)
        result = super()._apply(fn, recurse)
        for name, (value, grad) in saved.items():
            param = self._parameters[name]
            if param.dtype in _HALF_DTYPES:
                param.data = value.to(param.device)
                if grad is not None:
                    param.grad = grad.to(param.device)
        return result

    # ----------------------------------------------------------------------------------------------------
    # Small accessors
    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.embeddings.token_embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.embeddings.token_embedding = value

    @property
    def curvature(self) -> Tensor:
        """Curvature magnitude `c = exp(curv)` (the space has curvature `-c`)."""
        return self.curv.exp()

    # ----------------------------------------------------------------------------------------------------
    # Loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, then refuse weights whose learned scalars are NaN or infinite.

        A NaN curvature, feature scale or logit scale (a diverged training run, a corrupt conversion) would
        otherwise load silently and turn every distance and logit into NaN.

        Raises:
            ValueError: naming the parameter, its value and the weights file it came from.
        """
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives a tuple
        for name in model.scalar_parameter_names:
            param = getattr(model, name, None)
            if param is not None and param.device.type != "meta" and not bool(torch.isfinite(param).all()):
                source = _weights_source(pretrained_model_name_or_path, name, kwargs)
                raise ValueError(
                    f"{name} = {param.detach().float().tolist()} in {source} is not finite, so every embedding "
                    "and logit would be NaN. The checkpoint is corrupt (for example saved from a diverged "
                    "training run): export or convert it again, or load an earlier checkpoint."
                )
        return loaded

    # ----------------------------------------------------------------------------------------------------
    # Input checks (public boundary only)
    def _check_pixel_values(
        self,
        pixel_values: Tensor | None,
        interpolate_pos_encoding: bool,
        check_values: bool = True,
        pixel_attention_mask: Tensor | None = None,
        spatial_shapes: Tensor | None = None,
    ) -> None:
        if pixel_values is None:
            raise ValueError("pixel_values is None; pass images through HySACProcessor(images=...)")
        if self.base_family.is_naflex:
            self._check_patches(pixel_values, interpolate_pos_encoding, pixel_attention_mask, spatial_shapes)
        else:
            self._check_image_shape(pixel_values, interpolate_pos_encoding, pixel_attention_mask, spatial_shapes)
        if check_values and not is_tracing() and not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contain NaN or Inf; check the image decoding and normalisation")

    def _check_image_shape(
        self,
        pixel_values: Tensor,
        interpolate_pos_encoding: bool,
        pixel_attention_mask: Tensor | None,
        spatial_shapes: Tensor | None,
    ) -> None:
        """Shape checks of fixed-resolution image inputs: `(B, C, H, W)` at the tower's size."""
        if pixel_attention_mask is not None or spatial_shapes is not None:
            raise ValueError(
                f"pixel_attention_mask and spatial_shapes are inputs of SigLIP 2 NaFlex towers; this model's "
                f"({self.base_family.name}) takes pixel_values (batch, channels, height, width) alone"
            )
        if not torch.is_tensor(pixel_values) or pixel_values.ndim != 4:
            shape = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
            raise ValueError(
                f"pixel_values must have shape (batch, channels, height, width), got {shape}; "
                "for a single image add the batch dimension with pixel_values[None]"
            )
        vc = self.config.vision_config
        b, ch, h, w = pixel_values.shape
        if b == 0:
            raise ValueError("pixel_values is an empty batch (batch size 0); pass at least one image")
        if ch != vc.num_channels:
            raise ValueError(f"pixel_values has {ch} channels, the vision tower expects {vc.num_channels}")
        if not interpolate_pos_encoding and (h, w) != (vc.image_size, vc.image_size):
            raise ValueError(
                f"pixel_values are {h}x{w}, the vision tower expects {vc.image_size}x{vc.image_size}; "
                "preprocess with HySACProcessor or pass interpolate_pos_encoding=True"
            )

    def _check_patches(
        self,
        pixel_values: Tensor,
        interpolate_pos_encoding: bool,
        pixel_attention_mask: Tensor | None,
        spatial_shapes: Tensor | None,
    ) -> None:
        """Shape checks of SigLIP 2 NaFlex image inputs: `(B, N, C * p * p)` patches, `(B, N)` mask, `(B, 2)` grid."""
        vc = self.config.vision_config
        width = vc.num_channels * vc.patch_size**2
        if interpolate_pos_encoding:
            raise ValueError(
                "interpolate_pos_encoding is for fixed-resolution towers; SigLIP 2 NaFlex takes every image size "
                "through spatial_shapes: drop the argument"
            )
        if not torch.is_tensor(pixel_values) or pixel_values.ndim != 3 or pixel_values.shape[-1] != width:
            shape = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
            raise ValueError(
                f"a SigLIP 2 NaFlex tower takes pixel_values of shape (batch, patches, {width}) (channels x patch "
                f"size^2 = {vc.num_channels} x {vc.patch_size}^2), got {shape}; preprocess with HySACProcessor"
            )
        if pixel_values.shape[0] == 0:
            raise ValueError("pixel_values is an empty batch (batch size 0); pass at least one image")
        if pixel_attention_mask is None or spatial_shapes is None:
            given = {"pixel_attention_mask": pixel_attention_mask, "spatial_shapes": spatial_shapes}
            missing = [name for name, value in given.items() if value is None]
            raise ValueError(
                f"a SigLIP 2 NaFlex tower needs pixel_values, pixel_attention_mask and spatial_shapes; {missing} "
                "missing: pass every output of HySACProcessor(images=...), e.g. model.encode_image(**inputs)"
            )
        if tuple(pixel_attention_mask.shape) != tuple(pixel_values.shape[:2]):
            raise ValueError(
                f"pixel_attention_mask has shape {tuple(pixel_attention_mask.shape)}, expected (batch, patches) = "
                f"{tuple(pixel_values.shape[:2])}"
            )
        if tuple(spatial_shapes.shape) != (pixel_values.shape[0], 2):
            raise ValueError(
                f"spatial_shapes has shape {tuple(spatial_shapes.shape)}, expected (batch, 2) = "
                f"({pixel_values.shape[0]}, 2): each image's grid of patches (rows, columns)"
            )

    def _check_input_ids(
        self, input_ids: Tensor | None, attention_mask: Tensor | None, check_values: bool = True
    ) -> None:
        if input_ids is None:
            raise ValueError("input_ids is None; pass text through HySACProcessor(text=...)")
        if not torch.is_tensor(input_ids) or input_ids.ndim != 2:
            shape = tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__
            raise ValueError(f"input_ids must have shape (batch, sequence_length), got {shape}")
        tc = self.config.text_config
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids is an empty batch (batch size 0); pass at least one text")
        if input_ids.shape[1] > tc.max_position_embeddings:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens, the text tower takes at most "
                f"{tc.max_position_embeddings}; tokenize with truncation=True (HySACProcessor does by default)"
            )
        fixed = self.config.fixed_text_length
        if fixed is not None and input_ids.shape[1] != fixed:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens, but this {self.base_family.name} text tower pools its "
                f"last position, so every text must be padded to exactly {fixed} tokens (a shorter padding silently "
                f"changes the embeddings); tokenize with padding='max_length', max_length={fixed} (HySACProcessor "
                f"does; transformers' zero-shot pipeline: pass tokenizer_kwargs={{'padding': 'max_length', "
                f"'max_length': {fixed}}})"
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
            )
        if check_values and not is_tracing() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= tc.vocab_size):
            raise ValueError(
                f"input_ids contain ids outside [0, {tc.vocab_size}); was the text tokenized with another tokenizer?"
            )

    def _check_embeds(self, embeds: Tensor, name: str = "embeds") -> None:
        if not torch.is_tensor(embeds) or embeds.ndim != 2 or embeds.shape[-1] != self.config.projection_dim:
            shape = tuple(embeds.shape) if torch.is_tensor(embeds) else type(embeds).__name__
            raise ValueError(
                f"{name} must have shape (batch, {self.config.projection_dim}) (hyperboloid space components "
                f"from encode_image/encode_text), got {shape}"
            )

    # ----------------------------------------------------------------------------------------------------
    # Encoding
    def lift(self, features: Tensor, modality: Literal["image", "text"]) -> Tensor:
        """Lift the base's features onto the hyperboloid: `exp_map0(features * exp(alpha), c)`.

        Args:
            features: `(B, projection_dim)` Euclidean features, what the base model's `get_*_features` return
                (CLIP: the projected pooled states, before L2 normalisation; SigLIP: the heads' outputs; HySAC never
                normalises them).
            modality: selects `visual_alpha` or `textual_alpha`.
        Returns:
            `(B, projection_dim)` float32 space components.
        """
        log_alpha = self.visual_alpha if modality == "image" else self.textual_alpha
        with autocast_disabled(features.device):
            return exp_map0(features.float() * log_alpha.float().exp(), self.curv.float().exp())

    def _encode_image(
        self,
        pixel_values: Tensor,
        interpolate_pos_encoding: bool = False,
        pixel_attention_mask: Tensor | None = None,
        spatial_shapes: Tensor | None = None,
        **kwargs,
    ):
        """The base's image features (`get_image_features`) and the tower's output."""
        if self.base_family.is_naflex:
            # Positional: transformers 4's inner tower names the mask `attention_mask`, 5's `pixel_attention_mask`.
            outputs = self.vision_model(pixel_values, pixel_attention_mask, spatial_shapes, **kwargs)
        else:
            outputs = self.vision_model(
                pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs
            )
        pooled = outputs.pooler_output
        return (self.visual_projection(pooled) if self.has_projections else pooled), outputs

    def _encode_text(self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None, **kwargs):
        """The base's text features (`get_text_features`) and the tower's output."""
        outputs = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        pooled = outputs.pooler_output
        return (self.text_projection(pooled) if self.has_projections else pooled), outputs

    def encode_image(
        self,
        pixel_values: Tensor,
        *,
        pixel_attention_mask: Tensor | None = None,
        spatial_shapes: Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        lift: bool = True,
        check_inputs: bool = True,
    ) -> Tensor:
        """Embed images: the plain `(B, D)` tensor, the same under transformers 4 and 5.

        Args:
            pixel_values: `(B, 3, H, W)` from `HySACProcessor(images=...)`; SigLIP 2 NaFlex: `(B, N, 3 * p * p)`
                patches.
            pixel_attention_mask: SigLIP 2 NaFlex only (and required there): `(B, N)`, 1 for real patches.
            spatial_shapes: SigLIP 2 NaFlex only (and required there): `(B, 2)` patch grid of each image.
            interpolate_pos_encoding: accept other image sizes than the tower's (fixed-resolution towers).
            lift: `False` returns the base's features before the hyperbolic lift.
            check_inputs: `False` skips the checks that read pixel values (NaN/Inf: a host-device sync); shape
                checks always run. They are skipped anyway while compiling, exporting or tracing.
        Returns:
            `(B, projection_dim)` float32 space components of the hyperboloid embeddings (`lift=False`: the base's
            features, as float32).
        """
        self._check_pixel_values(
            pixel_values, interpolate_pos_encoding, check_inputs, pixel_attention_mask, spatial_shapes
        )
        features, _ = self._encode_image(pixel_values, interpolate_pos_encoding, pixel_attention_mask, spatial_shapes)
        return self.lift(features, "image") if lift else features.float()

    def encode_text(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        position_ids: Tensor | None = None,
        lift: bool = True,
        check_inputs: bool = True,
    ) -> Tensor:
        """Embed texts: the plain `(B, D)` tensor, the same under transformers 4 and 5.

        Args:
            input_ids: `(B, L)` token ids, `L <= 77` for CLIP (the processor pads and truncates); SigLIP families:
                exactly `L = 64` (their text tower pools the last position; the processor pads to it).
            attention_mask: `(B, L)`, optional: CLIP's causal mask and end-of-text pooling make padding
                after the end-of-text token irrelevant, so results are the same with or without it.
            position_ids: `(B, L)`, optional.
            lift: `False` returns the base's features before the hyperbolic lift.
            check_inputs: `False` skips the checks that read the ids (range: a host-device sync); shape checks
                always run. They are skipped anyway while compiling, exporting or tracing.
        Returns:
            `(B, projection_dim)` float32 space components of the hyperboloid embeddings (`lift=False`: the base's
            features, as float32).
        """
        self._check_input_ids(input_ids, attention_mask, check_values=check_inputs)
        features, _ = self._encode_text(input_ids, attention_mask, position_ids)
        return self.lift(features, "text") if lift else features.float()

    def get_image_features(
        self,
        pixel_values: Tensor,
        interpolate_pos_encoding: bool = False,
        pixel_attention_mask: Tensor | None = None,
        spatial_shapes: Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple | Tensor:
        """`CLIPModel.get_image_features`'s contract on the installed transformers line, for generic CLIP code.

        For a plain tensor on every line, use [`encode_image`].

        Args:
            pixel_values: `(B, 3, H, W)` from `HySACProcessor(images=...)` (SigLIP 2 NaFlex: `(B, N, 3 * p * p)`).
            interpolate_pos_encoding: accept other image sizes than the tower's.
            pixel_attention_mask, spatial_shapes: SigLIP 2 NaFlex's `(B, N)` and `(B, 2)` (required there).
            kwargs: on transformers 5, `output_hidden_states`, `output_attentions`, `return_dict` and the other
                keyword arguments `CLIPModel.get_image_features` passes to the vision tower. Transformers 4's
                `CLIPModel` ignores extra keyword arguments with a warning; so does this method there.
        Returns:
            transformers 5: `BaseModelOutputWithPooling` of the vision tower whose `pooler_output` is the
            `(B, projection_dim)` float32 hyperboloid embedding (a tuple with `return_dict=False`).
            transformers 4: that embedding as a tensor.
        """
        _refuse_lift(kwargs, "encode_image(pixel_values, lift=False)")
        naflex = {"pixel_attention_mask": pixel_attention_mask, "spatial_shapes": spatial_shapes}
        if not FEATURES_ARE_MODEL_OUTPUTS:
            _ignore_kwargs("get_image_features", kwargs)
            return self.encode_image(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **naflex)
        return_dict = kwargs.pop("return_dict", None)
        self._check_pixel_values(pixel_values, interpolate_pos_encoding, True, **naflex)
        features, outputs = self._encode_image(
            pixel_values, interpolate_pos_encoding, **naflex, return_dict=True, **kwargs
        )
        outputs.pooler_output = self.lift(features, "image")
        return self._model_output(outputs, return_dict)

    def get_text_features(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple | Tensor:
        """`CLIPModel.get_text_features`'s contract on the installed transformers line, for generic CLIP code.

        For a plain tensor on every line, use [`encode_text`].

        Args:
            input_ids: `(B, L)` token ids, `L <= 77` (SigLIP families: `L = 64`).
            attention_mask: `(B, L)`, optional.
            position_ids: `(B, L)`, optional.
            kwargs: on transformers 5, `output_hidden_states`, `output_attentions`, `return_dict` and the other
                keyword arguments `CLIPModel.get_text_features` passes to the text tower. Transformers 4's
                `CLIPModel` ignores extra keyword arguments with a warning; so does this method there.
        Returns:
            transformers 5: `BaseModelOutputWithPooling` of the text tower whose `pooler_output` is the
            `(B, projection_dim)` float32 hyperboloid embedding (a tuple with `return_dict=False`).
            transformers 4: that embedding as a tensor.
        """
        _refuse_lift(kwargs, "encode_text(input_ids, lift=False)")
        if not FEATURES_ARE_MODEL_OUTPUTS:
            _ignore_kwargs("get_text_features", kwargs)
            return self.encode_text(input_ids, attention_mask, position_ids=position_ids)
        return_dict = kwargs.pop("return_dict", None)
        self._check_input_ids(input_ids, attention_mask)
        features, outputs = self._encode_text(input_ids, attention_mask, position_ids, return_dict=True, **kwargs)
        outputs.pooler_output = self.lift(features, "text")
        return self._model_output(outputs, return_dict)

    def _model_output(self, output: ModelOutput, return_dict: bool | None) -> ModelOutput | tuple:
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        return output if return_dict else output.to_tuple()

    def forward(
        self,
        input_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        pixel_attention_mask: Tensor | None = None,
        spatial_shapes: Tensor | None = None,
        **kwargs,
    ) -> HySACOutput | tuple:
        """Embed texts and/or images; with both, score every text against every image.

        Args:
            input_ids: `(B_t, L)` token ids, optional.
            pixel_values: `(B_i, 3, H, W)`, optional (SigLIP 2 NaFlex: `(B_i, N, 3 * p * p)` patches).
            attention_mask: `(B_t, L)`, optional.
            position_ids: `(B_t, L)`, optional.
            return_loss: compute the contrastive loss (needs both modalities, `B_t == B_i`): symmetric InfoNCE, or
                SigLIP's pairwise sigmoid loss when the model has a `logit_bias`.
            interpolate_pos_encoding: accept other image sizes than the tower's.
            return_dict: `False` returns a tuple.
            pixel_attention_mask: SigLIP 2 NaFlex: `(B_i, N)`, passed through to the vision tower.
            spatial_shapes: SigLIP 2 NaFlex: `(B_i, 2)`, passed through to the vision tower.
            kwargs: passed to the towers (for example `output_hidden_states=True`).
        Returns:
            [`HySACOutput`]; logits are `-exp(logit_scale) * d_L(text, image)`, `+ logit_bias` where the model has one.
        """
        if input_ids is None and pixel_values is None:
            raise ValueError("pass input_ids, pixel_values or both")
        image_embeds = text_embeds = vision_outputs = text_outputs = None
        if pixel_values is not None:
            naflex = {"pixel_attention_mask": pixel_attention_mask, "spatial_shapes": spatial_shapes}
            self._check_pixel_values(pixel_values, interpolate_pos_encoding, True, **naflex)
            image_features, vision_outputs = self._encode_image(
                pixel_values, interpolate_pos_encoding, **naflex, **kwargs
            )
            image_embeds = self.lift(image_features, "image")
        if input_ids is not None:
            self._check_input_ids(input_ids, attention_mask)
            text_features, text_outputs = self._encode_text(input_ids, attention_mask, position_ids, **kwargs)
            text_embeds = self.lift(text_features, "text")

        logits_per_text = logits_per_image = loss = None
        if image_embeds is not None and text_embeds is not None:
            with autocast_disabled(text_embeds.device):
                scale = self.logit_scale.float().exp()
                logits_per_text = -scale * pairwise_dist(text_embeds, image_embeds, self.curv.float().exp())
                if self.has_logit_bias:
                    logits_per_text = logits_per_text + self.logit_bias.float()
                logits_per_image = logits_per_text.t()
        if return_loss:
            if logits_per_text is None:
                raise ValueError("return_loss=True needs both input_ids and pixel_values")
            if text_embeds.shape[0] != image_embeds.shape[0]:
                raise ValueError(
                    f"return_loss=True needs paired inputs; got {text_embeds.shape[0]} texts and "
                    f"{image_embeds.shape[0]} images"
                )
            loss_of = sigmoid_contrastive_loss if self.has_logit_bias else contrastive_loss
            loss = loss_of(logits_per_text)

        output = HySACOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
        )
        return self._model_output(output, return_dict)

    # ----------------------------------------------------------------------------------------------------
    # Safety
    def distance_to_root(self, embeds: Tensor) -> Tensor:
        """Geodesic distance of hyperboloid embeddings to the origin: the quantity HySAC's safety decisions use.

        Larger means more specific and more likely unsafe. No normalisation is applied: the paper's NSFW thresholds
        (0.51-0.55, Tables 5-6) are on an undocumented scale and do not transfer to these raw distances; calibrate a
        threshold on labelled data (`hysac-eval classify --calibrate`) and store it in `config.unsafe_thresholds`.

        Args:
            embeds: `(B, projection_dim)` space components from `encode_image`/`encode_text`.
        Returns:
            `(B,)` float32 distances, >= 0.
        """
        self._check_embeds(embeds)
        return dist_to_origin(embeds, self.curvature.detach())

    def classify_unsafe(
        self, embeds: Tensor, threshold: float | None = None, modality: Literal["image", "text"] = "image"
    ) -> Tensor:
        """Classify embeddings as unsafe when their distance to the root exceeds a threshold.

        Args:
            embeds: `(B, projection_dim)` space components.
            threshold: distance threshold; `None` uses `config.unsafe_thresholds[modality]`.
            modality: which stored threshold to use.
        Returns:
            `(B,)` bool tensor, True = unsafe.
        """
        if modality not in ("image", "text"):
            raise ValueError(f"modality={modality!r} is not one of ('image', 'text')")
        if threshold is None:
            thresholds = self.config.unsafe_thresholds or {}
            if modality not in thresholds:
                raise ValueError(
                    f"this model has no calibrated unsafe threshold for {modality!r} "
                    f"(config.unsafe_thresholds = {self.config.unsafe_thresholds}); pass threshold=..., or "
                    "calibrate one with hysac_hf.calibration / 'hysac-eval classify' and store it in "
                    "config.unsafe_thresholds"
                )
            threshold = thresholds[modality]
        return self.distance_to_root(embeds) > threshold

    def traversal_threshold(
        self,
        target: str = "image",
        bound: Literal["up_95", "avg", "low_05"] = "up_95",
        offset: float | None = None,
    ) -> Tensor:
        """The threshold `b' = b + tanh((b - offset) / c) + 1` of the traversal, from `config.bounds`.

        Args:
            target: `"image"` (safe images, key `V`), `"text"` (safe texts, key `S`) or a bounds key
                `S`, `V`, `U`, `G`.
            bound: which statistic of the bounds to use as `b`.
            offset: margin offset; `None` uses `config.traversal_offset`.
        Returns:
            scalar float64 tensor on the CPU.
        """
        if target not in TRAVERSAL_TARGETS:
            raise ValueError(f"target={target!r} is not one of {sorted(TRAVERSAL_TARGETS)}")
        if bound not in BOUND_STATS:
            raise ValueError(f"bound={bound!r} is not one of {list(BOUND_STATS)}")
        if self.config.bounds is None:
            raise ValueError(
                "this model has no calibrated bounds (config.bounds is None), so it cannot traverse. "
                "Calibrate them with 'hysac-calibrate --model DIR --dataset ...' (or "
                "hysac_hf.calibration.fit_bounds), or load a converted HySAC checkpoint that carries them."
            )
        key = TRAVERSAL_TARGETS[target]
        offset = self.config.traversal_offset if offset is None else offset
        return traversal_threshold(self.config.bounds[key][bound], self.curvature.detach(), offset)

    def traverse_to_safe(
        self,
        embeds: Tensor,
        target: str = "image",
        method: Literal["reference", "geodesic"] = "reference",
        bound: Literal["up_95", "avg", "low_05"] = "up_95",
        offset: float | None = None,
        direction: Literal["inward", "outward"] = "inward",
    ) -> Tensor:
        """Batched safety traversal: move embeddings beyond the safe region's bound back onto it.

        `reference` reproduces the authors' rule (a Euclidean rescale of the space components to the
        threshold, what the published numbers used); `geodesic` lands exactly at hyperbolic distance `b'`.
        `direction="outward"` is the reference evaluation's lower-bound variant. Rows within the bound are
        returned unchanged.

        Args:
            embeds: `(B, projection_dim)` space components (B may be 0; any float dtype).
            target: region to move into: `"image"` (safe images, `V`), `"text"` (safe texts, `S`), or a bounds
                key `S`/`V`/`U`/`G` (for example `G` with `direction="outward"` for the T*->I*uI protocol).
            method: `"reference"` or `"geodesic"`.
            bound: `"up_95"` (reference default), `"avg"` (the paper's mean) or `"low_05"`.
            offset: margin offset of the threshold; `None` uses `config.traversal_offset`.
            direction: `"inward"` or `"outward"`.
        Returns:
            `(B, projection_dim)` embeddings in the dtype of `embeds`.
        """
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not one of {METHODS}")
        if direction not in DIRECTIONS:
            raise ValueError(f"direction={direction!r} is not one of {DIRECTIONS}")
        self._check_embeds(embeds)
        threshold = self.traversal_threshold(target, bound, offset)
        return traverse(embeds, threshold, self.curvature.detach(), method=method, direction=direction)

    # ----------------------------------------------------------------------------------------------------
    # Training helpers
    @torch.no_grad()
    def clamp_parameters(self) -> None:
        """Clamp the learned scalars in place, as the reference does after every optimiser step.

        log-curvature to `[log(c0 / f), log(c0 * f)]`; log feature scales to `<= 0` (scales <= 1); log logit
        scale to `[logit_scale_init_value, max_logit_scale]` (the reference's lower clamp equals its initial
        value; `max_logit_scale` defaults to the reference's 4.6052).
        """
        cfg = self.config
        self.curv.clamp_(
            math.log(cfg.curv_init / cfg.curv_clamp_factor), math.log(cfg.curv_init * cfg.curv_clamp_factor)
        )
        self.visual_alpha.clamp_(max=0.0)
        self.textual_alpha.clamp_(max=0.0)
        self.logit_scale.clamp_(min(cfg.logit_scale_init_value, cfg.max_logit_scale), cfg.max_logit_scale)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, with `auto_map` also naming the zero-shot auto class, so that
        `AutoModelForZeroShotImageClassification` and the `zero-shot-image-classification` pipeline load it,
        and with sentence-transformers' files, so that `SentenceTransformer` ranks by Lorentz distance (not by
        cosine; see `sentence_transformers_hysac.py`). With `push_to_hub=True` those files are written after the
        upload: push with `model.push_to_hub(...)` or upload the saved folder instead. `config.custom_pipelines`
        declares the `unsafe-content-detection` and `safe-retrieval` pipelines (`pipeline_hysac.py`); `handler.py` makes the
        folder a Hugging Face Inference Endpoints repository."""
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map["AutoModelForZeroShotImageClassification"] = (
            f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"
        )
        self.config.auto_map = auto_map
        # Imported here so that transformers ships pipeline_hysac.py, the search engine it ranks through
        # (gallery_hysac.py) and the processor module it reads inputs with, with the remote code (transformers 4 copies a local folder's remote code one import deep).
        # Our entries replace any earlier ones: `pipeline()` swaps their class names for classes in the loaded config.
        from .gallery_hysac import INDEX_FORMAT  # noqa: F401
        from .handler import EndpointHandler  # noqa: F401 - ships handler.py, the Inference Endpoints handler
        from .pipeline_hysac import custom_pipelines
        from .processing_hysac import input_modality  # noqa: F401 - the pipelines' reading of inputs

        self.config.custom_pipelines = {**(getattr(self.config, "custom_pipelines", None) or {}), **custom_pipelines()}
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            # Imported here so that transformers ships the file with the remote code and nothing else loads it.
            from .sentence_transformers_hysac import save_sentence_transformers_config

            save_sentence_transformers_config(save_directory)
        return result

    # ----------------------------------------------------------------------------------------------------
    # Construction from a dual encoder
    @classmethod
    def from_dual_encoder(cls, base: Any, **config_kwargs) -> HySACModel:
        """Build a HySAC model from a transformers dual encoder: CLIP, SigLIP (and the fixed-resolution SigLIP 2
        checkpoints, which are `SiglipModel`s), SigLIP 2 NaFlex or MetaCLIP 2.

        The towers (and CLIP's projections) are copied exactly, so `encode_image`/`encode_text(lift=False)` return
        what the base's `get_image_features`/`get_text_features` return, and the embeddings are their exponential
        map. The HySAC scalars come from the config, not from the base: `curv`, the alphas, `logit_scale` (which
        HySAC trains from `log(1/0.07)` whatever the base's value) and, for the SigLIP families, `logit_bias`, which
        starts at SigLIP's initialisation (`SIGLIP_LOGIT_BIAS_INIT`, -10): the base's trained bias belongs to its
        cosine logits and its scale, neither of which HySAC keeps. This is where fine-tuning starts. The towers are
        returned in the base's dtype (the HySAC scalars stay float32), in eval mode.

        Args:
            base: a Hub id or local folder of a `clip`, `siglip`, `siglip2` or `metaclip_2` checkpoint, or the model
                itself (`CLIPModel`, `SiglipModel`, `Siglip2Model`, `MetaClip2Model`).
            config_kwargs: `HySACConfig` fields to override (for example `curv_init=2.0`, or
                `logit_bias_init_value=-10.0` for a CLIP to be trained with the sigmoid loss, `None` for a SigLIP
                without a bias).
        Raises:
            ValueError: a checkpoint of another model type, or towers that do not fit (a SigLIP vision tower without
                its pooling head).
            ImportError: the installed transformers lacks the family.
        """
        reserved = sorted({"text_config", "vision_config", "projection_dim", "base_model_type"} & set(config_kwargs))
        if reserved:
            raise TypeError(f"from_dual_encoder takes {reserved} from the base model; drop them")
        name = None
        if isinstance(base, (str, bytes)) or hasattr(base, "__fspath__"):
            name = os.fsdecode(base) if isinstance(base, bytes) else os.fspath(base)
            base = _load_dual_encoder(name)
        family = _family_of(base)
        base_config = base.config
        if family.has_projections:
            projection_dim = base_config.projection_dim
        else:
            projection_dim = base_config.vision_config.hidden_size
            text_config = base_config.text_config
            text_width = getattr(text_config, "projection_size", None) or text_config.hidden_size
            if text_width != projection_dim:
                raise ValueError(
                    f"the {family.name} text head outputs {text_width} features and the vision tower {projection_dim}; "
                    "HySAC lifts both into one space, so they must agree"
                )
            if getattr(base.vision_model, "head", None) is None:
                raise ValueError(
                    f"this {family.name} vision tower has no pooling head (vision_use_head=False), so it has no image "
                    "features to lift; use a checkpoint with its head"
                )
        settings = {
            "text_config": base_config.text_config.to_dict(),
            "vision_config": base_config.vision_config.to_dict(),
            "projection_dim": projection_dim,
            "base_model_type": family.model_type,
            "base_model_name_or_path": name or getattr(base, "name_or_path", None) or None,
        }
        if family.default_contrastive == "sigmoid":
            settings["logit_bias_init_value"] = SIGLIP_LOGIT_BIAS_INIT
        model = cls(HySACConfig(**{**settings, **config_kwargs})).to(base.dtype)
        # The base's own contrastive scalars stay behind: HySAC's logits are on another scale (see above).
        state = {k: v for k, v in base.state_dict().items() if k not in ("logit_scale", LOGIT_BIAS)}
        result = model.load_state_dict(state, strict=False)
        missing = set(result.missing_keys) - set(model.scalar_parameter_names)  # HySAC's own scalars are expected
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{family.name} weights do not fit HySAC: missing {sorted(missing)}, unexpected "
                f"{sorted(result.unexpected_keys)}"
            )
        model.name_or_path = getattr(base, "name_or_path", "") or ""
        return model.eval()

    @classmethod
    def from_clip(cls, clip: str | CLIPModel, **config_kwargs) -> HySACModel:
        """Build a HySAC model from a transformers CLIP checkpoint (Hub id, local folder or `CLIPModel`): the CLIP
        case of [`from_dual_encoder`].

        Towers and projections are copied exactly; the HySAC scalars (`curv`, alphas, and `logit_scale`,
        which HySAC trains from `log(1/0.07)` whatever the CLIP's value) come from the config. This is where
        fine-tuning starts. The towers are returned in the CLIP's dtype (the HySAC scalars stay float32), in
        eval mode.

        Args:
            clip: `"openai/clip-vit-large-patch14"`, a Safe-CLIP checkpoint, a local folder, or a `CLIPModel`.
            config_kwargs: `HySACConfig` fields to override (for example `curv_init=2.0`).
        """
        if isinstance(clip, (str, bytes)) or hasattr(clip, "__fspath__"):
            clip = _load_dual_encoder(os.fsdecode(clip) if isinstance(clip, bytes) else os.fspath(clip), only="clip")
        if not isinstance(clip, CLIPModel):
            raise TypeError(
                f"from_clip expects a CLIPModel or a path/Hub id of one, got {type(clip).__name__}; for SigLIP, "
                "SigLIP 2 or MetaCLIP 2 use HySACModel.from_dual_encoder"
            )
        return cls.from_dual_encoder(clip, **config_kwargs)


def _load_dual_encoder(name: str, only: str | None = None) -> nn.Module:
    """The dual encoder saved at `name` (Hub id or folder), loaded with its family's model class.

    Raises:
        ValueError: a checkpoint of another model type (or not of `only`), naming what is accepted.
    """
    from transformers import PretrainedConfig

    model_type = PretrainedConfig.get_config_dict(name)[0].get("model_type")
    accepted = ["clip"] if only else list(BASE_FAMILIES)
    if model_type not in accepted:
        hint = (
            "; it is already a HySAC model: load it with HySACModel.from_pretrained"
            if model_type == HySACConfig.model_type
            else "; for SigLIP, SigLIP 2 or MetaCLIP 2 use HySACModel.from_dual_encoder"
            if only and model_type in BASE_FAMILIES
            else ""
        )
        raise ValueError(f"{name} is a {model_type!r} checkpoint; expected one of {accepted}{hint}")
    return family_class(base_family(model_type), "model_class").from_pretrained(name)


def _family_of(base: nn.Module):
    """The `BaseFamily` of a dual-encoder object, by its config's `model_type` and checked against its class.

    Raises:
        TypeError: an object that is not one of the families' model classes.
    """
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    family = BASE_FAMILIES.get(model_type)
    expected = getattr(transformers, family.model_class, None) if family is not None else None
    if expected is None or not isinstance(base, expected):
        names = ", ".join(f.model_class for f in BASE_FAMILIES.values())
        raise TypeError(
            f"from_dual_encoder expects one of {names} (or a path/Hub id of one), got {type(base).__name__}"
            + (" (a HySAC model already)" if isinstance(base, HySACModel) else "")
        )
    return family


def _refuse_lift(kwargs: dict, replacement: str) -> None:
    if "lift" in kwargs:
        raise TypeError(
            f"get_*_features no longer takes lift= (it follows CLIPModel's contract); use model.{replacement}"
        )


def _ignore_kwargs(method: str, kwargs: dict) -> None:
    """transformers 4's `CLIPModel.get_*_features` ignore unknown keyword arguments with a warning: so do we."""
    if kwargs:
        logger.warning(
            f"The following named arguments are not valid for `HySACModel.{method}` and were ignored: "
            f"{', '.join(map(repr, kwargs))} (transformers {transformers.__version__}; CLIPModel ignores them too)"
        )


def _weights_source(source: Any, key: str, kwargs: dict) -> str:
    """Where `from_pretrained` read `key` from: the weights file of a local folder, else the repo and folder."""
    if kwargs.get("state_dict") is not None:
        return "the state_dict passed to from_pretrained"
    if source is None:
        return "the weights passed to from_pretrained"
    folder = os.path.join(os.fspath(source), kwargs.get("subfolder") or "")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            shard = json.load(handle).get("weight_map", {}).get(key)
        return os.path.join(folder, shard) if shard else index
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return f"the weights of {os.fspath(source)!r}"


HySACConfig.register_for_auto_class()
HySACModel.register_for_auto_class("AutoModel")

__all__ = [
    "LOGIT_BIAS",
    "LORA_TARGET_MODULES",
    "SCALAR_PARAMETERS",
    "HySACModel",
    "HySACOutput",
    "HySACPreTrainedModel",
    "contrastive_loss",
    "sigmoid_contrastive_loss",
]
