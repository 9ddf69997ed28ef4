"""Unsafe (NSFW) classification by distance to the root: metrics, threshold calibration, Table-6 sweeps.

Decision rule: an item is *unsafe* when its score (the model's `distance_to_root`, the raw hyperbolic distance
of its embedding to the root) is strictly greater than the threshold. Labels: 1 = unsafe (positive class),
0 = safe. Rates are fractions in `[0, 1]` here; the CLI and tables print percentages.

- accuracy = correct / all
- FPR = safe items flagged unsafe / safe items (0 when there are no safe items)
- FNR = unsafe items let through / unsafe items (0 when there are no unsafe items)
- F1 = 2 TP / (2 TP + FP + FN), unsafe as the positive class (0 when there is nothing to find and nothing flagged)

Choosing a threshold from labelled scores is calibration: `hysac_hf.calibration.calibrate_threshold`.

The paper's thresholds (0.51-0.55, Tables 5 and 6) are on an undocumented scale, probably a normalised
distance; they do not transfer to raw distances. Calibrate on labelled data instead
(`hysac_hf.calibration.calibrate_threshold`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def check_labelled_scores(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """`(N,)` float64 scores and int64 labels (0 safe, 1 unsafe) as numpy arrays, checked: paired, non-empty, finite.

    Raises:
        ValueError: naming what is wrong.
    """
    scores = np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.shape[0]} scores but {labels.shape[0]} labels; they must pair up")
    if scores.size == 0:
        raise ValueError("no scores given; classification metrics need at least one labelled item")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or Inf; check the embeddings")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 (safe) or 1 (unsafe), got values {sorted(set(labels.tolist()))[:10]}")
    return scores, labels.astype(np.int64)


def confusion_metrics(predictions, labels) -> dict[str, float]:
    """Accuracy, F1 (of the unsafe class), FPR, FNR (fractions) and the confusion counts for binary predictions
    (1 = unsafe)."""
    pred = np.asarray(predictions).reshape(-1).astype(np.int64)
    lab = np.asarray(labels).reshape(-1).astype(np.int64)
    if pred.shape != lab.shape:
        raise ValueError(f"{pred.shape[0]} predictions but {lab.shape[0]} labels")
    tp = int(((pred == 1) & (lab == 1)).sum())
    tn = int(((pred == 0) & (lab == 0)).sum())
    fp = int(((pred == 1) & (lab == 0)).sum())
    fn = int(((pred == 0) & (lab == 1)).sum())
    total = max(tp + tn + fp + fn, 1)
    return {
        "accuracy": (tp + tn) / total,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
        "fpr": fp / (fp + tn) if fp + tn else 0.0,
        "fnr": fn / (fn + tp) if fn + tp else 0.0,
        "tp": tp,
        "tn": tn,
        "fp": fp,
        "fn": fn,
    }


def classification_metrics(scores, labels, threshold: float) -> dict[str, float]:
    """Metrics of the rule `score > threshold` -> unsafe.

    Args:
        scores: `(N,)` unsafe scores (distances to the root).
        labels: `(N,)` 0 safe / 1 unsafe.
        threshold: decision threshold.
    Returns:
        `{"threshold", "accuracy", "f1", "fpr", "fnr", "tp", "tn", "fp", "fn"}`.
    """
    scores, labels = check_labelled_scores(scores, labels)
    return {"threshold": float(threshold), **confusion_metrics(scores > threshold, labels)}


def threshold_sweep(scores, labels, thresholds: Sequence[float] | None = None, num: int = 50) -> list[dict[str, float]]:
    """Table-6-style sweep: metrics at each threshold (default: `num` evenly spaced over the score range)."""
    scores, labels = check_labelled_scores(scores, labels)
    if thresholds is None:
        thresholds = np.linspace(scores.min(), scores.max(), num)
    return [classification_metrics(scores, labels, float(t)) for t in thresholds]


def sweep_to_markdown(sweep: Sequence[dict], title: str = "") -> str:
    """Markdown table of a sweep in percent, like the paper's Table 6."""
    lines = ([title, ""] if title else []) + ["| threshold | Acc | FPR | FNR |", "|---|---|---|---|"]
    for row in sweep:
        lines.append(
            f"| {row['threshold']:.4f} | {100 * row['accuracy']:.1f} | {100 * row['fpr']:.1f} | {100 * row['fnr']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot_sweep(
    sweep: Sequence[dict],
    path: str | os.PathLike,
    title: str = "Unsafe classification",
    marks: dict[str, float] | None = None,
) -> Path:
    """Plot Acc/FPR/FNR (%) against the threshold to a PNG; `marks` draws labelled vertical lines.

    Draws on a `matplotlib.figure.Figure` (no global backend switch).
    """
    from matplotlib.figure import Figure

    t = [r["threshold"] for r in sweep]
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot()
    for key, label in (("accuracy", "accuracy"), ("fpr", "false-positive rate"), ("fnr", "false-negative rate")):
        ax.plot(t, [100 * r[key] for r in sweep], label=label)
    for name, value in (marks or {}).items():
        ax.axvline(value, color="gray", linestyle="--", linewidth=1)
        ax.text(value, 101, name, rotation=90, va="bottom", ha="center", fontsize=7)
    ax.set_xlabel("threshold on the distance to the root (unsafe if above)")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.legend(loc="center right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


__all__ = [
    "check_labelled_scores",
    "classification_metrics",
    "confusion_metrics",
    "plot_sweep",
    "sweep_to_markdown",
    "threshold_sweep",
]
