#!/usr/bin/env bash
# The benchmarks on one GPU in under 10 minutes: the training step (ViT-L/14, bf16, LoRA, 32 and 64 quadruplets,
# HySAC vs CLIP, eager vs compiled; under 5 minutes), inference (images/s, texts/s, MFU, text padded to the
# longest caption vs 77 tokens; about a minute) and HySAC on every base family vs the base itself
# (bench_families.py: CLIP, SigLIP, SigLIP 2 NaFlex, MetaCLIP 2; about a minute). Results (tables, JSON, versions) go to $OUT, else
# outputs/gpu-benchmarks/ (ignored by git).
#
# Run from anywhere, on a machine with CUDA torch, transformers, accelerate and peft (datasets, evaluate and faiss
# are not needed):
#     bash benchmarks/gpu.sh
# The package is used as installed when `import hysac_hf.modeling` works; otherwise a wheel is installed into a
# temporary folder with `pip install --no-index --no-deps --target` (from .whl/ when present: build it beforehand
# with `pip wheel --no-deps -w .whl .`; else built here with `pip wheel --no-build-isolation`, which needs
# setuptools >= 77 on that machine).
#
# Overrides, for a CPU check of this script's logic:
#     DEVICE=cpu SIZE=tiny DTYPE=fp32 TRAIN_ARGS="--batch_sizes 2 --rounds 1 --compile_backend eager" \
#         INFERENCE_ARGS="--rounds 1" FAMILIES_ARGS="--rounds 1" bash benchmarks/gpu.sh
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # absolute: checks run from /tmp
DEVICE="${DEVICE:-cuda}"
SIZE="${SIZE:-large}"
DTYPE="${DTYPE:-bf16}"
OUT_DIR="${OUT:-$ROOT/outputs/gpu-benchmarks}"
TRAIN_TIMEOUT="${TRAIN_TIMEOUT:-330}"          # seconds; the target is < 300 including compilation
INFERENCE_TIMEOUT="${INFERENCE_TIMEOUT:-180}"
FAMILIES_TIMEOUT="${FAMILIES_TIMEOUT:-120}"
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
START=$SECONDS

say() { echo "gpu.sh: $*" | tee -a "$OUT_DIR/gpu.log" >&2; }

# 1. The package.
# (Python checks run from /tmp: from the repository root, `import hysac_hf` would find the uninstalled checkout.)
if [ -n "${HYSAC_FORCE_WHEEL:-}" ] || ! (cd /tmp && "$PY" -c "import hysac_hf.modeling") 2>/dev/null; then
  WORK="$(mktemp -d)"
  WHEEL="$(ls -t .whl/hysac_hf-*.whl 2>/dev/null | head -n 1)"
  if [ -z "$WHEEL" ]; then
    say "no wheel in .whl/: building one (pip wheel --no-deps --no-build-isolation)"
    "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/wheels" . >"$WORK/wheel.log" 2>&1 || {
      cat "$WORK/wheel.log" >&2
      say "could not build the wheel here; build it where pip can reach setuptools (pip wheel --no-deps -w .whl .) and carry .whl/ along"
      exit 2
    }
    WHEEL="$(ls "$WORK"/wheels/hysac_hf-*.whl | head -n 1)"
  fi
  if [ -n "$(find hysac_hf modeling model_cards train.py -name '*.py' -newer "$WHEEL" -print -quit 2>/dev/null)" ]; then
    say "warning: $WHEEL is older than some sources: rebuild it (pip wheel --no-deps -w .whl .) if they changed"
  fi
  "$PY" -m pip install -q --no-index --no-deps --target "$WORK/site" "$WHEEL" || { say "pip install of $WHEEL failed"; exit 2; }
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  say "installed $(basename "$WHEEL") into $WORK/site"
fi

# 2. What runs where: versions, the device, and the imports the benchmarks need (no datasets/faiss pulled in).
(cd /tmp && "$PY" -) >"$OUT_DIR/environment.txt" 2>&1 <<'EOF'
import platform, sys
import accelerate, peft, torch, transformers
import hysac_hf, hysac_hf.encode, hysac_hf.losses, hysac_hf.train, hysac_hf.training
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "accelerate", accelerate.__version__, "peft", peft.__version__)
print("hysac_hf from", hysac_hf.__file__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")
print("heavy optional modules imported:", sorted(m for m in ("datasets", "evaluate", "faiss") if m in sys.modules) or "none")
EOF
STATUS=$?
cat "$OUT_DIR/environment.txt" >&2
if [ $STATUS -ne 0 ]; then say "the environment check failed (see above)"; exit 2; fi

# 3. The benchmarks, each under a timeout well inside the slot.
# shellcheck disable=SC2086  # the *_ARGS overrides are word-split on purpose
timeout "$TRAIN_TIMEOUT" "$PY" benchmarks/bench_train.py --device "$DEVICE" --size "$SIZE" --dtype "$DTYPE" \
  --json "$OUT_DIR/bench_train.json" ${TRAIN_ARGS:-} 2>"$OUT_DIR/bench_train.log" | tee "$OUT_DIR/bench_train.txt"
TRAIN_STATUS=${PIPESTATUS[0]}
say "bench_train exit $TRAIN_STATUS after $((SECONDS - START)) s"
[ $TRAIN_STATUS -eq 0 ] || tail -n 40 "$OUT_DIR/bench_train.log" >&2

# shellcheck disable=SC2086
timeout "$INFERENCE_TIMEOUT" "$PY" benchmarks/bench_inference.py --device "$DEVICE" --size "$SIZE" --dtype "$DTYPE" \
  --json "$OUT_DIR/bench_inference.json" ${INFERENCE_ARGS:-} 2>"$OUT_DIR/bench_inference.log" \
  | tee "$OUT_DIR/bench_inference.txt"
INFERENCE_STATUS=${PIPESTATUS[0]}
say "bench_inference exit $INFERENCE_STATUS after $((SECONDS - START)) s"
[ $INFERENCE_STATUS -eq 0 ] || tail -n 40 "$OUT_DIR/bench_inference.log" >&2

# shellcheck disable=SC2086
timeout "$FAMILIES_TIMEOUT" "$PY" benchmarks/bench_families.py --device "$DEVICE" --size "$SIZE" --dtype "$DTYPE" \
  --json "$OUT_DIR/bench_families.json" ${FAMILIES_ARGS:-} 2>"$OUT_DIR/bench_families.log" \
  | tee "$OUT_DIR/bench_families.txt"
FAMILIES_STATUS=${PIPESTATUS[0]}
say "bench_families exit $FAMILIES_STATUS after $((SECONDS - START)) s"
[ $FAMILIES_STATUS -eq 0 ] || tail -n 40 "$OUT_DIR/bench_families.log" >&2

say "done in $((SECONDS - START)) s; results in $OUT_DIR"
[ $TRAIN_STATUS -eq 0 ] && [ $INFERENCE_STATUS -eq 0 ] && [ $FAMILIES_STATUS -eq 0 ]
