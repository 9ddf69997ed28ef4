"""Fine-tune HySAC: ``accelerate launch train.py --model_name_or_path ... --output_dir ...``.

Also runs as ``python train.py ...`` on one CPU/GPU. Every flag is documented by ``--help``; the logic lives
in `hysac_hf.training`.
"""

from __future__ import annotations

from hysac_hf.training import main

if __name__ == "__main__":
    main()
