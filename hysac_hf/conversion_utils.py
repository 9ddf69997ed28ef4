"""Convert the HySAC authors' checkpoint (`hysac_model.pth` + `hysac_bounds.json`) into a `HySACModel` folder.

The authors publish a pickled state dict of two PEFT-wrapped CLIP towers plus four log-space scalars. This
module maps its keys onto `HySACModel` (which names weights exactly like transformers' `CLIPModel`), folds
the LoRA adapters into the base weights in float32, folds the legacy peft patch-embedding bias into the patch
position embeddings, and refuses anything it cannot account for. Converting needs no peft; `verify_conversion`
(which rebuilds the authors' PEFT model) does.

Used by `conversion/convert_hysac_original_to_hf.py`; the steps are functions so tests can call them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .files import write_folder_atomically
from .hub import MissingTokenError, push_folder_to_hub
from .modeling.modeling_hysac import SCALAR_PARAMETERS

logger = logging.getLogger(__name__)

CHECKPOINT_FILENAME = "hysac_model.pth"
BOUNDS_FILENAME = "hysac_bounds.json"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_LORA_ALPHA = 1.0  # the published LoraConfig: r=16, lora_alpha=1 -> scaling 1/16

# Authors' key -> HySACModel key. Applied in order; the first matching pattern wins.
ORIGINAL_TO_CONVERTED_KEY_MAPPING: list[tuple[str, str]] = [
    (r"^visual\.base_model\.model\.(vision_model\..+)$", r"\1"),
    (r"^visual\.base_model\.model\.(visual_projection\.weight)$", r"\1"),
    (r"^textual\.base_model\.model\.(text_model\..+)$", r"\1"),
    (r"^textual\.base_model\.model\.(text_projection\.weight)$", r"\1"),
    (rf"^({'|'.join(SCALAR_PARAMETERS)})$", r"\1"),
]
# Keys dropped on purpose: ImageNet buffers the authors register but never use, and position-id buffers
# (persistent in old transformers versions; checked to be the identity arange before dropping).
DROPPED_KEYS: list[tuple[str, str]] = [
    (r"^pixel_(mean|std)$", "unused ImageNet normalisation buffer of the authors' model"),
    (r"\.position_ids$", "position-id buffer (arange), rebuilt by transformers"),
]
PATCH_BIAS_KEY = "vision_model.embeddings.patch_embedding.bias"
POSITION_EMBEDDING_KEY = "vision_model.embeddings.position_embedding.weight"
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_MAX_LISTED = 25


class ConversionError(ValueError):
    """The checkpoint, bounds or CLIP config cannot be converted; the message says what and how to fix it."""


def _listing(keys: list[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


# --------------------------------------------------------------------------------------------------------
# Inputs
def is_hub_repo_id(value: str) -> bool:
    """Whether `value` looks like a Hub repo id (`name` or `org/name`) rather than a local path."""
    if (
        value.endswith((".pth", ".pt", ".bin", ".json"))
        or value.startswith((".", "/", "~"))
        or os.sep + os.sep in value
    ):
        return False
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", value) is not None and ".." not in value


def resolve_inputs(
    checkpoint_path: str, bounds_path: str | None = None, revision: str | None = None
) -> tuple[Path, Path]:
    """Find the `.pth` and bounds files: local paths, a local folder holding both, or a Hub repo id.

    A Hub repo id (for example `aimagelab/HySAC`) downloads `hysac_model.pth` and, unless `bounds_path` is
    given, `hysac_bounds.json` with `hf_hub_download`.

    Raises:
        FileNotFoundError: a local path that does not exist and is not a repo id, or a folder missing a file.
    """
    path = Path(checkpoint_path).expanduser()
    if path.is_dir():
        checkpoint = path / CHECKPOINT_FILENAME
        bounds = Path(bounds_path) if bounds_path else path / BOUNDS_FILENAME
    elif path.is_file():
        checkpoint = path
        bounds = Path(bounds_path) if bounds_path else path.with_name(BOUNDS_FILENAME)
    elif is_hub_repo_id(checkpoint_path):
        import huggingface_hub

        logger.info("downloading %s from the Hub repo %s", CHECKPOINT_FILENAME, checkpoint_path)
        names = [CHECKPOINT_FILENAME] + ([] if bounds_path else [BOUNDS_FILENAME])
        downloaded = []
        for name in names:
            try:
                downloaded.append(Path(huggingface_hub.hf_hub_download(checkpoint_path, name, revision=revision)))
            except Exception as error:  # offline, unknown repo, missing file, no access: all end here
                raise FileNotFoundError(
                    f"--checkpoint_path {checkpoint_path!r} is not a local file or folder, and {name} could not be "
                    f"downloaded from the Hub repo of that name ({type(error).__name__}: {error}). Pass a local "
                    f"path, or check the repo id, your network and HF_HUB_OFFLINE."
                ) from error
        checkpoint = downloaded[0]
        bounds = Path(bounds_path) if bounds_path else downloaded[1]
    else:
        raise FileNotFoundError(
            f"--checkpoint_path {checkpoint_path!r} is neither an existing file or folder nor a Hub repo id; "
            f"pass the authors' {CHECKPOINT_FILENAME} or a repo id such as 'aimagelab/HySAC'"
        )
    for what, file in (("checkpoint", checkpoint), ("bounds file", bounds)):
        if not file.is_file():
            raise FileNotFoundError(
                f"{what} {str(file)!r} does not exist; pass it explicitly "
                f"({'--checkpoint_path' if what == 'checkpoint' else '--bounds_path'})"
            )
    return checkpoint, bounds


def load_original_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Load the authors' `.pth` safely (`weights_only=True`) and check it is a flat dict of tensors.

    Raises:
        ConversionError: the file is corrupt, truncated, not a state dict, or holds non-tensor values.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # the weights-only unpickler raises many types (IndexError, KeyError, ...) on garbage
        raise ConversionError(
            f"{str(path)!r} could not be read as a PyTorch checkpoint ({type(error).__name__}: {error}). "
            f"The file is corrupt, truncated or not a torch.save file; download {CHECKPOINT_FILENAME} again "
            "(for example from the Hub repo aimagelab/HySAC)."
        ) from error
    if isinstance(state, dict) and set(state) <= {"state_dict", "model"} and len(state) == 1:
        state = next(iter(state.values()))  # a training checkpoint wrapping the state dict
    if not isinstance(state, dict) or not state:
        raise ConversionError(
            f"{str(path)!r} holds a {type(state).__name__}, not a non-empty state dict (key -> tensor); "
            f"expected the authors' {CHECKPOINT_FILENAME}"
        )
    not_tensors = [str(k) for k, v in state.items() if not torch.is_tensor(v)]
    if not_tensors:
        raise ConversionError(f"{str(path)!r} has non-tensor entries: {_listing(not_tensors)}; expected a state dict")
    if not any(str(k).startswith(("visual.", "textual.")) for k in state):
        raise ConversionError(
            f"{str(path)!r} is not a HySAC checkpoint: none of its {len(state)} keys start with 'visual.' or "
            f"'textual.' (first keys: {_listing(list(map(str, state))[:5])}). Expected keys such as "
            "'visual.base_model.model.vision_model...' and 'textual.base_model.model.text_model...'."
        )
    return state


def load_bounds(path: str | Path) -> dict[str, dict[str, float]]:
    """Read and validate `hysac_bounds.json` (`{"S"|"V"|"U"|"G": {"avg"|"up_95"|"low_05": float}}`).

    Raises:
        ConversionError: not JSON, or keys missing / values not finite distances.
    """
    from .modeling.configuration_hysac import validate_bounds

    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"bounds file {str(path)!r} is not valid JSON: {error}") from error
    try:
        return validate_bounds(raw)
    except ValueError as error:
        raise ConversionError(f"bounds file {str(path)!r}: {error}") from error


# --------------------------------------------------------------------------------------------------------
# State-dict conversion
def fold_lora(weight: Tensor, lora_a: Tensor, lora_b: Tensor, lora_alpha: float) -> Tensor:
    """Fold one LoRA adapter into its base weight in float32: `W + (lora_alpha / r) * B @ A`.

    Args:
        weight: Linear `(out, in)` or Conv2d `(out, in, k, k)` base weight.
        lora_a: Linear `(r, in)`; Conv2d `(r, in, k, k)` (a convolution with the base kernel).
        lora_b: Linear `(out, r)`; Conv2d `(out, r, 1, 1)`.
        lora_alpha: LoRA alpha; the rank `r` comes from the shapes.
    Returns:
        the merged weight, float32, shaped like `weight`.
    """
    rank = lora_a.shape[0]
    if lora_b.shape[1] != rank or lora_b.shape[0] != weight.shape[0] or lora_a.shape[1:] != weight.shape[1:]:
        raise ConversionError(
            f"LoRA shapes A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} do not fit the base weight "
            f"{tuple(weight.shape)}"
        )
    if weight.ndim == 4 and lora_b.shape[2:] != (1, 1):
        raise ConversionError(f"Conv2d LoRA B must be a 1x1 convolution, got {tuple(lora_b.shape)}")
    scaling = lora_alpha / rank
    delta = lora_b.float().flatten(1) @ lora_a.float().flatten(1)
    return weight.float() + scaling * delta.view(weight.shape)


@dataclass
class ConversionReport:
    """What `convert_state_dict` did, for logs and tests."""

    layout: str = "current"
    lora_modules: int = 0
    ranks: set[int] = field(default_factory=set)
    adapter_names: set[str] = field(default_factory=set)
    dropped: list[str] = field(default_factory=list)
    folded_patch_bias: bool = False


def convert_state_dict(
    original: dict[str, Tensor], lora_alpha: float = DEFAULT_LORA_ALPHA, show_progress: bool = False
) -> tuple[dict[str, Tensor], ConversionReport]:
    """Map the authors' keys to `HySACModel` keys, fold LoRA (float32) and the legacy patch bias.

    Args:
        original: the authors' state dict (either peft key layout).
        lora_alpha: LoRA alpha of the checkpoint (published: 1).
        show_progress: show a progress bar over the folded modules.
    Returns:
        (`HySACModel`-named float32 state dict, report).
    Raises:
        ConversionError: listing unmapped keys, LoRA factors without a partner or base weight, several
            adapter names, or position ids that are not the identity.
    """
    report = ConversionReport()
    mapped: dict[str, Tensor] = {}
    unmapped: list[str] = []
    for key, value in original.items():
        reason = next((why for pattern, why in DROPPED_KEYS if re.search(pattern, key)), None)
        if reason is not None:
            if key.endswith("position_ids") and not torch.equal(value.flatten().long(), torch.arange(value.numel())):
                raise ConversionError(f"{key} is not the identity arange; this checkpoint uses custom position ids")
            report.dropped.append(key)
            logger.info("dropping %s (%s)", key, reason)
            continue
        for pattern, replacement in ORIGINAL_TO_CONVERTED_KEY_MAPPING:
            if re.match(pattern, key):
                mapped[re.sub(pattern, replacement, key)] = value
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise ConversionError(
            f"{len(unmapped)} checkpoint keys match no mapping rule: {_listing(unmapped)}. "
            "Expected 'visual.base_model.model.*', 'textual.base_model.model.*', "
            f"{list(SCALAR_PARAMETERS)}, 'pixel_mean' and 'pixel_std'."
        )

    # Group LoRA factors by module.
    factors: dict[str, dict[str, Tensor]] = {}
    for key in [k for k in mapped if _LORA_KEY.match(k)]:
        match = _LORA_KEY.match(key)
        report.adapter_names.add(match["adapter"] or "<none>")
        factors.setdefault(match["module"], {})[match["factor"]] = mapped.pop(key)
    if len(report.adapter_names) > 1:
        raise ConversionError(
            f"the checkpoint holds several LoRA adapters {sorted(report.adapter_names)}; the authors' model has one"
        )
    converted: dict[str, Tensor] = {}
    for key, value in mapped.items():
        converted[key.replace(".base_layer.", ".")] = value
    report.layout = "current" if any(".base_layer." in k for k in mapped) else "legacy"
    incomplete = [m for m, f in factors.items() if set(f) != {"A", "B"}]
    no_base = [m for m in factors if f"{m}.weight" not in converted]
    if incomplete or no_base:
        raise ConversionError(
            "LoRA adapters that cannot be folded: "
            + (f"missing lora_A or lora_B for {_listing(incomplete)}; " if incomplete else "")
            + (f"no base weight for {_listing(no_base)}" if no_base else "")
        )
    for module, pair in tqdm(factors.items(), desc="Folding LoRA", disable=None if show_progress and factors else True):
        converted[f"{module}.weight"] = fold_lora(converted[f"{module}.weight"], pair["A"], pair["B"], lora_alpha)
        report.ranks.add(int(pair["A"].shape[0]))
    report.lora_modules = len(factors)
    for key, value in converted.items():
        if value.is_floating_point():
            converted[key] = value.float()

    if PATCH_BIAS_KEY in converted:
        # peft 0.4/0.5 gave the bias-free patch convolution a random, frozen bias. It adds the same vector to
        # every patch token and never touches the class token, so it folds exactly into the patch rows of the
        # position embedding (row 0 is the class token).
        bias = converted.pop(PATCH_BIAS_KEY)
        position = converted.get(POSITION_EMBEDDING_KEY)
        if position is None or position.ndim != 2 or position.shape[1] != bias.shape[0]:
            raise ConversionError(
                f"cannot fold {PATCH_BIAS_KEY} {tuple(bias.shape)} into {POSITION_EMBEDDING_KEY} "
                f"{None if position is None else tuple(position.shape)}"
            )
        position = position.clone()
        position[1:] += bias
        converted[POSITION_EMBEDDING_KEY] = position
        report.folded_patch_bias = True
        logger.info("folded the legacy peft patch_embedding.bias into the patch position embeddings")
    logger.info(
        "converted %s-layout checkpoint: %d LoRA modules folded (rank %s, alpha %s)",
        report.layout,
        report.lora_modules,
        sorted(report.ranks),
        lora_alpha,
    )
    return converted, report


# --------------------------------------------------------------------------------------------------------
# Model assembly
def load_clip_config(clip_config: str | Path):
    """`CLIPConfig` of the base CLIP (Hub id or local folder)."""
    from transformers import CLIPConfig

    return CLIPConfig.from_pretrained(str(clip_config))


def build_hysac_config(clip_config, bounds: dict[str, dict[str, float]] | None):
    """`HySACConfig` with the CLIP's towers and projection size, and the bounds."""
    from .modeling.configuration_hysac import HySACConfig

    return HySACConfig(
        text_config=clip_config.text_config.to_dict(),
        vision_config=clip_config.vision_config.to_dict(),
        projection_dim=clip_config.projection_dim,
        bounds=bounds,
    )


