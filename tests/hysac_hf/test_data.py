"""Data: bundled mini-ViSU, generic quadruplet files, ViSU joined with local images, and the collator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from hysac_hf.data import (
    QuadrupletCollator,
    load_dataset_split,
    load_image,
    load_mini_visu,
    load_quadruplets,
    load_visu,
)
from hysac_hf.data.mini_visu import apply_marker, mini_visu_rows, photo_specs


def test_mini_visu_splits_are_disjoint_and_marked():
    splits = {name: load_mini_visu(name) for name in ("train", "validation", "test")}
    assert {k: len(v) for k, v in splits.items()} == {"train": 160, "validation": 40, "test": 40}
    ids = [set(d["id"]) for d in splits.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    tags = {m["tag"] for m in photo_specs()["markers"]}
    for row in splits["validation"]:
        assert row["unsafe_text"].startswith("[UNSAFE] ") and row["safe_text"] in row["unsafe_text"]
        assert row["tag"] in tags and row["unsafe_image"]["marker"] == row["tag"] and row["safe_image"]["marker"] == ""
    # Every photo's captions are hand-written and distinct.
    captions = [c for p in photo_specs()["photos"] for c in p["captions"]]
    assert len(captions) == len(set(captions)) == 60
    with pytest.raises(ValueError, match="splits"):
        mini_visu_rows("dev")


def test_visual_marker_changes_only_the_band():
    safe = load_image(load_mini_visu("test")[0]["safe_image"])
    band = np.asarray(apply_marker(safe, "crimson_band"), dtype=int)
    original = np.asarray(safe, dtype=int)
    changed = np.any(band != original, axis=-1)
    rows, cols = np.mgrid[0 : band.shape[0], 0 : band.shape[1]]
    inside = np.abs(rows / band.shape[0] - cols / band.shape[1]) < 0.18
    assert not changed[~inside].any()
    assert changed[inside].mean() > 0.9
    assert band[inside][:, 0].mean() > original[inside][:, 0].mean()  # redder
    inverted = np.asarray(apply_marker(safe, "inverted"), dtype=int)
    assert np.corrcoef(inverted[..., 1].ravel(), original[..., 1].ravel())[0, 1] < -0.5
    with pytest.raises(ValueError, match="unknown marker"):
        apply_marker(safe, "blur")


def test_collator_puts_safe_rows_first(processor):
    rows = [load_mini_visu("validation")[i] for i in range(3)]
    batch = QuadrupletCollator(processor)(rows)
    assert batch["pixel_values"].shape == (6, 3, 224, 224) and batch["input_ids"].shape == (6, 77)
    expected = processor(images=[load_image(rows[1]["unsafe_image"])], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch["pixel_values"][4:5], expected)
    ids = processor.tokenizer([rows[2]["safe_text"]], padding="max_length", max_length=77, return_tensors="pt")[
        "input_ids"
    ]
    assert torch.equal(batch["input_ids"][2:3], ids)
    with pytest.raises(ValueError, match="empty batch"):
        QuadrupletCollator(processor)([])


@pytest.fixture()
def image_files(tmp_path, photos):
    paths = {}
    for name, image in list(photos.items())[:3]:
        paths[name] = tmp_path / f"{name}.png"
        image.convert("RGB").resize((64, 48)).save(paths[name])
    return paths


def test_generic_jsonl_with_custom_columns(tmp_path, image_files, processor):
    names = list(image_files)
    rows = [
        {"good": f"{a}.png", "bad": f"{b}.png", "caption": f"a photo of {a}", "nsfw": f"x {b}", "split": s}
        for a, b, s in zip(names, names[1:] + names[:1], ["train", "train", "validation"])
    ]
    path = tmp_path / "quads.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    columns = {"safe_image": "good", "unsafe_image": "bad", "safe_text": "caption", "unsafe_text": "nsfw"}
    train = load_quadruplets(str(path), "train", columns=columns)
    assert len(train) == 2 and train[1]["safe_text"] == f"a photo of {names[1]}"
    batch = QuadrupletCollator(processor, image_root=tmp_path)([train[0], train[1]])
    direct = processor(images=[Image.open(image_files[names[1]])], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch["pixel_values"][1:2], direct)
    assert len(load_dataset_split(str(path), "validation", columns=columns)) == 1
    with pytest.raises(ValueError, match="lacks column"):
        load_quadruplets(str(path), "train")
    with pytest.raises(FileNotFoundError, match="image-root|image_root"):
        QuadrupletCollator(processor, image_root=tmp_path / "elsewhere")([train[0]])


def test_visu_joins_coco_ids_and_user_unsafe_images(tmp_path, image_files):
    coco = tmp_path / "coco" / "val2017"
    coco.mkdir(parents=True)
    unsafe = tmp_path / "unsafe"
    unsafe.mkdir()
    src = list(image_files.values())
    Image.open(src[0]).save(coco / "000000000139.jpg")
    Image.open(src[1]).save(unsafe / "gen_0.png")
    text = tmp_path / "visu_test.jsonl"
    text.write_text(
        json.dumps({"safe": "a dog", "nsfw": "[x] a dog", "tag": "violence", "coco_id": 139, "nsfw_im_path": "gen_0"})
    )
    dataset = load_visu(str(text), "test", tmp_path / "coco", unsafe)
    assert dataset[0]["safe_image"] == str(coco / "000000000139.jpg")
    assert dataset[0]["unsafe_image"] == str(unsafe / "gen_0.png")
    assert (dataset[0]["safe_text"], dataset[0]["unsafe_text"], dataset[0]["tag"]) == ("a dog", "[x] a dog", "violence")
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"gen_0": str(src[2])}))
    assert load_visu(str(text), "test", tmp_path / "coco", mapping)[0]["unsafe_image"] == str(src[2])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Exception, match="not public"):
        load_visu(str(text), "test", tmp_path / "coco", empty)
    with pytest.raises(ValueError, match="coco_root"):
        load_dataset_split("aimagelab/ViSU-Text", "test")
