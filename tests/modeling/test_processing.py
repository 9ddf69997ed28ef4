"""HySACProcessor: exact CLIP token ids, 77-token padding/truncation, odd images, and the auto classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

from hysac_hf import HySACProcessor
from hysac_hf.testing import clip_image_processor

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" with openai/clip-vit-* tokenizers


def test_text_is_padded_to_77_with_the_real_clip_ids(processor):
    out = processor(text=["a photo of a cat", "a rocket"])
    assert out["input_ids"].shape == (2, 77) and out["attention_mask"].shape == (2, 77)
    assert out["input_ids"][0, :7].tolist() == CAT_IDS
    assert (out["input_ids"][0, 7:] == 49407).all()  # CLIP pads with the end-of-text token
    assert out["attention_mask"][0].sum() == 7
    single = processor(text="a photo of a cat")
    assert torch.equal(single["input_ids"], out["input_ids"][:1])


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
        torch.testing.assert_close(processor(images=variant)["pixel_values"][0], out["pixel_values"][0], atol=0.02, rtol=0)
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
