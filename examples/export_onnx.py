"""Export a HySAC model's image and text encoders to ONNX, with a dynamic batch size, and check them.

    python examples/export_onnx.py --model path/to/hysac --output onnx/ [--opset 18] [--exporter dynamo]

Writes `image_encoder.onnx` (input `pixel_values` `(batch, 3, H, W)`; SigLIP 2 NaFlex: `pixel_values`
`(batch, patches, 3 * p * p)`, `pixel_attention_mask` `(batch, patches)`, `spatial_shapes` `(batch, 2)`; output
`image_embeds` `(batch, D)`) and `text_encoder.onnx` (inputs `input_ids` and, where the tokenizer makes one,
`attention_mask`, `(batch, sequence)`; SigLIP families: `sequence` is fixed at 64; output `text_embeds` `(batch, D)`):
the float32 space components of the hyperboloid embeddings that `model.encode_image` / `model.encode_text`
return, for any base family (CLIP, SigLIP, SigLIP 2, MetaCLIP 2). The curvature `c` the distances need
(`d(x, y) = acosh(c (x_t y_t - x.y)) / sqrt(c)`, `x_t = sqrt(1/c + |x|^2)`) is written to `hysac_onnx.json` beside
them.

Each encoder is then run with onnxruntime at two batch sizes (and, for text, two sequence lengths) on inputs made
by the model's own processor, and compared with torch; the script exits 1 if any output differs by more than
`--atol`. The default exporter is the dynamo one (`torch.onnx.export(..., dynamo=True)`); `--exporter legacy`
uses the TorchScript exporter, for which the model computes sinh/acosh from exp/log while it traces. SigLIP 2 NaFlex
exports with the TorchScript exporter only (its default), on transformers 5 only (`naflex_export_problem`).

Needs `pip install onnx onnxruntime onnxscript` (all three are in the `test` extra).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

logger = logging.getLogger("export_onnx")

REQUIRED = ("onnx", "onnxruntime", "onnxscript")


class ImageEncoder(nn.Module):
    """`pixel_values -> model.encode_image(pixel_values)`: the public method, as exported."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


class NaFlexImageEncoder(ImageEncoder):
    """SigLIP 2 NaFlex: `(pixel_values, pixel_attention_mask, spatial_shapes) -> model.encode_image(...)`."""

    def forward(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor, spatial_shapes: torch.Tensor
    ) -> torch.Tensor:
        return self.model.encode_image(
            pixel_values, pixel_attention_mask=pixel_attention_mask, spatial_shapes=spatial_shapes
        )


class TextEncoder(nn.Module):
    """`(input_ids, attention_mask) -> model.encode_text(input_ids, attention_mask)`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask)


class IdsTextEncoder(TextEncoder):
    """`input_ids -> model.encode_text(input_ids)`, for tokenizers that make no attention mask (SigLIP's)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HySAC model folder (or Hub id) with its processor")
    parser.add_argument("--output", required=True, help="folder to write image_encoder.onnx and text_encoder.onnx to")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset version (default: 18)")
    parser.add_argument(
        "--exporter",
        choices=("dynamo", "legacy"),
        default=None,
        help="torch.onnx.export(dynamo=True) (the default) or the TorchScript-based exporter (the default, and the "
        "only one that works, for SigLIP 2 NaFlex)",
    )
    parser.add_argument(
        "--atol", type=float, default=1e-4, help="largest accepted |onnxruntime - torch| (default: 1e-4)"
    )
    parser.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="load the model with its own code (needed without hysac_hf installed)",
    )
    return parser.parse_args(argv)


IMAGE_INPUTS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")
TEXT_INPUTS = ("input_ids", "attention_mask")


def _is_naflex(model: nn.Module) -> bool:
    family = getattr(model.config, "base_family", None)
    return bool(getattr(family, "is_naflex", False))


def naflex_export_problem(model: nn.Module, exporter: str | None) -> str | None:
    """Why a SigLIP 2 NaFlex model cannot be exported as asked, or None.

    Its vision embeddings resize the position embeddings to each image's patch grid. transformers 5 does it with
    traceable tensor ops, which the TorchScript exporter follows for any grid, but guards it with a check
    (`aten._is_all_true`) that the dynamo exporter has no ONNX function for; transformers 4 calls an antialiased
    bilinear interpolation per image, which neither exporter can express.
    """
    if not _is_naflex(model):
        return None
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return (
            f"SigLIP 2 NaFlex cannot be exported to ONNX with transformers {transformers.__version__}: its vision "
            "embeddings resize the position embeddings per image with an antialiased interpolation ONNX has no "
            "operator for; export with transformers >= 5 (pip install -U 'transformers>=5')"
        )
    if exporter == "dynamo":
        return (
            "SigLIP 2 NaFlex exports with --exporter legacy only (the default for it): transformers' check of the "
            "patch grid (aten._is_all_true) has no ONNX function in the dynamo exporter"
        )
    return None


def sample_inputs(processor, image_size: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Images and texts made by the model's processor: 3 random pictures, 3 captions padded to the longest (SigLIP
    families: to their fixed length, as their processor always pads)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    pictures = [
        Image.fromarray(rng.integers(0, 256, (image_size + 31 * i, image_size, 3), dtype=np.uint8)) for i in range(3)
    ]
    captions = ["a photo of a cat", "a rocket on a launch pad at night", "a cup of coffee"]
    images = processor(images=pictures, return_tensors="pt")
    texts = processor(text=captions, padding="longest", return_tensors="pt")
    return {k: images[k] for k in IMAGE_INPUTS if k in images}, {k: texts[k] for k in TEXT_INPUTS if k in texts}


