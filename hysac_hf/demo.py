"""`hysac-demo`: the README's main job, offline on a laptop CPU in a few minutes.

1. build a tiny random CLIP (real CLIP tokenizer, 64-px images) and turn it into HySAC (curvature 0.1), in a
   temporary folder that is deleted afterwards,
2. fine-tune it on the bundled mini-ViSU with the HySAC losses: the training script, run as a user runs it
   (`python -m hysac_hf.train ...` in a subprocess, its flags spelled from a `TrainingConfig`),
3. export it to `<output_dir>/model` (a Hub-ready folder: weights, config with bounds calibrated on the
   validation split, processor, remote code, model card, distance histogram),
4. load the export back the way a Hub user would (`AutoModel`/`AutoProcessor.from_pretrained(...,
   trust_remote_code=True)`),
5. evaluate that loaded model on the test split: R@1 retrieval and the mean distance to the root per kind of
   content, plus the distance to the root of a few sample photos with and without an "unsafe" marker and
   zero-shot scores over candidate captions,
6. print the result (the question: do safe and unsafe separate by distance from the root, S < V < U < G?), where
   the files are and how to load the model.

Starting from random towers, any separation comes from the losses alone (the entailment terms push unsafe
content outwards); this is a smoke-scale demonstration, not a replication of the paper. The one departure from
the reference settings that the order S < V < U < G needs is a smaller initial curvature (see `--curv_init`).
The sample photos are mini-ViSU's source photos (training sees crops of them), so their table shows the marker
effect, not generalisation; zero-shot of a model trained on 160 rows from random weights is near chance.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .modeling.configuration_hysac import CONTENT, CONTENT_KINDS
from .training import TrainingConfig, config_to_argv

logger = logging.getLogger(__name__)

ORDER = tuple(kind.key for kind in CONTENT_KINDS)  # the paper's radial order, nearest to the root first
MARKERS = ("crimson_band", "hazard_hatch", "inverted")
ZERO_SHOT_PHOTOS = ("astronaut", "cat", "coffee")
ZERO_SHOT_CANDIDATES = ("astronaut", "cat", "coffee", "rocket")
CURV_INIT = 0.1  # see --curv_init


class TrainingFailedError(subprocess.CalledProcessError):
    """The training subprocess exited with a non-zero status; its own error (one line, or a traceback) went to
    stderr before this one."""

    def __str__(self) -> str:
        how = f"exit status {self.returncode}" if self.returncode > 0 else f"signal {-self.returncode}"
        return f"training (python -m hysac_hf.train) stopped with {how}; its error is printed above"

    @property
    def exit_status(self) -> int:
        """The status to exit with: the training's own, or 128 + N when it was killed by signal N (as a shell)."""
        return self.returncode if self.returncode > 0 else 128 - self.returncode


def run_training_script(config: TrainingConfig) -> None:
    """Run the training script on `config` as a user would: `python -m hysac_hf.train <flags>` in a subprocess that
    shares this process's console, so its logs and its error appear as they would from the command line.

    Raises:
        TrainingFailedError: when the script exits with a non-zero status.
    """
    command = [sys.executable, "-m", "hysac_hf.train", *config_to_argv(config)]
    returncode = subprocess.run(command, check=False).returncode
    if returncode != 0:
        raise TrainingFailedError(returncode, command)


def is_ordered(means: dict[str, float]) -> bool:
    """True when the mean distances to the root grow strictly along S < V < U < G (the paper's order)."""
    return all(means[a] < means[b] for a, b in itertools.pairwise(ORDER))


