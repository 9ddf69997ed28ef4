#!/usr/bin/env bash
# Install everything and run the test suite on the newest transformers 5.x and the newest 4.x.
# Tests never touch the network: the Hub is switched off.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296}
bash scripts/setup_env.sh .venv "transformers>=5,<6" test,space,serve  # the Space (gradio) on the 5.x line only
bash scripts/setup_env.sh .venv-t4 "transformers>=4.57,<5" test,serve
echo "== transformers 5.x =="
HYSAC_OTHER_PYTHON="$PWD/.venv-t4/bin/python" .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
echo "== transformers 4.x =="
# Tests marked main_line (multi-process launches, packaging, the browser) do not depend on the transformers line:
# they run on 5.x only, which keeps CI short.
HYSAC_SECOND_LINE=1 HYSAC_OTHER_PYTHON="$PWD/.venv/bin/python" .venv-t4/bin/python -m pytest -q -p no:cacheprovider "$@"
