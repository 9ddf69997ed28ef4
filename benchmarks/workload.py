"""What the benchmarks share: tower geometries, random CLIPs built on the device, captions of realistic length,
FLOP counting and MFU, device timing, and the CPU allocator setting.

Nothing here downloads anything: the towers have random weights (throughput does not depend on the values), and
captions are random token ids with realistic lengths, so the scripts run on a machine without network access.
Imports torch, transformers and peft only (no datasets, evaluate or faiss: GPU machines may lack them).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

# glibc's default malloc makes large CPU forwards page-fault heavily and erratically; raising the mmap and trim
# thresholds (offline-setup.md §6) steadies CPU timings. It only takes effect at process start: see `maybe_reexec`.
GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"

# Dense bf16 peak of one H100/H200 SXM (TFLOP/s), the denominator of MFU on CUDA unless --peak_tflops says otherwise.
H100_BF16_PEAK_TFLOPS = 989.0

# CLIP token ids (openai/clip-vit-*): start and end of text; the tokenizer pads with the end-of-text token.
BOS_ID, EOS_ID = 49406, 49407
MAX_TEXT_TOKENS = 77
# Captions of typical length (COCO/ViSU-like, 8-18 words), in tokens including start and end of text.
CAPTION_TOKENS = (10, 20)

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {  # smoke runs and tests
        "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
        "vision_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "patch_size": 32,
        },
        "projection_dim": 32,
    },
    "small": {  # ViT-S/32-like: a training step that 2 CPU cores run in seconds
        "text_config": {
            "hidden_size": 384,
            "intermediate_size": 1536,
            "num_hidden_layers": 6,
            "num_attention_heads": 6,
        },
        "vision_config": {
            "hidden_size": 384,
            "intermediate_size": 1536,
            "num_hidden_layers": 6,
            "num_attention_heads": 6,
            "patch_size": 32,
        },
        "projection_dim": 256,
    },
    "base": {  # ViT-B/32
        "text_config": {
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
        },
        "vision_config": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "patch_size": 32,
        },
        "projection_dim": 512,
    },
    "large": {  # ViT-L/14, HySAC's backbone: for a GPU
        "text_config": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
        },
        "vision_config": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "patch_size": 14,
        },
        "projection_dim": 768,
    },
}


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def maybe_reexec(device: str, enabled: bool = True) -> None:
    """On CPU, re-run this process with `GLIBC_TUNABLES` set (it only takes effect at process start)."""
    if enabled and device == "cpu" and sys.platform.startswith("linux") and "GLIBC_TUNABLES" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": GLIBC_TUNABLES})


def clip_config(size: str):
    """A transformers `CLIPConfig` of the named geometry (224-px images, CLIP's 49,408-token vocabulary, 77 tokens)."""
    from transformers import CLIPConfig

    spec = SIZES[size]
    return CLIPConfig(
        text_config={**spec["text_config"], "vocab_size": 49408, "max_position_embeddings": MAX_TEXT_TOKENS},
        vision_config={**spec["vision_config"], "image_size": 224},
        projection_dim=spec["projection_dim"],
    )


def random_clip(size: str, device: str, seed: int = 0):
    """A float32 `CLIPModel` with random weights, initialised directly on `device` (no host copy of ViT-L)."""
    import torch
    from transformers import CLIPModel

    torch.manual_seed(seed)
    with torch.device(device):
        return CLIPModel(clip_config(size)).eval()


def caption_ids(n: int, generator, pad_to: int | None = None, lengths: tuple[int, int] = CAPTION_TOKENS):
    """`(n, L)` token ids of captions whose lengths (start and end of text included) are drawn uniformly from
    `lengths`, right-padded with the end-of-text token like CLIP's tokenizer: to the longest caption of the batch
    (the processor's default, `L = max length`) or to `pad_to` tokens (77: `padding="max_length"`).
    """
    import torch

    low, high = lengths
    sizes = torch.randint(low, high + 1, (n,), generator=generator)
    width = int(sizes.max()) if pad_to is None else pad_to
    ids = torch.full((n, width), EOS_ID, dtype=torch.long)
    ids[:, 0] = BOS_ID
    for row, size in enumerate(sizes.tolist()):
        ids[row, 1 : size - 1] = torch.randint(0, BOS_ID, (size - 2,), generator=generator)  # words: no specials
    return ids


def sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> float:
    """Seconds one call of `fn` takes, the device's queue drained before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def _cpu_attention_flops() -> dict:
    """FLOP formulas for CPU's fused attention kernels, which `FlopCounterMode` does not know (it counts the CUDA ones):
    the same formulas torch uses for the CUDA kernels, so CPU and GPU counts agree."""
    import torch
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):

        def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query, key, value)

        def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
            return sdpa_backward_flop_count(grad_out, query, key, value)

        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = forward
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    return mapping


def count_flops(fn: Callable[[], Any]) -> int:
    """Model FLOPs of one call of `fn` (matrix products, convolutions, attention), by `FlopCounterMode`."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops())
    with counter:
        fn()
    return counter.get_total_flops()


def peak_tflops(device: str, requested: float | None) -> float | None:
    """The MFU denominator: `requested`, else the H100/H200 dense bf16 peak on CUDA, else None (no MFU on CPU)."""
    if requested is not None:
        if requested <= 0:
            raise ValueError(f"--peak_tflops must be > 0, got {requested}")
        return requested
    return H100_BF16_PEAK_TFLOPS if str(device).startswith("cuda") else None


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1] (None without a peak)."""
    return None if peak is None else flops / seconds / (peak * 1e12)


def device_name(device: str) -> str:
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"cpu, {torch.get_num_threads()} threads"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags both benchmarks take: device, dtype, size, threads, seed, peak, JSON output, re-exec."""
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--dtype",
        choices=("bf16", "fp32"),
        default=None,
        help="bf16 (the default on cuda) or fp32 (the default on cpu)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help=f"peak TFLOP/s for MFU (default on cuda: {H100_BF16_PEAK_TFLOPS:g}, H100/H200 SXM dense bf16; "
        "on cpu MFU is printed only with this flag)",
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument(
        "--no_reexec",
        "--no-reexec",
        dest="reexec",
        action="store_false",
        help="on CPU, do not re-run with GLIBC_TUNABLES set (numbers get noisier)",
    )


def resolve_common_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill device/dtype defaults and refuse impossible combinations."""
    import torch

    args.device = args.device or default_device()
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device; use --device cpu")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error(f"--peak_tflops must be > 0, got {args.peak_tflops}")


def format_optional(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)
