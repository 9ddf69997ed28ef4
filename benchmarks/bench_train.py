"""The HySAC training step vs a CLIP LoRA contrastive step with the same encodings, eager and compiled, side by side.

Four variants, interleaved round-robin in one process after a warm-up (the order reverses every round, so machine
noise hits every variant alike):

- **HySAC eager / compiled**: train.py's step. The module is built as `hysac_hf.training.build_module` builds it:
  `QuadrupletEncoder(configure_trainable(model, ...))` with train.py's default LoRA settings, the frozen towers held
  in bf16 under bf16 (`hold_frozen_weights_in`; LoRA weights and the four scalars float32), and for "compiled"
  the two towers compiled in place (`tower.compile(backend=..., mode=...)`). The step is train.py's loop body for
  one micro-batch: Accelerate's autocast and `accumulate`, `HySACLoss()(out, curvature=..., logit_scale=...)`,
  the non-finite guard on the device (`optimizer.found_inf` on train.py's fused AdamW, `make_optimizer`; no
  host sync), the scheduler, the loss terms accumulated on the device, `clamp_parameters()`.
- **CLIP eager / compiled**: the same towers, LoRA settings, precision, inputs, optimiser, guard and scheduler;
  the same encodings (tower -> projection) but no lift: L2-normalised cosine logits over the 2B x 2B batch,
  symmetric cross-entropy, `logit_scale` clamped to log(100) after the step (as open_clip).

One step = B quadruplets = 2B images (safe, unsafe) + 2B captions (safe, unsafe). Captions have realistic lengths
(10-20 tokens) and are padded to the longest of the batch, as the collator does. Reported per variant:
quadruplets/s (from the minimum and the median step time), peak memory (CUDA: the step's peak allocation above
what was allocated before it, plus the variant's own weights, optimiser state and inputs; CPU: the peak RSS of one
step in a separate process, after its warm-up), model FLOPs per step (`FlopCounterMode`, on the eager step; the
compiled step does the same model FLOPs), MFU (against --peak_tflops; 989 TFLOP/s dense bf16 on CUDA), and the
step-time ratios HySAC/CLIP (median of the per-round ratios; ratio of the minima).

Compilation: each model is compiled once for every batch size and caption length. The inputs are marked dynamic in
the batch and text-length dimensions (in training the text length changes every batch, so the compiled text tower
goes dynamic after the second batch anyway), and the pixel values arrive in the towers' dtype so that the step's
cast is a no-op that keeps the mark (a real batch pays one cast of 2B images, microseconds on a GPU);
``--static_shapes`` compiles static graphs per batch size instead. The CLIP
towers are called exactly as HySAC's, so they reuse the code compiled for HySAC's towers (their first call takes no
compilation). Phases and their elapsed times are logged to stderr as they finish, with the table so far after each
batch size; the final table goes to stdout.

The step is train.py's own (`hysac_hf.training.TrainStep`, with `make_optimizer`); `build_module` below mirrors
`hysac_hf.training.build_module` with the same helpers and settings for a model in memory (that one loads a folder
with a processor); tests/test_benchmarks.py checks that the step trains, holds the frozen towers in bf16 and skips a
non-finite step on the device.

    python benchmarks/bench_train.py --device cuda --size large                 # ViT-L/14, bf16, b=32 and 64
    python benchmarks/bench_train.py --size small --threads 2                   # CPU, ViT-S/32-like, fp32, b=8
    python benchmarks/bench_train.py --size tiny --rounds 2 --compile_backend aot_eager   # a smoke run

On CPU the script re-executes itself with GLIBC_TUNABLES raising glibc's mmap/trim thresholds (``--no_reexec``
to skip): without it large CPU forwards page-fault heavily and timings are erratic.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import (
    SIZES,
    add_common_arguments,
    caption_ids,
    count_flops,
    device_name,
    format_optional,
    maybe_reexec,
    mfu,
    peak_tflops,
    random_clip,
    resolve_common_arguments,
    timed,
)

logger = logging.getLogger("bench_train")

MODELS = ("HySAC", "CLIP")
MODES = ("eager", "compiled")
MAX_LOGIT_SCALE = math.log(100.0)  # open_clip's clamp of CLIP's logit scale


# --------------------------------------------------------------------------------------------------------
# Arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size", choices=sorted(SIZES), default=None, help="tower geometry (default: large on cuda, small on cpu)"
    )
    parser.add_argument(
        "--batch_sizes",
        "--batch_size",
        default=None,
        help="quadruplets per step, comma-separated (default: 32,64 on cuda, 8 on cpu)",
    )
    parser.add_argument("--rounds", "--repeats", type=int, default=5, help="timed round-robin rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (compilation included)")
    parser.add_argument(
        "--modes",
        default="eager,compiled",
        help="which of eager,compiled to run (inductor compilation takes minutes on a small CPU)",
    )
    parser.add_argument("--compile_backend", default="inductor", help="torch.compile backend (train.py's flag)")
    parser.add_argument("--compile_mode", default=None, help="torch.compile mode (train.py's flag)")
    parser.add_argument(
        "--static_shapes",
        action="store_true",
        help="do not mark the inputs dynamic: every batch size compiles its own static graphs (minutes more; what "
        "a run with fixed-length text would get)",
    )
    parser.add_argument("--no_memory", dest="memory", action="store_false", help="skip the peak-memory measurement")
    parser.add_argument("--memory_child", default=None, help=argparse.SUPPRESS)  # internal: "MODEL:MODE"
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    resolve_common_arguments(args, parser)
    cuda = args.device.startswith("cuda")
    args.size = args.size or ("large" if cuda else "small")
    try:
        args.batch_sizes = [int(b) for b in (args.batch_sizes or ("32,64" if cuda else "8")).split(",")]
    except ValueError:
        parser.error(f"--batch_sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if min(args.batch_sizes) < 2:
        parser.error(f"--batch_sizes must be >= 2 (a contrastive loss needs negatives), got {args.batch_sizes}")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - set(MODES):
        parser.error(f"--modes must be a comma-separated subset of {','.join(MODES)}, got {','.join(args.modes)!r}")
    if args.rounds < 1 or args.warmup < 1:
        parser.error(f"--rounds and --warmup must be >= 1, got {args.rounds} and {args.warmup}")
    return args


# --------------------------------------------------------------------------------------------------------
# The modules
def training_config(args: argparse.Namespace):
    """train.py's `TrainingConfig` with its defaults (LoRA, optimiser, loss, schedule) and this run's precision and
    compile settings; the benchmark reads every setting from it, so it follows train.py's defaults."""
    from hysac_hf.training import TrainingConfig

    return TrainingConfig(
        model_name_or_path="<random weights>",
        output_dir="<none>",
        mixed_precision="bf16" if args.dtype == "bf16" else "no",
        torch_compile="compiled" in args.modes,
        torch_compile_backend=args.compile_backend,
        torch_compile_mode=args.compile_mode,
        cpu=args.device == "cpu",
    )