def load_into_hysac(config, state_dict: dict[str, Tensor]):
    """Instantiate `HySACModel(config)` in float32 and load `state_dict` with strict key and shape accounting.

    Raises:
        ConversionError: listing missing keys, unexpected keys and shape mismatches (with both shapes).
    """
    from .modeling.modeling_hysac import HySACModel

    model = HySACModel(config).float()
    expected = model.state_dict()
    state = dict(state_dict)
    for key in SCALAR_PARAMETERS:  # accept `(1,)` scalars as well as 0-d ones
        if key in state and state[key].numel() == 1:
            state[key] = state[key].reshape(expected[key].shape)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing from the checkpoint ({len(missing)}): {_listing(missing)}")
        if unexpected:
            problems.append(f"not in the model ({len(unexpected)}): {_listing(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches ({len(mismatched)}): {_listing(mismatched)}")
        raise ConversionError(
            "the converted weights do not fit the HySAC model built from --clip_config; "
            + "; ".join(problems)
            + ". Check that --clip_config is the CLIP the checkpoint was trained from "
            "(openai/clip-vit-large-patch14 for the published HySAC)."
        )
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def convert_checkpoint(
    checkpoint_path: str | Path,
    bounds_path: str | Path,
    clip_config: str | Path = DEFAULT_CLIP,
    lora_alpha: float = DEFAULT_LORA_ALPHA,
    show_progress: bool = False,
):
    """Convert the authors' files into a float32 `HySACModel` (eval mode).

    Returns:
        (`HySACModel`, the original state dict, `ConversionReport`).
    """
    original = load_original_checkpoint(checkpoint_path)
    bounds = load_bounds(bounds_path)
    config = build_hysac_config(load_clip_config(clip_config), bounds)
    state, report = convert_state_dict(original, lora_alpha=lora_alpha, show_progress=show_progress)
    model = load_into_hysac(config, state)
    return model, original, report


