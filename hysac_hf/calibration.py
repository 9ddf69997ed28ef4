"""Calibration: the bounds and the unsafe thresholds a model stores in its config, fitted on labelled embeddings.

- Bounds (`config.bounds`): the one place where the bounds' statistics are computed (mean `avg`, 95th percentile `up_95`, 5th percentile
`low_05` of the geodesic distance to the root, per kind S/V/U/G; docs/method.md §5) and where the distance
histogram (the paper's Figure 2) is drawn. The authors never released how `hysac_bounds.json` was computed; these
are the statistics their code reads.
- Unsafe thresholds (`config.unsafe_thresholds`): :func:`calibrate_threshold` chooses one from labelled distances to
  the root (best accuracy, or the lowest false-negative rate under a false-positive bound), :func:`calibrate_thresholds`
  one per modality from a quadruplet cache, :func:`threshold_quality` says how well they separate safe from unsafe,
  :func:`save_thresholds` stores them in a saved folder; the metrics are `evaluation.classification`'s.

Command line::

    hysac-calibrate --model out/hysac/model --dataset mini-visu --split validation [--histogram bounds.png]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from .errors import UsageError
from .evaluation.classification import check_labelled_scores, classification_metrics
from .encode import EmbeddingCache
from .modeling.configuration_hysac import BOUND_KEYS, CONTENT, CONTENT_KINDS, SAFE_KIND, UNSAFE_KIND, HySACConfig
from .modeling.lorentz import dist_to_origin

logger = logging.getLogger(__name__)

# The 5th and 95th percentiles need at least 1 / 0.05 = 20 values to lie between data points rather than on the
# extremes; with fewer rows the bounds would be degenerate (one row gives avg = up_95 = low_05).
MIN_CALIBRATION_ROWS = 20
COLOURS = {"S": "tab:green", "V": "tab:blue", "U": "tab:orange", "G": "tab:red"}


def root_distances(cache: EmbeddingCache) -> dict[str, Tensor]:
    """`{key: (N,) float64 geodesic distances to the root}` for every kind in the cache, in vocabulary order."""
    return {
        kind.key: dist_to_origin(cache.embeds[kind.key].double(), cache.curvature)
        for kind in CONTENT_KINDS
        if kind.key in cache.embeds
    }


def distance_stats(distances: dict[str, Tensor | np.ndarray]) -> dict[str, dict[str, float]]:
    """Mean, 5th/95th percentiles (linear interpolation), min, max and count of each kind's distances.

    Raises:
        ValueError: an empty or non-finite set of distances (naming the kind).
    """
    stats = {}
    for key, values in distances.items():
        values = torch.as_tensor(values, dtype=torch.float64).flatten()
        if values.numel() == 0:
            raise ValueError(f"no distances for {key} ({CONTENT[key].name}): the split is empty")
        if not torch.isfinite(values).all():
            raise ValueError(f"non-finite distances for {key} ({CONTENT[key].name}); the embeddings contain NaN/Inf")
        stats[key] = {
            "avg": values.mean().item(),
            "up_95": torch.quantile(values, 0.95).item(),
            "low_05": torch.quantile(values, 0.05).item(),
            "min": values.min().item(),
            "max": values.max().item(),
            "count": int(values.numel()),
        }
    return stats


def fit_bounds(
    distances: dict[str, Tensor | np.ndarray], min_rows: int = MIN_CALIBRATION_ROWS
) -> dict[str, dict[str, float]]:
    """`{"S"|"V"|"U"|"G": {"avg", "up_95", "low_05"}}` from distances to the root.

    Args:
        distances: kind key -> `(N,)` distances, for all four kinds.
        min_rows: refuse fewer rows than this (default 20; see :data:`MIN_CALIBRATION_ROWS`).
    Raises:
        ValueError: a missing kind, too few rows (saying how many are needed), NaN/Inf.
    """
    missing = [k for k in BOUND_KEYS if k not in distances]
    if missing:
        raise ValueError(
            f"bounds need all four kinds; missing {', '.join(f'{k} ({CONTENT[k].name})' for k in missing)}"
        )
    stats = distance_stats({k: distances[k] for k in BOUND_KEYS})
    rows = min(s["count"] for s in stats.values())
    if rows < min_rows:
        raise UsageError(
            f"the calibration split has {rows} rows; bounds need at least {min_rows} (the 5th and 95th percentiles "
            "are not meaningful below 1/0.05 rows). Use a larger split (e.g. --split validation) or more data"
        )
    return {k: {stat: stats[k][stat] for stat in ("avg", "up_95", "low_05")} for k in BOUND_KEYS}


def plot_root_histogram(
    distances: dict[str, Tensor | np.ndarray],
    path: str | os.PathLike,
    bounds: dict[str, dict[str, float]] | None = None,
    bins: int = 60,
    title: str = "Distance from the root",
) -> Path:
    """Overlaid histograms of the distance to the root per kind (Figure 2), as a PNG.

    Draws on a `matplotlib.figure.Figure` (no global backend switch). With `bounds`, each kind's mean (solid) and
    95th percentile (dashed) are drawn in its colour.
    """
    from matplotlib.figure import Figure

    if not distances:
        raise ValueError("no distances to plot")
    arrays = {k: np.asarray(torch.as_tensor(v, dtype=torch.float64)) for k, v in distances.items()}
    joint = np.concatenate(list(arrays.values()))
    upper = joint.max() if joint.max() > joint.min() else joint.min() + 1e-6
    edges = np.linspace(joint.min(), upper, bins + 1)
    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.add_subplot()
    for key, values in arrays.items():
        kind = CONTENT[key]
        ax.hist(values, bins=edges, alpha=0.45, color=COLOURS[key], label=f"{key}: {kind.name} (n={values.size})")
        if bounds and key in bounds:
            ax.axvline(bounds[key]["avg"], color=COLOURS[key], linestyle="-", linewidth=1)
            ax.axvline(bounds[key]["up_95"], color=COLOURS[key], linestyle="--", linewidth=1)
    ax.set_xlabel("geodesic distance to the root")
    ax.set_ylabel("count")
    ax.set_title(title + (" (line: mean, dashed: 95th percentile)" if bounds else ""), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    logger.debug("wrote the distance histogram to %s", path)
    return path


def calibrate(cache: EmbeddingCache, histogram_path: str | os.PathLike | None = None) -> dict[str, dict[str, float]]:
    """Bounds from an embedding cache of all four kinds (and optionally the histogram PNG)."""
    cache.require(*BOUND_KEYS)
    distances = root_distances(cache)
    bounds = fit_bounds(distances)
    if histogram_path:
        plot_root_histogram(distances, histogram_path, bounds=bounds, title="Calibration split: distance from the root")
    return bounds


def calibrate_thresholds(cache: EmbeddingCache, objective: str = "accuracy") -> dict[str, float]:
    """Unsafe-classification thresholds from the safe and unsafe rows of a quadruplet cache.

    For each modality, the distances to the root of its safe kind (V, S) are the negatives and those of its unsafe
    kind (G, U) the positives; the threshold is :func:`calibrate_threshold`'s (default: the best
    accuracy; docs/method.md §6.3).

    Returns:
        `{"image": t, "text": t}` for the modalities the cache holds both kinds of.
    """
    distances = root_distances(cache)
    thresholds = {}
    for modality in ("image", "text"):
        safe, unsafe = SAFE_KIND[modality].key, UNSAFE_KIND[modality].key
        if safe in distances and unsafe in distances:
            scores = torch.cat([distances[safe], distances[unsafe]])
            labels = torch.cat([torch.zeros(len(distances[safe])), torch.ones(len(distances[unsafe]))]).long()
            thresholds[modality] = float(calibrate_threshold(scores, labels, objective)["threshold"])
    return thresholds


def threshold_quality(cache: EmbeddingCache, thresholds: dict[str, float]) -> dict[str, dict[str, float]]:
    """How well each unsafe threshold separates the safe from the unsafe rows of a quadruplet cache (usually the
    rows it was calibrated on): :func:`~hysac_hf.evaluation.classification.classification_metrics` per modality, plus
    `"separates"`: whether it does better than calling every item the larger class (a threshold that flags every
    item, or none, separates nothing).

    Returns:
        `{"image"|"text": {"threshold", "accuracy", "f1", "fpr", "fnr", "tp", "tn", "fp", "fn", "separates"}}` for the
        modalities of `thresholds` whose safe and unsafe kinds the cache holds.
    """
    distances = root_distances(cache)
    quality = {}
    for modality, threshold in thresholds.items():
        safe, unsafe = SAFE_KIND[modality].key, UNSAFE_KIND[modality].key
        if safe not in distances or unsafe not in distances:
            continue
        scores = torch.cat([distances[safe], distances[unsafe]])
        labels = torch.cat([torch.zeros(len(distances[safe])), torch.ones(len(distances[unsafe]))]).long()
        metrics = classification_metrics(scores, labels, threshold)
        majority = max(len(distances[safe]), len(distances[unsafe])) / len(scores)
        quality[modality] = {**metrics, "separates": metrics["accuracy"] > majority}
    return quality


def report_threshold_quality(quality: dict[str, dict[str, float]], rows: str) -> None:
    """Log :func:`threshold_quality`: one line per modality, and a loud warning for a threshold that separates
    nothing (it must never be exported silently).

    Args:
        quality: :func:`threshold_quality`'s result.
        rows: what the rows were, for the messages ("the validation rows").
    """
    for modality, q in quality.items():
        logger.info(
            "%s threshold %.4f on %s: accuracy %.1f%%, F1 %.1f%%, false positives on safe %ss %.1f%%",
            modality,
            q["threshold"],
            rows,
            100 * q["accuracy"],
            100 * q["f1"],
            modality,
            100 * q["fpr"],
        )
        if not q["separates"]:
            logger.warning(
                "THE %s THRESHOLD SEPARATES NOTHING: at %.4f it calls %d/%d safe and %d/%d unsafe %ss of %s unsafe "
                "(accuracy %.1f%%, no better than one answer for all). The model does not yet tell safe from unsafe "
                "%ss: train longer or on more data, or calibrate later on labelled data (hysac-eval classify "
                "--calibrate accuracy --save)",
                modality.upper(),
                q["threshold"],
                q["fp"],
                q["fp"] + q["tn"],
                q["tp"],
                q["tp"] + q["fn"],
                modality,
                rows,
                100 * q["accuracy"],
                modality,
            )


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
    scores, labels = check_labelled_scores(scores, labels)
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


def write_config_fields(model_dir: str | os.PathLike, **fields):
    """Set fields of a saved HySAC folder's config through `HySACConfig` (validated), replacing config.json atomically.

    Returns:
        the `HySACConfig` written.
    """
    model_dir = Path(model_dir)
    config = HySACConfig.from_pretrained(model_dir)
    for name, value in fields.items():
        setattr(config, name, value)
    config = HySACConfig.from_dict(config.to_dict())  # re-validates bounds/thresholds
    with tempfile.TemporaryDirectory(dir=model_dir, prefix=".config-") as tmp:
        config.save_pretrained(tmp)
        os.replace(Path(tmp) / "config.json", model_dir / "config.json")
    return config


def save_thresholds(model_dir: str | os.PathLike, thresholds: dict[str, float]) -> dict[str, float]:
    """Store calibrated thresholds in a saved model folder's config (`unsafe_thresholds`), through `HySACConfig`,
    keeping the other fields and the other modality's threshold. Returns the stored mapping."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise UsageError(f"{config_path} not found; --save needs a local model folder written by save_pretrained")
    config = HySACConfig.from_pretrained(model_dir)
    merged = dict(config.unsafe_thresholds or {})
    merged.update({k: float(v) for k, v in thresholds.items()})
    stored = write_config_fields(model_dir, unsafe_thresholds=merged).unsafe_thresholds
    logger.info("Stored unsafe_thresholds=%s in %s", stored, config_path)
    return stored


