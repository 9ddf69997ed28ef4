"""HySAC processor: the base model's own image processor and tokenizer (CLIP's, SigLIP's, ...) behind one call.

Ships to the Hub as remote code (torch + transformers only). The sub-processors are built-in transformers
classes, so `AutoImageProcessor` loads them from a model folder without remote code, and so does `AutoTokenizer`
(transformers 5 asks whether to run the model's custom code first: pass `trust_remote_code=False` there).

The processor also carries its family's padding rule (`text_padding`): CLIP and MetaCLIP 2 pool the end-of-text
token under a causal mask, so texts are padded to the longest of each batch; SigLIP and SigLIP 2 pool the last
position, so texts are always padded to the tower's full length (64).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import transformers
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

try:
    from PIL import Image
except ImportError:  # pragma: no cover - transformers' image processors need Pillow anyway
    Image = None

DEFAULT_MAX_LENGTH = 77  # CLIP's context length
TEXT_PADDINGS = ("longest", "max_length")
# What an image processor returns for the model: pixels, and for SigLIP 2 NaFlex the patch mask and grid shapes.
IMAGE_INPUT_NAMES = ("pixel_values", "pixel_attention_mask", "spatial_shapes")
MAX_8_BIT = 255
MAX_16_BIT = 65535  # = 255 * 257: a 16-bit level v * 257 is the 8-bit level v
ARRAY_LAYOUTS = "(H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
TENSOR_LAYOUTS = "(H, W), (1, H, W), (3, H, W) or (4, H, W)"
IMAGE_URL_PREFIXES = ("http://", "https://")


def input_modality(value: Any, image_root: str | os.PathLike | None = None) -> str | None:
    """Whether an input is an image or a text: the one rule of the pipelines, the gallery index and `hysac-index`.

    - `"image"`: a PIL image, a numpy array, an `os.PathLike`, a string that names an existing file (relative
      strings under `image_root` when given, else the working directory) or starts with `http://` / `https://`, and a
      `datasets.Image` value left undecoded (a dict with `"bytes"` or `"path"`);
    - `"text"`: any other string;
    - None: anything else (a tensor of embeddings, a number, ...).
    """
    if (Image is not None and isinstance(value, Image.Image)) or isinstance(value, (np.ndarray, os.PathLike)):
        return "image"
    if isinstance(value, dict):
        return "image" if value.get("bytes") is not None or value.get("path") is not None else None
    if not isinstance(value, str):
        return None
    if value.startswith(IMAGE_URL_PREFIXES):
        return "image"
    path = value if image_root is None or os.path.isabs(value) else os.path.join(os.fspath(image_root), value)
    try:
        return "image" if os.path.isfile(path) else "text"
    except (OSError, ValueError):  # a caption too long for a path, or with a NUL byte: text
        return "text"


def to_rgb(image: Any) -> Any:
    """Turn one picture into the 8-bit RGB PIL image that CLIP's image processor reads: the processor's one
    format conversion.

    Every pixel becomes the nearest 8-bit level, so a 16-bit or float picture gives exactly what the same
    picture stored in 8 bits gives. Transparency is composited over white. Accepted:

    - PIL images of every mode: 8-bit modes (`"L"`, `"P"`, `"RGB"`, `"RGBA"`, `"LA"`, `"CMYK"`, ...) as PIL
      converts them; 16-bit grayscale (`"I;16"`, `"I;16B"`, `"I;16L"`, and `"I"`, as 16-bit PNGs open) with
      values in `[0, 65535]`; float (`"F"`) with values in `[0, 1]`.
    - numpy arrays, channels last as PIL and matplotlib lay them out: `(H, W)`, `(H, W, 1)`, `(H, W, 3)`,
      `(H, W, 4)`; of dtype `uint8`, `uint16` (16-bit: 65535 is white), float with values in `[0, 1]`, or another
      integer dtype whose values all lie in `[0, 255]` (read as 8-bit, as `CLIPImageProcessor` reads them).
    - torch tensors, channels first as torchvision makes them: `(H, W)`, `(1, H, W)`, `(3, H, W)`, `(4, H, W)`,
      with the same dtypes.

    Other objects are returned as they are, for the image processor to accept or reject.

    Raises:
        ValueError: for what has no single reading, naming it and what to pass instead: float values outside
            `[0, 1]`, NaN or infinity, boolean masks, 16-bit values outside `[0, 65535]`, wider integers beyond
            `[0, 255]`, and other shapes or channel counts.
    """
    if Image is not None and isinstance(image, Image.Image):
        if image.mode == "F" or image.mode.startswith("I"):  # 16/32-bit integer or float: scale, never clip
            source = f"PIL image of mode {image.mode!r}"
            pixels = np.asarray(image)
            return _array_to_rgb(pixels if image.mode == "F" else _sixteen_bit(pixels, source), source)
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
            # Composite transparency over white instead of dropping alpha (which can leave garbage colours).
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, image).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, torch.Tensor):
        return _array_to_rgb(_channels_last(image), f"torch tensor of dtype {image.dtype}")
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, f"numpy array of dtype {image.dtype}")
    return image


def _channels_last(tensor: torch.Tensor) -> np.ndarray:
    """`(H, W)` or channels-first `(C, H, W)` tensor -> numpy `(H, W)` / `(H, W, C)`."""
    if tensor.ndim == 3 and tensor.shape[0] in (1, 3, 4):
        tensor = tensor.permute(1, 2, 0)
    elif tensor.ndim != 2:
        raise ValueError(
            f"cannot read a torch image of shape {tuple(tensor.shape)}; expected {TENSOR_LAYOUTS} (channels first, "
            "as torchvision makes them): pass a channels-last tensor as `tensor.permute(2, 0, 1)` and a batch as a "
            "list or a (B, C, H, W) tensor"
        )
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16 or tensor.dtype == torch.float16:  # numpy has no bfloat16
        tensor = tensor.float()
    return tensor.numpy()


def _value_range(array: np.ndarray) -> str:
    return f"[{array.min()}, {array.max()}]"


def _sixteen_bit(array: np.ndarray, source: str) -> np.ndarray:
    """Check that integer pixels fit 16 bits and return them as `uint16`."""
    if array.size and (array.min() < 0 or array.max() > MAX_16_BIT):
        raise ValueError(
            f"a {source} is read as 16-bit, but its values lie in {_value_range(array)}, outside [0, {MAX_16_BIT}]; "
            "rescale it into [0, 65535] (uint16) or pass floats in [0, 1]"
        )
    return array.astype(np.uint16)


def _to_uint8(array: np.ndarray, source: str) -> np.ndarray:
    """Pixels of any accepted dtype -> the nearest 8-bit levels, `uint8`."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        return np.rint(array * (MAX_8_BIT / MAX_16_BIT)).astype(np.uint8)
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise ValueError(f"a {source} contains NaN or infinite values; pass finite values in [0, 1]")
        if array.min() < 0 or array.max() > 1:
            raise ValueError(
                f"a {source} must hold values in [0, 1], got {_value_range(array)}; divide 0-255 values by 255 "
                "(or pass them as uint8) and rescale other ranges into [0, 1]"
            )
        return np.rint(array.astype(np.float64) * MAX_8_BIT).astype(np.uint8)
    if array.dtype.kind == "b":
        raise ValueError(
            f"a {source} is a boolean mask, not an image; to use it as a black-and-white picture, pass it as "
            "uint8 with 0 for False and 255 for True"
        )
    if array.dtype.kind in "iu":
        if array.min() < 0 or array.max() > MAX_8_BIT:
            raise ValueError(
                f"a {source} is read as 8-bit only when its values lie in [0, 255]; got {_value_range(array)}. "
                "Pass 16-bit pictures as uint16 (`image.astype(np.uint16)`, 65535 = white) and other ranges as "
                "floats in [0, 1]"
            )
        return array.astype(np.uint8)
    raise ValueError(f"cannot read a {source} as an image; expected uint8, uint16 or float values in [0, 1]")


