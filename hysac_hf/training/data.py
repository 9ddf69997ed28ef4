"""The training data: the order of its rows, a per-epoch permutation that every process and every resume agree on."""

from __future__ import annotations

from collections.abc import Iterator

import torch


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