def format_bounds_change(old: dict | None, new: dict) -> str:
    """Lines `S avg 0.4120 -> 0.4300 ...` comparing old and new bounds (old may be None)."""
    lines = []
    for key in BOUND_KEYS:
        cells = []
        for stat in ("avg", "up_95", "low_05"):
            before = f"{old[key][stat]:.4f}" if old else "-"
            cells.append(f"{stat} {before} -> {new[key][stat]:.4f}")
        lines.append(f"  {key} ({CONTENT[key].name}): " + ", ".join(cells))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# hysac-calibrate
def build_parser() -> argparse.ArgumentParser:
    from .cli import add_argument, add_dataset_arguments, add_debug_flag

    parser = argparse.ArgumentParser(
        prog="hysac-calibrate",
        description="Fit HySAC bounds (distance-to-root statistics per kind of content) on a dataset split and "
        "store them in the model folder's config.json.",
    )
    add_argument(parser, "--model", required=True, help="Saved HySAC folder; its config.json gets the bounds.")
    add_dataset_arguments(parser, split="validation", dataset_default="mini-visu")
    add_argument(parser, "--batch_size", type=int, default=64, help="Quadruplets per forward pass.")
    add_argument(parser, "--histogram", default=None, help="Also write a histogram PNG here.")
    add_argument(parser, "--device", default=None, help="torch device (default: cpu).")
    add_argument(
        parser,
        "--overwrite",
        action="store_true",
        help="Replace bounds the model already has (the old and new values are logged).",
    )
    add_argument(parser, "--dry_run", action="store_true", help="Print the bounds without writing config.json.")
    add_debug_flag(parser)
    return parser


