"""Unsafe (NSFW) classification by distance to the root: metrics, threshold calibration, Table-6 sweeps.

Decision rule: an item is *unsafe* when its score (the model's `unsafe_score`, the raw hyperbolic distance
of its embedding to the root) is strictly greater than the threshold. Labels: 1 = unsafe (positive class),
0 = safe. Rates are fractions in `[0, 1]` here; the CLI and tables print percentages.

- accuracy = correct / all
- FPR = safe items flagged unsafe / safe items (0 when there are no safe items)
- FNR = unsafe items let through / unsafe items (0 when there are no unsafe items)

The paper's thresholds (0.51-0.55, Tables 5 and 6) are on an undocumented scale, probably a normalised
distance; they do not transfer to raw distances. Calibrate on labelled data instead
(:func:`calibrate_threshold`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

logger = logging.getLogger(__name__)


def _as_arrays(scores, labels) -> tuple[np.ndarray, np.ndarray]:
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
    """Accuracy, FPR, FNR (fractions) and the confusion counts for binary predictions (1 = unsafe)."""
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
        `{"threshold", "accuracy", "fpr", "fnr", "tp", "tn", "fp", "fn"}`.
    """
    scores, labels = _as_arrays(scores, labels)
    return {"threshold": float(threshold), **confusion_metrics(scores > threshold, labels)}


def calibrate_threshold(
    scores,
    labels,
    objective: Literal["accuracy", "fpr"] = "accuracy",
    target_fpr: float = 0.05,
) -> dict[str, float]:
    """Choose the threshold from labelled scores.

    - `objective="accuracy"`: the threshold of best accuracy. All distinct cut points are tried at once
      (sorting, no loop); among equally accurate cuts the lowest FNR wins, then the lowest threshold. The
      threshold returned is the midpoint between the two scores around the cut, so that the calibration
      data is classified exactly as evaluated.
    - `objective="fpr"`: the lowest threshold whose FPR on the data is `<= target_fpr` (this minimises FNR
      under the FPR constraint).

    Args:
        scores: `(N,)` unsafe scores.
        labels: `(N,)` 0 safe / 1 unsafe.
        objective: `"accuracy"` or `"fpr"`.
        target_fpr: the FPR bound for `objective="fpr"`, in `[0, 1]`.
    Returns:
        :func:`classification_metrics` of the chosen threshold, plus `"objective"`.
    """
    scores, labels = _as_arrays(scores, labels)
    if objective == "fpr":
        if not 0.0 <= target_fpr <= 1.0:
            raise ValueError(f"target_fpr must be a fraction in [0, 1], got {target_fpr}")
        safe = np.sort(scores[labels == 0])[::-1]
        if safe.size == 0:
            raise ValueError("objective='fpr' needs safe (label 0) items to measure false positives")
        allowed = int(np.floor(target_fpr * safe.size + 1e-9))
        # With threshold = the (allowed+1)-th largest safe score, at most `allowed` safe scores are above it.
        threshold = safe[allowed] if allowed < safe.size else np.nextafter(scores.min(), -np.inf)
    elif objective == "accuracy":
        cuts = np.unique(scores)  # predict unsafe iff score > cut
        cuts = np.concatenate([[np.nextafter(cuts[0], -np.inf)], cuts])
        safe_sorted, unsafe_sorted = np.sort(scores[labels == 0]), np.sort(scores[labels == 1])
        true_neg = np.searchsorted(safe_sorted, cuts, side="right")  # safe <= cut
        false_neg = np.searchsorted(unsafe_sorted, cuts, side="right")  # unsafe <= cut
        correct = true_neg + (unsafe_sorted.size - false_neg)
        # Best accuracy; ties: fewest false negatives (lowest cut), which lexsort picks by cut order.
        best = int(np.lexsort((np.arange(cuts.size), false_neg, -correct))[0])
        upper = cuts[best + 1] if best + 1 < cuts.size else cuts[best] + 1.0
        threshold = 0.5 * (cuts[best] + upper) if best > 0 else cuts[best]
        if best > 0 and not cuts[best] <= threshold < upper:  # pragma: no cover - float midpoint safeguard
            threshold = cuts[best]
    else:
        raise ValueError(f"objective must be 'accuracy' or 'fpr', got {objective!r}")
    metrics = classification_metrics(scores, labels, float(threshold))
    metrics["objective"] = objective if objective == "accuracy" else f"fpr<={target_fpr}"
    return metrics


def threshold_sweep(scores, labels, thresholds: Sequence[float] | None = None, num: int = 50) -> list[dict[str, float]]:
    """Table-6-style sweep: metrics at each threshold (default: `num` evenly spaced over the score range)."""
    scores, labels = _as_arrays(scores, labels)
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


def save_thresholds(model_dir: str | os.PathLike, thresholds: dict[str, float]) -> dict[str, float]:
    """Store calibrated thresholds in a saved model folder's config (`unsafe_thresholds`), through `HySACConfig`,
    keeping the other fields and the other modality's threshold. Returns the stored mapping."""
    from ..calibration import write_config_fields
    from ..cli import UsageError
    from ..modeling.configuration_hysac import HySACConfig

    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise UsageError(f"{config_path} not found; --save needs a local model folder written by save_pretrained")
    config = HySACConfig.from_pretrained(model_dir)
    merged = dict(config.unsafe_thresholds or {})
    merged.update({k: float(v) for k, v in thresholds.items()})
    stored = write_config_fields(model_dir, unsafe_thresholds=merged).unsafe_thresholds
    logger.info("Stored unsafe_thresholds=%s in %s", stored, config_path)
    return stored


__all__ = [
    "calibrate_threshold",
    "classification_metrics",
    "confusion_metrics",
    "plot_sweep",
    "save_thresholds",
    "sweep_to_markdown",
    "threshold_sweep",
]
