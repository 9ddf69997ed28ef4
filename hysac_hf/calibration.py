"""Bounds calibration: distance-to-root statistics per content type, written into the model config.

The authors never released how `hysac_bounds.json` was computed; the method doc (§3.5) reads it as the mean and
the 95th/5th percentiles of the geodesic distance to the root for safe text (S), safe image (V), unsafe text
(U) and unsafe image (G). This module recomputes them on a split of quadruplets.

Command line::

    hysac-calibrate --model out/hysac --dataset mini-visu --split validation [--histogram bounds.png]
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .modeling.lorentz import dist_to_origin

logger = logging.getLogger(__name__)

CONTENT_TYPES = {"S": "safe_text", "V": "safe_image", "U": "unsafe_text", "G": "unsafe_image"}


def fit_bounds(distances: dict[str, Tensor | np.ndarray]) -> dict[str, dict[str, float]]:
    """`{"S"|"V"|"U"|"G": {"avg", "up_95", "low_05"}}` from distances to the root.

    Args:
        distances: content type -> `(N,)` distances (N >= 1, finite).
    Returns:
        mean, 95th percentile and 5th percentile (linear interpolation, numpy's default) per type.
    """
    missing = set(CONTENT_TYPES) - set(distances)
    if missing:
        raise ValueError(f"distances lacks content type(s) {sorted(missing)}; expected {sorted(CONTENT_TYPES)}")
    bounds = {}
    for key in CONTENT_TYPES:
        values = torch.as_tensor(distances[key], dtype=torch.float64).flatten()
        if values.numel() == 0:
            raise ValueError(f"no distances for content type {key!r}: the calibration split is empty")
        if not torch.isfinite(values).all():
            raise ValueError(f"non-finite distances for content type {key!r}; the model produces NaN/Inf embeddings")
        bounds[key] = {
            "avg": values.mean().item(),
            "up_95": torch.quantile(values, 0.95).item(),
            "low_05": torch.quantile(values, 0.05).item(),
        }
    return bounds


@torch.no_grad()
def embed_distances(
    model,
    processor,
    dataset,
    batch_size: int = 64,
    image_root: str | None = None,
    show_progress: bool = True,
) -> dict[str, Tensor]:
    """Distance to the root of every safe/unsafe text and image of a quadruplet dataset.

    The embedding itself is `hysac_hf.evaluation.embed.embed_dataset` (the same path `hysac-eval embed` uses).

    Returns:
        content type (S, V, U, G) -> `(N,)` float32 distances.
    """
    from .evaluation.embed import embed_dataset

    cache = embed_dataset(
        model,
        processor,
        dataset,
        columns={column: key for key, column in CONTENT_TYPES.items()},
        tag_column=None,
        image_root=image_root,
        batch_size=batch_size,
        show_progress=show_progress,
    )
    return {key: dist_to_origin(cache.embeds[key], cache.curv).float() for key in CONTENT_TYPES}


def plot_histogram(distances: dict[str, Tensor], bounds: dict[str, dict[str, float]], path: str | Path) -> Path:
    """Histogram PNG of the distances per content type with the fitted mean and percentiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"S": "safe text", "V": "safe image", "U": "unsafe text", "G": "unsafe image"}
    colors = {"S": "tab:green", "V": "tab:blue", "U": "tab:orange", "G": "tab:red"}
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in CONTENT_TYPES:
        ax.hist(distances[key].numpy(), bins=30, alpha=0.45, color=colors[key], label=f"{key}: {names[key]}")
        ax.axvline(bounds[key]["avg"], color=colors[key], linestyle="-")
        ax.axvline(bounds[key]["up_95"], color=colors[key], linestyle=":")
    ax.set_xlabel("geodesic distance to the root")
    ax.set_ylabel("count")
    ax.set_title("HySAC bounds (line: mean, dotted: 95th percentile)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def calibrate_model(
    model,
    processor,
    dataset,
    batch_size: int = 64,
    image_root: str | None = None,
    histogram_path: str | Path | None = None,
    show_progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Embed `dataset`, fit bounds and (optionally) draw the histogram. Does not modify `model`."""
    distances = embed_distances(model, processor, dataset, batch_size, image_root, show_progress=show_progress)
    bounds = fit_bounds(distances)
    if histogram_path:
        plot_histogram(distances, bounds, histogram_path)
    return bounds


def main(argv: Sequence[str] | None = None) -> None:
    """`hysac-calibrate`: fit bounds on a split and write them into the model folder's config.json."""
    from . import HySACModel, HySACProcessor
    from .data import load_dataset_split

    parser = argparse.ArgumentParser(description="Fit HySAC bounds (distance-to-root statistics) on a dataset split.")
    parser.add_argument("--model", required=True, help="Exported HySAC folder; its config.json gets the bounds.")
    parser.add_argument(
        "--dataset", default="mini-visu", help="'mini-visu', 'visu:<text source>', a file, folder or Hub id."
    )
    parser.add_argument("--split", default="validation", help="Split to embed (the reference's split is unknown).")
    parser.add_argument("--max_samples", type=int, default=None, help="Use only the first rows.")
    parser.add_argument("--batch_size", type=int, default=64, help="Encoding batch size.")
    parser.add_argument("--image_root", default=None, help="Folder for relative image paths.")
    parser.add_argument("--coco_root", default=None, help="COCO 2017 root (ViSU).")
    parser.add_argument("--visu_unsafe_images", default=None, help="Your ViSU unsafe images (folder or mapping).")
    parser.add_argument("--histogram", default=None, help="Also write a histogram PNG here.")
    parser.add_argument("--dry_run", action="store_true", help="Print the bounds without writing config.json.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json; pass the folder written by train.py/save_pretrained")
    model = HySACModel.from_pretrained(model_dir).eval()
    # trust_remote_code only silences the prompt: the tokenizer and image processor are built-in CLIP classes.
    processor = HySACProcessor.from_pretrained(model_dir, trust_remote_code=True)
    dataset = load_dataset_split(
        args.dataset,
        args.split,
        coco_root=args.coco_root,
        visu_unsafe_images=args.visu_unsafe_images,
        max_samples=args.max_samples,
    )
    bounds = calibrate_model(model, processor, dataset, args.batch_size, args.image_root, args.histogram)
    if not args.dry_run:
        config_path = model_dir / "config.json"
        config = json.loads(config_path.read_text())
        config["bounds"] = bounds
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        logger.info(f"wrote bounds to {config_path}")
    print(json.dumps(bounds, indent=2))