def export(module: nn.Module, inputs: dict[str, torch.Tensor], path: Path, args, dynamic: dict[str, dict]) -> None:
    """Export `module(**inputs)` to `path` with the dims in `dynamic` (`{input: {axis: name}}`) left free."""
    output_name = "image_embeds" if "pixel_values" in inputs else "text_embeds"
    kwargs = {"input_names": list(inputs), "output_names": [output_name], "opset_version": args.opset}
    if args.exporter == "dynamo":
        dims = {}
        shapes = {
            name: {
                axis: dims.setdefault(label, torch.export.Dim(label, min=1, max=77 if label == "sequence" else 4096))
                for axis, label in axes.items()
            }
            for name, axes in dynamic.items()
        }
        with warnings.catch_warnings():  # inputs sharing the batch dim are reported, and are what we mean
            warnings.filterwarnings("ignore", message=".*shares the same shape constraints with another axis")
            torch.onnx.export(
                module, tuple(inputs.values()), str(path), dynamo=True, dynamic_shapes=shapes, verbose=False, **kwargs
            )
    else:
        axes = {**dynamic, output_name: {0: "batch"}}
        torch.onnx.export(module, tuple(inputs.values()), str(path), dynamo=False, dynamic_axes=axes, **kwargs)


def check(module: nn.Module, path: Path, batches: list[dict[str, torch.Tensor]]) -> float:
    """Largest |onnxruntime - torch| over `batches`."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for inputs in batches:
        with torch.no_grad():
            expected = module(**inputs).numpy()
        got = session.run(None, {name: tensor.numpy() for name, tensor in inputs.items()})[0]
        if got.shape != expected.shape:
            raise RuntimeError(f"{path.name}: onnxruntime gave shape {got.shape}, torch {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # onnxscript's optimizer logs at INFO
    logger.setLevel(logging.INFO)
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        print(f"error: {', '.join(missing)} not installed; pip install {' '.join(REQUIRED)}", file=sys.stderr)
        return 2
    if args.opset < 14:
        print(f"error: --opset {args.opset} is too old; use 14 or newer (CLIP's attention needs it)", file=sys.stderr)
        return 2
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        print(f"error: --output {output} is a file; pass a folder", file=sys.stderr)
        return 2

    from transformers import AutoModel, AutoProcessor

    try:  # registers "hysac" with the Auto classes, so the installed code loads the folder (no remote code)
        import hysac_hf  # noqa: F401
    except ImportError:
        logger.info("hysac_hf is not installed: the folder's own code is needed (--trust_remote_code)")
    try:
        model = AutoModel.from_pretrained(args.model, trust_remote_code=args.trust_remote_code).eval()
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())
        print(f"error: cannot load a HySAC model and processor from {args.model}: {reason}", file=sys.stderr)
        return 2
    if not hasattr(model, "encode_image"):
        print(f"error: {args.model} holds a {type(model).__name__}, not a HySAC model", file=sys.stderr)
        return 2
    model.float()  # ONNX Runtime's CPU kernels and the comparison are float32
    problem = naflex_export_problem(model, args.exporter)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.exporter is None:
        args.exporter = "legacy" if _is_naflex(model) else "dynamo"

    image_size = getattr(model.config.vision_config, "image_size", 224)  # NaFlex towers take any size
    images, texts = sample_inputs(processor, image_size)
    fixed_length = getattr(model.config, "fixed_text_length", None)  # SigLIP: every text has exactly 64 tokens
    text_axes = {0: "batch"} if fixed_length else {0: "batch", 1: "sequence"}
    text_batches = [{k: v[:2] for k, v in texts.items()}, texts]
    if not fixed_length:
        text_batches.append({k: v[:1, :-1] for k, v in texts.items()})  # another sequence length
    output.mkdir(parents=True, exist_ok=True)
    jobs = [
        (
            "image_encoder.onnx",
            (NaFlexImageEncoder if "spatial_shapes" in images else ImageEncoder)(model).eval(),
            images,
            {name: {0: "batch"} for name in images},
            [{k: v[:2] for k, v in images.items()}, images],
        ),
        (
            "text_encoder.onnx",
            (TextEncoder if "attention_mask" in texts else IdsTextEncoder)(model).eval(),
            texts,
            {name: dict(text_axes) for name in texts},
            text_batches,
        ),
    ]
    results = {}
    for filename, module, inputs, dynamic, batches in jobs:
        path = output / filename
        logger.info("Exporting %s (%s exporter, opset %d)", path, args.exporter, args.opset)
        with torch.no_grad():
            export(module, {k: v[:2] for k, v in inputs.items()}, path, args, dynamic)
        results[filename] = check(module, path, batches)
    (output / "hysac_onnx.json").write_text(
        json.dumps(
            {
                "curvature": float(model.curvature.detach()),
                "logit_scale": float(model.logit_scale.detach().exp()),
                "embedding_dim": model.config.projection_dim,
                "base_model_type": getattr(model.config, "base_model_type", "clip"),
                "image_size": getattr(model.config.vision_config, "image_size", None),
                "image_inputs": list(images),
                "text_inputs": list(texts),
                "max_text_length": model.config.text_config.max_position_embeddings,
                "files": sorted(results),
            },
            indent=2,
        )
        + "\n"
    )
    failed = {name: diff for name, diff in results.items() if not diff <= args.atol}
    for name, diff in results.items():
        print(f"{output / name}: max |onnxruntime - torch| = {diff:.2e} ({'ok' if name not in failed else 'FAILED'})")
    if failed:
        print(f"error: outputs differ by more than --atol {args.atol:g}: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
