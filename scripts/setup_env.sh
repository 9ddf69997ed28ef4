#!/usr/bin/env bash
# Create (or update) a virtual environment with hysac-hf installed editable.
#   usage: bash scripts/setup_env.sh VENV_DIR "TRANSFORMERS_SPEC" EXTRAS
#   e.g.   bash scripts/setup_env.sh .venv "transformers>=5,<6" test,serve   (serve: hysac-serve's LitServe)
# torch is pinned to 2.13.0 and installed first: on CPU-only machines install the CPU build beforehand
# (see README, "CPU-only machines"), so that nothing pulls the CUDA wheels.
set -euo pipefail
venv=${1:-.venv}
transformers_spec=${2:-transformers>=5,<6}
extras=${3:-train}
python=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip() { "$venv/bin/python" -m pip "$@" 2> >(grep -v "is ignored" >&2); }
pip install -q --upgrade pip
pip install -q "torch==2.13.0"
pip install -q -e ".[$extras]" "$transformers_spec"
# CLIP's BPE vocabulary ships inside the open-clip-torch wheel; --no-deps keeps torchvision/CUDA torch out.
pip install -q --no-deps "open-clip-torch==3.3.0"
"$venv/bin/python" -c "import torch, transformers; print('venv', '$venv', 'torch', torch.__version__, 'transformers', transformers.__version__)"
