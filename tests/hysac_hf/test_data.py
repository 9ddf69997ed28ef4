"""Data: bundled mini-ViSU, generic quadruplet files, ViSU joined with local images, and the collator."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hysac_hf.data import parse_columns
from hysac_hf.errors import UsageError
from hysac_hf.data import (
    QuadrupletCollator,
    load_dataset_split,
    load_image,
    load_mini_visu,
    load_quadruplets,
    load_visu,
)
from hysac_hf.data import bad_image_rows, bad_images_or_skip, find_bad_images
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
    texts = [r["safe_text"] for r in rows] + [r["unsafe_text"] for r in rows]
    longest = processor.tokenizer(texts, padding="longest", return_tensors="pt")
    assert batch["pixel_values"].shape == (6, 3, 224, 224) and batch["input_ids"].shape == longest["input_ids"].shape
    assert batch["input_ids"].shape[1] < 77  # padded to the longest caption, not to 77
    expected = processor(images=[load_image(rows[1]["unsafe_image"])], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch["pixel_values"][4:5], expected)
    assert torch.equal(batch["input_ids"], longest["input_ids"])
    # Right padding needs no mask (causal attention, end-of-text pooling); a left-padding tokenizer gets one.
    assert "attention_mask" not in batch
    processor.tokenizer.padding_side = "left"
    try:
        left = QuadrupletCollator(processor)(rows)
    finally:
        processor.tokenizer.padding_side = "right"
    assert left["attention_mask"].shape == left["input_ids"].shape and not left["attention_mask"].all()
    full = QuadrupletCollator(processor, padding="max_length")(rows)
    assert full["input_ids"].shape == (6, 77)
    texts_only = QuadrupletCollator(processor, kinds=["S", "U"])(rows)
    assert "pixel_values" not in texts_only and texts_only["input_ids"].shape[0] == 6
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
    with pytest.raises(UsageError, match=r"lacks safe_text \(safe text\), safe_image \(safe image\)"):
        load_quadruplets(str(path), "train")
    with pytest.raises(UsageError, match="has no column \\['nsfw_typo'\\]"):
        load_quadruplets(str(path), "train", columns={**columns, "unsafe_text": "nsfw_typo"})
    with pytest.raises(UsageError, match="image_root"):
        QuadrupletCollator(processor, image_root=tmp_path / "elsewhere")([train[0]])
    assert bad_image_rows(train, ["safe_image"], tmp_path) == {}
    assert bad_image_rows(train, ["safe_image"], tmp_path / "elsewhere") == {
        row: f"safe_image: {tmp_path / 'elsewhere' / n}.png (missing)" for row, n in enumerate(names[:2])
    }
    (tmp_path / f"{names[0]}.png").write_bytes(b"garbage")
    assert bad_image_rows(train, ["safe_image"], tmp_path)[0].startswith(
        f"safe_image: {tmp_path / names[0]}.png (Unidentified"
    )


def test_every_bad_image_is_found_in_one_pass_truncated_ones_too(tmp_path, photos):
    """Missing files, files that are not images, and files cut short after a valid header (JPEG and PNG) are all
    found at once, before any model loads; good files, decoded images and mini-ViSU specs pass."""
    good_png, good_jpeg = tmp_path / "good.png", tmp_path / "good.jpg"
    photos["astronaut"].save(good_png)
    photos["astronaut"].save(good_jpeg, quality=90)
    for good, cut in ((good_png, tmp_path / "cut.png"), (good_jpeg, tmp_path / "cut.jpg")):
        data = good.read_bytes()
        cut.write_bytes(data[: len(data) // 2])  # a valid header, half the pixels
    (tmp_path / "text.png").write_text("not an image")
    values = ["good.png", "cut.png", "good.jpg", "cut.jpg", "missing.png", "text.png", photos["cat"],
              {"bytes": good_png.read_bytes(), "path": "inline.png"}, {"bytes": b"junk", "path": "junk.png"},
              {"photo": "astronaut", "crop": [0, 0, 1, 1], "flip": False, "marker": None}]  # fmt: skip
    bad = find_bad_images(values, image_root=tmp_path)
    assert sorted(bad) == [1, 3, 4, 5, 8]
    assert bad[4] == f"{tmp_path / 'missing.png'} (missing)" and bad[8].startswith("junk.png (")
    assert "cut.png" in bad[1] and "cut.jpg" in bad[3]
    with pytest.raises(UsageError, match=r"5 of the 10 images of the gallery are missing or cannot be decoded: .*--skip_bad_images"):
        bad_images_or_skip(bad, len(values), "the gallery", skip=False)
    assert bad_images_or_skip(bad, len(values), "the gallery", skip=True) == [0, 2, 6, 7, 9]
    assert bad_images_or_skip({}, 3, "the gallery", skip=False) == [0, 1, 2]


def test_columns_map_every_source(tmp_path):
    rows = {"caption": ["a", "b"], "nsfw": ["x a", "x b"], "good": ["1.png", "2.png"], "bad": ["3.png", "4.png"]}
    columns = parse_columns("caption=S,good=safe_image,nsfw=T*,bad=G")
    assert columns == {"safe_text": "caption", "safe_image": "good", "unsafe_text": "nsfw", "unsafe_image": "bad"}
    table = datasets.Dataset.from_dict(rows)
    table.to_csv(tmp_path / "q.csv")
    table.to_parquet(tmp_path / "q.parquet")
    (tmp_path / "splits").mkdir()
    table.to_json(tmp_path / "splits" / "test.jsonl")
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"test": table}).save_to_disk(str(tmp_path / "saved_dict"))
    sources = [table, datasets.DatasetDict({"test": table}), str(tmp_path / "q.csv"), str(tmp_path / "q.parquet")]
    sources += [str(tmp_path / "splits"), str(tmp_path / "saved"), str(tmp_path / "saved_dict")]
    for source in sources:
        data = load_dataset_split(source, "test", columns=columns)
        assert data["safe_text"] == ["a", "b"] and data["unsafe_image"] == ["3.png", "4.png"], source
    with pytest.raises(UsageError, match="no split 'train'"):
        load_dataset_split(str(tmp_path / "saved_dict"), "train", columns=columns)
    with pytest.raises(UsageError, match="no train file"):
        load_dataset_split(str(tmp_path / "splits"), "train", columns=columns)
    with pytest.raises(UsageError, match="maps S \\(safe text\\) twice"):
        parse_columns("caption=S,nsfw=S")
    with pytest.raises(UsageError, match="SOURCE_COLUMN=KIND"):
        parse_columns("caption")


def test_unreadable_sources_and_images_name_the_file(tmp_path, processor, photos):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UsageError, match="empty.jsonl is empty"):
        load_dataset_split(str(tmp_path / "empty.jsonl"), "train")
    (tmp_path / "broken.jsonl").write_text('{"safe_text": "a"}\n{"safe_text": ')
    with pytest.raises(UsageError, match="cannot read .*broken.jsonl"):
        load_dataset_split(str(tmp_path / "broken.jsonl"), "train")
    (tmp_path / "noise.png").write_bytes(b"not an image at all")
    with pytest.raises(UsageError, match="cannot decode image .*noise.png"):
        load_image(str(tmp_path / "noise.png"))
    photos["cat"].save(tmp_path / "cat.jpg")
    data = (tmp_path / "cat.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="cannot decode image .*truncated.jpg"):
        QuadrupletCollator(processor, kinds=["V"])([{"safe_image": str(tmp_path / "truncated.jpg")}])


def test_mini_visu_reports_a_missing_photo_library_at_load(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    with pytest.raises(UsageError, match=r"needs scikit-learn.*pip install 'hysac-hf\[train\]'"):
        load_mini_visu("train")


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
    with pytest.raises(UsageError, match="coco_root"):
        load_dataset_split("aimagelab/ViSU-Text", "test")
