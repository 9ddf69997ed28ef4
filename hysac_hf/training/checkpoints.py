"""What a training checkpoint holds beside Accelerate's state, and where a run keeps its checkpoints.

A checkpoint is `<output_dir>/checkpoints/step_N`: Accelerate's `save_state` (model, optimiser, scheduler, RNG,
sampler) plus :class:`TrainingProgress` (counters, the validation history, the best metric so far and the settings
that fix the sequence of steps, as JSON; the best epoch's trained parameters as safetensors). A resume continues the
same run or is refused (:func:`check_resumable`). A run that fails before its first checkpoint or export leaves
nothing behind (:func:`discard_run_on_failure`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import UsageError

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
PROGRESS_FILE = "training_progress.json"
BEST_STATE_FILE = "best_trainable.safetensors"


@dataclass
class TrainingProgress:
    """What a run has done, saved with every checkpoint (JSON beside Accelerate's state) and restored on resume.

    Attributes:
        micro_step, global_step: micro-batches and optimiser steps done.
        best_metric, best_epoch, bad_epochs: model selection so far (`--select_best`, early stopping).
        epochs_done: validated epochs.
        history: the validation metrics of every epoch so far (train_summary.json and the model card show them all,
            across resumes).
        run: the settings that fix the sequence of steps (:func:`run_signature`), checked on resume.
    """

    micro_step: int = 0
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    epochs_done: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    run: dict[str, Any] | None = None

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


def run_signature(config: Any, data: Any, num_processes: int) -> dict[str, Any]:
    """The settings that fix a run's sequence of batches and optimiser steps: a checkpoint resumes exactly only under
    the same ones.

    Args:
        config: the `TrainingConfig`.
        data: the run's `TrainingData` (its summary's `train_rows` and `train_rows_sha256`).
        num_processes: processes of the run.
    """
    return {
        "per_device_train_batch_size": config.per_device_train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "num_processes": num_processes,
        "seed": config.seed,
        "dataset": str(config.dataset),
        "train_split": config.train_split,
        "train_rows": data.summary["train_rows"],
        "train_rows_sha256": data.summary["train_rows_sha256"],
    }


def check_resumable(checkpoint: str | Path, saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint under settings that give another sequence of steps.

    Args:
        checkpoint: the checkpoint folder, for the message.
        saved: its run signature (:func:`run_signature`; None for a checkpoint written before signatures were saved,
            which is resumed with a warning).
        current: this run's signature.
    Raises:
        UsageError: naming every difference, and what to do.
    """
    if saved is None:
        logger.warning("%s records no run settings (an older checkpoint): resuming without checking them", checkpoint)
        return
    differences = [
        f"{key} {saved[key]!r} (this run: {current[key]!r})"
        for key in current
        if key in saved and saved[key] != current[key]
    ]
    if differences:
        raise UsageError(
            f"cannot resume from {checkpoint}: it was written by a run with {'; '.join(differences)}. Resuming under "
            "other settings would not continue that run (other batches, other steps); resume with the settings it "
            "was written with, or start a new run in another --output_dir"
        )


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
