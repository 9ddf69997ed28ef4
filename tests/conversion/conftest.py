"""Fixtures for the conversion tests: tiny authors-format HySAC checkpoints built with the installed peft.

Both key layouts are produced from one trained-looking authors' model (random non-zero LoRA B factors,
non-default curvature, alphas and logit scale):

- ``current``: `model.state_dict()` of the PEFT-wrapped model as the installed peft saves it (`base_layer` keys);
- ``legacy``: the same tensors renamed as peft 0.4 saved them, plus the random `patch_embedding.bias` that peft
  0.4/0.5 added to the Conv2d LoRA layer. Its reference model carries that bias, as the authors' model did.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from hysac_hf.authors_reference import (
    AuthorsHySAC,
    build_authors_model,
    dist_to_root_reference,
    load_authors_state_dict,
    to_legacy_layout,
)

CURV = 1.7
VISUAL_ALPHA = 0.3
TEXTUAL_ALPHA = 0.25
LOGIT_SCALE = 20.0
TRAVERSAL_ALPHA = 0.8


@dataclass
class AuthorsCheckpoint:
    """A saved authors-format checkpoint and the authors' model that computes what it should."""

    layout: str
    checkpoint: Path
    bounds: Path
    reference: AuthorsHySAC
    state_dict: dict


def solve_bound_for_threshold(threshold: float, curv: float, alpha: float = TRAVERSAL_ALPHA) -> float:
    """The bound `b` whose traversal threshold `b + tanh((b - alpha) / c) + 1` equals `threshold` (bisection)."""
    low, high = 0.0, threshold
    for _ in range(200):
        mid = (low + high) / 2
        value = mid + math.tanh((mid - alpha) / curv) + 1
        low, high = (mid, high) if value < threshold else (low, mid)
    return (low + high) / 2


def verification_batch(clip_config: CLIPConfig, processor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel values of real photos and real tokenized captions, fixed for every test."""
    from hysac_hf.testing import SAMPLE_CAPTIONS, sample_images

    images = list(sample_images().values())
    batch = processor(text=list(SAMPLE_CAPTIONS.values()), images=images)
    return batch["pixel_values"], batch["input_ids"]


@pytest.fixture(scope="session")
def tiny_clip_config(tiny_clip_dir) -> CLIPConfig:
    return CLIPConfig.from_pretrained(tiny_clip_dir)


@pytest.fixture(scope="session")
def fixed_batch(tiny_clip_config, processor):
    return verification_batch(tiny_clip_config, processor)


@pytest.fixture(scope="session")
def trained_authors_state(tiny_clip_dir, tiny_clip_config) -> dict:
    """State dict (current peft layout) of an authors' model that looks trained."""
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    torch.manual_seed(1234)
    model = build_authors_model(tiny_clip_config, clip_state_dict=clip.state_dict())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)  # peft initialises B to zero; a trained adapter is not
        model.curv.fill_(math.log(CURV))
        model.visual_alpha.fill_(math.log(VISUAL_ALPHA))
        model.textual_alpha.fill_(math.log(TEXTUAL_ALPHA))
        model.logit_scale.fill_(math.log(LOGIT_SCALE))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def authors_checkpoints(tmp_path_factory, tiny_clip_config, trained_authors_state, fixed_batch) -> dict:
    """`{"current": AuthorsCheckpoint, "legacy": AuthorsCheckpoint}` saved as `.pth` + bounds JSON."""
    folder = tmp_path_factory.mktemp("authors_checkpoints")
    generator = torch.Generator().manual_seed(99)
    hidden = tiny_clip_config.vision_config.hidden_size
    patch_bias = torch.randn(hidden, generator=generator) * 0.5
    states = {
        "current": trained_authors_state,
        "legacy": to_legacy_layout(trained_authors_state, patch_bias=patch_bias),
    }
    checkpoints = {}
    pixel_values, _ = fixed_batch
    for layout, state in states.items():
        reference = build_authors_model(tiny_clip_config)
        load_authors_state_dict(reference, state)
        reference.eval()
        # Bounds chosen so the safe-image traversal moves some of the photos and leaves the others.
        with torch.no_grad():
            distances = dist_to_root_reference(reference.encode_image(pixel_values), CURV).sort().values
        threshold = float((distances[2] + distances[3]) / 2)
        up_95 = solve_bound_for_threshold(threshold, CURV)
        bounds = {
            "S": {"avg": 0.3, "up_95": 0.45, "low_05": 0.15},
            "V": {"avg": up_95 * 0.8, "up_95": up_95, "low_05": up_95 * 0.6},
            "U": {"avg": 0.8, "up_95": 0.95, "low_05": 0.65},
            "G": {"avg": 1.05, "up_95": 1.2, "low_05": 0.9},
        }
        layout_dir = folder / layout
        layout_dir.mkdir()
        checkpoint = layout_dir / "hysac_model.pth"
        torch.save(state, checkpoint)
        bounds_path = layout_dir / "hysac_bounds.json"
        bounds_path.write_text(json.dumps(bounds))
        checkpoints[layout] = AuthorsCheckpoint(layout, checkpoint, bounds_path, reference, state)
    return checkpoints
