"""The benchmarks keep running as the code moves: smoke runs of bench_train.py and bench_inference.py at the tiny size
(every variant in the table, finite numbers, FLOP counts that agree with the model), the training step they time
(it trains, holds the frozen towers in bf16, and skips a non-finite step on the device as train.py does), and the
shared workload helpers against hand-computed values. No timing is asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from hysac_hf.testing import REPO_ROOT

BENCHMARKS = REPO_ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_train
import workload

GLIBC_TUNABLES = workload.GLIBC_TUNABLES


def run_benchmark(script: str, *args: str, tmp_path) -> tuple[dict, str]:
    """Run a benchmark in a subprocess (with GLIBC_TUNABLES set, so it does not re-execute); (JSON, stdout)."""
    out = tmp_path / f"{script}.json"
    env = {**os.environ, "GLIBC_TUNABLES": GLIBC_TUNABLES, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--device", "cpu", "--size", "tiny", "--threads", "1"]
        + list(args)
        + ["--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


def assert_finite_numbers(row: dict, skip: tuple[str, ...] = ()) -> None:
    for key, value in row.items():
        if isinstance(value, float) and key not in skip:
            assert math.isfinite(value) and value >= 0, (key, value, row)


# --------------------------------------------------------------------------------------------------------
# Smoke runs
@pytest.mark.slow
def test_bench_train_reports_every_variant(tmp_path):
    results, stdout = run_benchmark(
        "bench_train.py",
        "--batch_sizes",
        "2,3",
        "--rounds",
        "1",
        "--warmup",
        "1",
        "--compile_backend",
        "eager",  # dynamo without inductor: the compiled path, minus minutes of C++ compilation
        "--no_memory",
        "--peak_tflops",
        "1",
        tmp_path=tmp_path,
    )
    rows = {(r["batch_size"], r["model"], r["mode"]): r for r in results["rows"]}
    assert set(rows) == {(b, m, mode) for b in (2, 3) for m in ("HySAC", "CLIP") for mode in ("eager", "compiled")}
    for (batch_size, model, mode), row in rows.items():
        assert_finite_numbers(row)
        assert row["peak_mib"] is None  # --no_memory
        assert row["quadruplets_per_s_median"] == pytest.approx(batch_size / row["s_per_step_median"])
        assert row["mfu_median"] == pytest.approx(row["tflop_per_step"] / row["s_per_step_median"] / 1.0)
        assert 10 <= row["text_tokens"] <= 20  # captions padded to the longest, not to 77
        line = f"{batch_size:>5} {model:<6} {mode:<9}"
        assert sum(text.startswith(line) for text in stdout.splitlines()) == 1, (line, stdout)
    for batch_size in (2, 3):
        # The same towers and encodings: HySAC's step adds only the lift and the losses' small products.
        hysac, clip = rows[(batch_size, "HySAC", "eager")], rows[(batch_size, "CLIP", "eager")]
        assert hysac["tflop_per_step"] == pytest.approx(clip["tflop_per_step"], rel=0.02)
        assert hysac["tflop_per_step"] > clip["tflop_per_step"]
    assert set(results["ratios"]) == {
        f"b={b} {name}"
        for b in (2, 3)
        for name in ("eager", "compiled", "HySAC compiled speed-up", "CLIP compiled speed-up")
    }
    for value in results["ratios"].values():
        assert_finite_numbers(value)
    assert results["phases_s"]["total"] > 0


@pytest.mark.slow
def test_bench_families_reports_every_family_side_by_side(tmp_path):
    results, stdout = run_benchmark("bench_families.py", "--rounds", "1", tmp_path=tmp_path)
    rows = {(r["family"], r["modality"]): r for r in results["rows"]}
    families = ("clip", "siglip", "siglip2", "metaclip_2")
    assert set(rows) == {(family, modality) for family in families for modality in ("image", "text")}
    for (family, modality), row in rows.items():
        assert_finite_numbers(row, skip=("text_tokens",))
        assert row["ratio_median"] > 0 and f"{family:<11} {modality:<8}" in stdout
        if modality == "text":  # SigLIP embeds its fixed 64 tokens, CLIP and MetaCLIP 2 captions of 10-20
            assert (row["text_tokens"] == 64) == (family in ("siglip", "siglip2"))
            assert family in ("siglip", "siglip2") or 10 <= row["text_tokens"] <= 20


@pytest.mark.slow
def test_bench_inference_reports_every_variant(tmp_path):
    results, stdout = run_benchmark("bench_inference.py", "--rounds", "1", tmp_path=tmp_path)
    rows = {(r["modality"], r["variant"]): r for r in results["rows"]}
    assert set(rows) == {
        ("image", "CLIP"),
        ("image", "HySAC"),
        ("image", "authors (PEFT)"),
        ("text", "CLIP"),
        ("text", "HySAC"),
        ("text", "HySAC @77"),
        ("text", "authors (PEFT)"),
    }
    for (modality, variant), row in rows.items():
        assert_finite_numbers(row)
        assert row["mfu_median"] is None  # CPU, no --peak_tflops
        assert f"{modality:<8} {variant:<16}" in stdout
    # Padding to the longest caption changes nothing but the cost (float32: equal to rounding).
    assert results["pad_to_longest_max_abs_diff"]["fp32"] < 1e-5
    longest = results["text_tokens"]["longest"]
    assert 10 <= longest <= 20
    # Per-token work is the same and attention grows faster than the length: 77 tokens cost > 77/longest times more.
    assert rows[("text", "HySAC @77")]["gflop_per_item"] > 77 / longest * rows[("text", "HySAC")]["gflop_per_item"]
    # The lift adds no matrix products; the authors' unmerged LoRA adds some.
    for modality in ("image", "text"):
        assert rows[(modality, "HySAC")]["gflop_per_item"] == pytest.approx(rows[(modality, "CLIP")]["gflop_per_item"])
        assert rows[(modality, "authors (PEFT)")]["gflop_per_item"] > rows[(modality, "HySAC")]["gflop_per_item"]
    assert set(results["ratios"]) == {
        "image HySAC/CLIP",
        "text HySAC/CLIP",
        "text longest/77 tokens",
        "image HySAC/authors",
        "text HySAC/authors",
    }


# --------------------------------------------------------------------------------------------------------
# The step the benchmark times
def build_tiny_steps(dtype: str):
    args = bench_train.parse_args(
        ["--device", "cpu", "--size", "tiny", "--dtype", dtype, "--modes", "eager", "--batch_sizes", "2", "--no_reexec"]
    )
    config = bench_train.training_config(args)
    accelerator = bench_train.make_accelerator(config)
    steps, batches = bench_train.build_steps(args, config, accelerator, [("HySAC", "eager"), ("CLIP", "eager")])
    for step in steps.values():
        step.batch = dict(batches[2])
    return steps


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_benchmark_step_trains_like_train_py():
    steps = build_tiny_steps("bf16")
    for (model_name, _), step in steps.items():
        inner = step.accelerator.unwrap_model(step.module)
        tower = (inner.hysac if model_name == "HySAC" else inner.clip).vision_model
        # train.py's precision policy under bf16 with LoRA: frozen weights bf16, LoRA and scalars float32.
        assert tower.encoder.layers[0].mlp.fc1.base_layer.weight.dtype == torch.bfloat16
        trained = {name: p for name, p in inner.named_parameters() if p.requires_grad}
        assert trained and all(p.dtype == torch.float32 for p in trained.values())
        assert any(name.endswith("logit_scale") for name in trained)
        before = {name: p.detach().clone() for name, p in trained.items()}

        losses = [float(step().detach()), float(step().detach())]
        assert all(math.isfinite(loss) for loss in losses)
        assert float(step.running["loss"]) == pytest.approx(sum(losses), rel=1e-5)  # kept on the device
        assert int(step.first_bad) == -1
        lora_b = [name for name in trained if "lora_B" in name]
        assert lora_b and all(not torch.equal(trained[n], before[n]) for n in lora_b)  # LoRA B starts at 0 and moves

        # A non-finite loss: the fused AdamW skips the step on the device (train.py's guard), nothing moves.
        assert step.skip_on_device
        kept = {name: p.detach().clone() for name, p in trained.items()}
        step.batch["pixel_values"] = torch.full_like(step.batch["pixel_values"], float("nan"))
        assert not math.isfinite(float(step().detach()))
        assert all(torch.equal(trained[n], kept[n]) for n in trained)
        assert int(step.first_bad) == 2


@pytest.mark.slow
def test_cpu_peak_memory_of_one_variant():
    args = bench_train.parse_args(
        [
            "--device",
            "cpu",
            "--size",
            "tiny",
            "--modes",
            "eager",
            "--batch_sizes",
            "2",
            "--warmup",
            "1",
            "--threads",
            "1",
        ]
    )
    peak = bench_train.cpu_peak_mib(args, "CLIP", "eager", 2)
    # A process that imported torch and transformers and holds a model: hundreds of MiB, far from the machine's RAM.
    assert 100 < peak < 8192


# --------------------------------------------------------------------------------------------------------
# Workload helpers
def test_caption_ids_pad_realistic_captions_like_the_tokenizer():
    generator = torch.Generator().manual_seed(3)
    ids = workload.caption_ids(64, generator)
    lengths = (ids == workload.EOS_ID).int().argmax(dim=1) + 1  # tokens up to the first end-of-text
    assert ids.shape == (64, int(lengths.max()))
    assert int(lengths.min()) >= 10 and int(lengths.max()) <= 20 and len(set(lengths.tolist())) > 5
    assert torch.all(ids[:, 0] == workload.BOS_ID)
    for row, length in zip(ids, lengths.tolist()):
        assert torch.all(row[length:] == workload.EOS_ID)  # right padding with end-of-text, as CLIP's tokenizer
        assert torch.all(row[1 : length - 1] < workload.BOS_ID)  # no special token inside a caption
    padded = workload.caption_ids(64, torch.Generator().manual_seed(3), pad_to=77)
    assert padded.shape == (64, 77) and torch.equal(padded[:, : ids.shape[1]], ids)
    assert torch.all(padded[:, ids.shape[1] :] == workload.EOS_ID)


def test_count_flops_counts_cpu_attention_and_matrix_products():
    b, h, s, d = 2, 3, 5, 8
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    weight = torch.randn(d, 4)

    def attention_and_linear():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        (out @ weight).sum().backward()

    # Forward: Q K^T and P V, 2*b*h*s*s*d each; backward (fused kernels recompute the scores): Q K^T, dP, dV, dQ
    # and dK, 2*b*h*s*s*d each (torch's formula for the CUDA kernels). The product with `weight`,
    # (b*h*s, d) x (d, 4): 2*b*h*s*d*4 forward and the same for the gradient of `out`.
    expected = 14 * b * h * s * s * d + 2 * (2 * b * h * s * d * 4)
    assert workload.count_flops(attention_and_linear) == expected


def test_mfu_and_peak():
    assert workload.mfu(2e12, 0.5, 8.0) == pytest.approx(0.5)
    assert workload.mfu(2e12, 0.5, None) is None
    assert workload.peak_tflops("cuda", None) == workload.H100_BF16_PEAK_TFLOPS
    assert workload.peak_tflops("cpu", None) is None
    assert workload.peak_tflops("cpu", 3.5) == 3.5
    with pytest.raises(ValueError, match="peak_tflops"):
        workload.peak_tflops("cpu", 0)


def test_bench_train_refuses_bad_arguments(capsys):
    for argv, message in (
        (["--batch_sizes", "1"], "--batch_sizes must be >= 2"),
        (["--batch_sizes", "a,b"], "comma-separated integers"),
        (["--modes", "fast"], "--modes must be"),
        (["--device", "tpu"], "--device must be cpu or cuda"),
    ):
        with pytest.raises(SystemExit) as error:
            bench_train.parse_args(["--device", "cpu", *argv] if "--device" not in argv else argv)
        assert error.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.main_line
def test_bench_serve_reports_both_variants_and_the_overload(tmp_path):
    """bench_serve.py on the tiny model for a second per run: both variants served without errors, the overload run
    answered every request (200, or 503/429 with Retry-After) and left the server healthy. No timing is asserted."""
    pytest.importorskip("litserve")
    out = tmp_path / "serve.json"
    env = {**os.environ, "GLIBC_TUNABLES": GLIBC_TUNABLES, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, str(BENCHMARKS / "bench_serve.py"), "--size", "tiny", "--seconds", "1", "--warmup", "0.5"]
    command += ["--rounds", "1", "--clients", "4", "--max_queue", "8", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    for name in ("batched", "unbatched"):
        row = results["summary"][name]
        assert row["requests"] > 0 and row["errors"] == 0, row
        assert_finite_numbers(row)
        assert f"| {name} |" in result.stdout
    overload = results["overload"]
    assert overload["sent"] > 0 and overload["lost"] == 0, overload
    assert overload["ok"] + overload["refused"] == overload["sent"]
    assert overload["healthy_after"] and overload["served_after"]
    assert "batched / unbatched requests/s" in result.stdout
