"""The training data: the splits, loaded and checked before the model loads (:func:`load_training_data`), and the
order of the training rows, a per-epoch permutation that every process and every resume agree on
(:class:`EpochPermutationSampler`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from ..calibration import MIN_CALIBRATION_ROWS
from ..data import IMAGE_COLUMNS, bad_image_rows, bad_images_or_skip, load_dataset_split
from ..errors import UsageError

if TYPE_CHECKING:
    from datasets import Dataset

    from .config import TrainingConfig

def load_training_data(config: TrainingConfig, num_processes: int) -> tuple[Dataset, Dataset | None]:
    """The training and validation splits of `config.dataset`, checked before the model loads.

    Checks: the training split holds at least one global batch, the validation split enough rows to calibrate the
    bounds (unless `--no_calibrate`), and every image file of both exists and is an image.

    Args:
        config: the run's settings (`dataset`, the splits, `columns`, the image folders, `max_*_samples`).
        num_processes: processes that share a global batch.
    Returns:
        `(train_set, eval_set)` with canonical column names; `eval_set` is None without a validation split.
    Raises:
        UsageError: naming the split, the count or the file, and the fix.
    """
    kwargs = {"columns": config.columns, "coco_root": config.coco_root, "visu_unsafe_images": config.visu_unsafe_images}
    train_set = load_dataset_split(config.dataset, config.train_split, max_samples=config.max_train_samples, **kwargs)
    eval_set = None
    if config.validation_split:
        eval_set = load_dataset_split(
            config.dataset, config.validation_split, max_samples=config.max_eval_samples, **kwargs
        )
        if not config.no_calibrate and len(eval_set) < MIN_CALIBRATION_ROWS:
            raise UsageError(
                f"the validation split has {len(eval_set)} rows; calibrating bounds needs at least "
                f"{MIN_CALIBRATION_ROWS}. Use more validation rows, or --no_calibrate"
            )
    global_batch = config.per_device_train_batch_size * num_processes
    if len(train_set) < global_batch:
        raise UsageError(
            f"the training split has {len(train_set)} rows, fewer than one global batch ({global_batch} = "
            f"{config.per_device_train_batch_size} x {num_processes} processes); lower --per_device_train_batch_size"
        )
    for name, data in (("training", train_set), ("validation", eval_set)):
        if data is None:
            continue
        bad_images_or_skip(bad_image_rows(data, IMAGE_COLUMNS, config.image_root), len(data), f"the {name} split", False)
    return train_set, eval_set


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
