"""Export a HySAC model's image and text encoders to ONNX, with a dynamic batch size, and check them.

    python examples/export_onnx.py --model path/to/hysac --output onnx/ [--opset 18] [--exporter dynamo]

Writes `image_encoder.onnx` (input `pixel_values` `(batch, 3, H, W)`, output `image_embeds` `(batch, D)`) and
`text_encoder.onnx` (inputs `input_ids`, `attention_mask` `(batch, sequence)`, output `text_embeds` `(batch, D)`):
the float32 space components of the hyperboloid embeddings that `model.encode_image` / `model.encode_text`
return. The curvature `c` the distances need (`d(x, y) = acosh(c (x_t y_t - x.y)) / sqrt(c)`,
`x_t = sqrt(1/c + |x|^2)`) is written to `hysac_onnx.json` beside them.

Each encoder is then run with onnxruntime at two batch sizes (and, for text, two sequence lengths) on inputs made
by the model's own processor, and compared with torch; the script exits 1 if any output differs by more than
`--atol`. The default exporter is the dynamo one (`torch.onnx.export(..., dynamo=True)`); `--exporter legacy`
uses the TorchScript exporter, for which the model computes sinh/acosh from exp/log while it traces.

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


class TextEncoder(nn.Module):
    """`(input_ids, attention_mask) -> model.encode_text(input_ids, attention_mask)`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HySAC model folder (or Hub id) with its processor")
    parser.add_argument("--output", required=True, help="folder to write image_encoder.onnx and text_encoder.onnx to")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset version (default: 18)")
    parser.add_argument(
        "--exporter",
        choices=("dynamo", "legacy"),
        default="dynamo",
        help="torch.onnx.export(dynamo=True) (default) or the TorchScript-based exporter",
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


def sample_inputs(processor, image_size: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Images and texts made by the model's processor: 3 random pictures, 3 captions padded to the longest."""
    from PIL import Image

    rng = np.random.default_rng(0)
    pictures = [
        Image.fromarray(rng.integers(0, 256, (image_size + 31 * i, image_size, 3), dtype=np.uint8)) for i in range(3)
    ]
    captions = ["a photo of a cat", "a rocket on a launch pad at night", "a cup of coffee"]
    images = processor(images=pictures, return_tensors="pt")
    texts = processor(text=captions, padding="longest", return_tensors="pt")
    return {"pixel_values": images["pixel_values"]}, {k: texts[k] for k in ("input_ids", "attention_mask")}


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

    images, texts = sample_inputs(processor, model.config.vision_config.image_size)
    output.mkdir(parents=True, exist_ok=True)
    jobs = [
        (
            "image_encoder.onnx",
            ImageEncoder(model).eval(),
            images,
            {"pixel_values": {0: "batch"}},
            [{k: v[:2] for k, v in images.items()}, images],
        ),
        (
            "text_encoder.onnx",
            TextEncoder(model).eval(),
            texts,
            {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}},
            [{k: v[:2] for k, v in texts.items()}, texts, {k: v[:1, :-1] for k, v in texts.items()}],
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
                "image_size": model.config.vision_config.image_size,
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
