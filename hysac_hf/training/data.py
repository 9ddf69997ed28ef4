"""The training data: the training and validation rows, loaded and checked before the model loads
(:func:`load_training_data`, with a held-out validation split where the dataset has none), and the order of the
training rows, a per-epoch permutation that every process and every resume agree on
(:class:`EpochPermutationSampler`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..calibration import MIN_CALIBRATION_ROWS
from ..data import (
    CANONICAL_COLUMNS,
    IMAGE_COLUMNS,
    bad_image_rows,
    bad_images_or_skip,
    dataset_has_split,
    load_dataset_split,
)
from ..errors import UsageError

if TYPE_CHECKING:
    from datasets import Dataset

    from .config import TrainingConfig


@dataclass
class TrainingData:
    """The rows a run trains and validates on, and where they came from (`train_summary.json["data"]`).

    Attributes:
        train: the training rows (canonical columns).
        validation: the validation rows, or None without validation.
        summary: `{"dataset", "train_split", "train_rows", "train_rows_sha256" (:func:`rows_sha256`),
            "validation_rows", "validation"}` (a sentence saying where the validation rows came from) and, with
            `--skip_bad_images`, `"skipped_bad_images"` per split.
    """

    train: Dataset
    validation: Dataset | None
    summary: dict[str, Any] = field(default_factory=dict)


def load_training_data(config: TrainingConfig, num_processes: int) -> TrainingData:
    """The training and validation rows of `config.dataset`, checked before the model loads.

    The validation rows are the `--validation_split` split; a dataset without it (a data file with no `split`
    column, a folder or repo without that split) holds out `--validation_split_percentage` of the training rows
    instead, a seeded shuffle (the same on every process and every resume), and says so in the log and the summary.
    Checks: every image of both (one pass; bad ones are an error, or left out with `--skip_bad_images`), the
    training rows hold at least one global batch, the validation rows enough to calibrate the bounds (unless
    `--no_calibrate`).

    Args:
        config: the run's settings (`dataset`, the splits, `columns`, the image folders, `max_*_samples`).
        num_processes: processes that share a global batch.
    Returns:
        the :class:`TrainingData`.
    Raises:
        UsageError: naming the split, the count or the file, and the fix.
    """
    kwargs = {"columns": config.columns, "coco_root": config.coco_root, "visu_unsafe_images": config.visu_unsafe_images}
    summary: dict[str, Any] = {"dataset": str(config.dataset), "train_split": config.train_split}
    validation = None
    if config.validation_split and not dataset_has_split(config.dataset, config.validation_split):
        rows = load_dataset_split(config.dataset, config.train_split, **kwargs)
        held = rows.train_test_split(test_size=config.validation_split_percentage / 100, seed=config.seed)
        train, validation = held["train"], held["test"]
        summary["validation"] = (
            f"held out: {len(validation)} of the {len(rows)} rows of the {config.train_split!r} split "
            f"({config.validation_split_percentage}%, seed {config.seed}), which are not trained on; "
            f"{config.dataset} has no {config.validation_split!r} split"
        )
        train = train.select(range(min(config.max_train_samples or len(train), len(train))))
        validation = validation.select(range(min(config.max_eval_samples or len(validation), len(validation))))
    else:
        train = load_dataset_split(config.dataset, config.train_split, max_samples=config.max_train_samples, **kwargs)
        if config.validation_split:
            validation = load_dataset_split(
                config.dataset, config.validation_split, max_samples=config.max_eval_samples, **kwargs
            )
            summary["validation"] = f"the {config.validation_split!r} split of {config.dataset}"
    skipped: dict[str, int] = {}

    def usable(rows: Dataset, name: str) -> Dataset:
        """`rows` whose images all decode (one pass; the others an error, or left out with --skip_bad_images)."""
        bad = bad_image_rows(rows, IMAGE_COLUMNS, config.image_root, show_progress=True)
        keep = bad_images_or_skip(bad, len(rows), f"the {name} rows", config.skip_bad_images)
        if len(keep) == len(rows):
            return rows
        skipped[name] = len(rows) - len(keep)
        return rows.select(keep)

    train = usable(train, "training")
    validation = None if validation is None else usable(validation, "validation")
    if validation is not None and not config.no_calibrate and len(validation) < MIN_CALIBRATION_ROWS:
        raise UsageError(
            f"the validation rows are {len(validation)}; calibrating bounds needs at least {MIN_CALIBRATION_ROWS}. "
            "Use more validation rows (a larger --validation_split_percentage where they are held out), or "
            "--no_calibrate"
        )
    global_batch = config.per_device_train_batch_size * num_processes
    if len(train) < global_batch:
        raise UsageError(
            f"the training split has {len(train)} rows, fewer than one global batch ({global_batch} = "
            f"{config.per_device_train_batch_size} x {num_processes} processes); lower --per_device_train_batch_size"
        )
    summary.update(
        train_rows=len(train),
        train_rows_sha256=rows_sha256(train),
        validation_rows=None if validation is None else len(validation),
    )
    if skipped:
        summary["skipped_bad_images"] = skipped
    return TrainingData(train, validation, summary)


def rows_sha256(rows: Dataset) -> str:
    """The SHA-256 of a split's content columns, row by row (file names of images, not their pixels; image bytes by
    their own hash): the identity of the rows a checkpoint was trained on."""
    columns = [c for c in CANONICAL_COLUMNS if c in rows.column_names]
    table = rows.select_columns(columns).with_format("arrow")[:]
    digest = hashlib.sha256()
    for column in columns:
        for value in table.column(column).to_pylist():
            digest.update(json.dumps(value, sort_keys=True, default=_bytes_digest).encode())
    return digest.hexdigest()


def _bytes_digest(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return hashlib.sha256(value).hexdigest()
    raise TypeError(f"cannot fingerprint a {type(value).__name__}")


class EpochPermutationSampler(torch.utils.data.Sampler):
    """A permutation of `range(n)` seeded by `(seed, epoch)`: identical on every process and after a resume.

    The epoch is set with `use_epoch`, deliberately not `set_epoch`: Accelerate's dataloader calls `set_epoch`
    with its own iteration counter, which restarts at 0 for the loader that `skip_first_batches` builds.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n
