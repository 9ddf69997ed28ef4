#!/usr/bin/env python
"""Convert the HySAC authors' checkpoint into a Hub-ready `transformers` folder (and optionally push it).

Example (with Hub access)::

    python conversion/convert_hysac_original_to_hf.py \\
        --checkpoint_path aimagelab/HySAC \\
        --clip_config openai/clip-vit-large-patch14 \\
        --output_dir hysac-vit-l-14 --verify \\
        --push_to_hub your-org/hysac

From an installed wheel the same script runs as `hysac-convert ...` or `python -m hysac_hf.convert ...`.
`--checkpoint_path` is a local `hysac_model.pth`, a folder holding it and `hysac_bounds.json`, or a Hub repo id
from which both are downloaded. The output folder holds `model.safetensors`, `config.json` (with `auto_map` and
the bounds), the processor/tokenizer/image-processor files, the remote-code files and a `README.md` model card.
It is written to a temporary folder beside `--output_dir` and moved into place only when everything succeeded.

Converting needs no peft; `--verify` (rebuilds the authors' PEFT model and compares embeddings) does.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from hysac_hf.cli import add_debug_flag, command_name, run, setup_logging
from hysac_hf.errors import require
from hysac_hf.conversion_utils import (
    DEFAULT_CLIP,
    DEFAULT_LORA_ALPHA,
    DTYPES,
    cast_towers,
    convert_checkpoint,
    load_clip_config,
    push_folder_to_hub,
    resolve_inputs,
    save_atomically,
    verify_conversion,
)

logger = logging.getLogger("convert_hysac")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint_path",
        required=True,
        help="the authors' hysac_model.pth, a folder with it and hysac_bounds.json, or a Hub repo id (aimagelab/HySAC)",
    )
    parser.add_argument(
        "--bounds_path", default=None, help="hysac_bounds.json (default: beside the checkpoint / from the repo)"
    )
    parser.add_argument(
        "--clip_config",
        default=DEFAULT_CLIP,
        help="Hub id or local folder of the base CLIP: its config, tokenizer and image processor are used",
    )
    parser.add_argument("--output_dir", required=True, help="new (or empty) folder to write the converted model into")
    parser.add_argument("--revision", default=None, help="Hub revision of --checkpoint_path when it is a repo id")
    parser.add_argument(
        "--lora_alpha",
        type=float,
        default=DEFAULT_LORA_ALPHA,
        help="LoRA alpha of the checkpoint (published: 1; the rank is read from the tensors)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the saved tower weights")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="rebuild the authors' PEFT model (needs peft), compare embeddings, fail above 1e-5 (float32)",
    )
    parser.add_argument("--push_to_hub", metavar="REPO_ID", default=None, help="upload the folder to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--commit_message", default=None, help="commit message of the upload")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if (args.private or args.commit_message) and not args.push_to_hub:
        parser.error("--private and --commit_message only apply with --push_to_hub REPO_ID")
    if args.lora_alpha <= 0:
        parser.error(f"--lora_alpha must be positive, got {args.lora_alpha}")
    return args


def convert(args: argparse.Namespace) -> int:
    """Convert (and verify, and push) as `args` say; usage and input errors propagate to `cli`."""
    from hysac_hf import HySACProcessor
    from hysac_hf.hub import require_token
    from hysac_hf.model_card import render_model_card

    if args.push_to_hub:
        require_token(args.push_to_hub)  # before the slow work
    if args.verify:
        require("peft", purpose="--verify (it rebuilds the authors' PEFT model)")
    checkpoint, bounds_path = resolve_inputs(args.checkpoint_path, args.bounds_path, revision=args.revision)
    logger.info("converting %s with bounds %s", checkpoint, bounds_path)
    model, original, report = convert_checkpoint(
        checkpoint, bounds_path, args.clip_config, args.lora_alpha, show_progress=True
    )
    max_diff = None
    if args.verify:
        max_diff = verify_conversion(model, original, load_clip_config(args.clip_config), args.lora_alpha)
        logger.info("verified against the authors' model: max abs diff %.3g", max_diff)
    processor = HySACProcessor.from_pretrained(str(args.clip_config))
    cast_towers(model, DTYPES[args.dtype])
    source = args.checkpoint_path if not Path(args.checkpoint_path).exists() else checkpoint.name
    card = render_model_card(
        repo_id=args.push_to_hub or "your-org/hysac",
        bounds=model.config.bounds,
        curvature=float(model.curvature.detach()),
        source=source,
        dtype=args.dtype,
        max_abs_diff=max_diff,
    )

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        card.save(folder / "README.md")

    output_dir = save_atomically(args.output_dir, write)
    logger.info(
        "saved the converted model to %s (%s layout, %d LoRA modules folded%s); load it with "
        "AutoModel.from_pretrained(%r, trust_remote_code=True)",
        output_dir,
        report.layout,
        report.lora_modules,
        ", legacy patch bias folded" if report.folded_patch_bias else "",
        str(output_dir),
    )
    if args.verify:
        print(f"max abs diff vs the authors' model: {max_diff:.3g}")
    if args.push_to_hub:
        url = push_folder_to_hub(output_dir, args.push_to_hub, args.private, args.commit_message)
        print(url)
    else:
        print(output_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Convert with the project's error policy: exit 0, or 2 with one line on a usage or input error (ConversionError,
    a missing file, an existing output folder, no token); `--debug` shows the traceback."""
    args = parse_args(argv)
    setup_logging()
    with torch.no_grad():
        return run(convert, args, command_name("hysac-convert", argv))


cli = main  # console-script name kept for earlier callers


if __name__ == "__main__":
    sys.exit(main())