class CLIPLoRAEncoder(nn.Module):
    """The CLIP baseline's forward: the same towers and projections as `QuadrupletEncoder`, without the lift.

    Args:
        model: a `PeftModel` around a `CLIPModel`.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def clip(self) -> nn.Module:
        return self.model.get_base_model()

    def forward(self, pixel_values: Tensor, input_ids: Tensor) -> dict[str, Tensor]:
        clip = self.clip
        pixel_values = pixel_values.to(clip.vision_model.embeddings.class_embedding.dtype)
        # The towers are called exactly as `HySACModel.encode_image/encode_text` call them, so that compiled CLIP
        # towers trace to the same graphs as HySAC's (and hit inductor's caches).
        image = clip.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=False)
        text = clip.text_model(input_ids=input_ids, attention_mask=None, position_ids=None)
        image, text = clip.visual_projection(image.pooler_output), clip.text_projection(text.pooler_output)
        return {"image": image.float(), "text": text.float(), "logit_scale": clip.logit_scale.float()}


def clip_contrastive_loss(out: dict[str, Tensor]) -> dict[str, Tensor]:
    """CLIP's symmetric InfoNCE over cosine logits, in float32."""
    image, text = F.normalize(out["image"], dim=-1), F.normalize(out["text"], dim=-1)
    logits = out["logit_scale"].exp() * image @ text.t()
    labels = torch.arange(len(logits), device=logits.device)
    return {"loss": 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))}


