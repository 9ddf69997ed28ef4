"""One HySAC training step vs one plain CLIP LoRA contrastive step with the same encodings, side by side.

HySAC step: encode 2B images (I, I*) and 2B texts (T, T*) with LoRA towers, lift to the hyperboloid, seven
losses (four Lorentzian contrastive terms + three entailment cones), backward, AdamW, clamps.
CLIP step: the same towers, LoRA, 2B images and 2B texts, L2-normalised cosine logits over the 2B x 2B batch,
symmetric cross-entropy, backward, AdamW. Target: HySAC / CLIP <= 1.10.

The variants are interleaved round-robin in one process after a warm-up; min and median are reported. Peak
memory is the maximum RSS of a separate short process per variant. Run::

    python benchmarks/bench_train.py [--size small|base] [--batch_size 8] [--repeats 10]

The script re-executes itself with GLIBC_TUNABLES raising glibc's mmap/trim thresholds (see
offline-setup.md §6): without it large CPU forwards page-fault heavily and timings are erratic.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"

SIZES = {
    # ViT-S/32-like towers (fast enough for 2 CPU cores).
    "small": {
        "text": {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 6},
        "vision": {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 6, "patch_size": 32},
        "projection_dim": 256,
    },
    # ViT-B/32 CLIP geometry.
    "base": {
        "text": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8},
        "vision": {
            "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "patch_size": 32
        },
        "projection_dim": 512,
    },
    # ViT-L/14 CLIP geometry (what HySAC fine-tunes); for a GPU.
    "large": {
        "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
        "vision": {
            "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 14
        },
        "projection_dim": 768,
    },
}


def build(size: str, variant: str, device: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPConfig, CLIPModel

    from hysac_hf import HySACModel
    from hysac_hf.training import LORA_TARGET_MODULES, HySACTrainingModule, parameter_groups

    spec = SIZES[size]
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, max_position_embeddings=77, **spec["text"]),
        vision_config=dict(image_size=224, **spec["vision"]),
        projection_dim=spec["projection_dim"],
    )
    clip = CLIPModel(config)
    lora = LoraConfig(r=16, lora_alpha=1, lora_dropout=0.1, bias="none", target_modules=list(LORA_TARGET_MODULES))
    if variant == "hysac":
        base = HySACModel.from_clip(clip)
        base.requires_grad_(False)
        model = HySACTrainingModule(get_peft_model(base, lora))
        for name in ("logit_scale", "curv", "visual_alpha", "textual_alpha"):
            getattr(base, name).requires_grad_(True)
    else:
        clip.requires_grad_(False)
        model = get_peft_model(clip, lora)
        clip.logit_scale.requires_grad_(True)
    model.to(device).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.2), lr=1e-5, betas=(0.9, 0.98))
    return model, optimizer


def make_step(variant: str, model, optimizer, batch_size: int, device: str):
    import torch
    import torch.nn.functional as F

    from hysac_hf.losses import HySACLoss

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2 * batch_size, 3, 224, 224, generator=generator).to(device)
    ids = torch.randint(1, 49000, (2 * batch_size, 77), generator=generator)
    ids[:, 20] = 49407
    ids = ids.to(device)
    loss_fn = HySACLoss()

    def hysac_step():
        out = model(pixel_values=pixels, input_ids=ids)
        loss = loss_fn(
            out["image"], out["unsafe_image"], out["text"], out["unsafe_text"], out["curv"], out["logit_scale"]
        )["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.clamp_parameters()
        return loss

    def clip_step():
        clip = model.get_base_model()
        image = clip.get_image_features(pixel_values=pixels)
        text = clip.get_text_features(input_ids=ids)
        image = getattr(image, "pooler_output", image)
        text = getattr(text, "pooler_output", text)
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        logits = clip.logit_scale.exp() * text @ image.t()
        labels = torch.arange(len(logits), device=logits.device)
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return hysac_step if variant == "hysac" else clip_step


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def loss_only_time(batch_size: int, dim: int, repeats: int) -> float:
    """Median seconds of the seven HySAC losses (forward + backward) on random embeddings."""
    import torch

    from hysac_hf.losses import HySACLoss

    loss_fn = HySACLoss()
    times = []
    for _ in range(repeats):
        embeds = [(0.3 * torch.randn(batch_size, dim)).requires_grad_() for _ in range(4)]
        start = time.perf_counter()
        loss_fn(*embeds, torch.tensor(1.0), torch.tensor(2.65))["loss"].backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_only(args) -> None:
    """Child process: a few steps of one variant; prints the peak RSS (MiB)."""
    import torch

    torch.set_num_threads(args.threads)
    model, optimizer = build(args.size, args.memory_only, args.device)
    step = make_step(args.memory_only, model, optimizer, args.batch_size, args.device)
    for _ in range(2):
        step()
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mib": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="Tower geometry (random weights).")
    parser.add_argument("--batch_size", type=int, default=8, help="Quadruplets per step (2B images, 2B texts).")
    parser.add_argument("--repeats", type=int, default=8, help="Timed rounds per variant.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed rounds per variant.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPU).")
    parser.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu")
    parser.add_argument("--memory_only", choices=("hysac", "clip"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cpu" and os.environ.get("GLIBC_TUNABLES") != TUNABLES:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": TUNABLES})
    if args.memory_only:
        return memory_only(args)

    import torch

    torch.set_num_threads(args.threads)
    steps = {}
    for variant in ("hysac", "clip"):
        model, optimizer = build(args.size, variant, args.device)
        steps[variant] = make_step(variant, model, optimizer, args.batch_size, args.device)
    times: dict[str, list[float]] = {"hysac": [], "clip": []}
    for round_index in range(args.warmup + args.repeats):
        for variant, step in steps.items():
            sync(args.device)
            start = time.perf_counter()
            step()
            sync(args.device)
            if round_index >= args.warmup:
                times[variant].append(time.perf_counter() - start)
    ratios = [h / c for h, c in zip(times["hysac"], times["clip"])]
    dim = SIZES[args.size]["projection_dim"]
    loss_time = loss_only_time(args.batch_size, dim, max(args.repeats, 5))
    memory = {}
    for variant in ("hysac", "clip"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--memory_only",
                variant,
                "--size",
                args.size,
                "--batch_size",
                str(args.batch_size),
                "--threads",
                str(args.threads),
                "--device",
                args.device,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        memory[variant] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]

    print(
        f"size={args.size} batch={args.batch_size} quadruplets (2x{args.batch_size} images + 2x{args.batch_size} texts per step), "
        f"device={args.device}, threads={args.threads}, GLIBC_TUNABLES={'set' if os.environ.get('GLIBC_TUNABLES') else 'unset'}"
    )
    print(f"{'variant':<8} {'min s/step':>11} {'median s/step':>14} {'samples/s (median)':>19} {'peak MiB':>9}")
    for variant in ("hysac", "clip"):
        median = statistics.median(times[variant])
        print(
            f"{variant:<8} {min(times[variant]):>11.3f} {median:>14.3f} {args.batch_size / median:>19.2f} {memory[variant]:>9.0f}"
        )
    print(
        f"ratio HySAC/CLIP per round: min {min(ratios):.3f}, median {statistics.median(ratios):.3f}; "
        f"ratio of the minima {min(times['hysac']) / min(times['clip']):.3f} (target <= 1.10)"
    )
    print(
        f"seven HySAC losses alone (forward+backward, B={args.batch_size}, D={dim}): {1e3 * loss_time:.2f} ms "
        f"= {100 * loss_time / statistics.median(times['hysac']):.2f}% of the HySAC step"
    )


if __name__ == "__main__":
    main()
