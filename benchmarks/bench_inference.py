"""Inference throughput: transformers `CLIPModel` vs `HySACModel` vs the authors' PEFT-wrapped path, and text at the
length of the text (pad to the longest caption) vs 77 tokens.

All models share one random CLIP's weights (`HySACModel.from_clip`; the authors' model wraps the same towers with
the published LoRA config via peft, unmerged, then lifts with `exp(alpha)` and `exp_map0`). Captions have realistic
lengths (10-20 tokens, start and end of text included) and are padded to the longest of the batch, as the
processor does by default; "HySAC @77" embeds the same captions padded to 77 tokens (`padding="max_length"`), and
the script prints the largest difference between the two embeddings (CLIP's causal mask and end-of-text pooling
make them equal). The variants run interleaved round-robin in one process after a warm-up (the order alternates
every round), so machine noise hits every variant alike; the script reports min and median seconds per batch,
items/s, model FLOPs per item (`FlopCounterMode`), MFU (against --peak_tflops; 989 TFLOP/s dense bf16 on CUDA) and
the throughput ratios (by min, by median, and the median of the per-round ratios, the most robust on a shared
machine):

- HySAC / CLIP (target >= 0.97: the hyperbolic lift should cost nothing measurable),
- HySAC / authors (the converted model, with LoRA folded, must be faster; on CPU by default, ``--authors`` on CUDA),
- text pad-to-longest / 77 tokens (target >= 3x on a GPU, embeddings identical).

Run::

    .venv/bin/python benchmarks/bench_inference.py            # CPU, --size base: 15 rounds of 8 images / 16 texts
    .venv/bin/python benchmarks/bench_inference.py --size tiny --rounds 3   # seconds, a smoke run
    .venv/bin/python benchmarks/bench_inference.py --threads 1 --rounds 10  # steadiest on a shared machine
    python benchmarks/bench_inference.py --device cuda --size large         # bf16, 256 images / 1024 texts

With two threads on a machine that other jobs also load, every torch op pays a thread-synchronisation penalty,
which exaggerates differences between variants that run different numbers of ops (the PEFT path runs several
extra small ops per adapted layer); `--threads 1` measures the work itself.

On CPU, glibc's default malloc makes large forwards page-fault heavily and erratically, so the script re-executes
itself with ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296``
unless that variable is already set (``--no_reexec`` disables this). The package itself never sets it.
The authors' path needs peft.
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
    clip_config,
    count_flops,
    device_name,
    format_optional,
    maybe_reexec,
    mfu,
    peak_tflops,
    resolve_common_arguments,
    sync,
)

logger = logging.getLogger("bench_inference")

AUTHORS = "authors (PEFT)"
HYSAC_77 = f"HySAC @{MAX_TEXT_TOKENS}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default=None,
        help="random CLIP size (default: base on cpu = ViT-B/32, large on cuda = ViT-L/14)",
    )
    parser.add_argument(
        "--image_batch", type=int, default=None, help="images per timed call (default: 8 cpu, 256 cuda)"
    )
    parser.add_argument(
        "--text_batch", type=int, default=None, help="texts per timed call (default: 16 cpu, 1024 cuda)"
    )
    parser.add_argument("--rounds", type=int, default=15, help="timed round-robin rounds after the warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument(
        "--authors",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time the authors' PEFT-wrapped path (default: on cpu only; it is slow on cuda)",
    )
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    resolve_common_arguments(args, parser)
    cuda = args.device.startswith("cuda")
    args.size = args.size or ("large" if cuda else "base")
    args.image_batch = args.image_batch or (256 if cuda else 8)
    args.text_batch = args.text_batch or (1024 if cuda else 16)
    args.authors = (not cuda) if args.authors is None else args.authors
    for name in ("image_batch", "text_batch", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def build_models(args: argparse.Namespace) -> dict[str, Any]:
    """CLIP, HySAC (same weights) and optionally the authors' PEFT-wrapped model, eval, on the device, float32."""
    from transformers import CLIPModel

    from hysac_hf import HySACModel
    from hysac_hf.modeling.modeling_hysac import SCALAR_PARAMETERS

    config = clip_config(args.size)
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        clip = CLIPModel(config).eval()
        hysac = HySACModel.from_clip(clip).eval()
    models = {"config": config, "CLIP": clip, "HySAC": hysac}
    if args.authors:
        from hysac_hf.authors_reference import build_authors_model

        state = {k: v.detach().float().cpu() for k, v in clip.state_dict().items()}
        authors = build_authors_model(config, clip_state_dict=state)
        with torch.no_grad():
            for name in SCALAR_PARAMETERS:
                getattr(authors, name).copy_(getattr(hysac, name))
        models[AUTHORS] = authors.to(args.device).eval()
    return models