def _calibrate_command(args: argparse.Namespace) -> int:
    import json

    from .cli import dataset_from_args
    # Every input is checked before the model is loaded and before anything is written.
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise UsageError(
            f"{model_dir} has no config.json; pass the model folder written by train.py or save_pretrained"
        )
    try:
        config = HySACConfig.from_pretrained(model_dir)
    except (ValueError, OSError) as error:
        raise UsageError(f"{model_dir / 'config.json'} is not a usable HySAC config: {error}") from None
    if config.bounds is not None and not (args.overwrite or args.dry_run):
        raise UsageError(
            f"{model_dir} already has bounds; pass --overwrite to replace them (old and new values are shown), or "
            "--dry_run to only print the new ones"
        )
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.histogram and not Path(args.histogram).resolve().parent.is_dir():
        raise UsageError(f"--histogram {args.histogram}: folder {Path(args.histogram).parent} does not exist")
    dataset = dataset_from_args(args)
    if len(dataset) < MIN_CALIBRATION_ROWS:
        raise UsageError(
            f"{args.dataset} ({args.split}) has {len(dataset)} rows; bounds need at least {MIN_CALIBRATION_ROWS}"
        )

    from .loading import load_model
    from .encode import encode_quadruplets

    model, processor = load_model(model_dir, args.device)
    cache = encode_quadruplets(
        model,
        processor,
        dataset,
        kinds=BOUND_KEYS,
        image_root=args.image_root,
        batch_size=args.batch_size,
        source={"dataset": str(args.dataset), "split": args.split},
    )
    bounds = calibrate(cache, args.histogram)
    if args.histogram:
        logger.info("wrote the distance histogram to %s", args.histogram)
    if args.dry_run:
        logger.info("dry run: %s not changed", model_dir / "config.json")
    else:
        if config.bounds is not None:
            logger.info(
                "replacing the bounds of %s (--overwrite):\n%s", model_dir, format_bounds_change(config.bounds, bounds)
            )
        write_config_fields(model_dir, bounds=bounds)
        logger.info("wrote bounds to %s", model_dir / "config.json")
    print(json.dumps(bounds, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`hysac-calibrate`: exit status 0, or 2 with one line on a usage or input error."""
    from .cli import run, setup_logging

    args = build_parser().parse_args(argv)
    setup_logging()
    return run(_calibrate_command, args, "hysac-calibrate")


if __name__ == "__main__":
    raise SystemExit(main())