def build_module(model_name: str, mode: str, source, config, device: str) -> nn.Module:
    """One variant's module on `device`, built like `hysac_hf.training.build_module` (which loads from a folder with a
    processor; here the towers are random, so this mirrors its model part with the same helpers and settings)."""
    from peft import LoraConfig, get_peft_model

    from hysac_hf import HySACModel
    from hysac_hf.encode import QuadrupletEncoder
    from hysac_hf.modeling.modeling_hysac import LORA_TARGET_MODULES
    from hysac_hf.training import configure_trainable, hold_frozen_weights_in, trainable_kwargs

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(config.mixed_precision))
    if model_name == "HySAC":
        with torch.device(device):
            base = HySACModel.from_clip(source)
        if half is not None and not config.full_finetune:
            hold_frozen_weights_in(base, half)
        module = QuadrupletEncoder(
            configure_trainable(base, gradient_checkpointing=config.gradient_checkpointing, **trainable_kwargs(config))
        )
        towers = (module.hysac.vision_model, module.hysac.text_model)
    else:
        clip = copy.deepcopy(source)
        if half is not None:
            hold_frozen_weights_in(clip, half)  # the same four parts exist on a CLIPModel
        clip.requires_grad_(False)
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            bias="none",
            target_modules=list(config.lora_target_modules or LORA_TARGET_MODULES),  # None: CLIP's, as HySAC's
        )
        module = CLIPLoRAEncoder(get_peft_model(clip, lora))
        clip.logit_scale.requires_grad_(True)
        towers = (clip.vision_model, clip.text_model)
    if mode == "compiled":
        for tower in towers:
            tower.compile(backend=config.torch_compile_backend, mode=config.torch_compile_mode)
    return module.to(device).train()


class TrainingStep:
    """train.py's step (`hysac_hf.training.TrainStep`: forward, loss, the on-device non-finite guard, backward, fused
    AdamW, scheduler, clamps) on a fixed batch, for HySAC or the CLIP baseline (gradient accumulation 1).

    Nothing here reads a device value on the host; `running` and `first_bad` are the step's device-side bookkeeping.
    """

    def __init__(self, model_name: str, module: nn.Module, config, accelerator, batch: dict[str, Tensor]):
        from transformers import get_scheduler

        from hysac_hf.losses import HySACLoss
        from hysac_hf.training import TrainStep, make_optimizer

        self.model_name, self.config, self.accelerator, self.batch = model_name, config, accelerator, batch
        optimizer, fused = make_optimizer(module, config, accelerator.device)
        scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=0, num_training_steps=10**6)
        self.module, self.optimizer, self.scheduler = accelerator.prepare(module, optimizer, scheduler)
        inner = accelerator.unwrap_model(self.module)
        if model_name == "HySAC":
            loss = HySACLoss(
                entailment_weight=config.entailment_weight,
                aperture_scale=config.aperture_scale,
                min_radius=inner.hysac.config.min_radius,
                weighting=config.loss_weighting,
                local_negatives=config.local_negatives,
            )
            loss_fn = lambda out: loss(out, curvature=out["curvature"], logit_scale=out["logit_scale"])  # noqa: E731
            clamp = inner.hysac.clamp_parameters
        else:
            loss_fn = clip_contrastive_loss

            def clamp() -> None:
                with torch.no_grad():
                    inner.clip.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

        self.step = TrainStep(
            self.module, self.optimizer, self.scheduler, accelerator, loss_fn, clamp, seed=config.seed,
            skip_on_device=fused,
        )  # fmt: skip
        self.micro_step = 0

    @property
    def skip_on_device(self) -> bool:
        return self.step.skip_on_device

    @property
    def running(self) -> dict[str, Tensor]:
        return self.step.running

    @property
    def first_bad(self) -> Tensor:
        return self.step.first_bad

    def __call__(self) -> Tensor:
        self.step(self.batch, self.micro_step, self.micro_step)
        self.micro_step += 1
        return self.step.last_terms["loss"]

    def resident_bytes(self) -> int:
        """Bytes of this variant's parameters, buffers and optimiser state (each storage once)."""
        tensors = [*self.module.parameters(), *self.module.buffers()]
        for state in self.optimizer.optimizer.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.numel()}
        return sum(storages.values())


