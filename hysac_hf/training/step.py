"""One micro-batch of training (:class:`TrainStep`), reproducible from its position in the run (:func:`step_seed`)
and guarded against non-finite losses without a host-device synchronisation per step (:class:`NonFiniteLossError`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def step_seed(seed: int, micro_step: int, rank: int) -> int:
    """Seed of the global RNG for one micro-batch (LoRA dropout): a function of the position in training only."""
    return (seed * 1_000_003 + micro_step * 1_009 + rank) % (2**63)


class NonFiniteLossError(FloatingPointError):
    """Raised before the optimiser step when the loss is NaN or Inf, so the weights stay as they were."""


class TrainStep:
    """One micro-batch of training as train.py runs it, with its device-side bookkeeping (the benchmark times it too).

    forward -> loss -> backward -> (at the end of an accumulation window) the optimiser step, the scheduler step and
    the clamps. Nothing here reads a device value on the host: the loss terms are summed on the device (read them with
    :meth:`running_means` at a logging step), and a non-finite loss (on any process) makes the fused AdamW skip its
    step on the device (`found_inf`), so the weights stay those of the last good step; :meth:`check_finite` (one
    synchronisation) raises at the next logging step, checkpoint or epoch end. Without a fused optimiser (or under
    fp16's GradScaler, which skips by itself) the check runs on the host at once.

    Args:
        module, optimizer, scheduler: prepared by `accelerator.prepare`.
        accelerator: the `accelerate.Accelerator`.
        loss_fn: `module`'s output -> dict of named `()` terms with `"loss"`.
        clamp: called after every optimiser step (e.g. `HySACModel.clamp_parameters`).
        seed: the run's seed; the global RNG (LoRA dropout) is reseeded per micro-batch with :func:`step_seed`.
        max_grad_norm: clip the gradients to this norm (0: off).
        skip_on_device: the optimiser is the fused AdamW of :func:`make_optimizer` (found_inf supported).
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer,
        scheduler,
        accelerator,
        loss_fn,
        clamp,
        seed: int = 42,
        max_grad_norm: float = 0.0,
        skip_on_device: bool = True,
    ):
        self.module, self.optimizer, self.scheduler, self.accelerator = module, optimizer, scheduler, accelerator
        self.loss_fn, self.clamp, self.seed, self.max_grad_norm = loss_fn, clamp, seed, max_grad_norm
        self.skip_on_device = skip_on_device and accelerator.scaler is None
        device = accelerator.device
        self.window_bad = torch.zeros((), device=device)  # non-finite losses in the current accumulation window
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first optimiser step with one
        self.running: dict[str, Tensor] = {}
        self.last_terms: dict[str, Tensor] = {}
        self.count = 0

    def __call__(self, batch: dict[str, Any], micro_step: int, global_step: int) -> dict[str, Tensor]:
        """Train on one micro-batch; returns the module's output (detached scalars such as the curvature in it)."""
        accelerator, optimizer = self.accelerator, self.optimizer
        torch.manual_seed(step_seed(self.seed, micro_step, accelerator.process_index))
        with accelerator.accumulate(self.module):
            out = self.module(**batch)
            terms = self.loss_fn(out)
            loss = terms["loss"]
            bad = (~torch.isfinite(loss.detach())).float()
            if accelerator.num_processes > 1:
                bad = accelerator.reduce(bad, reduction="sum")  # a collective on the device, not a sync
            self.window_bad += bad
            self.first_bad = torch.where((self.first_bad < 0) & (bad > 0), global_step, self.first_bad)
            if not self.skip_on_device and bool(bad):  # no fused optimiser: check on the host, before the step
                self.check_finite(global_step)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if self.skip_on_device:
                    optimizer.optimizer.found_inf = (self.window_bad > 0).float()
                if self.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
            optimizer.step()
            self.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        self.last_terms = {name: value.detach() for name, value in terms.items()}
        for name, value in self.last_terms.items():
            self.running[name] = self.running.get(name, 0) + value
        self.count += 1
        if accelerator.sync_gradients:
            self.window_bad.zero_()
            self.clamp()
        return out

    def check_finite(self, global_step: int, note: str = "") -> None:
        """Raise :class:`NonFiniteLossError` if a step had a non-finite loss (one host-device synchronisation)."""
        step = int(self.first_bad)
        if step >= 0:
            raise NonFiniteLossError(
                f"non-finite loss at optimiser step {step}: that step was skipped, so the weights were not updated "
                f"by it (stopped at step {global_step}){note}. Lower --learning_rate, use --mixed_precision no or "
                "bf16, or check the data."
            )

    def running_means(self) -> dict[str, float]:
        """Mean of each loss term since :meth:`reset_running` (one synchronisation)."""
        return {name: (value / max(self.count, 1)).item() for name, value in self.running.items()}

    def reset_running(self) -> None:
        self.running, self.count = {}, 0
