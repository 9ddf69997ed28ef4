"""Process-group helpers for contrastive training: a differentiable all-gather and rank/world queries."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True inside an initialised process group with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_info() -> tuple[int, int]:
    """`(rank, world_size)`, `(0, 1)` outside a process group."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def gather_with_grad(tensor: Tensor) -> Tensor:
    """All-gather along dim 0 with autograd: gradients flow back to the process that owns each row.

    Uses `torch.distributed._functional_collectives.all_gather_single_autograd` (or its predecessor
    `all_gather_tensor_autograd`, torch >= 2.3), else the deprecated `torch.distributed.nn.functional.all_gather`. Both backward passes sum the
    incoming gradients over processes (a reduce-scatter), so each rank receives d(sum of every rank's loss)/d(its rows). With DDP averaging the
    parameter gradients over ranks this is exactly the gradient of the mean global-batch loss.

    Args:
        tensor: `(B, ...)`, the same shape on every process (use `drop_last=True`).
    Returns:
        `(world_size * B, ...)`, rank-major; the input itself outside a process group.
    """
    if not is_distributed():
        return tensor
    from torch.distributed import _functional_collectives as collectives

    # all_gather_single_autograd (torch >= 2.12) replaces all_gather_tensor_autograd (deprecated there).
    gather = getattr(collectives, "all_gather_single_autograd", None) or getattr(
        collectives, "all_gather_tensor_autograd", None
    )
    if gather is None:  # torch < 2.3
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(tensor.contiguous()), dim=0)
    gathered = gather(tensor.contiguous(), gather_dim=0, group=dist.group.WORLD)
    # An AsyncCollectiveTensor: wait here so that callers get a plain tensor.
    return gathered.wait() if hasattr(gathered, "wait") else gathered
