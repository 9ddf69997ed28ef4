"""Inference throughput: transformers `CLIPModel` vs `HySACModel` vs the authors' PEFT-wrapped path.

All three share one random CLIP's weights (`HySACModel.from_clip`; the authors' model wraps the same towers with
the published LoRA config via peft, unmerged, then lifts with `exp(alpha)` and `exp_map0`). They run
interleaved round-robin in one process after a warm-up (the order alternates every round), so machine noise hits
every variant alike; the script reports min and median seconds per batch, items/s, and the ratios (by min, by
median, and the median of the per-round ratios, which is the most robust on a shared machine)

- HySAC / CLIP throughput (target >= 0.97: the hyperbolic lift should cost nothing measurable), and
- HySAC / authors throughput (the converted model, with LoRA folded, must be faster).

Run (about 2-3 minutes for the default ViT-B/32-sized config on 2 idle cores; longer on a busy machine)::

    .venv/bin/python benchmarks/bench_inference.py            # --size base: 15 rounds of 8 images / 16 texts
    .venv/bin/python benchmarks/bench_inference.py --size tiny --rounds 3   # seconds, a smoke run
    .venv/bin/python benchmarks/bench_inference.py --threads 1 --rounds 10  # steadiest on a shared machine

With two threads on a machine that other jobs also load, every torch op pays a thread-synchronisation penalty,
which exaggerates differences between variants that run different numbers of ops (the PEFT path runs several
extra small ops per adapted layer); `--threads 1` measures the work itself.

glibc's default malloc makes large CPU forwards page-fault heavily and erratically, so the script re-executes
itself with ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296``
unless that variable is already set (``--no-reexec`` disables this). The package itself never sets it.
Needs peft (the authors' path).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
SIZES = {
    "tiny": dict(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=224,
            patch_size=32,
        ),
        projection_dim=32,
    ),
    "base": dict(  # ViT-B/32
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        vision_config=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=32,
        ),
        projection_dim=512,
    ),
    "large": dict(  # ViT-L/14, HySAC's backbone
        text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        vision_config=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
        ),
        projection_dim=768,
    ),
}

logger = logging.getLogger("bench_inference")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="base", help="random CLIP size (base = ViT-B/32)")
    parser.add_argument("--image_batch", type=int, default=8, help="images per timed call")
    parser.add_argument("--text_batch", type=int, default=16, help="texts (77 tokens) per timed call")
    parser.add_argument("--rounds", type=int, default=15, help="timed round-robin rounds after the warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--no-reexec",
        dest="reexec",
        action="store_false",
        help="do not re-run with GLIBC_TUNABLES set (numbers get noisier)",
    )
    args = parser.parse_args(argv)
    for name in ("image_batch", "text_batch", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def maybe_reexec(args: argparse.Namespace) -> None:
    """Re-run this script with GLIBC_TUNABLES set (it only takes effect at process start)."""
    if args.reexec and "GLIBC_TUNABLES" not in os.environ and sys.platform.startswith("linux"):
        env = dict(os.environ, GLIBC_TUNABLES=GLIBC_TUNABLES)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def build_models(size: str, seed: int):
    """CLIP, HySAC (same weights) and the authors' PEFT-wrapped model (same towers + LoRA), all eval/float32."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from hysac_hf import HySACModel
    from hysac_hf.authors_reference import build_authors_model

    spec = SIZES[size]
    config = CLIPConfig(
        text_config={**spec["text_config"], "vocab_size": 49408, "max_position_embeddings": 77},
        vision_config=spec["vision_config"],
        projection_dim=spec["projection_dim"],
    )
    torch.manual_seed(seed)
    clip = CLIPModel(config).eval()
    hysac = HySACModel.from_clip(clip).eval()
    authors = build_authors_model(config, clip_state_dict=clip.state_dict())
    with torch.no_grad():
        for name in ("logit_scale", "curv", "visual_alpha", "textual_alpha"):
            getattr(authors, name).copy_(getattr(hysac, name))
    return clip, hysac, authors.eval(), config


