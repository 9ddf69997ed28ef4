"""`hysac-demo`: the README's main job, offline on a laptop CPU in a few minutes.

1. build a tiny random CLIP (real CLIP tokenizer, 64-px images) and turn it into HySAC,
2. fine-tune it on the bundled mini-ViSU with the HySAC losses (`hysac_hf.training`),
3. export it (`save_pretrained`, loads with plain `AutoModel`) with bounds calibrated on the validation split,
4. evaluate on the test split: R@1 retrieval and the mean distance to the root per content type,
5. print the result (the question: do safe and unsafe separate by distance from the root, S < V < U < G?).

Starting from random towers, any separation comes from the losses alone (the entailment terms push unsafe
content outwards); this is a smoke-scale demonstration, not a replication of the paper.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ORDER = ("S", "V", "U", "G")
NAMES = {"S": "safe text", "V": "safe image", "U": "unsafe text", "G": "unsafe image"}


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
            "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "image_size": image_size, "patch_size": 8
        },
    )
    CLIPModel(config).save_pretrained(directory)
    tokenizer = build_clip_tokenizer(directory / "_vocab")
    CLIPProcessor(image_processor=clip_image_processor(image_size), tokenizer=tokenizer).save_pretrained(directory)
    return directory


@torch.no_grad()
def evaluate(model, processor, split: str = "test", batch_size: int = 40) -> dict:
    """R@1 retrieval and distance-to-root statistics on a mini-ViSU split."""
    from .calibration import embed_distances
    from .data import QuadrupletCollator, load_mini_visu
    from .training import recall_at_1

    dataset = load_mini_visu(split)
    distances = embed_distances(model, processor, dataset, batch_size=batch_size, show_progress=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=QuadrupletCollator(processor))
    images, texts = [], []
    for batch in loader:
        image = model.get_image_features(batch["pixel_values"])
        text = model.get_text_features(batch["input_ids"])
        images.append(image.view(2, -1, image.shape[-1]))
        texts.append(text.view(2, -1, text.shape[-1]))
    image, text = torch.cat(images, 1), torch.cat(texts, 1)
    c = model.curvature
    recall = {
        "T->I": recall_at_1(text[0], image[0], c),
        "I->T": recall_at_1(image[0], text[0], c),
        "T*->I*": recall_at_1(text[1], image[1], c),
        "I*->T*": recall_at_1(image[1], text[1], c),
    }
    means = {key: distances[key].double().mean().item() for key in ORDER}
    # How often an unsafe item lies farther from the root than its own safe counterpart.
    farther = {
        "image": (distances["G"] > distances["V"]).float().mean().item(),
        "text": (distances["U"] > distances["S"]).float().mean().item(),
    }
    ordered = all(means[a] < means[b] for a, b in itertools.pairwise(ORDER))
    return {
        "n": len(dataset),
        "recall_at_1": recall,
        "mean_distance": means,
        "unsafe_farther": farther,
        "ordered": ordered,
    }


def format_report(result: dict, output_dir: Path) -> str:
    lines = [f"HySAC demo: tiny model fine-tuned on mini-ViSU, exported to {output_dir}", ""]
    lines.append(f"Test split ({result['n']} quadruplets), R@1 (%):")
    lines.append("  " + "  ".join(f"{k} {v:5.1f}" for k, v in result["recall_at_1"].items()))
    lines.append("Mean geodesic distance to the root:")
    for key in ORDER:
        lines.append(f"  {key} ({NAMES[key]:12s}) {result['mean_distance'][key]:.4f}")
    farther = result["unsafe_farther"]
    lines.append(
        f"Unsafe farther than its safe pair: images {100 * farther['image']:.0f}%, texts {100 * farther['text']:.0f}%"
    )
    lines.append("Order S < V < U < G: " + ("yes" if result["ordered"] else "NO"))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Train a tiny HySAC on mini-ViSU, export, calibrate, evaluate.")
    parser.add_argument("--output_dir", default="hysac-demo", help="Where the exported model goes.")
    parser.add_argument("--num_train_epochs", type=int, default=10, help="Training epochs over the 160 training rows.")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="Peak learning rate.")
    parser.add_argument("--batch_size", type=int, default=32, help="Quadruplets per step.")
    parser.add_argument(
        "--entailment_weight",
        type=float,
        default=4.0,
        help="lambda_e of the entailment terms (4: the tiny random model needs more than the reference 1.0 to separate safe from unsafe).",
    )
    parser.add_argument(
        "--lora", action="store_true", help="Train LoRA adapters (paper setting) instead of every weight."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed.")
    parser.add_argument("--json", action="store_true", help="Print the result as JSON.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from accelerate.state import AcceleratorState

    from . import HySACModel, HySACProcessor
    from .training import main as train

    output_dir = Path(args.output_dir)
    clip_dir = build_demo_clip(output_dir / "_tiny_clip", seed=args.seed)
    train_args = [
        "--model_name_or_path",
        str(clip_dir),
        "--output_dir",
        str(output_dir),
        "--dataset",
        "mini-visu",
        "--per_device_train_batch_size",
        str(args.batch_size),
        "--num_train_epochs",
        str(args.num_train_epochs),
        "--learning_rate",
        str(args.learning_rate),
        "--entailment_weight",
        str(args.entailment_weight),
        "--num_warmup_steps",
        "5",
        "--seed",
        str(args.seed),
        "--select_best",
        "none",
        "--calibration_histogram",
        str(output_dir / "bounds.png"),
        "--logging_steps",
        "5",
    ]
    if not args.lora:
        train_args.append("--full_finetune")
    AcceleratorState._reset_state(True)
    train(train_args)
    model = HySACModel.from_pretrained(output_dir).eval()
    processor = HySACProcessor.from_pretrained(output_dir, trust_remote_code=True)
    result = evaluate(model, processor)
    result["bounds"] = model.config.bounds
    print(json.dumps(result, indent=2) if args.json else format_report(result, output_dir))
    return result
