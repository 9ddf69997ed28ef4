"""Embedding cache and the `hysac-eval` command line end to end on the tiny model (offline)."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from hysac_hf.modeling.lorentz import dist_to_origin

from hysac_hf import HySACModel
from hysac_hf.encode import EmbeddingCache, encode_quadruplets
from hysac_hf.calibration import calibrate_threshold
from hysac_hf.errors import UsageError
from hysac_hf.evaluation.cli import main
from hysac_hf.evaluation.retrieval import evaluate_retrieval


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
def test_embed_a_datasets_image_dataset_with_tags(hysac, processor, photos, captions):
    dataset = photo_dataset(photos, captions)
    cache = encode_quadruplets(hysac, processor, dataset, batch_size=3, show_progress=False)
    assert sorted(cache.embeds) == ["G", "S", "U", "V"] and cache.num_rows == 4
    assert cache.tags == ["violence", "hate", "violence", "sexual"]
    assert cache.curvature == pytest.approx(1.7) and cache.bounds == hysac.config.bounds
    with torch.no_grad():
        images = processor(images=[im.convert("RGB") for im in dataset["unsafe_image"]], return_tensors="pt")
        expected_g = hysac.encode_image(images["pixel_values"])
    torch.testing.assert_close(cache.embeds["G"], expected_g, atol=1e-5, rtol=1e-5)


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
                "--max_samples",
                "12",
                "--batch-size",  # the dashed spelling of earlier releases still works
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
                "--output_json",
                str(out_json),
                "--output_md",
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
    assert stats["G"]["avg"] == pytest.approx(dist_to_origin(cache.embeds["G"].double(), cache.curvature).mean().item())

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
    scores = dist_to_origin(torch.cat([cache.embeds["V"], cache.embeds["G"]]), cache.curvature)
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
    assert main(["classify", "--images", str(folder), "--model", str(model_dir), "--safe_class", "benign"]) == 2
    # A stored threshold is never replaced silently.
    calibrate = ["classify", "--cache", str(cache_dir), "--model", str(model_dir), "--calibrate", "fpr", "--save"]
    assert main(calibrate) == 2
    assert "already has an unsafe threshold" in capsys.readouterr().err
    assert HySACModel.from_pretrained(model_dir).config.unsafe_thresholds == reloaded.config.unsafe_thresholds
    assert main([*calibrate, "--overwrite"]) == 0
    capsys.readouterr()

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


def test_bad_images_are_named_before_the_model_loads_or_skipped(model_dir, photos, tmp_path, capsys):
    zs = tmp_path / "zs"
    for name in ("cat", "coffee"):
        (zs / name).mkdir(parents=True)
        photos[name].convert("RGB").save(zs / name / "a.png")
    (zs / "cat" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    argv = ["zeroshot", "--images", str(zs)]
    assert main([*argv, "--model", str(tmp_path / "no" / "model")]) == 2  # the image fails first, the model never loads
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1 of the 3 images" in err and "b.png" in err and "--skip_bad_images" in err
    assert main([*argv, "--model", str(model_dir), "--skip_bad_images"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == [str(zs / "cat" / "a.png"), str(zs / "coffee" / "a.png")]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"safe_text": t, "safe_image": str(p)}) + "\n" for t, p in
                            (("a cat", zs / "cat" / "a.png"), ("broken", zs / "cat" / "b.png"))))  # fmt: skip
    embed = ["embed", "--model", str(model_dir), "--dataset", str(rows), "--output", str(tmp_path / "cache")]
    assert main(embed) == 2 and "cat/b.png" in capsys.readouterr().err
    assert main([*embed, "--skip_bad_images"]) == 0
    assert json.loads(capsys.readouterr().out)["num_rows"] == 1


def test_debug_shows_the_traceback_before_or_after_the_subcommand(tmp_path):
    for argv in (["retrieval", "--cache", str(tmp_path), "--debug"], ["--debug", "retrieval", "--cache", str(tmp_path)]):
        with pytest.raises(UsageError, match="is not an embedding cache"):
            main(argv)


def test_help_shows_one_spelling_per_flag(capsys):
    with pytest.raises(SystemExit):
        main(["embed", "--help"])
    out = capsys.readouterr().out
    assert "--batch_size" in out and "--max_samples" in out and "--batch-size" not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["retrieval", "--cache", "nowhere"], "is not an embedding cache"),
        (["retrieval", "--cache", "nowhere", "--ks", "1,x"], "--ks takes comma-separated integers"),
        (["retrieval", "--cache", "nowhere", "--tasks", "T->X"], "unknown task(s) ['T->X']"),
        (["histogram", "--cache", "nowhere", "--output", "/no/such/folder/h.png"], "does not exist"),
        (["embed", "--model", "m", "--dataset", "mini-visu", "--split", "dev", "--output", "o"], "splits"),
        (["embed", "--model", "m", "--dataset", "x.csv", "--output", "o", "--columns", "a=Z"], "unknown kind"),
        (["zeroshot", "--model", "m", "--images", "nowhere"], "image folder nowhere does not exist"),
        (["retrieval", "--cache", "nowhere", "--log_level", "WARNING"], "is not an embedding cache"),  # flag after
    ],
)
def test_input_errors_exit_2_with_one_line_and_write_nothing(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hysac-eval: error: ") and message in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