def _array_to_rgb(array: np.ndarray, source: str) -> Any:
    """Channels-last numpy pixels -> RGB PIL image (see `to_rgb`)."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"cannot read a {source} of shape {array.shape} as an image; expected {ARRAY_LAYOUTS} (channels last); "
            "pass a batch as a list or a (B, H, W, C) array"
        )
    if array.size == 0:
        raise ValueError(f"the {source} of shape {array.shape} is empty")
    return to_rgb(Image.fromarray(np.ascontiguousarray(_to_uint8(array, source))))


class HySACProcessor(ProcessorMixin):
    r"""Tokenizes text and preprocesses images for [`HySACModel`].

    Text is padded by the family's rule (`text_padding`) and truncated at the text tower's length. CLIP (the default,
    `"longest"`): padded to the longest text of the batch, truncated at 77 tokens (`padding="max_length"` pads to 77 as
    the authors do; the embeddings are the same). SigLIP families (`"max_length"`): always padded to exactly 64 tokens,
    whatever `padding` asks, because their text tower pools the last position. Images may be PIL
    images, numpy arrays or torch tensors, 8-bit, 16-bit or float, grayscale, RGB or RGBA, of any size: `to_rgb`
    says which and how they are read; then the family's image processor (SigLIP 2 NaFlex: patches with
    `pixel_attention_mask` and `spatial_shapes`, all returned).

    Args:
        image_processor: the base's image processor (`CLIPImageProcessor`, `SiglipImageProcessor`,
            `Siglip2ImageProcessor`).
        tokenizer: the base's tokenizer (the CLIP BPE tokenizer, SigLIP's, Gemma's, XLM-R's).
        text_padding (`str`, defaults to `"longest"`): the family's padding rule, `"longest"` or `"max_length"`
            (texts always padded to `max_length`).
        text_max_length (`int`, *optional*): tokens per text, the text tower's length; default: the tokenizer's
            `model_max_length` (77 for CLIP).
    """

    if int(transformers.__version__.split(".")[0]) < 5:  # transformers 5 infers these from __init__
        attributes = ["image_processor", "tokenizer"]
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        text_padding: str = "longest",
        text_max_length: int | None = None,
        **kwargs,
    ):
        if image_processor is None:
            raise ValueError("HySACProcessor needs an image_processor (the base model's, e.g. a CLIPImageProcessor)")
        if tokenizer is None:
            raise ValueError("HySACProcessor needs a tokenizer (the base model's, e.g. a CLIPTokenizer)")
        if text_padding not in TEXT_PADDINGS:
            raise ValueError(f"text_padding={text_padding!r} must be one of {list(TEXT_PADDINGS)}")
        if text_max_length is not None and not (isinstance(text_max_length, int) and text_max_length > 0):
            raise ValueError(f"text_max_length={text_max_length!r} must be a positive integer or None")
        self.text_padding = text_padding
        self.text_max_length = text_max_length
        super().__init__(image_processor, tokenizer, **kwargs)

    @property
    def max_length(self) -> int:
        """Tokens per text: `text_max_length`, else the tokenizer's limit (77 when it has none)."""
        if self.text_max_length is not None:
            return self.text_max_length
        length = getattr(self.tokenizer, "model_max_length", DEFAULT_MAX_LENGTH)
        return length if 0 < length <= 10_000 else DEFAULT_MAX_LENGTH

    @property
    def is_fixed_length(self) -> bool:
        """Whether every text is padded to `max_length` whatever a call asks (SigLIP families)."""
        return self.text_padding == "max_length"

    def text_options(self, padding: bool | str | None = None, max_length: int | None = None) -> dict[str, Any]:
        """The tokenizer's padding, truncation and length for a call that asks for `padding` (None: the rule's
        default), by the family's rule: a fixed-length family always pads to `max_length`.

        Returns:
            `{"padding": ..., "truncation": True, "max_length": ...}` for the tokenizer.
        """
        if self.is_fixed_length:
            if padding not in (None, True, False, "longest", "max_length", "do_not_pad"):
                raise ValueError(f"padding={padding!r} is not a padding strategy")
            if max_length not in (None, self.max_length):
                raise ValueError(
                    f"max_length={max_length}: this model's text tower pools its last position, so every text is "
                    f"padded to exactly {self.max_length} tokens; drop max_length"
                )
            return {"padding": "max_length", "truncation": True, "max_length": self.max_length}
        return {
            "padding": "longest" if padding is None else padding,
            "truncation": True,
            "max_length": max_length or self.max_length,
        }

    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Any = None,
        return_tensors: str | None = "pt",
        padding: bool | str | None = None,
        truncation: bool = True,
        max_length: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Prepare text and/or images.

        Args:
            text: a string or a list of strings.
            images: an image or a list of images (PIL, numpy channels-last, torch channels-first; see `to_rgb`),
                or a batch as one `(B, H, W, C)` array or `(B, C, H, W)` tensor.
            return_tensors: `"pt"` (default), `"np"` or `None`.
            padding: CLIP: `"longest"` (default: the longest text of the batch; CLIP's causal mask and end-of-text
                pooling give the same embeddings as 77 tokens, several times faster), `"max_length"` (77 tokens, as
                the authors' code), or `False`. SigLIP families: ignored, texts are always padded to 64 tokens
                (their text tower pools the last position; any other length changes the embeddings).
            truncation: truncate text longer than `max_length` (default True: never an error).
            max_length: defaults to the text tower's length (77 for CLIP, 64 for SigLIP).
            kwargs: passed to the tokenizer; transformers' processor convention is accepted too, as generic
                callers such as sentence-transformers use it: `text_kwargs` (tokenizer), `images_kwargs` (image
                processor) and `common_kwargs` (both; its `return_tensors` replaces the argument).
        Returns:
            `BatchFeature` with `input_ids` (and the tokenizer's `attention_mask`) `(B_t, L)` and/or `pixel_values`
            `(B_i, 3, H, W)` (SigLIP 2 NaFlex: `(B_i, N, 3 * p * p)` with `pixel_attention_mask` `(B_i, N)` and
            `spatial_shapes` `(B_i, 2)`).
        """
        if text is None and images is None:
            raise ValueError("HySACProcessor needs text, images or both")
        common_kwargs = dict(kwargs.pop("common_kwargs", None) or {})
        return_tensors = common_kwargs.pop("return_tensors", return_tensors)
        text_kwargs = {**common_kwargs, **(kwargs.pop("text_kwargs", None) or {})}
        images_kwargs = {**common_kwargs, **(kwargs.pop("images_kwargs", None) or {})}
        for unused in ("audio_kwargs", "videos_kwargs"):  # no audio or video inputs to apply them to
            kwargs.pop(unused, None)
        data: dict[str, Any] = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not texts:
                raise ValueError("text is an empty list; pass at least one string")
            bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
            if bad:
                raise ValueError(f"text must be strings, got {sorted(set(bad))}")
            text_kwargs = {**kwargs, **text_kwargs}
            options = self.text_options(text_kwargs.pop("padding", padding), text_kwargs.pop("max_length", max_length))
            options["truncation"] = text_kwargs.pop("truncation", truncation) if not self.is_fixed_length else True
            encoding = self.tokenizer(texts, return_tensors=return_tensors, **{**text_kwargs, **options})
            data.update(encoding)
        if images is not None:
            is_batch = isinstance(images, (list, tuple)) or getattr(images, "ndim", None) == 4
            batch = list(images) if is_batch else [images]
            if not batch:
                raise ValueError("images is an empty list; pass at least one image")
            image_inputs = self.image_processor(
                [to_rgb(image) for image in batch], return_tensors=return_tensors, **images_kwargs
            )
            # pixel_values, and a NaFlex processor's pixel_attention_mask and spatial_shapes
            data.update({key: image_inputs[key] for key in IMAGE_INPUT_NAMES if key in image_inputs})
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
        return ["input_ids", "attention_mask", *IMAGE_INPUT_NAMES]


HySACProcessor.register_for_auto_class()

__all__ = ["IMAGE_INPUT_NAMES", "HySACProcessor", "input_modality", "to_rgb"]
