"""`python -m hysac_hf.training` used to be the training script; say where it went and exit 2."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    print(
        "hysac_hf.training holds the reusable parts of training; run the training script with `hysac-train ...`, "
        "`python -m hysac_hf.train ...` or `accelerate launch train.py ...` (see --help)",
        file=sys.stderr,
    )
    sys.exit(2)
