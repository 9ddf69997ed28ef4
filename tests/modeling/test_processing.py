"""HySACProcessor: exact CLIP token ids, 77-token padding/truncation, odd images, 16-bit and float pictures, and
the auto classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

from hysac_hf import HySACProcessor
from hysac_hf.modeling.processing_hysac import to_rgb
from hysac_hf.testing import clip_image_processor

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" with openai/clip-vit-* tokenizers


def test_text_is_padded_to_the_longest_with_the_real_clip_ids(processor):
    out = processor(text=["a photo of a cat", "a rocket"])
    assert out["input_ids"].shape == (2, 7) and out["attention_mask"].shape == (2, 7)  # the longest text: 7 tokens
    assert out["input_ids"][0].tolist() == CAT_IDS
    assert (out["input_ids"][1, 4:] == 49407).all()  # CLIP pads with the end-of-text token
    assert out["attention_mask"][1].sum() == 4
    single = processor(text="a photo of a cat")
    assert torch.equal(single["input_ids"], out["input_ids"][:1])
    # The authors' 77-token padding stays available.
    full = processor(text=["a photo of a cat", "a rocket"], padding="max_length")
    assert full["input_ids"].shape == (2, 77) and torch.equal(full["input_ids"][:, :7], out["input_ids"])


def test_text_over_77_tokens_is_truncated_not_an_error(processor):
    long_text = " ".join(["astronaut"] * 200)
    out = processor(text=[long_text])
    assert out["input_ids"].shape == (1, 77)
    assert out["input_ids"][0, 0] == 49406 and out["input_ids"][0, -1] == 49407  # ends with end-of-text


def test_rgb_pixels_equal_the_stock_clip_image_processor(processor, photos):
    ours = processor(images=[photos["astronaut"], photos["rocket"]])["pixel_values"]
    stock = clip_image_processor()([photos["astronaut"], photos["rocket"]], return_tensors="pt")["pixel_values"]
    assert ours.shape == (2, 3, 224, 224)
    assert torch.equal(ours, stock)


def test_grayscale_rgba_numpy_and_odd_sized_images(processor, photos):
    gray = photos["camera"]  # mode "L"
    assert gray.mode == "L" and photos["logo"].mode == "RGBA"
    out = processor(images=[gray, photos["logo"], photos["rocket"]])
    assert out["pixel_values"].shape == (3, 3, 224, 224)
    # grayscale becomes three identical channels, same as PIL's own conversion
    assert torch.equal(out["pixel_values"][0], processor(images=gray.convert("RGB"))["pixel_values"][0])
    array = np.asarray(gray)
    for variant in (array, array[..., None], array.astype(np.float32) / 255.0):
        torch.testing.assert_close(
            processor(images=variant)["pixel_values"][0], out["pixel_values"][0], atol=0.02, rtol=0
        )
    # transparency is composited over white, not dropped
    transparent = Image.new("RGBA", (50, 70), (255, 0, 0, 0))
    white = Image.new("RGB", (50, 70), (255, 255, 255))
    assert torch.equal(processor(images=transparent)["pixel_values"], processor(images=white)["pixel_values"])
    tiny = Image.new("RGB", (3, 5), (10, 200, 30))  # far smaller than 224, odd aspect
    assert processor(images=tiny)["pixel_values"].shape == (1, 3, 224, 224)


def test_bad_processor_inputs_raise(processor):
    with pytest.raises(ValueError, match="text, images or both"):
        processor()
    with pytest.raises(ValueError, match="empty list"):
        processor(text=[])
    with pytest.raises(ValueError, match="empty list"):
        processor(images=[])
    with pytest.raises(ValueError, match="strings"):
        processor(text=[1, 2])
    with pytest.raises(ValueError, match="channels last"):
        processor(images=np.zeros((3, 8, 8, 2), dtype=np.uint8))


def pixels(processor, image) -> torch.Tensor:
    return processor(images=image)["pixel_values"]


def test_16_bit_and_float_pictures_equal_the_same_picture_in_8_bits(processor, photos, hysac):
    """A picture stored in 16 bits (v * 257) or as floats (v / 255) is the 8-bit picture v: same pixels, same
    embedding. Before, uint16 was clipped to 255 (white) and 16-bit grayscale PIL images came out white."""
    rgb = np.asarray(photos["astronaut"])
    chw = torch.from_numpy(rgb.copy()).permute(2, 0, 1)
    expected = pixels(processor, photos["astronaut"])
    variants = {
        "numpy uint16": rgb.astype(np.uint16) * 257,
        "numpy float32": rgb.astype(np.float32) / 255,
        "numpy float64": rgb / 255,
        "numpy float16": (rgb / 255).astype(np.float16),
        "numpy int64 in [0, 255]": rgb.astype(np.int64),  # read as 8-bit, as CLIPImageProcessor reads it
        "torch uint8 (C, H, W)": chw,
        "torch uint16": (chw.to(torch.int32) * 257).to(torch.uint16),
        "torch float32": chw.float() / 255,
    }
    for name, variant in variants.items():
        assert torch.equal(pixels(processor, variant), expected), name

    gray = np.asarray(photos["camera"])
    expected_gray = pixels(processor, photos["camera"])
    gray_variants = {
        "PIL I;16": Image.fromarray(gray.astype(np.uint16) * 257),
        "PIL I;16B": Image.frombytes("I;16B", gray.shape[::-1], (gray.astype(">u2") * 257).tobytes()),
        "PIL I": Image.fromarray(gray.astype(np.int32) * 257),
        "PIL F": Image.fromarray(gray.astype(np.float32) / 255),
        "numpy (H, W, 1) uint16": gray[..., None].astype(np.uint16) * 257,
        "torch (1, H, W) float": torch.from_numpy(gray.copy())[None].float() / 255,
    }
    for name, variant in gray_variants.items():
        assert torch.equal(pixels(processor, variant), expected_gray), name

    # RGBA in 16 bits: the alpha channel scales too, then composites over white as in 8 bits.
    logo = np.asarray(photos["logo"])
    assert torch.equal(pixels(processor, logo.astype(np.uint16) * 257), pixels(processor, photos["logo"]))

    with torch.no_grad():
        embeds_8 = hysac.encode_image(expected)
        embeds_16 = hysac.encode_image(pixels(processor, variants["numpy uint16"]))
        embeds_float = hysac.encode_image(pixels(processor, gray_variants["PIL F"]))
    assert torch.equal(embeds_16, embeds_8)
    assert torch.equal(embeds_float, hysac.encode_image(expected_gray))


def test_16_bit_values_round_to_the_nearest_8_bit_level():
    """Every 16-bit value v lands within half an 8-bit level of v / 257, and the mapping never decreases."""
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    levels = np.asarray(to_rgb(ramp).convert("L")).astype(np.float64).ravel()
    assert np.abs(levels - np.arange(65536) / 257).max() <= 0.5
    assert (np.diff(levels) >= 0).all() and levels[0] == 0 and levels[-1] == 255
    floats = np.linspace(0, 1, 4097, dtype=np.float64).reshape(1, -1)
    assert np.abs(np.asarray(to_rgb(floats).convert("L")).ravel() - floats.ravel() * 255).max() <= 0.5


def test_16_bit_grayscale_png_reads_as_the_8_bit_picture(processor, photos, tmp_path):
    """A 16-bit grayscale PNG written by PIL and read back (mode "I;16") gives the 8-bit picture's pixels."""
    gray = np.asarray(photos["camera"])
    path = tmp_path / "camera16.png"
    Image.fromarray(gray.astype(np.uint16) * 257).save(path)
    with Image.open(path) as png:
        assert png.mode in ("I;16", "I")  # 16-bit on disk
        assert np.asarray(png).max() > 255
        got = pixels(processor, png)
    assert torch.equal(got, pixels(processor, photos["camera"]))
    white = np.asarray(to_rgb(Image.open(path)))
    assert (white == 255).mean() == pytest.approx((gray == 255).mean())  # was 89 % white before


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.full((8, 8, 3), -0.1), r"float64 must hold values in \[0, 1\], got \[-0.1, -0.1\]"),
        (np.full((8, 8, 3), 200.0, dtype=np.float32), r"values in \[0, 1\].*divide 0-255 values by 255"),
        (np.full((8, 8), np.nan), "NaN or infinite"),
        (np.full((8, 8), np.inf, dtype=np.float32), "NaN or infinite"),
        (np.ones((8, 8), dtype=bool), "boolean mask"),
        (torch.ones(3, 8, 8, dtype=torch.bool), "boolean mask"),
        (np.full((8, 8), 70_000, dtype=np.int32), r"int32 is read as 8-bit only .*\[70000, 70000\].*uint16"),
        (np.full((8, 8), 300, dtype=np.int64), r"\[300, 300\]"),
        (np.zeros((8, 8), dtype=np.complex64), "expected uint8, uint16 or float"),
        (np.zeros((8, 8, 5), dtype=np.uint8), r"shape \(8, 8, 5\).*channels last"),
        (np.zeros((8, 8, 2), dtype=np.uint16), "channels last"),
        (np.zeros((0, 4, 3), dtype=np.uint8), "empty"),
        (Image.fromarray(np.full((8, 8), 70_000, dtype=np.int32)), r"mode 'I' is read as 16-bit.*\[0, 65535\]"),
        (Image.fromarray(np.full((8, 8), -3, dtype=np.int32)), r"mode 'I'.*\[-3, -3\]"),
        (Image.fromarray(np.full((8, 8), 200.0, dtype=np.float32)), r"mode 'F' must hold values in \[0, 1\]"),
        (torch.zeros(64, 64, 3, dtype=torch.uint8), r"shape \(64, 64, 3\).*channels first.*permute\(2, 0, 1\)"),
        (torch.zeros(5, 8, 8), "channels first"),
        (torch.full((3, 8, 8), 1.5), r"torch.float32 must hold values in \[0, 1\]"),
    ],
    ids=lambda value: (
        None
        if isinstance(value, str)
        else f"{type(value).__name__}-{getattr(value, 'dtype', getattr(value, 'mode', ''))}"
    ),
)
def test_pictures_without_one_reading_are_refused(processor, image, message):
    with pytest.raises(ValueError, match=message):
        processor(images=image)


