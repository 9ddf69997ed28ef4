"""HySAC processor: transformers' own CLIP image processor and CLIP tokenizer behind one call.

Ships to the Hub as remote code (torch + transformers only). The sub-processors are built-in transformers
classes, so `AutoTokenizer` and `AutoImageProcessor` load them from a model folder without remote code.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import transformers
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

try:
    from PIL import Image
except ImportError:  # pragma: no cover - transformers' image processors need Pillow anyway
    Image = None

DEFAULT_MAX_LENGTH = 77  # CLIP's context length


def to_rgb(image: Any) -> Any:
    """Convert a PIL image or a numpy array (grayscale `(H, W)` / `(H, W, 1)`, RGB, or RGBA) to an RGB PIL image.

    Other inputs (torch tensors, already-RGB images) are returned as they are.
    """
    if Image is not None and isinstance(image, Image.Image):
        if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
            # Composite transparency over white instead of dropping alpha (which can leave garbage colours).
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, image).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ValueError(
                f"cannot interpret a numpy image of shape {image.shape}; expected (H, W), (H, W, 1), (H, W, 3) "
                "or (H, W, 4) (channels last)"
            )
        if array.dtype != np.uint8:
            if array.size and float(np.nanmax(array)) <= 1.0:
                array = array * 255.0
            array = np.clip(np.nan_to_num(array), 0, 255).astype(np.uint8)
        return to_rgb(Image.fromarray(array))
    return image


class HySACProcessor(ProcessorMixin):
    r"""Tokenizes text and preprocesses images for [`HySACModel`].

    Text is padded to 77 tokens and truncated by default, as the HySAC authors and CLIP do. Images may be
    PIL images or numpy arrays in any of grayscale, RGB or RGBA and of any size.

    Args:
        image_processor (`CLIPImageProcessor`): resizing, cropping and CLIP normalisation.
        tokenizer (`CLIPTokenizer`/`CLIPTokenizerFast`): the CLIP BPE tokenizer.
    """

    if int(transformers.__version__.split(".")[0]) < 5:  # transformers 5 infers these from __init__
        attributes = ["image_processor", "tokenizer"]
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        if image_processor is None:
            raise ValueError("HySACProcessor needs an image_processor (a CLIPImageProcessor)")
        if tokenizer is None:
            raise ValueError("HySACProcessor needs a tokenizer (a CLIPTokenizer)")
        super().__init__(image_processor, tokenizer, **kwargs)

    @property
    def max_length(self) -> int:
        length = getattr(self.tokenizer, "model_max_length", DEFAULT_MAX_LENGTH)
        return length if 0 < length <= 10_000 else DEFAULT_MAX_LENGTH

    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Any = None,
        return_tensors: str | None = "pt",
        padding: bool | str = "max_length",
        truncation: bool = True,
        max_length: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Prepare text and/or images.

        Args:
            text: a string or a list of strings.
            images: an image or a list of images (PIL, numpy).
            return_tensors: `"pt"` (default), `"np"` or `None`.
            padding: `"max_length"` (default, 77 tokens), `True`/`"longest"`, or `False`.
            truncation: truncate text longer than `max_length` (default True: never an error).
            max_length: defaults to the tokenizer's 77.
            kwargs: passed to the tokenizer and image processor.
        Returns:
            `BatchFeature` with `input_ids` and `attention_mask` `(B_t, L)` and/or `pixel_values` `(B_i, 3, H, W)`.
        """
        if text is None and images is None:
            raise ValueError("HySACProcessor needs text, images or both")
        data: dict[str, Any] = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not texts:
                raise ValueError("text is an empty list; pass at least one string")
            bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
            if bad:
                raise ValueError(f"text must be strings, got {sorted(set(bad))}")
            encoding = self.tokenizer(
                texts,
                padding=padding,
                truncation=truncation,
                max_length=max_length or self.max_length,
                return_tensors=return_tensors,
                **kwargs,
            )
            data.update(encoding)
        if images is not None:
            batch = list(images) if isinstance(images, (list, tuple)) else [images]
            if not batch:
                raise ValueError("images is an empty list; pass at least one image")
            pixel_values = self.image_processor([to_rgb(image) for image in batch], return_tensors=return_tensors)
            data["pixel_values"] = pixel_values["pixel_values"]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as `ProcessorMixin` does, plus a standalone `preprocessor_config.json` in every transformers
        version, so that `AutoImageProcessor` (and transformers 4 reading a folder saved by 5) finds it."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        self.image_processor.save_pretrained(save_directory)
        return result

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


HySACProcessor.register_for_auto_class()

__all__ = ["HySACProcessor", "to_rgb"]
