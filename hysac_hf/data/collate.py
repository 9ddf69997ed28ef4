"""Turn dataset rows into model inputs, inside DataLoader workers (image decoding, preprocessing, tokenisation).

Text is padded to the longest caption of each batch (CLIP's causal mask and end-of-text pooling make the
embeddings equal to 77-padded ones) and truncated at 77 tokens.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import UsageError
from ..modeling.configuration_hysac import CONTENT_KINDS, ContentKind, content_kind
from ..modeling.processing_hysac import to_rgb
from .mini_visu import render

MAX_TEXT_TOKENS = 77  # CLIP's context length


def _decode(source: Any, opener) -> Image.Image:
    """Open and fully decode an image, turning PIL's errors into one that names the image."""
    try:
        with opener() as image:
            image.load()  # decode now: a truncated file fails here, not later
            return to_rgb(image)
    except OSError as error:  # UnidentifiedImageError and "image file is truncated" are OSErrors
        raise UsageError(f"cannot decode image {source}: {error}; re-export or remove it") from None


def load_image(value: Any, image_root: str | Path | None = None) -> Image.Image:
    """Decode one image reference to RGB (transparency composited over white, as `HySACProcessor` does).

    Args:
        value: a PIL image, a numpy array, a path (absolute or relative to `image_root`), a `datasets.Image`
            dict (`{"bytes", "path"}`) or a mini-ViSU spec (`{"photo", "crop", "flip", "marker"}`).
        image_root: folder that relative paths are resolved against.
    Raises:
        UsageError: a missing or undecodable file (named), or an unsupported value.
    """
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if isinstance(value, np.ndarray):
        return to_rgb(value)
    if isinstance(value, dict) and "photo" in value:
        return render(value)
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        if value.get("bytes"):
            name = value.get("path") or "<image bytes>"
            return _decode(name, lambda: Image.open(io.BytesIO(value["bytes"])))
        value = value["path"]
    if isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        if not path.is_absolute() and image_root is not None:
            path = Path(image_root) / path
        if not path.is_file():
            raise UsageError(f"image {path} does not exist; check --image_root / --coco_root and the dataset")
        return _decode(path, lambda: Image.open(path))
    raise UsageError(
        f"cannot load an image from a {type(value).__name__}; expected a PIL image, a numpy array, a path or a "
        "datasets.Image dict"
    )


def bad_image_files(dataset: Any, columns: Sequence[str], image_root: str | Path | None = None) -> list[str]:
    """Image paths in string columns of `dataset` that do not exist or are not images (a quick check before training).

    Only the file header is read (`PIL.Image.open` is lazy), so this is cheap; a file truncated after a valid
    header is found when it is decoded, with an error that names it. Decoded images, bytes and mini-ViSU specs are
    skipped.

    Returns:
        `"<path> (<reason>)"` for each bad file, in dataset order.
    """
    bad = []
    for column in columns:
        if column not in dataset.column_names:
            continue
        for value in dataset[column]:
            if not isinstance(value, str):
                continue
            path = Path(value).expanduser()
            if not path.is_absolute() and image_root is not None:
                path = Path(image_root) / path
            if not path.is_file():
                bad.append(f"{path} (missing)")
                continue
            try:
                with Image.open(path):
                    pass
            except OSError as error:
                bad.append(f"{path} ({type(error).__name__}: {error})")
    return bad


def tokenize(processor, texts: list[str], padding: bool | str = "longest") -> dict[str, torch.Tensor]:
    """`input_ids` of `texts`, padded to the longest (or `padding="max_length"`: 77), truncated at 77.

    With right padding (CLIP's) no attention mask is returned: CLIP's causal mask and end-of-text pooling make
    padding after the end-of-text token irrelevant, and without a mask the text tower never checks it on the host
    (transformers tests whether a mask is all ones, a host-device synchronisation per batch). A left-padding
    tokenizer gets its mask.
    """
    encoding = processor.tokenizer(
        texts, padding=padding, truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt"
    )
    if getattr(processor.tokenizer, "padding_side", "right") == "right":
        return {"input_ids": encoding["input_ids"]}
    return {"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"]}


def preprocess_images(processor, images: list[Image.Image]) -> torch.Tensor:
    return processor.image_processor(images=images, return_tensors="pt")["pixel_values"]


class QuadrupletCollator:
    """Collate quadruplet rows into one image batch and one text batch, kinds stacked in vocabulary order.

    With all four kinds, `pixel_values` holds `2B` images (safe `V` rows first, then unsafe `G`) and
    `input_ids`/`attention_mask` `2B` texts (`S` first, then `U`); `QuadrupletEncoder` splits them back.

    Args:
        processor: a `HySACProcessor` (or any processor with `image_processor` and `tokenizer`).
        kinds: the kinds to collate (keys, columns or notations; default all four).
        image_root: folder for relative image paths.
        padding: `"longest"` (default) or `"max_length"` (77 tokens).
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
            batch["pixel_values"] = preprocess_images(self.processor, images)
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
            return {"pixel_values": preprocess_images(self.processor, [load_image(v, self.image_root) for v in items])}
        bad = sorted({type(t).__name__ for t in items if not isinstance(t, str)})
        if bad:
            raise UsageError(f"texts must be strings, got {bad}")
        return tokenize(self.processor, list(items), self.padding)


__all__ = ["MAX_TEXT_TOKENS", "ItemCollator", "QuadrupletCollator", "bad_image_files", "load_image", "tokenize"]