# --------------------------------------------------------------------------------------------------------
# Verification against the authors' model
def fixed_verification_inputs(config, batch_size: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Deterministic pixel values `(B, 3, S, S)` and CLIP-style token ids `(B, 77)` (BOS, words, EOS, padding)."""
    generator = torch.Generator().manual_seed(seed)
    vc, tc = config.vision_config, config.text_config
    pixel_values = torch.randn(batch_size, vc.num_channels, vc.image_size, vc.image_size, generator=generator)
    length = tc.max_position_embeddings
    eos = tc.vocab_size - 1  # CLIP's <|endoftext|> is the last id: end-of-text pooling takes the argmax id
    bos = max(eos - 1, 0)
    input_ids = torch.full((batch_size, length), eos, dtype=torch.long)
    for row in range(batch_size):
        words = 3 + 4 * row
        input_ids[row, 0] = bos
        input_ids[row, 1 : 1 + words] = torch.randint(0, max(bos, 1), (words,), generator=generator)
    return pixel_values, input_ids


@torch.no_grad()
def verify_conversion(
    model,
    original: dict[str, Tensor],
    clip_config,
    lora_alpha: float = DEFAULT_LORA_ALPHA,
    atol: float = 1e-5,
) -> float:
    """Rebuild the authors' PEFT model, load `original` strictly and compare embeddings on fixed inputs.

    Needs peft. Both models run in float32.

    Returns:
        the max absolute difference over image and text embeddings.
    Raises:
        ConversionError: when it exceeds `atol`.
    """
    from .authors_reference import build_authors_model, load_authors_state_dict

    rank = next((int(v.shape[0]) for k, v in original.items() if ".lora_A" in k), 16)
    reference = build_authors_model(clip_config, lora_alpha=lora_alpha, rank=rank)
    load_authors_state_dict(reference, original)
    reference.float().eval()
    pixel_values, input_ids = fixed_verification_inputs(model.config)
    converted = model.float().eval()
    diffs = {
        "image": (converted.encode_image(pixel_values) - reference.encode_image(pixel_values)).abs().max(),
        "text": (converted.encode_text(input_ids) - reference.encode_text(input_ids)).abs().max(),
    }
    max_diff = float(max(diffs.values()))
    logger.info("verification: max |converted - authors| image %.3g, text %.3g", diffs["image"], diffs["text"])
    if not math.isfinite(max_diff) or max_diff > atol:
        raise ConversionError(
            f"the converted model differs from the authors' model by {max_diff:.3g} (> {atol}) on fixed inputs "
            f"(image {float(diffs['image']):.3g}, text {float(diffs['text']):.3g}); check --lora_alpha and "
            "--clip_config"
        )
    return max_diff


# --------------------------------------------------------------------------------------------------------
# Output
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cast_towers(model, dtype: torch.dtype):
    """Cast the towers and projections to `dtype`; the log-space scalars stay float32."""
    for module in (model.vision_model, model.text_model, model.visual_projection, model.text_projection):
        module.to(dtype)
    return model


def save_atomically(output_dir: str | Path, write) -> Path:
    """Run `write(tmp_dir)` into a temporary folder beside `output_dir`, then move it into place.

    An existing non-empty `output_dir` is an error (nothing is overwritten); on any failure nothing is left.
    """
    try:
        return write_folder_atomically(output_dir, write, replace=False)
    except FileExistsError as error:
        raise FileExistsError(f"--output_dir: {error}") from None


__all__ = [
    "ORIGINAL_TO_CONVERTED_KEY_MAPPING",
    "ConversionError",
    "ConversionReport",
    "MissingTokenError",
    "build_hysac_config",
    "cast_towers",
    "convert_checkpoint",
    "convert_state_dict",
    "fixed_verification_inputs",
    "fold_lora",
    "is_hub_repo_id",
    "load_bounds",
    "load_clip_config",
    "load_into_hysac",
    "load_original_checkpoint",
    "push_folder_to_hub",
    "resolve_inputs",
    "save_atomically",
    "verify_conversion",
]
