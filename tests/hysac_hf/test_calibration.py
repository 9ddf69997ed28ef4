"""Bounds calibration against numpy percentiles and hand-computed distances to the root; `hysac-calibrate`; unsafe
thresholds against exhaustive search, and saving them into a model folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hysac_hf import HySACModel
from hysac_hf.calibration import (
    MIN_CALIBRATION_ROWS,
    calibrate_threshold,
    distance_stats,
    fit_bounds,
    main,
    plot_root_histogram,
    root_distances,
    save_thresholds,
)
from hysac_hf.data import QuadrupletCollator, load_mini_visu
from hysac_hf.encode import EmbeddingCache, encode_quadruplets
from hysac_hf.errors import UsageError
from hysac_hf.evaluation.classification import classification_metrics
from hysac_hf.testing import save_model_folder


def test_fit_bounds_matches_numpy_percentiles():
    rng = np.random.default_rng(0)
    distances = {key: rng.gamma(shape=2.0 + i, scale=0.3, size=37 + i) for i, key in enumerate("SVUG")}
    bounds = fit_bounds(distances)
    for key, values in distances.items():
        assert bounds[key]["avg"] == pytest.approx(values.mean(), abs=1e-12)
        assert bounds[key]["up_95"] == pytest.approx(np.percentile(values, 95), abs=1e-12)
        assert bounds[key]["low_05"] == pytest.approx(np.percentile(values, 5), abs=1e-12)
    # The statistics of the histogram are the same numbers (one implementation).
    stats = distance_stats(distances)
    assert all(stats[k][s] == bounds[k][s] for k in bounds for s in bounds[k])
    assert stats["G"]["count"] == 40 and stats["S"]["max"] == pytest.approx(distances["S"].max())


def test_fit_bounds_rejects_bad_input():
    good = {key: np.linspace(0.1, 1.0, MIN_CALIBRATION_ROWS) for key in "SVUG"}
    assert fit_bounds(good)["S"]["up_95"] == pytest.approx(np.percentile(good["S"], 95))
    with pytest.raises(ValueError, match=r"missing G \(unsafe image\)"):
        fit_bounds({k: v for k, v in good.items() if k != "G"})
    with pytest.raises(ValueError, match="empty"):
        fit_bounds({**good, "U": np.array([])})
    with pytest.raises(ValueError, match="non-finite"):
        fit_bounds({**good, "V": np.append(good["V"], np.nan)})
    # A single row gives avg = up_95 = low_05: refused, saying how many rows are needed.
    with pytest.raises(UsageError, match=f"has 1 rows; bounds need at least {MIN_CALIBRATION_ROWS}"):
        fit_bounds({key: np.array([0.5]) for key in "SVUG"})
    with pytest.raises(UsageError, match=f"at least {MIN_CALIBRATION_ROWS}"):
        fit_bounds({key: v[: MIN_CALIBRATION_ROWS - 1] for key, v in good.items()})


def test_root_distances_match_hand_computed_radii(hysac, processor):
    dataset = load_mini_visu("validation", max_samples=5)
    cache = encode_quadruplets(hysac, processor, dataset, batch_size=3, show_progress=False)
    distances = root_distances(cache)
    batch = QuadrupletCollator(processor, padding="max_length")([dataset[i] for i in range(5)])
    with torch.no_grad():
        image = hysac.encode_image(batch["pixel_values"]).double().numpy()
        text = hysac.encode_text(batch["input_ids"]).double().numpy()
    c = hysac.curvature.item()
    radius = lambda x: np.arcsinh(np.sqrt(c) * np.linalg.norm(x, axis=1)) / np.sqrt(c)
    np.testing.assert_allclose(distances["V"], radius(image[:5]), rtol=1e-5)
    np.testing.assert_allclose(distances["G"], radius(image[5:]), rtol=1e-5)
    np.testing.assert_allclose(distances["S"], radius(text[:5]), rtol=1e-5)
    np.testing.assert_allclose(distances["U"], radius(text[5:]), rtol=1e-5)
    assert list(distances) == ["S", "V", "U", "G"]


def test_histogram_is_a_png_and_leaves_the_backend_alone(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    distances = {key: torch.rand(30, dtype=torch.float64) + i for i, key in enumerate("SVUG")}
    path = plot_root_histogram(distances, tmp_path / "sub" / "h.png", bounds=fit_bounds(distances))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == backend


@pytest.fixture()
def model_folder(hysac, processor, tmp_path):
    """A saved HySAC folder without bounds."""
    hysac.config.bounds = None
    return save_model_folder(hysac, processor, tmp_path / "model")


def test_cli_writes_bounds_through_the_config_and_a_histogram(hysac, processor, model_folder, tmp_path, capsys):
    png = tmp_path / "h.png"
    code = main(["--model", str(model_folder), "--max_samples", "24", "--batch_size", "8", "--histogram", str(png)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    reloaded = HySACModel.from_pretrained(model_folder)
    assert reloaded.config.bounds == printed
    # Written by HySACConfig.save_pretrained: the rest of the config survives, auto_map included.
    stored = json.loads((model_folder / "config.json").read_text())
    assert stored["model_type"] == "hysac" and "AutoModel" in stored["auto_map"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cache = encode_quadruplets(hysac, processor, load_mini_visu("validation", max_samples=24), show_progress=False)
    expected = root_distances(cache)["G"].mean().item()
    assert printed["G"]["avg"] == pytest.approx(expected, rel=1e-5)


def test_cli_never_replaces_bounds_silently(model_folder, capsys):
    args = ["--model", str(model_folder), "--max_samples", "20", "--batch_size", "10"]
    assert main(args) == 0
    first = json.loads((model_folder / "config.json").read_text())["bounds"]
    capsys.readouterr()
    before = (model_folder / "config.json").read_text()
    assert main(args + ["--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "already has bounds" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (model_folder / "config.json").read_text() == before  # untouched
    assert main(args + ["--split", "test", "--overwrite"]) == 0
    new = json.loads((model_folder / "config.json").read_text())["bounds"]
    assert new != first
    assert f"{first['S']['avg']:.4f} -> {new['S']['avg']:.4f}" in capsys.readouterr().err  # old -> new is shown


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max_samples", "1"], "has 1 rows; bounds need at least 20"),
        (["--split", "dev"], "splits"),
        (["--columns", "caption=Q"], "unknown kind of content 'Q'"),
        (["--dataset", "missing.jsonl"], "does not exist"),
        (["--histogram", "/nonexistent/folder/h.png"], "does not exist"),
    ],
)
def test_cli_input_errors_are_one_line_and_write_nothing(model_folder, capsys, args, message):
    before = sorted(p.name for p in model_folder.iterdir())
    config = (model_folder / "config.json").read_text()
    assert main(["--model", str(model_folder), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("hysac-calibrate: error: ") and message in err
    assert sorted(p.name for p in model_folder.iterdir()) == before
    assert (model_folder / "config.json").read_text() == config


def test_cli_explains_a_missing_model_folder(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    with pytest.raises(UsageError, match="config.json"):
        main(["--model", str(tmp_path / "nope"), "--debug"])


def test_calibration_reads_a_cache(hysac):
    g = torch.Generator().manual_seed(0)
    embeds = {k: 0.1 * (i + 1) * torch.randn(25, 32, generator=g) for i, k in enumerate("SVUG")}
    cache = EmbeddingCache(embeds=embeds, curvature=1.7)
    distances = root_distances(cache)
    expected = torch.asinh(1.7**0.5 * embeds["U"].double().norm(dim=-1)) / 1.7**0.5
    torch.testing.assert_close(distances["U"], expected)


# ------------------------------------------------------------------------------------------------------------
# Unsafe thresholds
def brute_force_best_accuracy(scores, labels):
    candidates = np.concatenate([[scores.min() - 1], np.sort(scores)])
    return max(((np.mean((scores > t) == labels), t) for t in candidates), key=lambda x: x[0])[0]


@pytest.mark.parametrize("seed", range(5))
def test_calibrate_best_accuracy_matches_exhaustive_search(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(1.0 + 0.6 * labels, 0.4), 2)  # rounding creates ties
    cal = calibrate_threshold(scores, labels, "accuracy")
    assert cal["accuracy"] == pytest.approx(brute_force_best_accuracy(scores, labels))
    # the threshold lies strictly between two scores, so re-applying it gives the same metrics
    assert not np.any(scores == cal["threshold"])


def test_calibrate_target_fpr():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(200, int), np.ones(100, int)]
    scores = np.r_[rng.normal(1.0, 0.3, 200), rng.normal(1.8, 0.3, 100)]
    for target in (0.0, 0.01, 0.05, 0.2):
        cal = calibrate_threshold(scores, labels, "fpr", target_fpr=target)
        assert cal["fpr"] <= target
        # lowest such threshold: one step lower (the next safe score below) breaks the FPR bound
        lower = scores[labels == 0][scores[labels == 0] < cal["threshold"]].max()
        assert classification_metrics(scores, labels, lower)["fpr"] > target
    assert calibrate_threshold(scores, labels, "fpr", target_fpr=1.0)["fnr"] == 0.0
    with pytest.raises(ValueError, match="target_fpr"):
        calibrate_threshold(scores, labels, "fpr", target_fpr=5)
    with pytest.raises(ValueError, match="labels must be 0"):
        calibrate_threshold(scores, labels + 1)
    with pytest.raises(ValueError, match="NaN"):
        calibrate_threshold([np.nan, 1.0], [0, 1])


def test_save_thresholds_into_model_folder(hysac, tmp_path):
    hysac.save_pretrained(tmp_path)
    stored = save_thresholds(tmp_path, {"image": 1.25})
    assert stored == {"image": 1.25}
    save_thresholds(tmp_path, {"text": 0.5})
    reloaded = HySACModel.from_pretrained(tmp_path)
    assert reloaded.config.unsafe_thresholds == {"image": 1.25, "text": 0.5}
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "hysac"
    with pytest.raises(ValueError, match="config.json not found"):
        save_thresholds(tmp_path / "nope", {"image": 1.0})
