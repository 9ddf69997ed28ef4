"""Inference throughput of HySAC on every base family against the base model itself, side by side in one run:
CLIP, SigLIP (and fixed-resolution SigLIP 2), SigLIP 2 NaFlex and MetaCLIP 2.

For each family a random base of the chosen geometry (the tower sizes of `workload.SIZES`, 224-px images) is built
with transformers' own class and converted with `HySACModel.from_dual_encoder`; the HySAC model then takes the base's
tower modules themselves, so both run the very same weights and the comparison isolates what HySAC adds (the input
checks and the hyperbolic lift). Timed per family, round-robin and interleaved (the order alternates every round)
after a warm-up: the base's `get_image_features` / `get_text_features` against HySAC's `encode_image` /
`encode_text`, on the family's inputs: pixels (NaFlex: the same images as 7 x 7 patch sequences with their mask and
grid), captions of 10-20 tokens padded to the longest for CLIP and MetaCLIP 2 and to the fixed 64 tokens for SigLIP.
Reports min and median seconds per batch, items/s and the throughput ratios HySAC-on-X / X (by min, by median, and
the median of the per-round ratios; target >= 0.97 for every family: the lift should cost nothing measurable).

Run::

    .venv/bin/python benchmarks/bench_families.py --threads 1                # CPU, base size, 10 rounds
    .venv/bin/python benchmarks/bench_families.py --size tiny --rounds 2     # a smoke run
    python benchmarks/bench_families.py --device cuda --size large           # bf16 on a GPU

On CPU the script re-executes itself with `GLIBC_TUNABLES` set (see bench_inference.py; ``--no_reexec`` disables it).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import (
    MAX_TEXT_TOKENS,
    SIZES,
    add_common_arguments,
    caption_ids,
    device_name,
    maybe_reexec,
    resolve_common_arguments,
    sync,
)

logger = logging.getLogger("bench_families")

FAMILIES = ("clip", "siglip", "siglip2", "metaclip_2")
IMAGE_SIZE = 224
SIGLIP_TEXT_TOKENS = 64  # SigLIP and SigLIP 2 always embed 64 tokens
SIGLIP_VOCAB = 32000  # SigLIP's (throughput does not depend on it); CLIP and MetaCLIP 2 take CLIP's ids


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="tower geometry (default: base on cpu)")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated subset of {FAMILIES}")
    parser.add_argument("--image_batch", type=int, default=None, help="images per call (default: 8 cpu, 256 cuda)")
    parser.add_argument("--text_batch", type=int, default=None, help="texts per call (default: 16 cpu, 1024 cuda)")
    parser.add_argument("--rounds", type=int, default=10, help="timed round-robin rounds per family")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    resolve_common_arguments(args, parser)
    cuda = args.device.startswith("cuda")
    args.size = args.size or ("large" if cuda else "base")
    args.image_batch = args.image_batch or (256 if cuda else 8)
    args.text_batch = args.text_batch or (1024 if cuda else 16)
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(args.families) - set(FAMILIES))
    if unknown or not args.families:
        parser.error(f"--families takes a subset of {FAMILIES}, got {unknown or 'none'}")
    for name in ("image_batch", "text_batch", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def base_config(family: str, size: str):
    """The config of a `family` dual encoder with the towers of `SIZES[size]`."""
    import transformers

    spec = SIZES[size]
    text, vision = dict(spec["text_config"]), {**spec["vision_config"]}
    if family in ("clip", "metaclip_2"):
        name = "CLIPConfig" if family == "clip" else "MetaClip2Config"
        return getattr(transformers, name)(
            text_config={**text, "vocab_size": 49408, "max_position_embeddings": MAX_TEXT_TOKENS},
            vision_config={**vision, "image_size": IMAGE_SIZE},
            projection_dim=spec["projection_dim"],
        )
    # SigLIP's text head outputs the vision width: HySAC's space is that width.
    text.update(
        vocab_size=SIGLIP_VOCAB,
        max_position_embeddings=SIGLIP_TEXT_TOKENS,
        projection_size=vision["hidden_size"],
        bos_token_id=None,  # SigLIP's tokenizer adds none; its config's default (CLIP's id) is outside 32,000
        eos_token_id=1,
        pad_token_id=1,
    )
    if family == "siglip":
        return transformers.SiglipConfig(text_config=text, vision_config={**vision, "image_size": IMAGE_SIZE})
    patches = (IMAGE_SIZE // vision["patch_size"]) ** 2
    return transformers.Siglip2Config(text_config=text, vision_config={**vision, "num_patches": patches})


def build_pair(family: str, args: argparse.Namespace):
    """`(base, hysac)` sharing the very same tower modules, eval, on the device, in the benchmark's dtype."""
    import transformers

    from hysac_hf import HySACModel
    from hysac_hf.modeling.configuration_hysac import BASE_FAMILIES

    torch.manual_seed(args.seed)
    with torch.device(args.device):
        base = getattr(transformers, BASE_FAMILIES[family].model_class)(base_config(family, args.size)).eval()
        hysac = HySACModel.from_dual_encoder(base).eval()
    # The same modules on both sides: one copy of the weights, and nothing but HySAC's own work differs.
    for name in ("text_model", "vision_model", "text_projection", "visual_projection"):
        if hasattr(hysac, name):
            setattr(hysac, name, getattr(base, name))
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    return base.to(dtype), hysac.to(dtype)  # HySAC's scalars stay float32


