#!/usr/bin/env bash
# Install hysac-hf and run the main job on the embedded default (bundled mini-ViSU, tiny model), offline.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
bash scripts/setup_env.sh .venv "transformers>=5,<6" train
.venv/bin/hysac-demo "$@"
