"""Validation of a training run: loss and the reference's recall_sum from one embedding pass of the split."""

from __future__ import annotations

import torch
from torch import Tensor

from ..encode import EmbeddingCache
from ..evaluation.retrieval import recall_from_ranks
from ..losses import HySACLoss
from ..modeling.configuration_hysac import CONTENT
from ..modeling.gallery_hysac import paired_ranks

# recall_sum of the reference (docs/method.md §7.6): R@1 text->image and image->text for these (text, image) pairs.
RECALL_SUM_PAIRS = (("S", "V"), ("S", "G"), ("U", "V"))


@torch.no_grad()
def validation_metrics(
    cache: EmbeddingCache, logit_scale: float | Tensor, loss_fn: HySACLoss, chunk: int
) -> dict[str, float]:
    """Validation loss (mean over chunks of `chunk` quadruplets) and the reference's recall_sum.

    recall_sum = R@1 (text->image + image->text) of S->V, S->G and U->V (docs/method.md §7.6), in percent, with
    the library's one recall (`evaluation.retrieval.recall_from_ranks` on the search engine's pessimistic ranks).
    """
    cache.require(*CONTENT)
    n = cache.num_rows
    curvature = torch.tensor(cache.curvature)
    logit_scale = torch.as_tensor(logit_scale, dtype=torch.float32)
    losses = []
    for start in range(0, n - 1, chunk):
        rows = {key: value[start : start + chunk] for key, value in cache.embeds.items()}
        if rows["V"].shape[0] < 2:  # a contrastive loss needs a negative
            continue
        terms = loss_fn(rows, curvature=curvature, logit_scale=logit_scale, logit_bias=cache.logit_bias)
        losses.append(terms["loss"].item())
    metrics = {"val_loss": float(sum(losses) / max(len(losses), 1))}
    for text, image in RECALL_SUM_PAIRS:
        text_to_image, image_to_text = paired_ranks(cache.embeds[text], cache.embeds[image], curvature)  # one product
        metrics[f"R1_t2i_{text}_{image}"] = recall_from_ranks(text_to_image)["R@1"]
        metrics[f"R1_i2t_{text}_{image}"] = recall_from_ranks(image_to_text)["R@1"]
    metrics["recall_sum"] = sum(v for k, v in metrics.items() if k.startswith("R1_"))
    return metrics