def padding_difference(hysac, input_ids, input_ids_77, count: int = 64) -> float:
    """Max |encode_text(padded to the longest) - encode_text(padded to 77)| over the first `count` captions."""
    with torch.inference_mode():
        return float((hysac.encode_text(input_ids[:count]) - hysac.encode_text(input_ids_77[:count])).abs().max())


def _features(output):
    """transformers 5 returns a model output from `CLIPModel.get_*_features`, 4 a tensor."""
    return output if hasattr(output, "shape") else output.pooler_output


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    maybe_reexec(args.device, args.reexec)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    models = build_models(args)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    generator = torch.Generator().manual_seed(args.seed)
    image_size = models["config"].vision_config.image_size
    pixel_values = torch.randn(args.image_batch, 3, image_size, image_size, generator=generator).to(args.device, dtype)
    text_generator_state = generator.get_state()
    input_ids = caption_ids(args.text_batch, generator).to(args.device)  # padded to the longest caption
    generator.set_state(text_generator_state)
    input_ids_77 = caption_ids(args.text_batch, generator, pad_to=MAX_TEXT_TOKENS).to(args.device)  # same captions
    if not torch.equal(input_ids_77[:, : input_ids.shape[1]], input_ids):
        raise AssertionError("the 77-token batch must hold the same captions as the padded-to-longest one")
    pad_diff = {"fp32": padding_difference(models["HySAC"], input_ids, input_ids_77)}
    for name in ("CLIP", "HySAC", AUTHORS):
        if name in models:
            models[name] = models[name].to(dtype)  # HySAC's four scalars stay float32
    clip, hysac = models["CLIP"], models["HySAC"]
    if dtype != torch.float32:
        pad_diff[args.dtype] = padding_difference(hysac, input_ids, input_ids_77)

    variants = {
        ("image", "CLIP"): lambda: _features(clip.get_image_features(pixel_values=pixel_values)),
        ("image", "HySAC"): lambda: hysac.encode_image(pixel_values),
        ("text", "CLIP"): lambda: _features(clip.get_text_features(input_ids=input_ids)),
        ("text", "HySAC"): lambda: hysac.encode_text(input_ids),
        ("text", HYSAC_77): lambda: hysac.encode_text(input_ids_77),
    }
    if AUTHORS in models:
        authors = models[AUTHORS]
        variants[("image", AUTHORS)] = lambda: authors.encode_image(pixel_values)
        variants[("text", AUTHORS)] = lambda: authors.encode_text(input_ids)
    batch = {"image": args.image_batch, "text": args.text_batch}

    with torch.inference_mode():
        # Sanity: same towers, so HySAC's unlifted features equal CLIP's and its embeddings equal the authors'.
        diffs = {
            "HySAC vs CLIP image features": hysac.encode_image(pixel_values, lift=False)
            - _features(clip.get_image_features(pixel_values=pixel_values)).float(),
        }
        if AUTHORS in models:
            diffs["HySAC vs authors image embeds"] = variants[("image", "HySAC")]() - variants[("image", AUTHORS)]()
            diffs["HySAC vs authors text embeds"] = variants[("text", "HySAC")]() - variants[("text", AUTHORS)]()
        for name, diff in diffs.items():
            logger.info("sanity: max |%s| = %.2e", name, float(diff.abs().max()))
        flops = {key: count_flops(fn) / batch[key[0]] for key, fn in variants.items()}
        logger.info("built and checked in %.1f s", time.perf_counter() - started)
        times: dict[tuple[str, str], list[float]] = {key: [] for key in variants}
        for round_index in tqdm(range(args.warmup + args.rounds), desc=f"Benchmarking ({args.size})"):
            order = list(variants)
            if round_index % 2:  # alternate the order so no variant always follows the same one
                order.reverse()
            for key in order:
                sync(args.device)
                start = time.perf_counter()
                variants[key]()
                sync(args.device)
                if round_index >= args.warmup:
                    times[key].append(time.perf_counter() - start)

    peak = peak_tflops(args.device, args.peak_tflops)
    import transformers

    results: dict[str, Any] = {
        "size": args.size,
        "device": device_name(args.device),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "batch": batch,
        "text_tokens": {"longest": input_ids.shape[1], "max_length": MAX_TEXT_TOKENS},
        "peak_tflops": peak,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pad_to_longest_max_abs_diff": pad_diff,
        "rows": [],
        "ratios": {},
        "elapsed_s": time.perf_counter() - started,
    }
    for (modality, name), values in times.items():
        best, median = min(values), statistics.median(values)
        results["rows"].append(
            {
                "modality": modality,
                "variant": name,
                "min_s": best,
                "median_s": median,
                "items_per_s_min_time": batch[modality] / best,
                "items_per_s_median": batch[modality] / median,
                "gflop_per_item": flops[(modality, name)] / 1e9,
                "mfu_median": mfu(flops[(modality, name)] * batch[modality], median, peak),
            }
        )
    comparisons = [
        ("image", "HySAC", "CLIP", "HySAC/CLIP"),
        ("text", "HySAC", "CLIP", "HySAC/CLIP"),
        ("text", "HySAC", HYSAC_77, f"longest/{MAX_TEXT_TOKENS} tokens"),
    ]
    if AUTHORS in models:
        comparisons += [("image", "HySAC", AUTHORS, "HySAC/authors"), ("text", "HySAC", AUTHORS, "HySAC/authors")]
    for modality, ours_name, other, label in comparisons:
        ours, theirs = times[(modality, ours_name)], times[(modality, other)]
        results["ratios"][f"{modality} {label}"] = {
            "min": min(theirs) / min(ours),
            "median": statistics.median(theirs) / statistics.median(ours),
            "paired": statistics.median(t / o for t, o in zip(theirs, ours)),
        }
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def format_table(results: dict[str, Any]) -> str:
    batch, tokens = results["batch"], results["text_tokens"]
    pad_diffs = ", ".join(f"{k} {v:.2e}" for k, v in results["pad_to_longest_max_abs_diff"].items())
    lines = [
        (
            f"bench_inference: size={results['size']} device={results['device']} dtype={results['dtype']} "
            f"images/batch={batch['image']} texts/batch={batch['text']} rounds={results['rounds']} "
            f"torch={results['torch']} transformers={results['transformers']}"
        ),
        (
            f"texts: captions of 10-20 tokens padded to the longest ({tokens['longest']} tokens), '{HYSAC_77}' the "
            f"same captions padded to {tokens['max_length']}; max |embeds(longest) - embeds(77)|: {pad_diffs}; "
            f"MFU against {format_optional(results['peak_tflops'], 'g')} TFLOP/s"
        ),
        (
            f"{'modality':<8} {'variant':<16} {'min s':>8} {'median s':>9} {'items/s (min)':>14} "
            f"{'items/s (median)':>17} {'GFLOP/item':>10} {'MFU':>6}"
        ),
    ]
    for row in results["rows"]:
        lines.append(
            f"{row['modality']:<8} {row['variant']:<16} {row['min_s']:>8.4f} {row['median_s']:>9.4f} "
            f"{row['items_per_s_min_time']:>14.1f} {row['items_per_s_median']:>17.1f} {row['gflop_per_item']:>10.3f} "
            f"{format_optional(row['mfu_median'], '.1%'):>6}"
        )
    lines.append("throughput ratios (>1 = the first faster): by min / by median / median of per-round ratios")
    for name, value in results["ratios"].items():
        lines.append(f"  {name:<24} {value['min']:6.3f} / {value['median']:6.3f} / {value['paired']:6.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