def family_inputs(family: str, config, args: argparse.Namespace, generator) -> tuple[dict, dict]:
    """Image and text inputs as the family's processor makes them (random values of the right shapes)."""
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    pixels = torch.randn(args.image_batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    if family == "siglip2":  # NaFlex: the same pictures as (rows x columns) sequences of flattened patches
        patch = config.vision_config.patch_size
        grid = IMAGE_SIZE // patch
        patches = pixels.reshape(args.image_batch, 3, grid, patch, grid, patch).permute(0, 2, 4, 3, 5, 1)
        images = {
            "pixel_values": patches.reshape(args.image_batch, grid * grid, patch * patch * 3),
            "pixel_attention_mask": torch.ones(args.image_batch, grid * grid, dtype=torch.long),
            "spatial_shapes": torch.tensor([[grid, grid]] * args.image_batch, dtype=torch.long),
        }
    else:
        images = {"pixel_values": pixels}
    images["pixel_values"] = images["pixel_values"].to(dtype)
    if family in ("siglip", "siglip2"):
        ids = torch.randint(0, SIGLIP_VOCAB, (args.text_batch, SIGLIP_TEXT_TOKENS), generator=generator)
    else:
        ids = caption_ids(args.text_batch, generator)
    images = {k: v.to(args.device) for k, v in images.items()}
    return images, {"input_ids": ids.to(args.device)}


def _features(output):
    """transformers 5 returns a model output from `get_*_features`, 4 a tensor."""
    return output if hasattr(output, "shape") else output.pooler_output


def bench_family(family: str, args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    base, hysac = build_pair(family, args)
    generator = torch.Generator().manual_seed(args.seed)
    images, texts = family_inputs(family, base.config, args, generator)
    variants = {
        ("image", "base"): lambda: _features(base.get_image_features(**images)),
        ("image", "HySAC"): lambda: hysac.encode_image(**images),
        ("text", "base"): lambda: _features(base.get_text_features(**texts)),
        ("text", "HySAC"): lambda: hysac.encode_text(**texts),
    }
    with torch.inference_mode():
        # Sanity: the unlifted HySAC features are the base's own.
        for modality, inputs in (("image", images), ("text", texts)):
            ours = (hysac.encode_image if modality == "image" else hysac.encode_text)(**inputs, lift=False)
            diff = float((ours - variants[(modality, "base")]().float()).abs().max())
            logger.info("%s: max |HySAC %s features - base's| = %.2e", family, modality, diff)
        times: dict[tuple[str, str], list[float]] = {key: [] for key in variants}
        for round_index in tqdm(range(args.warmup + args.rounds), desc=f"{family} ({args.size})", leave=False):
            order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
            for key in order:
                sync(args.device)
                start = time.perf_counter()
                variants[key]()
                sync(args.device)
                if round_index >= args.warmup:
                    times[key].append(time.perf_counter() - start)
    batch = {"image": args.image_batch, "text": args.text_batch}
    rows = []
    for modality in ("image", "text"):
        ours, theirs = times[(modality, "HySAC")], times[(modality, "base")]
        rows.append(
            {
                "family": family,
                "modality": modality,
                "text_tokens": texts["input_ids"].shape[1] if modality == "text" else None,
                "base_items_per_s_median": batch[modality] / statistics.median(theirs),
                "hysac_items_per_s_median": batch[modality] / statistics.median(ours),
                "ratio_min": min(theirs) / min(ours),
                "ratio_median": statistics.median(theirs) / statistics.median(ours),
                "ratio_paired": statistics.median(t / o for t, o in zip(theirs, ours)),
            }
        )
    return {"rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    maybe_reexec(args.device, args.reexec)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    started = time.perf_counter()
    results: dict[str, Any] = {
        "size": args.size,
        "device": device_name(args.device),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "batch": {"image": args.image_batch, "text": args.text_batch},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "rows": [],
    }
    for family in args.families:
        results["rows"] += bench_family(family, args)["rows"]
    results["elapsed_s"] = time.perf_counter() - started
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def format_table(results: dict[str, Any]) -> str:
    batch = results["batch"]
    lines = [
        (
            f"bench_families: size={results['size']} device={results['device']} dtype={results['dtype']} "
            f"images/batch={batch['image']} texts/batch={batch['text']} rounds={results['rounds']} "
            f"torch={results['torch']} transformers={results['transformers']}"
        ),
        "HySAC on X vs X itself (the same tower modules): throughput ratio HySAC/X (>1 = HySAC faster; target >= 0.97)",
        (
            f"{'family':<11} {'modality':<8} {'tokens':>6} {'X items/s':>10} {'HySAC items/s':>14} "
            f"{'ratio (min)':>11} {'(median)':>9} {'(per round)':>11}"
        ),
    ]
    for row in results["rows"]:
        tokens = "" if row["text_tokens"] is None else str(row["text_tokens"])
        lines.append(
            f"{row['family']:<11} {row['modality']:<8} {tokens:>6} {row['base_items_per_s_median']:>10.1f} "
            f"{row['hysac_items_per_s_median']:>14.1f} {row['ratio_min']:>11.3f} {row['ratio_median']:>9.3f} "
            f"{row['ratio_paired']:>11.3f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