def make_batch(
    batch_size: int, image_dtype: torch.dtype, device: str, seed: int, dynamic: bool = True
) -> dict[str, Tensor]:
    """2B images and 2B captions (padded to the longest), marked dynamic in batch and text length (`dynamic`)."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(2 * batch_size, 3, 224, 224, generator=generator).to(device, image_dtype)
    input_ids = caption_ids(2 * batch_size, generator).to(device)
    if dynamic:
        torch._dynamo.maybe_mark_dynamic(pixel_values, 0)
        torch._dynamo.maybe_mark_dynamic(input_ids, 0)
        torch._dynamo.maybe_mark_dynamic(input_ids, 1)
    return {"pixel_values": pixel_values, "input_ids": input_ids}


def build_steps(args, config, accelerator, variants) -> tuple[dict, dict]:
    """`({(model, mode): TrainingStep}, {batch_size: batch})`: the steps start on the first batch size."""
    source = random_clip(args.size, args.device, args.seed)
    steps = {}
    for model_name, mode in variants:
        module = build_module(model_name, mode, source, config, args.device)
        steps[(model_name, mode)] = TrainingStep(model_name, module, config, accelerator, batch={})
    del source
    image_dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32
    batches = {
        b: make_batch(b, image_dtype, args.device, args.seed + b, dynamic=not args.static_shapes)
        for b in args.batch_sizes
    }
    return steps, batches


def make_accelerator(config):
    from accelerate import Accelerator

    return Accelerator(mixed_precision=config.mixed_precision, cpu=config.cpu)


# --------------------------------------------------------------------------------------------------------
# Memory
def cuda_peak_mib(step: TrainingStep) -> float:
    """The step's peak allocation above what was allocated before it, plus its variant's resident state and inputs."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    inputs = sum(t.untyped_storage().nbytes() for t in step.batch.values())
    return (torch.cuda.max_memory_allocated() - before + step.resident_bytes() + inputs) / 2**20


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(args: argparse.Namespace) -> None:
    """Child process: one variant, warm-up (compilation), then the peak RSS of one step; prints JSON."""
    model_name, mode = args.memory_child.split(":")
    args.modes = [mode]
    config = training_config(args)
    steps, batches = build_steps(args, config, make_accelerator(config), [(model_name, mode)])
    step = steps[(model_name, mode)]
    step.batch = batches[args.batch_sizes[0]]
    for _ in range(args.warmup):
        step()
    reset = _reset_peak_rss()
    step()
    print(json.dumps({"peak_mib": _peak_rss_mib(), "after_warmup": reset}))


def cpu_peak_mib(args: argparse.Namespace, model_name: str, mode: str, batch_size: int) -> float:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory_child",
        f"{model_name}:{mode}",
        "--batch_sizes",
        str(batch_size),
        "--size",
        args.size,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--warmup",
        str(args.warmup),
        "--seed",
        str(args.seed),
        "--compile_backend",
        args.compile_backend,
        "--no_reexec",  # the environment (GLIBC_TUNABLES) is inherited
    ]
    if args.static_shapes:
        command.append("--static_shapes")
    if args.compile_mode:
        command += ["--compile_mode", args.compile_mode]
    if args.threads:
        command += ["--threads", str(args.threads)]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory child for {model_name} {mode} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


