"""Bounds calibration against numpy percentiles and hand-computed distances to the root."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hysac_hf import HySACModel
from hysac_hf.calibration import embed_distances, fit_bounds, main
from hysac_hf.data import QuadrupletCollator, load_mini_visu


def test_fit_bounds_matches_numpy_percentiles():
    rng = np.random.default_rng(0)
    distances = {key: rng.gamma(shape=2.0 + i, scale=0.3, size=37 + i) for i, key in enumerate("SVUG")}
    bounds = fit_bounds(distances)
    for key, values in distances.items():
        assert bounds[key]["avg"] == pytest.approx(values.mean(), abs=1e-12)
        assert bounds[key]["up_95"] == pytest.approx(np.percentile(values, 95), abs=1e-12)
        assert bounds[key]["low_05"] == pytest.approx(np.percentile(values, 5), abs=1e-12)


def test_fit_bounds_rejects_bad_input():
    good = {key: np.ones(3) for key in "SVUG"}
    with pytest.raises(ValueError, match="lacks content type"):
        fit_bounds({k: v for k, v in good.items() if k != "G"})
    with pytest.raises(ValueError, match="empty"):
        fit_bounds({**good, "U": np.array([])})
    with pytest.raises(ValueError, match="non-finite"):
        fit_bounds({**good, "V": np.array([1.0, np.nan])})


def test_embed_distances_match_hand_computed_radii(hysac, processor):
    dataset = load_mini_visu("validation", max_samples=5)
    distances = embed_distances(hysac, processor, dataset, batch_size=3, show_progress=False)
    batch = QuadrupletCollator(processor)([dataset[i] for i in range(5)])
    with torch.no_grad():
        image = hysac.get_image_features(batch["pixel_values"]).double().numpy()
        text = hysac.get_text_features(batch["input_ids"]).double().numpy()
    c = hysac.curvature.item()
    radius = lambda x: np.arcsinh(np.sqrt(c) * np.linalg.norm(x, axis=1)) / np.sqrt(c)
    np.testing.assert_allclose(distances["V"], radius(image[:5]), rtol=1e-5)
    np.testing.assert_allclose(distances["G"], radius(image[5:]), rtol=1e-5)
    np.testing.assert_allclose(distances["S"], radius(text[:5]), rtol=1e-5)
    np.testing.assert_allclose(distances["U"], radius(text[5:]), rtol=1e-5)


def test_cli_writes_bounds_into_config_and_histogram(hysac, processor, tmp_path, capsys):
    hysac.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    main(["--model", str(tmp_path), "--max_samples", "6", "--batch_size", "4", "--histogram", str(tmp_path / "h.png")])
    printed = json.loads(capsys.readouterr().out)
    stored = json.loads((tmp_path / "config.json").read_text())["bounds"]
    assert stored == printed
    reloaded = HySACModel.from_pretrained(tmp_path)
    assert reloaded.config.bounds == printed
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    expected = embed_distances(hysac, processor, load_mini_visu("validation", max_samples=6), show_progress=False)
    assert printed["G"]["avg"] == pytest.approx(expected["G"].double().mean().item(), rel=1e-6)


def test_cli_explains_a_missing_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        main(["--model", str(tmp_path / "nope")])
