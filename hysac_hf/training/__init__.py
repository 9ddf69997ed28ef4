"""The parts of HySAC fine-tuning that `train.py` (``accelerate launch train.py ...``) is made of, one per module:

- :mod:`.config`: the run's settings (:class:`TrainingConfig`), their checks (:func:`check_config`), their command
  line (:func:`config_to_argv`) and the `Accelerator` they ask for (:func:`build_accelerator`);
- :mod:`.data`: the splits, loaded and checked before the model (:func:`load_training_data`), and the order of the
  training rows (:class:`EpochPermutationSampler`);
- :mod:`.model`: the module to train (:func:`build_module`; :func:`configure_trainable`: LoRA or full fine-tuning,
  frozen projections, trained scalars; :func:`contrastive_loss_of`: softmax or sigmoid; half-precision frozen
  weights, FSDP-shardable scalars) and its AdamW
  (:func:`make_optimizer`);
- :mod:`.step`: one micro-batch of training (:class:`TrainStep`, :func:`step_seed`, :class:`NonFiniteLossError`);
- :mod:`.checkpoints`: what a checkpoint holds beside Accelerate's state (:class:`TrainingProgress`), where
  (:func:`list_checkpoints`), and the cleanup of a run that failed early (:func:`discard_run_on_failure`);
- :mod:`.validation`: loss and the reference's recall_sum from one `EmbeddingCache` (:func:`validation_metrics`);
- :mod:`.export`: the trained model as a plain `HySACModel` with LoRA merged (:func:`export_from_state`,
  :func:`export_model`), written as a Hub-ready folder (:func:`write_export`).

Determinism: the data order is a per-epoch permutation seeded by the seed (same on every process), rows are
pre-augmented (no random transforms), and the global RNG that drives LoRA dropout is reseeded before every
micro-batch from ``(seed, micro_step, rank)``. A run resumed from a checkpoint therefore replays exactly the steps an
uninterrupted run would take: on CPU the final weights are bitwise identical.
"""

from __future__ import annotations

from .checkpoints import (
    CHECKPOINT_PREFIX,
    TrainingProgress,
    check_resumable,
    discard_run_on_failure,
    list_checkpoints,
    run_signature,
)
from .config import (
    TrainingConfig,
    build_accelerator,
    check_config,
    config_to_argv,
    tracker_settings,
    translate_legacy_flags,
)
from .data import EpochPermutationSampler, TrainingData, load_training_data
from .export import HISTOGRAM_FILE, export_from_state, export_model, write_export
from .model import (
    SCALAR_PARAMETERS,
    build_module,
    configure_trainable,
    contrastive_loss_of,
    fused_adamw_supported,
    hold_frozen_weights_in,
    make_optimizer,
    make_scalars_shardable,
    parameter_groups,
    trainable_kwargs,
    trainable_names,
)
from .step import NonFiniteLossError, TrainStep, step_seed
from .validation import validation_metrics

__all__ = [
    "CHECKPOINT_PREFIX",
    "HISTOGRAM_FILE",
    "SCALAR_PARAMETERS",
    "EpochPermutationSampler",
    "NonFiniteLossError",
    "TrainStep",
    "TrainingConfig",
    "TrainingProgress",
    "build_accelerator",
    "build_module",
    "check_config",
    "config_to_argv",
    "configure_trainable",
    "contrastive_loss_of",
    "discard_run_on_failure",
    "export_from_state",
    "export_model",
    "fused_adamw_supported",
    "hold_frozen_weights_in",
    "list_checkpoints",
    "TrainingData",
    "check_resumable",
    "run_signature",
    "load_training_data",
    "make_optimizer",
    "make_scalars_shardable",
    "parameter_groups",
    "step_seed",
    "tracker_settings",
    "trainable_kwargs",
    "trainable_names",
    "translate_legacy_flags",
    "validation_metrics",
    "write_export",
]
