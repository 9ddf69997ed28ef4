"""Embedding cache and the `hysac-eval` command line end to end on the tiny model (offline)."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from hysac_hf.modeling.lorentz import dist_to_origin

from hysac_hf import HySACModel
from hysac_hf.evaluation.classification import calibrate_threshold
from hysac_hf.evaluation.cli import main
from hysac_hf.evaluation.embed import EmbeddingCache, embed_dataset, open_quadruplets
from hysac_hf.evaluation.retrieval import evaluate_retrieval


@pytest.fixture()
def model_dir(hysac, processor, tmp_path):
    path = tmp_path / "model"
    hysac.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def photo_dataset(photos, captions) -> datasets.Dataset:
    names = sorted(photos)[:4]
    rows = {
        "safe_image": [photos[n] for n in names],
        "unsafe_image": [photos[n].rotate(90) for n in names],
        "safe_text": [captions[n] for n in names],
        "unsafe_text": [f"a violent scene with {captions[n]}" for n in names],
        "tag": ["violence", "hate", "violence", "sexual"],
    }
    return datasets.Dataset.from_dict(
        rows,
        features=datasets.Features(
            {
                "safe_image": datasets.Image(),
                "unsafe_image": datasets.Image(),
                "safe_text": datasets.Value("string"),
                "unsafe_text": datasets.Value("string"),
                "tag": datasets.Value("string"),
            }
        ),
    )


@pytest.mark.slow
def test_embed_dataset_matches_direct_encoding(hysac, processor, photos, captions, tmp_path):
    dataset = photo_dataset(photos, captions)
    cache = embed_dataset(hysac, processor, dataset, batch_size=3, show_progress=False)
    assert sorted(cache.embeds) == ["G", "S", "U", "V"] and cache.num_rows == 4
    assert cache.tags == ["violence", "hate", "violence", "sexual"]
    assert cache.curv == pytest.approx(1.7) and cache.bounds == hysac.config.bounds
    with torch.no_grad():
        images = processor(images=[im.convert("RGB") for im in dataset["unsafe_image"]], return_tensors="pt")
        expected_g = hysac.get_image_features(pixel_values=images["pixel_values"])
        texts = processor(text=list(dataset["safe_text"]), return_tensors="pt")
        expected_s = hysac.get_text_features(input_ids=texts["input_ids"], attention_mask=texts["attention_mask"])
    torch.testing.assert_close(cache.embeds["G"], expected_g, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.embeds["S"], expected_s, atol=1e-5, rtol=1e-5)
    cache.save(tmp_path / "cache")
    loaded = EmbeddingCache.load(tmp_path / "cache")
    assert all(torch.equal(loaded.embeds[k], cache.embeds[k]) for k in cache.embeds)
    assert loaded.tags == cache.tags and loaded.bounds == cache.bounds and loaded.curv == cache.curv
    # a text-only dataset embeds the texts and says what it skipped
    text_only = dataset.remove_columns(["safe_image", "unsafe_image"])
    assert sorted(embed_dataset(hysac, processor, text_only, show_progress=False).embeds) == ["S", "U"]
    with pytest.raises(ValueError, match="none of the columns"):
        embed_dataset(
            hysac, processor, dataset.remove_columns(["safe_image", "unsafe_image", "safe_text", "unsafe_text"])
        )
    with pytest.raises(FileNotFoundError, match="hysac-eval embed"):
        EmbeddingCache.load(tmp_path / "nothing")


def test_open_quadruplets_sources(photos, captions, tmp_path):
    dataset = photo_dataset(photos, captions)
    dataset.save_to_disk(str(tmp_path / "saved"))
    assert open_quadruplets(str(tmp_path / "saved")).num_rows == 4
    assert open_quadruplets(datasets.DatasetDict({"test": dataset}), "test", max_samples=2).num_rows == 2
    mini = open_quadruplets("mini-visu", "test", max_samples=5)
    assert {"safe_image", "unsafe_image", "safe_text", "unsafe_text", "tag"} <= set(mini.column_names)


@pytest.mark.slow
def test_cli_end_to_end(model_dir, photos, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    assert (
        main(
            [
                "embed",
                "--model",
                str(model_dir),
                "--dataset",
                "mini-visu",
                "--split",
                "test",
                "--max-samples",
                "12",
                "--batch-size",
                "8",
                "--output",
                str(cache_dir),
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["num_rows"] == 12
    cache = EmbeddingCache.load(cache_dir)
    assert sorted(cache.embeds) == ["G", "S", "U", "V"] and len(set(cache.tags)) > 1

    # retrieval: JSON on stdout and in a file, markdown file, same numbers as the library call
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    assert (
        main(
            [
                "retrieval",
                "--cache",
                str(cache_dir),
                "--ks",
                "1,5",
                "--method",
                "geodesic",
                "--bound",
                "avg",
                "--output-json",
                str(out_json),
                "--output-md",
                str(out_md),
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    expected = evaluate_retrieval(cache, ks=[1, 5], method="geodesic", bound="avg")
    assert printed["tasks"] == expected["tasks"] and json.loads(out_json.read_text())["tasks"] == expected["tasks"]
    assert "| T*->IuI* | 1 |" in out_md.read_text()

    # histogram: PNG plus the per-type statistics of the distance to the root
    png = tmp_path / "hist.png"
    assert main(["histogram", "--cache", str(cache_dir), "--output", str(png)]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert png.stat().st_size > 1000
    assert stats["G"]["avg"] == pytest.approx(dist_to_origin(cache.embeds["G"].double(), cache.curv).mean().item())

    # classify from the cache: calibrate, save into the model folder, reload
    assert (
        main(
            [
                "classify",
                "--cache",
                str(cache_dir),
                "--model",
                str(model_dir),
                "--calibrate",
                "accuracy",
                "--save",
                "--sweep",
                "auto",
                "--plot",
                str(tmp_path / "sweep.png"),
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    scores = dist_to_origin(torch.cat([cache.embeds["V"], cache.embeds["G"]]), cache.curv)
    labels = torch.cat([torch.zeros(12), torch.ones(12)]).long()
    assert result["calibrated"]["accuracy"] == pytest.approx(calibrate_threshold(scores, labels)["accuracy"])
    assert (tmp_path / "sweep.png").is_file()
    reloaded = HySACModel.from_pretrained(model_dir)
    assert reloaded.config.unsafe_thresholds["image"] == pytest.approx(result["calibrated"]["threshold"])

    # classify an image folder with the stored threshold
    folder = tmp_path / "images"
    names = sorted(photos)
    for i, name in enumerate(names):
        sub = folder / ("unsafe" if i % 2 else "safe")
        sub.mkdir(parents=True, exist_ok=True)
        photos[name].convert("RGB").save(sub / f"{name}.png")
    assert main(["classify", "--images", str(folder), "--model", str(model_dir)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_items"] == len(names) and result["num_unsafe"] == len(names) // 2
    assert result["at_threshold"]["threshold"] == pytest.approx(reloaded.config.unsafe_thresholds["image"])
    assert main(["classify", "--images", str(folder), "--model", str(model_dir), "--safe-class", "benign"]) == 2

    # zero-shot: the CLI's predictions are the argmax of the model's logits_per_image
    zs = tmp_path / "zs"
    for name in names[:3]:
        (zs / name).mkdir(parents=True)
        photos[name].convert("RGB").save(zs / name / "a.png")
    assert main(["zeroshot", "--model", str(model_dir), "--images", str(zs), "--template", "a photo of a {}."]) == 0
    result = json.loads(capsys.readouterr().out)
    from PIL import Image

    from hysac_hf import HySACProcessor

    processor = HySACProcessor.from_pretrained(model_dir)
    inputs = processor(
        text=[f"a photo of a {n}." for n in names[:3]],
        images=[Image.open(p) for p in result["images"]],
        return_tensors="pt",
    )
    with torch.no_grad():
        logits = reloaded(**inputs).logits_per_image
    predicted = [names[i] for i in logits.argmax(dim=1).tolist()]
    assert result["predictions"] == predicted
    assert result["accuracy"] == pytest.approx(100 * sum(p == n for p, n in zip(predicted, names[:3])) / 3)
