"""Turn dataset rows into model inputs, inside DataLoader workers (image decoding, preprocessing, tokenisation).

Text follows the processor's padding rule: CLIP and MetaCLIP 2 pad to the longest caption of each batch (their causal
mask and end-of-text pooling make the embeddings equal to 77-padded ones) and truncate at 77 tokens; SigLIP families
always pad to their text tower's 64 tokens (it pools the last position).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import UsageError
from ..modeling.configuration_hysac import CONTENT_KINDS, ContentKind, content_kind
from ..modeling.processing_hysac import IMAGE_INPUT_NAMES, to_rgb
from .images import load_image

MAX_TEXT_TOKENS = 77  # CLIP's context length


def tokenize(processor, texts: list[str], padding: bool | str = "longest") -> dict[str, torch.Tensor]:
    """`input_ids` of `texts` by the processor's padding rule: padded to the longest (or `padding="max_length"`: 77),
    truncated at 77, for CLIP; always padded to the text tower's length for SigLIP families (`padding` is ignored).

    With right padding and a free padding rule (CLIP's, MetaCLIP 2's) no attention mask is returned: the causal mask
    and end-of-text pooling make padding after the end-of-text token irrelevant, and without a mask the text tower
    never checks it on the host (transformers tests whether a mask is all ones, a host-device synchronisation per
    batch). A left-padding tokenizer, or a fixed-length family (whose tower attends over every position), gets the
    tokenizer's mask when it makes one.
    """
    fixed_length = getattr(processor, "is_fixed_length", False)
    if fixed_length:
        options = processor.text_options()
    else:
        max_length = getattr(processor, "text_max_length", None) or MAX_TEXT_TOKENS
        options = {"padding": padding, "truncation": True, "max_length": max_length}
    encoding = processor.tokenizer(texts, return_tensors="pt", **options)
    right_padded = getattr(processor.tokenizer, "padding_side", "right") == "right"
    if right_padded and not fixed_length:
        return {"input_ids": encoding["input_ids"]}
    return {key: encoding[key] for key in ("input_ids", "attention_mask") if key in encoding}


def preprocess_images(processor, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    """The image processor's model inputs: `pixel_values`, and SigLIP 2 NaFlex's `pixel_attention_mask` and
    `spatial_shapes`."""
    inputs = processor.image_processor(images=images, return_tensors="pt")
    return {key: inputs[key] for key in IMAGE_INPUT_NAMES if key in inputs}


class QuadrupletCollator:
    """Collate quadruplet rows into one image batch and one text batch, kinds stacked in vocabulary order.

    With all four kinds, `pixel_values` holds `2B` images (safe `V` rows first, then unsafe `G`) and
    `input_ids`/`attention_mask` `2B` texts (`S` first, then `U`); `QuadrupletEncoder` splits them back.

    Args:
        processor: a `HySACProcessor` (or any processor with `image_processor` and `tokenizer`).
        kinds: the kinds to collate (keys, columns or notations; default all four).
        image_root: folder for relative image paths.
        padding: `"longest"` (default) or `"max_length"` (77 tokens); SigLIP families always pad to 64.
    """

    def __init__(
        self,
        processor,
        kinds: Sequence[str | ContentKind] | None = None,
        image_root: str | Path | None = None,
        padding: bool | str = "longest",
    ):
        self.processor = processor
        chosen = {k if isinstance(k, ContentKind) else content_kind(k) for k in (kinds or CONTENT_KINDS)}
        self.kinds = tuple(k for k in CONTENT_KINDS if k in chosen)
        self.image_kinds = tuple(k.key for k in self.kinds if k.modality == "image")
        self.text_kinds = tuple(k.key for k in self.kinds if k.modality == "text")
        self.image_root = image_root
        self.padding = padding

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if not rows:
            raise UsageError("empty batch: the dataset split is smaller than one batch")
        batch: dict[str, Any] = {}
        by_key = {k.key: k for k in self.kinds}
        if self.image_kinds:
            images = [load_image(row[by_key[key].column], self.image_root) for key in self.image_kinds for row in rows]
            batch.update(preprocess_images(self.processor, images))
        if self.text_kinds:
            texts = [str(row[by_key[key].column]) for key in self.text_kinds for row in rows]
            batch.update(tokenize(self.processor, texts, self.padding))
        return batch


class ItemCollator:
    """Collate single items (images or texts) into model inputs.

    Args:
        processor: a `HySACProcessor`.
        modality: `"image"` or `"text"`.
        image_root: folder for relative image paths.
        padding: text padding, `"longest"` (default) or `"max_length"`.
    """

    def __init__(self, processor, modality: str, image_root: str | Path | None = None, padding: bool | str = "longest"):
        if modality not in ("image", "text"):
            raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
        self.processor, self.modality, self.image_root, self.padding = processor, modality, image_root, padding

    def __call__(self, items: list[Any]) -> dict[str, torch.Tensor]:
        if not items:
            raise UsageError("empty batch")
        if self.modality == "image":
            return preprocess_images(self.processor, [load_image(v, self.image_root) for v in items])
        bad = sorted({type(t).__name__ for t in items if not isinstance(t, str)})
        if bad:
            raise UsageError(f"texts must be strings, got {bad}")
        return tokenize(self.processor, list(items), self.padding)


__all__ = ["MAX_TEXT_TOKENS", "ItemCollator", "QuadrupletCollator", "bad_image_files", "load_image", "tokenize"]
