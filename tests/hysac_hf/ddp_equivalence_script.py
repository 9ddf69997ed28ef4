"""Launched by test_distributed.py on 2 CPU processes: global-batch loss/gradients vs one process with 2B rows.

Writes a JSON report (rank 0) to the path given as argv[1].
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch
from accelerate import Accelerator
from hysac_hf.modeling.configuration_hysac import HySACConfig
from hysac_hf.modeling.modeling_hysac import HySACModel

from hysac_hf.encode import QuadrupletEncoder
from hysac_hf.losses import HySACLoss
from hysac_hf.training import configure_trainable

B = 3  # per-process batch


def tiny_model(contrastive: str = "softmax") -> QuadrupletEncoder:
    """A tiny CLIP-shaped HySAC with LoRA; `contrastive="sigmoid"` gives it a trained logit bias (SigLIP's loss)."""
    torch.manual_seed(0)
    config = HySACConfig(
        text_config={
            "vocab_size": 100,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "eos_token_id": 99,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 16,
        },
        projection_dim=16,
    )
    model = HySACModel(config)
    module = QuadrupletEncoder(configure_trainable(model, lora_dropout=0.0, contrastive=contrastive))
    # Non-zero LoRA B so that LoRA gradients flow everywhere; for the sigmoid loss a logit scale of 1 and a bias of -1
    # (not 1/0.07 and SigLIP's -10), so that the negative pairs weigh in it.
    with torch.no_grad():
        if model.has_logit_bias:
            model.logit_scale.fill_(0.0)
            model.logit_bias.fill_(-1.0)
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return module


def batch(rows: slice, world: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    n = B * world
    pixels = torch.randn(2 * n, 3, 32, 32, generator=generator)
    ids = torch.randint(1, 98, (2 * n, 8), generator=generator)
    ids[:, -1] = 99
    index = torch.cat([torch.arange(n)[rows], n + torch.arange(n)[rows]])
    return {"pixel_values": pixels[index], "input_ids": ids[index]}


def loss_of(module, loss_fn, inputs):
    out = module(**inputs)
    return loss_fn(
        out, curvature=out["curvature"], logit_scale=out["logit_scale"], logit_bias=out.get("logit_bias")
    )["loss"]


def compare(accelerator, ddp, reference, local_negatives: bool, contrastive: str = "softmax") -> dict:
    rank, world = accelerator.process_index, accelerator.num_processes
    for model in (ddp, reference):
        model.zero_grad(set_to_none=True)
    loss_fn = HySACLoss(local_negatives=local_negatives, rank=rank, world_size=world, contrastive=contrastive)
    local_loss = loss_of(ddp, loss_fn, batch(slice(rank * B, (rank + 1) * B), world))
    accelerator.backward(local_loss)
    mean_loss = accelerator.reduce(local_loss.detach(), reduction="mean")
    grads = {n: p.grad.clone() for n, p in accelerator.unwrap_model(ddp).named_parameters() if p.requires_grad}

    # One process, batch 2B. With local negatives the expectation is the mean of the two per-half losses.
    single = HySACLoss(contrastive=contrastive)
    if local_negatives:
        ref_loss = (
            sum(loss_of(reference, single, batch(slice(r * B, (r + 1) * B), world)) for r in range(world)) / world
        )
    else:
        ref_loss = loss_of(reference, single, batch(slice(0, B * world), world))
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    return {
        "world": world,
        "loss": mean_loss.item(),
        "reference_loss": ref_loss.item(),
        "local_loss": local_loss.item(),
        "max_grad_diff": max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads),
        "max_grad": max(g.abs().max().item() for g in ref_grads.values()),
        "n_params": len(ref_grads),
        "trained": sorted(ref_grads),
        "zero_grads": sorted(n for n, g in ref_grads.items() if g.abs().max().item() == 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("report")
    opts = parser.parse_args()
    accelerator = Accelerator(cpu=True)
    if accelerator.num_processes != 2:
        sys.exit(f"expected 2 processes, got {accelerator.num_processes} ({accelerator.distributed_type})")
    module = tiny_model()
    reference = copy.deepcopy(module)
    ddp = accelerator.prepare(module)
    report = {
        "global": compare(accelerator, ddp, reference, False),
        "local": compare(accelerator, ddp, reference, True),
    }
    # SigLIP's sigmoid loss, chunked across the processes: the same equality, the logit bias trained too.
    sigmoid_module = tiny_model("sigmoid")
    sigmoid_reference = copy.deepcopy(sigmoid_module)
    sigmoid_ddp = accelerator.prepare(sigmoid_module)
    report["sigmoid"] = compare(accelerator, sigmoid_ddp, sigmoid_reference, False, "sigmoid")
    report["sigmoid_local"] = compare(accelerator, sigmoid_ddp, sigmoid_reference, True, "sigmoid")
    if accelerator.is_main_process:
        with open(opts.report, "w") as handle:
            json.dump(report, handle)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
