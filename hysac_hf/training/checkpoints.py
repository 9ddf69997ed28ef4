"""What a training checkpoint holds beside Accelerate's state, and where a run keeps its checkpoints.

A checkpoint is `<output_dir>/checkpoints/step_N`: Accelerate's `save_state` (model, optimiser, scheduler, RNG,
sampler) plus :class:`TrainingProgress` (counters as JSON, the best epoch's trained parameters as safetensors).
A run that fails before its first checkpoint or export leaves nothing behind (:func:`discard_run_on_failure`).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

CHECKPOINT_PREFIX = "step_"
PROGRESS_FILE = "training_progress.json"
BEST_STATE_FILE = "best_trainable.safetensors"


@dataclass
class TrainingProgress:
    """Counters saved with every checkpoint (JSON beside Accelerate's state), restored on resume."""

    micro_step: int = 0
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    epochs_done: int = 0

    def save(self, checkpoint: str | Path, best_state: dict[str, Tensor] | None = None) -> None:
        """Write the counters (JSON) and the best epoch's trained parameters (safetensors) into a checkpoint."""
        checkpoint = Path(checkpoint)
        (checkpoint / PROGRESS_FILE).write_text(json.dumps(asdict(self), indent=1))
        if best_state is not None:
            save_file({k: v.contiguous() for k, v in best_state.items()}, checkpoint / BEST_STATE_FILE)

    def load(self, checkpoint: str | Path) -> dict[str, Tensor] | None:
        """Restore the counters of a checkpoint; returns the best epoch's parameters saved with it, if any."""
        checkpoint = Path(checkpoint)
        if not (checkpoint / PROGRESS_FILE).is_file():
            raise FileNotFoundError(
                f"{checkpoint} has no {PROGRESS_FILE}: it is not a checkpoint written by train.py (or it is incomplete)"
            )
        for key, value in json.loads((checkpoint / PROGRESS_FILE).read_text()).items():
            setattr(self, key, value)
        best = checkpoint / BEST_STATE_FILE
        return load_file(best) if best.is_file() else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The `step_N` checkpoint folders of a run, oldest first."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


@contextmanager
def discard_run_on_failure(output_dir: str | Path, export_dir: str | Path) -> Iterator[None]:
    """Remove the run folder `output_dir` if the body raises, when this run created it and it holds neither a
    checkpoint nor the export `export_dir`: a mistake found late (an undecodable image, a NaN loss at step 1) leaves
    nothing behind, while a resumable or exported run is kept. The error propagates."""
    output_dir = Path(output_dir)
    created = not output_dir.exists()
    try:
        yield
    except BaseException:
        if created and output_dir.is_dir() and not Path(export_dir).exists() and not list_checkpoints(output_dir):
            shutil.rmtree(output_dir, ignore_errors=True)
        raise