def build_demo_clip(directory: str | Path, seed: int = 0, image_size: int = 64) -> Path:
    """A small random CLIP (2 layers, width 128, 64-px images, patch 8) with the real tokenizer, saved to `directory`."""
    from transformers import CLIPModel, CLIPProcessor

    from .testing import build_clip_tokenizer, clip_image_processor, tiny_clip_config

    directory = Path(directory)
    torch.manual_seed(seed)
    config = tiny_clip_config(
        projection_dim=64,
        text_config={"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4},
        vision_config={
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": 8,
        },
    )
    CLIPModel(config).save_pretrained(directory)
    tokenizer = build_clip_tokenizer(directory / "_vocab")
    CLIPProcessor(image_processor=clip_image_processor(image_size), tokenizer=tokenizer).save_pretrained(directory)
    return directory


def evaluate(model, processor, split: str = "test", batch_size: int = 40) -> dict:
    """R@1 retrieval and distance-to-root statistics on a mini-ViSU split (one embedding pass)."""
    from .calibration import distance_stats, root_distances
    from .data import load_mini_visu
    from .encode import encode_quadruplets
    from .evaluation.retrieval import recall_from_ranks
    from .modeling.gallery_hysac import paired_ranks

    dataset = load_mini_visu(split)
    cache = encode_quadruplets(model, processor, dataset, tag_column=None, batch_size=batch_size, show_progress=False)
    embeds, curvature = cache.embeds, cache.curvature
    distances = root_distances(cache)
    recall = {}
    for text, image in (("S", "V"), ("U", "G")):  # both directions of a pair from one score matrix
        notation = CONTENT[text].notation, CONTENT[image].notation
        ranks = paired_ranks(embeds[text], embeds[image], curvature)
        recall["->".join(notation)] = recall_from_ranks(ranks[0])["R@1"]
        recall["->".join(reversed(notation))] = recall_from_ranks(ranks[1])["R@1"]
    means = {key: stats["avg"] for key, stats in distance_stats(distances).items()}
    # How often an unsafe item lies farther from the root than its own safe counterpart.
    farther = {
        "image": (distances["G"] > distances["V"]).double().mean().item(),
        "text": (distances["U"] > distances["S"]).double().mean().item(),
    }
    return {
        "n": len(dataset),
        "recall_at_1": recall,
        "mean_distance": means,
        "unsafe_farther": farther,
        "ordered": is_ordered(means),
    }


@torch.no_grad()
def photo_distances(model, processor, photos: dict) -> dict[str, dict]:
    """Distance to the root of each photo and of its copy with a synthetic "unsafe" marker (mini-ViSU's).

    Args:
        model: a HySAC model (`distance_to_root`, `encode_image`).
        processor: its processor.
        photos: name -> PIL image (any mode; converted to RGB). Markers cycle through `MARKERS`.
    Returns:
        name -> `{"marker": str, "safe": float, "marked": float}`.
    """
    from .data.mini_visu import apply_marker

    names = list(photos)
    if not names:
        raise ValueError("photo_distances needs at least one photo")
    from .encode import encode_images

    safe = [photos[name].convert("RGB") for name in names]
    markers = [MARKERS[i % len(MARKERS)] for i in range(len(names))]
    marked = [apply_marker(image, marker) for image, marker in zip(safe, markers)]
    embeds = encode_images(model, processor, safe + marked, show_progress=False)
    distances = model.distance_to_root(embeds).tolist()
    n = len(names)
    return {
        name: {"marker": marker, "safe": distances[i], "marked": distances[n + i]}
        for i, (name, marker) in enumerate(zip(names, markers))
    }


@torch.no_grad()
def zero_shot(model, processor, photos: dict, captions: dict[str, str]) -> dict[str, dict[str, float]]:
    """Zero-shot scores: softmax over the candidate captions of each photo's `logits_per_image`.

    Args:
        photos: name -> PIL image.
        captions: label -> candidate caption (at least two).
    Returns:
        photo name -> {caption label: probability}; each row sums to 1.
    """
    if len(captions) < 2:
        raise ValueError(f"zero_shot needs at least two candidate captions, got {len(captions)}")
    labels = list(captions)
    inputs = processor(
        text=[captions[label] for label in labels],
        images=[image.convert("RGB") for image in photos.values()],
        return_tensors="pt",
    )
    probs = model(**inputs).logits_per_image.softmax(dim=-1).tolist()
    return {name: dict(zip(labels, row)) for name, row in zip(photos, probs)}


def format_report(result: dict, output_dir: Path) -> str:
    export_dir = Path(result.get("export_dir", output_dir))
    lines = [f"HySAC demo: tiny model fine-tuned on mini-ViSU, exported to {export_dir}", ""]
    lines.append(f"Test split ({result['n']} quadruplets), R@1 (%):")
    lines.append("  " + "  ".join(f"{k} {v:5.1f}" for k, v in result["recall_at_1"].items()))
    lines.append("Mean geodesic distance to the root:")
    for key in ORDER:
        lines.append(f"  {key} ({CONTENT[key].name:12s}) {result['mean_distance'][key]:.4f}")
    farther = result["unsafe_farther"]
    lines.append(
        f"Unsafe farther than its safe pair: images {100 * farther['image']:.0f}%, texts {100 * farther['text']:.0f}%"
    )
    lines.append("Order S < V < U < G: " + ("yes" if result["ordered"] else "NO"))
    photos = result.get("photo_distances")
    if photos:
        lines += ["", "Sample photos, distance to the root, plain -> with the synthetic unsafe marker:"]
        for name, row in photos.items():
            verdict = "farther" if row["marked"] > row["safe"] else "NOT farther"
            lines.append(f"  {name:10s} {row['safe']:.4f} -> {row['marked']:.4f}  {row['marker']:13s} {verdict}")
    scores = result.get("zero_shot")
    if scores:
        labels = list(next(iter(scores.values())))
        chance = 100 / len(labels)
        lines += ["", f"Zero-shot, softmax of logits_per_image over captions (%, chance {chance:.0f}):"]
        lines.append("  " + " " * 10 + "".join(f"{label:>11s}" for label in labels))
        for name, row in scores.items():
            lines.append(f"  {name:10s}" + "".join(f"{100 * row[label]:11.1f}" for label in labels))
    lines += [
        "",
        f"Model folder (Hub-ready, with its model card): {export_dir}",
        f"Distance histogram of the calibration split: {export_dir / 'bounds.png'}",
        "Load it with:",
        "  from transformers import AutoModel, AutoProcessor",
        f"  model = AutoModel.from_pretrained({str(export_dir)!r}, trust_remote_code=True)",
        f"  processor = AutoProcessor.from_pretrained({str(export_dir)!r}, trust_remote_code=True)",
    ]
    return "\n".join(lines)


def build_demo_hysac(directory: str | Path, seed: int = 0, curv_init: float = 1.0) -> Path:
    """The demo's starting point: `build_demo_clip` converted with `HySACModel.from_clip`, saved with its processor.

    Args:
        directory: where the HySAC checkpoint goes (the random CLIP goes to `directory/_clip`).
        seed: seed of the random CLIP weights.
        curv_init: initial curvature magnitude `c` (the config's `curv_init`; it also centres the clamp range).
    """
    from . import HySACModel, HySACProcessor

    directory = Path(directory)
    clip_dir = build_demo_clip(directory / "_clip", seed=seed)
    HySACModel.from_clip(clip_dir, curv_init=curv_init).save_pretrained(directory)
    HySACProcessor.from_pretrained(clip_dir).save_pretrained(directory)
    return directory


def load_exported(directory: str | Path):
    """Load an exported folder the way a Hub user does: `AutoModel`/`AutoProcessor` with `trust_remote_code=True`."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(directory, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
    logger.info(
        "loaded %s with AutoModel: %s.%s, processor %s",
        directory,
        type(model).__module__,
        type(model).__name__,
        type(processor).__name__,
    )
    return model, processor


@dataclass
class DemoConfig:
    """Settings of the main job (`hysac-demo --help` describes each)."""

    output_dir: str = "hysac-demo"
    num_train_epochs: int = 10
    learning_rate: float = 1e-3
    batch_size: int = 32
    entailment_weight: float = 4.0
    aperture_scale: float = 1.0
    curv_init: float = CURV_INIT
    lora: bool = False
    seed: int = 0
    json: bool = False
    debug: bool = False


def parse_args(argv: Sequence[str] | None = None) -> DemoConfig:
    """The `hysac-demo` command line as a :class:`DemoConfig`."""
    from .cli import add_debug_flag

    parser = argparse.ArgumentParser(
        prog="hysac-demo", description="Train a tiny HySAC on mini-ViSU, export, calibrate, evaluate."
    )
    parser.add_argument(
        "--output_dir", default="hysac-demo", help="Run folder; the exported model goes to <output_dir>/model."
    )
    parser.add_argument("--num_train_epochs", type=int, default=10, help="Training epochs over the 160 training rows.")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="Peak learning rate.")
    parser.add_argument("--batch_size", type=int, default=32, help="Quadruplets per step.")
    parser.add_argument(
        "--entailment_weight",
        type=float,
        default=4.0,
        help=(
            "lambda_e of the three entailment terms (reference 1.0). The demo uses 4: at 1.0 the contrastive "
            "terms win and unsafe captions stay level with safe ones (S 0.51, U 0.51 at c = 0.1)."
        ),
    )
    parser.add_argument(
        "--aperture_scale", type=float, default=1.0, help="eta, scale of the entailment cones' half-aperture."
    )
    parser.add_argument(
        "--curv_init",
        type=float,
        default=CURV_INIT,
        help=(
            "Initial curvature magnitude c (reference 1.0). The tiny model uses 0.1: a cone's half-aperture is "
            "asin(2K / sinh(sqrt(c) d)) at distance d from the root (K = 0.1). At c = 1 a safe image at d ~ 0.9 "
            "has a cone ~11 degrees wide that its unsafe caption (the I -> T* term) never enters; the texts "
            "collapse towards the root (S 0.26 < U 0.32 < V 0.87 < G 0.92). At c = 0.1 the cones are wide, all "
            "three entailment terms are met and the paper's order S < V < U < G appears (seeds 0-3)."
        ),
    )
    parser.add_argument(
        "--lora",
        action="store_true",
        help=(
            "Train LoRA adapters (paper setting) instead of every weight. Pair it with --learning_rate 1e-2: with "
            "the reference LoRA scaling (alpha 1 / r 16) 50 steps at 1e-3 barely move the tiny model."
        ),
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed.")
    parser.add_argument("--json", action="store_true", help="Print the result as JSON.")
    add_debug_flag(parser)
    return DemoConfig(**vars(parser.parse_args(argv)))


def run(config: DemoConfig) -> dict:
    """Train, export, reload with `AutoModel` and evaluate; prints the report and returns the result dict."""
    import tempfile

    from .errors import UsageError, require
    from .testing import SAMPLE_CAPTIONS, sample_images

    if config.curv_init <= 0:
        raise UsageError(f"--curv_init must be > 0, got {config.curv_init}")
    if config.num_train_epochs < 1 or config.batch_size < 2:
        raise UsageError("--num_train_epochs must be >= 1 and --batch_size >= 2")
    if Path(config.output_dir).exists() and not Path(config.output_dir).is_dir():
        raise UsageError(f"--output_dir {config.output_dir} is a file; pass a folder")
    require("skimage", "sklearn", "matplotlib", purpose="the bundled mini-ViSU photos")
    if config.lora:
        require("peft", purpose="--lora")

    output_dir = Path(config.output_dir)
    with tempfile.TemporaryDirectory(prefix="hysac-demo-start-") as scratch:
        start_dir = build_demo_hysac(Path(scratch) / "start", seed=config.seed, curv_init=config.curv_init)
        training = TrainingConfig(
            model_name_or_path=str(start_dir),
            output_dir=str(output_dir),
            dataset="mini-visu",
            per_device_train_batch_size=config.batch_size,
            num_train_epochs=config.num_train_epochs,
            learning_rate=config.learning_rate,
            entailment_weight=config.entailment_weight,
            aperture_scale=config.aperture_scale,
            num_warmup_steps=5,
            seed=config.seed,
            select_best="none",
            logging_steps=5,
            full_finetune=not config.lora,
            hub_model_id="hysac-demo",
            debug=config.debug,
        )
        run_training_script(training)

    # From here on only the exported folder is used, loaded as from the Hub.
    model, processor = load_exported(training.export_dir)
    result = evaluate(model, processor)
    result["export_dir"] = str(training.export_dir)
    result["bounds"] = model.config.bounds
    photos = sample_images()
    result["photo_distances"] = photo_distances(model, processor, photos)
    result["zero_shot"] = zero_shot(
        model,
        processor,
        {name: photos[name] for name in ZERO_SHOT_PHOTOS},
        {label: SAMPLE_CAPTIONS[label] for label in ZERO_SHOT_CANDIDATES},
    )
    print(json.dumps(result, indent=2) if config.json else format_report(result, output_dir))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """`hysac-demo` entry point: exit status 0, 2 with one line on a usage or input error, or the training's own
    status when the training script fails (its error first, then one line from the demo)."""
    from .cli import run as run_command
    from .cli import setup_logging

    config = parse_args(argv)
    setup_logging()
    try:
        return run_command(run, config, "hysac-demo")
    except TrainingFailedError as error:
        if config.debug:
            raise
        print(f"hysac-demo: error: {error}", file=sys.stderr)
        return error.exit_status


if __name__ == "__main__":
    raise SystemExit(main())
