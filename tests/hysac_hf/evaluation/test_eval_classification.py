"""Unsafe classification: metrics by hand, sweeps, plots, and the bundled `evaluate` metric modules loaded offline
(threshold calibration is tested with `hysac_hf.calibration`, in tests/hysac_hf/test_calibration.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hysac_hf.evaluation import metric_path
from hysac_hf.evaluation.classification import (
    classification_metrics,
    plot_sweep,
    sweep_to_markdown,
    threshold_sweep,
)


def test_metrics_by_hand():
    scores = [0.1, 0.4, 0.5, 0.7, 0.9, 0.3]
    labels = [0, 0, 1, 1, 1, 1]
    m = classification_metrics(scores, labels, 0.35)
    # predicted unsafe: 0.4, 0.5, 0.7, 0.9 -> fp 1 (0.4), tn 1, tp 3, fn 1 (0.3)
    assert (m["tp"], m["tn"], m["fp"], m["fn"]) == (3, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(4 / 6) and m["fpr"] == 0.5 and m["fnr"] == 0.25
    # strict rule: a score equal to the threshold is safe
    assert classification_metrics([0.5], [1], 0.5)["fnr"] == 1.0


def test_sweep_markdown_and_plot(tmp_path):
    scores = np.array([0.50, 0.515, 0.52, 0.525, 0.535, 0.545, 0.56])
    labels = np.array([0, 0, 1, 0, 1, 1, 1])
    sweep = threshold_sweep(scores, labels, [0.51, 0.52, 0.53, 0.54, 0.55])
    assert [round(r["fpr"], 4) for r in sweep] == [round(2 / 3, 4), round(1 / 3, 4), 0.0, 0.0, 0.0]
    assert [r["fnr"] for r in sweep] == [0.0, 0.25, 0.25, 0.5, 0.75]
    md = sweep_to_markdown(sweep)
    assert "| 0.5300 | 85.7 | 0.0 | 25.0 |" in md
    from matplotlib.image import imread

    path = plot_sweep(sweep, tmp_path / "sweep.png", marks={"calibrated": 0.53})
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0


def test_evaluate_metric_modules_load_offline(monkeypatch):
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    recall = evaluate.load(metric_path("recall_at_k"))
    rankings = [[4, 2, 0, 1, 3], [4, 2, 1, 0, 3], [4, 2, 0, 1, 3], [4, 2, 1, 0, 3], [4, 2, 0, 1, 3]]
    got = recall.compute(predictions=rankings, references=[0, 1, 2, 3, 4], k=[1, 2, 3, 4, 5])
    # ranks of the targets: 2, 2, 1, 4, 0
    assert got == {"R@1": 20.0, "R@2": 40.0, "R@3": 80.0, "R@4": 80.0, "R@5": 100.0}
    for preds, refs in zip(rankings, [0, 1, 2, 3, 4]):
        recall.add(predictions=preds, references=refs)
    assert recall.compute(k=[3]) == {"R@3": 80.0}
    with pytest.raises(ValueError, match="R@6"):
        recall.compute(predictions=rankings, references=[0, 1, 2, 3, 4], k=[6])
    clf = evaluate.load(metric_path("unsafe_classification"))
    preds, refs = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 1]
    got = clf.compute(predictions=preds, references=refs)
    m = classification_metrics(np.array(preds, float), refs, 0.5)
    assert got == pytest.approx({"accuracy": 100 * m["accuracy"], "fpr": 100 * m["fpr"], "fnr": 100 * m["fnr"]})
    assert got == pytest.approx({"accuracy": 50.0, "fpr": 50.0, "fnr": 50.0})