# --------------------------------------------------------------------------------------------------------
# Main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    maybe_reexec(args.device, args.reexec)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("accelerate", "torch._dynamo", "torch._inductor"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return {}

    started = time.perf_counter()
    phases: dict[str, float] = {}

    def phase(name: str, since: float) -> float:
        now = time.perf_counter()
        phases[name] = now - since
        logger.info("phase %-28s %7.1f s (total %.1f s)", name, now - since, now - started)
        return now

    variants = [(model_name, mode) for mode in args.modes for model_name in MODELS]
    config = training_config(args)
    accelerator = make_accelerator(config)
    steps, batches = build_steps(args, config, accelerator, variants)
    mark = phase("build", started)
    peak = peak_tflops(args.device, args.peak_tflops)

    import transformers

    rows, ratios = [], {}
    results = {
        "size": args.size,
        "device": device_name(args.device),
        "dtype": args.dtype,
        "batch_sizes": args.batch_sizes,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "compile": {"backend": args.compile_backend, "mode": args.compile_mode, "static_shapes": args.static_shapes},
        "peak_tflops": peak,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "rows": rows,
        "ratios": ratios,
        "phases_s": phases,
    }
    for batch_size in args.batch_sizes:
        for step in steps.values():
            step.batch = batches[batch_size]
        first_call = {}
        for key, step in steps.items():  # warm-up; a compiled variant compiles on its first call
            first_call[key] = timed(step, args.device)
            for _ in range(args.warmup - 1):
                step()
            mark = phase(f"warm-up b={batch_size} {key[0]} {key[1]}", mark)
        times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
        for round_index in range(args.rounds):
            order = list(steps) if round_index % 2 == 0 else list(reversed(steps))
            for key in order:
                times[key].append(timed(steps[key], args.device))
        mark = phase(f"timed rounds b={batch_size}", mark)
        flops = {}
        for model_name in MODELS:  # model FLOPs: the same for the eager and the compiled step
            key = (model_name, "eager") if (model_name, "eager") in steps else (model_name, args.modes[0])
            flops[model_name] = count_flops(steps[key])
        mark = phase(f"FLOP count b={batch_size}", mark)
        memory: dict[tuple[str, str], float | None] = {key: None for key in steps}
        if args.memory:
            for key in steps:
                memory[key] = (
                    cuda_peak_mib(steps[key])
                    if args.device.startswith("cuda")
                    else cpu_peak_mib(args, key[0], key[1], batch_size)
                )
            mark = phase(f"memory b={batch_size}", mark)
        for (model_name, mode), values in times.items():
            best, median = min(values), statistics.median(values)
            rows.append(
                {
                    "batch_size": batch_size,
                    "model": model_name,
                    "mode": mode,
                    "text_tokens": batches[batch_size]["input_ids"].shape[1],
                    "s_per_step_min": best,
                    "s_per_step_median": median,
                    "quadruplets_per_s_min_time": batch_size / best,
                    "quadruplets_per_s_median": batch_size / median,
                    "first_call_s": first_call[(model_name, mode)],
                    "peak_mib": memory[(model_name, mode)],
                    "tflop_per_step": flops[model_name] / 1e12,
                    "mfu_median": mfu(flops[model_name], median, peak),
                }
            )
        for mode in args.modes:
            hysac, clip = times[("HySAC", mode)], times[("CLIP", mode)]
            ratios[f"b={batch_size} {mode}"] = {
                "paired_median": statistics.median(h / c for h, c in zip(hysac, clip)),
                "of_minima": min(hysac) / min(clip),
            }
        if len(args.modes) == 2:
            for model_name in MODELS:
                eager, compiled = times[(model_name, "eager")], times[(model_name, "compiled")]
                ratios[f"b={batch_size} {model_name} compiled speed-up"] = {
                    "paired_median": statistics.median(e / c for e, c in zip(eager, compiled)),
                    "of_minima": min(eager) / min(compiled),
                }
        # Partial results as each batch size finishes, so that a run cut short by a time limit still reports.
        logger.info("results so far:\n%s", format_table(results))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    phases["total"] = time.perf_counter() - started
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def format_table(results: dict[str, Any]) -> str:
    peak = results["peak_tflops"]
    lines = [
        (
            f"bench_train: size={results['size']} device={results['device']} dtype={results['dtype']} "
            f"rounds={results['rounds']} warmup={results['warmup']} compile={results['compile']['backend']}"
            f"/{results['compile']['mode'] or 'default'}{'/static' if results['compile']['static_shapes'] else ''} "
            f"torch={results['torch']} transformers={results['transformers']}"
        ),
        (
            "one step = B quadruplets (2B images + 2B captions of 10-20 tokens padded to the longest), LoRA, "
            f"loss, fused AdamW, clamps; MFU = model FLOPs / median step time / {format_optional(peak, 'g')} TFLOP/s"
        ),
        (
            f"{'batch':>5} {'model':<6} {'mode':<9} {'tokens':>6} {'s/step min':>10} {'s/step med':>10} "
            f"{'quads/s best':>12} {'quads/s med':>11} {'peak MiB':>9} {'TFLOP/step':>10} {'MFU':>6} {'1st call s':>10}"
        ),
    ]
    for row in results["rows"]:
        lines.append(
            f"{row['batch_size']:>5} {row['model']:<6} {row['mode']:<9} {row['text_tokens']:>6} "
            f"{row['s_per_step_min']:>10.4f} {row['s_per_step_median']:>10.4f} "
            f"{row['quadruplets_per_s_min_time']:>12.2f} {row['quadruplets_per_s_median']:>11.2f} "
            f"{format_optional(row['peak_mib'], '.0f'):>9} {row['tflop_per_step']:>10.4f} "
            f"{format_optional(row['mfu_median'], '.1%'):>6} "
            f"{row['first_call_s']:>10.1f}"
        )
    lines.append("step-time ratios: median of per-round ratios (ratio of minima)")
    for name, value in results["ratios"].items():
        label = name if "speed-up" in name else f"{name} HySAC/CLIP"
        lines.append(f"  {label:<36} {value['paired_median']:6.3f} ({value['of_minima']:.3f})")
    lines.append("phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in results["phases_s"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
