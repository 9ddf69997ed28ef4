#!/usr/bin/env python
"""Fine-tune HySAC (Hyperbolic Safety-Aware CLIP) with Accelerate.

    accelerate launch train.py --model_name_or_path openai/clip-vit-large-patch14 --output_dir out/hysac ...
    python train.py --model_name_or_path ... --output_dir ...          # one process (CPU or one GPU)
    hysac-train ... / python -m hysac_hf.train ...                     # the same script, from an installed wheel

The script follows the Accelerate/diffusers example scripts: `parse_args()` builds a `TrainingConfig`, `main(config)`
trains, validates every epoch, exports the best (or last) model with LoRA merged, calibrates its bounds on the
validation split and writes a Hub-ready folder to `<output_dir>/model` (`--push_to_hub` uploads it). Checkpoints
(`<output_dir>/checkpoints`) and tracker logs (`<output_dir>/logs`) stay beside it, outside the Hub folder. The
pieces (settings and their checks, data loading, model and LoRA setup, the step, checkpoints, validation metrics,
export) live in `hysac_hf.training`; embedding is `hysac_hf.encode`; the losses are `hysac_hf.losses`.

Every input is checked before the model loads and before anything is written; a usage or input error prints one
line and exits 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import HfArgumentParser, get_scheduler

from hysac_hf.calibration import calibrate, calibrate_thresholds, report_threshold_quality, threshold_quality
from hysac_hf.cli import OneSpellingHelpFormatter, command_name, run, setup_logging
from hysac_hf.data import QuadrupletCollator
from hysac_hf.encode import EmbeddingCache, encode_quadruplets
from hysac_hf.hub import push_folder_to_hub
from hysac_hf.losses import HySACLoss
from hysac_hf.training import (
    CHECKPOINT_PREFIX,
    HISTOGRAM_FILE,
    EpochPermutationSampler,
    TrainingConfig,
    TrainingProgress,
    TrainStep,
    build_accelerator,
    build_module,
    check_config,
    check_resumable,
    contrastive_loss_of,
    discard_run_on_failure,
    export_from_state,
    list_checkpoints,
    load_training_data,
    make_optimizer,
    run_signature,
    tracker_settings,
    trainable_kwargs,
    trainable_names,
    translate_legacy_flags,
    validation_metrics,
    write_export,
)

# The console shows the main process only (hysac_hf.cli.setup_logging in main). A plain logger: accelerate's
# get_logger would prefix every line with "[RANK 0]".
logger = logging.getLogger("train")


def parse_args(input_args: list[str] | None = None) -> TrainingConfig:
    """Parse the command line into a :class:`TrainingConfig` (flags spelled `--like_this`; the first release's
    `--*_column` flags become `--columns`)."""
    parser = HfArgumentParser(
        TrainingConfig, description=__doc__.split("\n\n")[0], formatter_class=OneSpellingHelpFormatter
    )
    args = translate_legacy_flags(sys.argv[1:] if input_args is None else input_args)
    (config,) = parser.parse_args_into_dataclasses(args)
    return config


def main(config: TrainingConfig, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Train, select, export, calibrate and (optionally) push. Returns the run summary (also in train_summary.json).

    Args:
        config: the run's settings.
        accelerator: an `Accelerator` to use instead of the one built from `config` (for callers that configure
            Accelerate themselves).

    A run that fails before its first checkpoint or export removes the `output_dir` it created, so a mistake found
    late (an undecodable image, a NaN loss at step 1) leaves nothing behind.
    """
    output_dir = Path(config.output_dir)
    # A run that fails early leaves nothing behind.
    with discard_run_on_failure(output_dir, config.export_dir), contextlib.ExitStack() as stack:
        check_config(config)
        accelerator = accelerator or build_accelerator(config)
        if accelerator.is_local_main_process:  # console logs on one process; third-party INFO noise off
            setup_logging(config.log_level)
        else:
            setup_logging(logging.ERROR)
            transformers.utils.logging.set_verbosity_error()
            datasets.utils.logging.set_verbosity_error()
        # Once the handlers exist: every log line prints on its own line above the progress bar, not glued to it.
        stack.enter_context(logging_redirect_tqdm())
        set_seed(config.seed)

        # Data, checked (sizes, every image) before the model loads and before anything is written; a dataset
        # without a validation split holds some training rows out
        data = load_training_data(config, accelerator.num_processes)
        train_set, eval_set = data.train, data.validation
        logger.info(
            "training on %d rows of %s; validating on %s",
            data.summary["train_rows"],
            config.dataset,
            "nothing" if eval_set is None else f"{data.summary['validation_rows']} rows: {data.summary['validation']}",
        )

        # Resume: the checkpoint must continue this very run (same batches, processes, seed and rows)
        progress = TrainingProgress(run=run_signature(config, data, accelerator.num_processes))
        best_state = None  # the trained parameters of the best epoch so far, on the main process
        resume_path = None
        if config.resume_from_checkpoint:
            resume_path = (
                list_checkpoints(output_dir)[-1]
                if config.resume_from_checkpoint == "latest"
                else Path(config.resume_from_checkpoint)
            )
            signature = progress.run
            best_state = progress.load(resume_path)
            check_resumable(resume_path, progress.run, signature)
            progress.run = signature

        # Model: LoRA (or every tower weight) and the four scalars train; frozen weights in half precision if asked
        module, processor = build_module(config, accelerator)
        n_trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        n_total = sum(p.numel() for p in module.parameters())
        logger.info("trainable parameters: %s / %s", f"{n_trainable:,}", f"{n_total:,}")

        sampler = EpochPermutationSampler(len(train_set), config.seed)
        train_loader = torch.utils.data.DataLoader(
            train_set,
            batch_size=config.per_device_train_batch_size,
            sampler=sampler,
            collate_fn=QuadrupletCollator(processor, image_root=config.image_root),
            num_workers=config.dataloader_num_workers,
            drop_last=True,
        )

        # Optimiser and schedule. The fused AdamW skips a step on the device when told the loss was not finite
        # (`found_inf`), so the guard needs no host-device synchronisation per step.
        optimizer, fused = make_optimizer(module, config, accelerator.device)
        batches_per_process = len(train_set) // (config.per_device_train_batch_size * accelerator.num_processes)
        steps_per_epoch = math.ceil(batches_per_process / config.gradient_accumulation_steps)
        total_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
        num_epochs = math.ceil(total_steps / steps_per_epoch)
        # Accelerate steps a prepared scheduler once per process at every optimiser step (it assumes the schedule
        # counts per-process batches), so the lengths are given in those units: the learning rate at optimiser step k
        # is then the same for any number of processes.
        scheduler = get_scheduler(
            config.lr_scheduler_type,
            optimizer,
            num_warmup_steps=config.num_warmup_steps * accelerator.num_processes,
            num_training_steps=(config.schedule_steps or total_steps) * accelerator.num_processes,
        )
        module, optimizer, train_loader, scheduler = accelerator.prepare(module, optimizer, train_loader, scheduler)

        # Losses: negatives gathered from every process for training, the whole chunk for validation; softmax
        # (CLIP's) or sigmoid (SigLIP's, with the model's logit bias), by --contrastive or the model's own
        hysac = accelerator.unwrap_model(module).hysac
        loss_kwargs = {
            "entailment_weight": config.entailment_weight,
            "aperture_scale": config.aperture_scale,
            "min_radius": hysac.config.min_radius,
            "weighting": config.loss_weighting,
            "contrastive": contrastive_loss_of(hysac, config.contrastive),
        }
        loss_fn = HySACLoss(
            **loss_kwargs,
            local_negatives=config.local_negatives,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
        )
        eval_loss_fn = HySACLoss(**loss_kwargs)
        if config.report_to != "none":
            accelerator.init_trackers("hysac", config=tracker_settings(config))
        names = trainable_names(accelerator.unwrap_model(module))

        def gather_trained() -> dict[str, torch.Tensor] | None:
            """The trained parameters, whole, on the main process (a collective under FSDP: every process calls it)."""
            state = accelerator.get_state_dict(module)
            if not accelerator.is_main_process:
                return None
            return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in state.items() if k in names}

        # Resume: Accelerate's state (model, optimiser, scheduler, RNG); our counters were read above
        if resume_path is not None:
            logger.info("resuming from %s", resume_path)
            accelerator.load_state(str(resume_path))
            logger.info("resumed at optimiser step %d (epoch %d)", progress.global_step, progress.epochs_done)

        step = TrainStep(
            module,
            optimizer,
            scheduler,
            accelerator,
            loss_fn=lambda out: loss_fn(
                out, curvature=out["curvature"], logit_scale=out["logit_scale"], logit_bias=out.get("logit_bias")
            ),
            clamp=lambda: accelerator.unwrap_model(module).hysac.clamp_parameters(),
            seed=config.seed,
            max_grad_norm=config.max_grad_norm,
            skip_on_device=fused,
        )

        def check_finite() -> None:
            """Stop with `NonFiniteLossError` if any step so far had a non-finite loss (one synchronisation)."""
            step.check_finite(progress.global_step, note=f"; the last checkpoint is in {output_dir}/checkpoints")

        # The epochs: train, log every --logging_steps, checkpoint every --checkpointing_steps, then validate and
        # keep the best epoch's trained parameters (early stopping after --early_stopping_patience bad epochs)
        best_cache: EmbeddingCache | None = None  # validation embeddings of the best epoch
        last_cache: EmbeddingCache | None = None  # and of the last one
        # A context: the bar closes (and ends its line) even when training stops with an error or Ctrl-C. Shown on a
        # terminal only; a log file gets the logging steps as lines instead.
        bar = stack.enter_context(
            tqdm(
                total=total_steps,
                initial=progress.global_step,
                desc="Training",
                disable=None if accelerator.is_local_main_process else True,
            )
        )
        stop = progress.global_step >= total_steps
        first_epoch = progress.micro_step // batches_per_process
        module.train()
        for epoch in range(first_epoch, num_epochs):
            if stop:
                break
            sampler.use_epoch(epoch)
            skip = progress.micro_step - epoch * batches_per_process  # batches of this epoch done before a resume
            loader = accelerator.skip_first_batches(train_loader, skip) if skip > 0 else train_loader
            step.reset_running()
            for batch in loader:
                out = step(batch, progress.micro_step, progress.global_step)
                progress.micro_step += 1
                if accelerator.sync_gradients:  # an optimiser step was taken
                    progress.global_step += 1
                    bar.update(1)
                    if progress.global_step % config.logging_steps == 0:
                        check_finite()
                        logs = {f"train/{k}": v for k, v in step.running_means().items()}
                        logs["train/lr"] = scheduler.get_last_lr()[0]
                        logs["train/curvature"] = float(out["curvature"].detach().reshape(-1)[0])
                        bar.set_postfix(loss=f"{logs['train/loss']:.4f}")
                        if bar.disable:  # no bar (a log file): a line per logging step
                            logger.info(
                                "step %d/%d: loss %.4f, lr %.3g",
                                progress.global_step,
                                total_steps,
                                logs["train/loss"],
                                logs["train/lr"],
                            )
                        accelerator.log(logs, step=progress.global_step)
                    if config.checkpointing_steps and progress.global_step % config.checkpointing_steps == 0:
                        check_finite()
                        checkpoint = output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{progress.global_step}"
                        accelerator.save_state(str(checkpoint))
                        if accelerator.is_main_process:
                            progress.save(checkpoint, best_state)
                            for old in list_checkpoints(output_dir)[: -config.checkpoints_total_limit]:
                                shutil.rmtree(old)
                        accelerator.wait_for_everyone()
                    if progress.global_step >= total_steps:
                        stop = True
                        break
            check_finite()
            epoch_finished = progress.micro_step >= (epoch + 1) * batches_per_process
            train_loss = step.running_means().get("loss", float("nan"))
            if eval_set is None or not epoch_finished:
                logger.info("epoch %d: train_loss %.4f", epoch + 1, train_loss)
                continue

            # Validation: one embedding pass of the split on every process (each embeds its share)
            progress.epochs_done = epoch + 1
            last_cache = encode_quadruplets(
                module,
                processor,
                eval_set,
                image_root=config.image_root,
                batch_size=config.per_device_eval_batch_size,
                num_workers=config.dataloader_num_workers,
                accelerator=accelerator,
                show_progress=False,
                source={"dataset": config.dataset, "split": config.validation_split, "epoch": epoch + 1},
            )
            metrics = validation_metrics(
                last_cache, last_cache.logit_scale, eval_loss_fn, config.per_device_eval_batch_size
            )
            metrics["epoch"] = epoch + 1
            progress.history.append(metrics)  # saved with every checkpoint: a resumed run keeps every epoch
            accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=progress.global_step)
            logger.info(
                "epoch %d: train_loss %.4f, val_loss %.4f, recall_sum %.1f (R@1 %s)",
                epoch + 1,
                train_loss,
                metrics["val_loss"],
                metrics["recall_sum"],
                ", ".join(f"{k[3:]} {v:.1f}" for k, v in metrics.items() if k.startswith("R1_")),
            )
            if config.select_best != "none":
                value = metrics[config.select_best]
                better = progress.best_metric is None or (
                    value > progress.best_metric if config.select_best == "recall_sum" else value < progress.best_metric
                )
                if better:
                    progress.best_metric, progress.best_epoch, progress.bad_epochs = value, epoch + 1, 0
                    best_state, best_cache = gather_trained(), last_cache
                else:
                    progress.bad_epochs += 1
                    if config.early_stopping_patience and progress.bad_epochs >= config.early_stopping_patience:
                        logger.info(
                            "early stopping after epoch %d: no improvement for %d epochs",
                            epoch + 1,
                            progress.bad_epochs,
                        )
                        break
        bar.close()
        check_finite()
        accelerator.wait_for_everyone()

        # Export (best epoch or last weights): rebuilt in float32 from the base and the trained parameters; the
        # bounds come from the exported weights' validation embeddings.
        summary: dict[str, Any] = {
            "global_step": progress.global_step,
            "history": progress.history,
            "best_metric": progress.best_metric,
            "best_epoch": progress.best_epoch,
            "data": data.summary,
        }
        # Every process takes the same branch (gather_trained is a collective under FSDP).
        if config.select_best != "none" and progress.best_epoch is not None:
            trained, calibration_cache = (
                best_state,
                best_cache,
            )  # best_cache is None if the best epoch predates a resume
        else:
            trained, calibration_cache = gather_trained(), last_cache
        if accelerator.is_main_process:
            final = export_from_state(config.model_name_or_path, trained, **trainable_kwargs(config))
            if eval_set is not None and not config.no_calibrate and calibration_cache is None:
                calibration_cache = encode_quadruplets(
                    final,
                    processor,
                    eval_set,
                    image_root=config.image_root,
                    batch_size=config.per_device_eval_batch_size,
                )
            calibration = None if config.no_calibrate else calibration_cache
            if calibration is not None:
                final.config.bounds = calibrate(calibration)
                final.config.unsafe_thresholds = calibrate_thresholds(calibration)
                summary["bounds"] = final.config.bounds
                summary["unsafe_thresholds"] = final.config.unsafe_thresholds
                # How well each threshold separates the validation rows it was fitted on; one that separates nothing
                # (it flags every item, or none) is exported with a loud warning, never silently.
                summary["unsafe_threshold_quality"] = threshold_quality(calibration, final.config.unsafe_thresholds)
                report_threshold_quality(summary["unsafe_threshold_quality"], "the validation rows")
            export_dir = config.export_dir
            write_export(config, final, processor, summary, calibration)
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
            logger.info(
                "exported the model to %s; load it with AutoModel.from_pretrained(%r, trust_remote_code=True)",
                export_dir,
                str(export_dir),
            )
            if calibration is not None:
                logger.info(
                    "bounds and unsafe thresholds (%s) calibrated on the validation rows (%s); distance-to-root "
                    "histogram: %s",
                    ", ".join(f"{k} {v:.4f}" for k, v in final.config.unsafe_thresholds.items()),
                    data.summary["validation"],
                    export_dir / HISTOGRAM_FILE,
                )
            if config.push_to_hub:
                url = push_folder_to_hub(
                    export_dir,
                    config.repo_id,
                    private=config.hub_private_repo,
                    commit_message=f"HySAC trained with train.py ({progress.global_step} steps)",
                    token=config.hub_token,
                )
                summary["hub_commit"] = url
                logger.info("pushed to the Hub: %s", url)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return summary


def cli(input_args: list[str] | None = None) -> int:
    """Entry point: exit status 0, or 2 with one line on a usage or input error (`--debug` shows the traceback)."""
    config = parse_args(input_args)
    return run(main, config, command_name("train.py", input_args))  # hysac-train, train.py, ...


if __name__ == "__main__":
    sys.exit(cli())
