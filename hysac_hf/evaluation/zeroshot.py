"""Zero-shot classification (the robustness check of Table 7): images against prompts built from class names.

Each class name fills a prompt template (default `"a photo of a {}."`); an image is assigned the class whose
prompt embedding is nearest in hyperbolic distance, i.e. the argmax of the model's `logits_per_image`
(`-exp(logit_scale) * d`). Ties go to the class listed first (`argmax` returns the first maximum).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from ..encode import encode_texts
from ..modeling.lorentz import pairwise_dist

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "a photo of a {}."


def class_prompts(class_names: Sequence[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """Fill the template with each class name (underscores become spaces)."""
    if "{}" not in template:
        raise ValueError(f"the prompt template must contain '{{}}' for the class name, got {template!r}")
    return [template.format(name.replace("_", " ")) for name in class_names]


@torch.no_grad()
def zero_shot_predict(model, image_embeds: Tensor, text_embeds: Tensor) -> tuple[Tensor, Tensor]:
    """Predicted class per image, from the model's logits (negative scaled distance).

    Args:
        model: a `HySACModel` (its curvature and logit scale are used).
        image_embeds: `(N, D)` image space components.
        text_embeds: `(C, D)` class-prompt space components.
    Returns:
        `(predictions, logits_per_image)`: `(N,)` int64 class indices and `(N, C)` logits.
    """
    logits = -model.logit_scale.detach().float().exp() * pairwise_dist(
        image_embeds, text_embeds, model.curvature.detach()
    )
    return logits.argmax(dim=1), logits


def zero_shot_accuracy(
    model,
    processor,
    image_embeds: Tensor,
    labels: Sequence[int],
    class_names: Sequence[str],
    template: str = DEFAULT_TEMPLATE,
) -> dict:
    """Top-1 zero-shot accuracy (%) overall and per class.

    Args:
        model, processor: a `HySACModel` and its processor.
        image_embeds: `(N, D)` image embeddings.
        labels: `(N,)` true class indices into `class_names`.
        class_names: class names (for an image folder, its sub-folder names).
        template: prompt template with one `{}`.
    Returns:
        `{"accuracy": %, "per_class": {name: %}, "num_images": N, "template": template, "predictions": [...]}`.
    """
    labels_t = torch.as_tensor(list(labels), dtype=torch.long)
    if labels_t.shape[0] != image_embeds.shape[0]:
        raise ValueError(f"{image_embeds.shape[0]} images but {labels_t.shape[0]} labels")
    text_embeds = encode_texts(model, processor, class_prompts(class_names, template), show_progress=False)
    predictions, _ = zero_shot_predict(model, image_embeds, text_embeds)
    correct = predictions == labels_t
    per_class = {
        name: 100.0 * correct[labels_t == i].double().mean().item()
        for i, name in enumerate(class_names)
        if (labels_t == i).any()
    }
    return {
        "accuracy": 100.0 * correct.double().mean().item(),
        "per_class": per_class,
        "num_images": int(labels_t.shape[0]),
        "template": template,
        "predictions": [class_names[i] for i in predictions.tolist()],
    }


__all__ = ["DEFAULT_TEMPLATE", "class_prompts", "zero_shot_accuracy", "zero_shot_predict"]
