"""The parts of HySAC fine-tuning that `train.py` (``accelerate launch train.py ...``) is made of, one per module:

- :mod:`.model`: the module to train (:func:`configure_trainable`: LoRA or full fine-tuning, frozen projections,
  trained scalars; half-precision frozen weights, FSDP-shardable scalars) and its AdamW (:func:`make_optimizer`);
- :mod:`.data`: the order of the training rows (:class:`EpochPermutationSampler`);
- :mod:`.step`: one micro-batch of training (:class:`TrainStep`, :func:`step_seed`, :class:`NonFiniteLossError`);
- :mod:`.checkpoints`: what a checkpoint holds beside Accelerate's state (:class:`TrainingProgress`) and where
  (:func:`list_checkpoints`);
- :mod:`.validation`: loss and the reference's recall_sum from one `EmbeddingCache` (:func:`validation_metrics`);
- :mod:`.export`: the trained model as a plain `HySACModel` with LoRA merged (:func:`export_from_state`,
  :func:`export_model`).

Determinism: the data order is a per-epoch permutation seeded by the seed (same on every process), rows are
pre-augmented (no random transforms), and the global RNG that drives LoRA dropout is reseeded before every
micro-batch from ``(seed, micro_step, rank)``. A run resumed from a checkpoint therefore replays exactly the steps an
uninterrupted run would take: on CPU the final weights are bitwise identical.
"""

from __future__ import annotations

from .checkpoints import CHECKPOINT_PREFIX, TrainingProgress, list_checkpoints
from .data import EpochPermutationSampler
from .export import export_from_state, export_model
from .model import (
    LORA_TARGET_MODULES,
    SCALAR_PARAMETERS,
    configure_trainable,
    fused_adamw_supported,
    hold_frozen_weights_in,
    make_optimizer,
    make_scalars_shardable,
    parameter_groups,
    trainable_names,
)
from .step import NonFiniteLossError, TrainStep, step_seed
from .validation import validation_metrics

__all__ = [
    "CHECKPOINT_PREFIX",
    "LORA_TARGET_MODULES",
    "SCALAR_PARAMETERS",
    "EpochPermutationSampler",
    "NonFiniteLossError",
    "TrainStep",
    "TrainingProgress",
    "configure_trainable",
    "export_from_state",
    "export_model",
    "fused_adamw_supported",
    "hold_frozen_weights_in",
    "list_checkpoints",
    "make_optimizer",
    "make_scalars_shardable",
    "parameter_groups",
    "step_seed",
    "trainable_names",
    "validation_metrics",
]