def test_processor_convention_kwargs_reach_the_right_sub_processor(processor, photos):
    """`text_kwargs`/`images_kwargs`/`common_kwargs` (transformers' convention, used by sentence-transformers)."""
    out = processor(
        text=["a photo of a cat", "a rocket"],
        images=photos["rocket"],
        text_kwargs={"padding": True},
        images_kwargs={"do_normalize": False},
        common_kwargs={"return_tensors": "np"},
        audio_kwargs={"padding": True},
    )
    assert isinstance(out["input_ids"], np.ndarray) and out["input_ids"].shape == (2, 7)  # longest, not 77
    assert out["input_ids"][0].tolist() == CAT_IDS
    stock = clip_image_processor()(photos["rocket"], do_normalize=False, return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(out["pixel_values"], stock)
    assert 0.0 <= out["pixel_values"].min() and out["pixel_values"].max() <= 1.0


def test_saved_processor_loads_through_every_auto_class(processor, photos, tmp_path):
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    remote = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(remote).__name__ == "HySACProcessor"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)  # built-in class, no remote code needed
    image_processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert "CLIPTokenizer" in type(tokenizer).__name__
    assert "CLIPImageProcessor" in type(image_processor).__name__
    text = ["a photo of a cat", "a cup of coffee"]
    assert torch.equal(remote(text=text)["input_ids"], processor(text=text)["input_ids"])
    assert tokenizer("a photo of a cat")["input_ids"] == CAT_IDS
    image = photos["coffee"]
    assert torch.equal(
        image_processor(image, return_tensors="pt")["pixel_values"], processor(images=image)["pixel_values"]
    )
    again = HySACProcessor.from_pretrained(tmp_path)
    assert torch.equal(again(images=image)["pixel_values"], processor(images=image)["pixel_values"])
