"""Turn quadruplet rows into model inputs inside DataLoader workers (image decoding and preprocessing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..modeling.processing_hysac import to_rgb
from .mini_visu import render

IMAGE_COLUMNS = ("safe_image", "unsafe_image")
TEXT_COLUMNS = ("safe_text", "unsafe_text")


def load_image(value: Any, image_root: str | Path | None = None) -> Image.Image:
    """Decode one image reference to RGB (transparency composited over white, as `HySACProcessor` does).

    Args:
        value: a PIL image, a path (absolute or relative to `image_root`), a `datasets.Image` dict
            (`{"bytes", "path"}`) or a mini-ViSU spec (`{"photo", "crop", "flip", "marker"}`).
        image_root: folder that relative paths are resolved against.
    """
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if isinstance(value, dict) and "photo" in value:
        return render(value)
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        if value.get("bytes"):
            import io

            return to_rgb(Image.open(io.BytesIO(value["bytes"])))
        value = value["path"]
    if isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_absolute() and image_root is not None:
            path = Path(image_root) / path
        if not path.is_file():
            raise FileNotFoundError(f"image {path} does not exist; check --image_root / --coco_root and the dataset")
        with Image.open(path) as image:
            image.load()  # decode before the file closes
            return to_rgb(image)
    raise TypeError(f"cannot load an image from {type(value).__name__}; expected a PIL image, a path or a dict")


class QuadrupletCollator:
    """Collate quadruplet rows into `pixel_values` (2B images: safe first) and `input_ids` (2B texts: safe first).

    Runs in DataLoader workers, so decoding and preprocessing overlap with training.

    Args:
        processor: a `HySACProcessor` or `CLIPProcessor`.
        image_root: folder for relative image paths.
    """

    def __init__(self, processor, image_root: str | Path | None = None):
        self.processor = processor
        self.image_root = image_root

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("empty batch: the dataset split is smaller than one batch")
        images = [load_image(row[column], self.image_root) for column in IMAGE_COLUMNS for row in rows]
        texts = [str(row[column]) for column in TEXT_COLUMNS for row in rows]
        image_inputs = self.processor.image_processor(images=images, return_tensors="pt")
        text_inputs = self.processor.tokenizer(
            texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt"
        )
        return {"pixel_values": image_inputs["pixel_values"], "input_ids": text_inputs["input_ids"]}
