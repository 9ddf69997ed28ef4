"""The one embedding path: quadruplets, images and texts -> embeddings; the cache; several processes."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from hysac_hf.errors import UsageError
from hysac_hf.data import load_image, load_mini_visu
from hysac_hf.encode import CACHE_FILE, META_FILE, EmbeddingCache, encode_images, encode_quadruplets, encode_texts
from hysac_hf.testing import run_on_cpu_processes


def direct(model, processor, rows):
    """Embeddings computed without the encode path: the processor padded to 77 with an attention mask, one batch."""
    images = [load_image(row[column]) for column in ("safe_image", "unsafe_image") for row in rows]
    texts = [row[column] for column in ("safe_text", "unsafe_text") for row in rows]
    inputs = processor(text=texts, images=images, padding="max_length", max_length=77, return_tensors="pt")
    n = len(rows)
    with torch.no_grad():
        image = model.encode_image(inputs["pixel_values"])
        text = model.encode_text(inputs["input_ids"], inputs["attention_mask"])
    return {"V": image[:n], "G": image[n:], "S": text[:n], "U": text[n:]}


def test_quadruplets_equal_direct_encoding_in_dataset_order(hysac, processor):
    dataset = load_mini_visu("validation", max_samples=7)
    cache = encode_quadruplets(hysac, processor, dataset, batch_size=3, show_progress=False)
    assert sorted(cache.embeds) == ["G", "S", "U", "V"] and cache.num_rows == 7
    # Padded to the longest caption of each batch of 3 vs one batch padded to 77: the same embeddings.
    expected = direct(hysac, processor, [dataset[i] for i in range(7)])
    for key in "SVUG":
        torch.testing.assert_close(cache.embeds[key], expected[key], atol=1e-5, rtol=1e-5)
    assert cache.tags == list(dataset["tag"])
    assert cache.curvature == pytest.approx(hysac.curvature.item())
    assert cache.bounds == hysac.config.bounds and cache.traversal_offset == hysac.config.traversal_offset
    # Rows keep their identity: reversing the dataset reverses the rows.
    flipped = encode_quadruplets(hysac, processor, dataset.select(range(6, -1, -1)), batch_size=4, show_progress=False)
    torch.testing.assert_close(flipped.embeds["U"], cache.embeds["U"].flip(0), atol=1e-5, rtol=1e-5)


def test_text_padding_to_the_longest_caption_equals_77_tokens(hysac, processor):
    texts = ["a cat", "a photo of an astronaut in a white spacesuit next to a flag and a model shuttle", "x"]
    longest = processor.tokenizer(texts, padding="longest", return_tensors="pt")
    full = processor.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")
    assert longest["input_ids"].shape[1] < 30 and full["input_ids"].shape[1] == 77
    with torch.no_grad():
        short = hysac.encode_text(longest["input_ids"], longest["attention_mask"])
        padded = hysac.encode_text(full["input_ids"], full["attention_mask"])
    torch.testing.assert_close(short, padded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        encode_texts(hysac, processor, texts, batch_size=2, show_progress=False), padded, atol=1e-5, rtol=1e-5
    )


def test_images_and_texts_from_lists_and_dataset_columns(hysac, processor, photos, captions, tmp_path):
    names = ["astronaut", "camera", "logo"]  # RGB, grayscale, RGBA
    paths = []
    for name in names:
        paths.append(tmp_path / f"{name}.png")
        photos[name].save(paths[-1])
    with torch.no_grad():
        expected = hysac.encode_image(processor(images=[load_image(p) for p in paths])["pixel_values"])
    from_paths = encode_images(hysac, processor, paths, batch_size=2, show_progress=False)
    from_pil = encode_images(hysac, processor, [photos[n] for n in names], batch_size=5, show_progress=False)
    column = datasets.Dataset.from_dict({"img": [str(p) for p in paths]}).cast_column("img", datasets.Image())
    from_column = encode_images(hysac, processor, column, column="img", show_progress=False)
    for got in (from_paths, from_pil, from_column):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    table = datasets.Dataset.from_dict({"caption": [captions[n] for n in names]})
    torch.testing.assert_close(
        encode_texts(hysac, processor, table, column="caption", show_progress=False),
        encode_texts(hysac, processor, [captions[n] for n in names], show_progress=False),
    )
    with pytest.raises(UsageError, match="no images"):
        encode_images(hysac, processor, [], show_progress=False)
    with pytest.raises(UsageError, match="list of texts"):
        encode_texts(hysac, processor, "a single string", show_progress=False)
    with pytest.raises(UsageError, match="no column 'text'"):
        encode_texts(hysac, processor, table, column="text", show_progress=False)


def test_the_callers_model_is_left_as_it_was(hysac, processor):
    from hysac_hf.training import configure_trainable

    peft_model = configure_trainable(hysac, lora_dropout=0.5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    peft_model.train()
    texts = ["a cat", "a dog on a sofa"]
    first = encode_texts(peft_model, processor, texts, show_progress=False)
    second = encode_texts(peft_model, processor, texts, show_progress=False)
    torch.testing.assert_close(first, second)  # dropout was off while embedding
    assert peft_model.training and all(m.training for m in peft_model.modules())  # and the mode is restored
    peft_model.eval()
    ids = processor.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(first, peft_model.encode_text(ids["input_ids"], ids["attention_mask"]))


def test_text_only_datasets_and_missing_columns(hysac, processor):
    rows = datasets.Dataset.from_dict({"safe_text": ["a cat", "a dog"], "unsafe_text": ["x a cat", "x a dog"]})
    cache = encode_quadruplets(hysac, processor, rows, show_progress=False)
    assert sorted(cache.embeds) == ["S", "U"] and cache.tags is None
    with pytest.raises(UsageError, match="lacks column"):
        encode_quadruplets(hysac, processor, rows, kinds=["S", "V"], show_progress=False)
    with pytest.raises(UsageError, match="none of the columns"):
        encode_quadruplets(hysac, processor, datasets.Dataset.from_dict({"text": ["a"]}), show_progress=False)
    with pytest.raises(UsageError, match="empty"):
        encode_quadruplets(hysac, processor, rows.select([]), show_progress=False)


def test_nan_weights_are_reported_not_cached(hysac, processor):
    with torch.no_grad():
        hysac.text_projection.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf embeddings for 2 safe text rows"):
        encode_texts(hysac, processor, ["a cat", "a dog"], show_progress=False)


def small_cache(seed: int = 0, n: int = 5) -> EmbeddingCache:
    g = torch.Generator().manual_seed(seed)
    return EmbeddingCache(
        embeds={k: torch.randn(n, 4, generator=g) for k in "SVUG"},
        curvature=1.3,
        bounds=None,
        traversal_offset=0.7,
        tags=[f"t{i % 2}" for i in range(n)],
        source={"dataset": "x"},
    )


def test_cache_round_trip_and_refusals(tmp_path):
    cache = small_cache()
    cache.save(tmp_path / "c")
    loaded = EmbeddingCache.load(tmp_path / "c")
    assert all(torch.equal(loaded.embeds[k], cache.embeds[k]) for k in "SVUG")
    assert (loaded.curvature, loaded.traversal_offset, loaded.tags) == (1.3, 0.7, cache.tags)
    # A folder whose parts come from two different caches is refused.
    small_cache(seed=1).save(tmp_path / "other")
    (tmp_path / "c" / CACHE_FILE).write_bytes((tmp_path / "other" / CACHE_FILE).read_bytes())
    with pytest.raises(UsageError, match="does not match"):
        EmbeddingCache.load(tmp_path / "c")
    # Metadata that disagrees with the matrices (no checksum to catch it first).
    meta = json.loads((tmp_path / "other" / META_FILE).read_text())
    meta.pop("sha256")
    meta["num_rows"] = 7
    (tmp_path / "other" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(UsageError, match="says 7 rows but"):
        EmbeddingCache.load(tmp_path / "other")
    with pytest.raises(UsageError, match="not an embedding cache"):
        EmbeddingCache.load(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a folder"):
        cache.save(tmp_path / "file")


def test_cache_written_by_the_first_release_still_loads(tmp_path):
    from safetensors.torch import save_file

    cache = small_cache()
    save_file(cache.embeds, tmp_path / CACHE_FILE)
    legacy = {"curv": 1.3, "bounds": None, "traversal_alpha": 0.7, "tags": None, "num_rows": 5, "source": {}}
    (tmp_path / META_FILE).write_text(json.dumps(legacy))
    loaded = EmbeddingCache.load(tmp_path)
    assert loaded.curvature == 1.3 and loaded.traversal_offset == 0.7


def test_a_crash_while_saving_leaves_the_old_cache(tmp_path, monkeypatch):
    from hysac_hf import encode

    old = small_cache(seed=0)
    old.save(tmp_path / "c")
    real = encode.save_file

    def crash(tensors, path):
        real(tensors, path)  # the new matrices are fully written...
        raise KeyboardInterrupt  # ...and the process dies before the metadata

    monkeypatch.setattr(encode, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        small_cache(seed=1).save(tmp_path / "c")
    loaded = EmbeddingCache.load(tmp_path / "c")
    assert torch.equal(loaded.embeds["S"], old.embeds["S"])
    # no temporary folder left behind; only the writers' (empty) lock file beside the cache, as lock files must stay
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c.lock", "c"] and (tmp_path / ".c.lock").stat().st_size == 0


@pytest.mark.slow
@pytest.mark.main_line
def test_two_processes_write_the_same_cache_as_one(model_dir, tmp_path):
    """`accelerate launch --num_processes 2 hysac-eval embed ...` (CPU, gloo) equals one process, rows in order."""
    embed = ["-m", "hysac_hf.evaluation.cli", "embed", "--model", model_dir, "--dataset", "mini-visu"]
    embed += ["--split", "test", "--max_samples", "13", "--batch_size", "4"]
    single = run_on_cpu_processes([*embed, "--output", tmp_path / "one"], num_processes=1)
    assert single.returncode == 0, single.stderr[-2000:]
    double = run_on_cpu_processes([*embed, "--output", tmp_path / "two"], num_processes=2)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = EmbeddingCache.load(tmp_path / "one"), EmbeddingCache.load(tmp_path / "two")
    assert two.num_rows == one.num_rows == 13 and two.tags == one.tags
    for key in "SVUG":
        assert torch.equal(two.embeds[key], one.embeds[key])  # same batches, same padding: bit for bit
    # 13 rows in batches of 4 on 2 processes: uneven shares, no row duplicated or lost.
    assert json.loads(double.stdout)["num_rows"] == 13