def make_inputs(config, image_batch: int, text_batch: int, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    vc = config.vision_config
    pixel_values = torch.randn(image_batch, 3, vc.image_size, vc.image_size, generator=generator)
    input_ids = torch.full((text_batch, 77), 49407, dtype=torch.long)
    input_ids[:, 0] = 49406
    lengths = torch.randint(5, 40, (text_batch,), generator=generator)
    for row, length in enumerate(lengths.tolist()):
        input_ids[row, 1:length] = torch.randint(0, 49405, (length - 1,), generator=generator)
    return pixel_values, input_ids


def _features(output):
    """transformers 5 returns a model output from `CLIPModel.get_*_features`, 4 a tensor."""
    return output if hasattr(output, "shape") else output.pooler_output


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    maybe_reexec(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    clip, hysac, authors, config = build_models(args.size, args.seed)
    pixel_values, input_ids = make_inputs(config, args.image_batch, args.text_batch, args.seed)

    variants = {
        ("image", "CLIP"): lambda: _features(clip.get_image_features(pixel_values=pixel_values)),
        ("image", "HySAC"): lambda: hysac.encode_image(pixel_values),
        ("image", "authors (PEFT)"): lambda: authors.encode_image(pixel_values),
        ("text", "CLIP"): lambda: _features(clip.get_text_features(input_ids=input_ids)),
        ("text", "HySAC"): lambda: hysac.encode_text(input_ids),
        ("text", "authors (PEFT)"): lambda: authors.encode_text(input_ids),
    }
    with torch.inference_mode():
        # Sanity: same towers, so HySAC's unlifted features equal CLIP's and its embeddings equal the authors'.
        diffs = {
            "HySAC vs CLIP image features": (
                hysac.encode_image(pixel_values, lift=False)
                - _features(clip.get_image_features(pixel_values=pixel_values))
            ),
            "HySAC vs authors image embeds": variants[("image", "HySAC")]() - variants[("image", "authors (PEFT)")](),
            "HySAC vs authors text embeds": variants[("text", "HySAC")]() - variants[("text", "authors (PEFT)")](),
        }
        for name, diff in diffs.items():
            logger.info("sanity: max |%s| = %.2e", name, float(diff.abs().max()))
        times: dict[tuple[str, str], list[float]] = {key: [] for key in variants}
        total = args.warmup + args.rounds
        for round_index in tqdm(range(total), desc=f"Benchmarking ({args.size})"):
            order = list(variants)
            if round_index % 2:  # alternate the order so no variant always follows the same one
                order.reverse()
            for key in order:
                start = time.perf_counter()
                variants[key]()
                elapsed = time.perf_counter() - start
                if round_index >= args.warmup:
                    times[key].append(elapsed)

    batch = {"image": args.image_batch, "text": args.text_batch}
    results = {
        "size": args.size,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "batch": batch,
        "rows": [],
        "ratios": {},
    }
    lines = [
        f"bench_inference: size={args.size} images/batch={args.image_batch} texts/batch={args.text_batch} "
        f"rounds={args.rounds} threads={torch.get_num_threads()} "
        f"GLIBC_TUNABLES={'set' if os.environ.get('GLIBC_TUNABLES') else 'unset'} torch={torch.__version__}",
        f"{'modality':<8} {'variant':<16} {'min s':>8} {'median s':>9} {'items/s (min)':>14} {'items/s (median)':>17}",
    ]
    for (modality, name), values in times.items():
        best, median = min(values), statistics.median(values)
        results["rows"].append(
            {
                "modality": modality,
                "variant": name,
                "min_s": best,
                "median_s": median,
                "items_per_s_min": batch[modality] / best,
                "items_per_s_median": batch[modality] / median,
            }
        )
        lines.append(
            f"{modality:<8} {name:<16} {best:>8.3f} {median:>9.3f} {batch[modality] / best:>14.1f} "
            f"{batch[modality] / median:>17.1f}"
        )
    lines.append(
        "throughput ratios (>1 = HySAC faster): by min / by median / median of per-round ratios (robust to drift)"
    )
    for modality in ("image", "text"):
        for other, label in (("CLIP", "HySAC/CLIP"), ("authors (PEFT)", "HySAC/authors")):
            ours, theirs = times[(modality, "HySAC")], times[(modality, other)]
            by_min = min(theirs) / min(ours)
            by_median = statistics.median(theirs) / statistics.median(ours)
            paired = statistics.median(t / o for t, o in zip(theirs, ours))
            results["ratios"][f"{modality} {label}"] = {"min": by_min, "median": by_median, "paired": paired}
            lines.append(f"  {modality:<6} {label:<14} {by_min:6.3f} / {by_median:6.3f} / {paired:6.3f}")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
