"""`hysac-index`: build a gallery index folder once, then search it by text or image, safely.

Subcommands:
- `build`: embed a folder of images, a text file (one text per line) or a dataset column with a HySAC model and
  write the index folder (exact `flat` search, or approximate `ivf` for large galleries). Under `accelerate
  launch` every process embeds its share; the main process writes the folder.
- `search`: embed one query (`--text` or `--image`) and print its nearest gallery items as JSON, after moving an
  unsafe query into the gallery's safe region (`--policy redirect`, the default) or as it is (`retain`).
- `info`: print an index folder's description (no model needed).

Results go to stdout as JSON (the only print). A usage or input error prints one line and exits 2 (`--debug`
shows the traceback); every check that can fail runs before the model is loaded and before anything is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..cli import add_argument, add_global_flags, add_skip_bad_images_flag, add_subcommand
from ..errors import UsageError, require, usage_errors
from ..modeling.gallery_hysac import read_index_json

logger = logging.getLogger(__name__)

PROG = "hysac-index"
EPILOG = """examples:
  # an image gallery from a folder (every image under it; results carry the path relative to it)
  hysac-index build --model my-hysac --images photos/ --output photos-index
  # a text gallery from a file with one text per line; an approximate index for a large gallery
  hysac-index build --model my-hysac --texts captions.txt --output captions-index --kind ivf
  # the image column of a dataset (Hub id, save_to_disk folder or a .jsonl/.csv/.parquet file)
  hysac-index build --model my-hysac --dataset my_data.parquet --column image --split train --output data-index
  # several processes (GPUs) embed their share of the gallery
  accelerate launch -m hysac_hf.index.cli build --model my-hysac --images photos/ --output photos-index

  # search: the nearest images of a text; an unsafe query is first moved into the safe-image region
  hysac-index search --index photos-index --model my-hysac --text "a dog on a beach" --top_k 5
  hysac-index search --index photos-index --model my-hysac --image query.jpg --policy retain

Search output: {"redirected": bool, "query_distance_to_root": d, "search_distance_to_root": d',
"results": [{"index": i, "distance": d, ...metadata}]}, nearest first. The index remembers the model that built
it: searching it with another model is refused (rebuild the index with that model)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_global_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{build,search,info}")

    p = add_subcommand(
        sub,
        "build",
        help="embed a gallery and write its index folder",
        description="Embed a gallery (images, texts or a dataset column) with a HySAC model and write an index folder.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_argument(p, "--model", required=True, help="HySAC model folder or Hub id (the one that will search the index)")
    source = p.add_mutually_exclusive_group(required=True)
    add_argument(
        source, "--images", default=None, help="folder of images (searched recursively; hidden folders skipped)"
    )
    add_argument(
        source, "--texts", default=None, help="UTF-8 text file, one gallery text per line (blank lines skipped)"
    )
    add_argument(
        source,
        "--dataset",
        default=None,
        help="a Hub dataset id, a save_to_disk folder, or a .jsonl/.csv/.parquet file",
    )
    add_argument(p, "--column", default=None, help="with --dataset: the image or text column (default: the only one)")
    add_argument(p, "--split", default="train", help="with --dataset: the split (default: train)")
    add_argument(
        p,
        "--modality",
        default=None,
        choices=["image", "text"],
        help="with --dataset: what --column holds (default: an Image column holds images, a string column images when "
        "its values are paths of existing image files or http(s) URLs, texts otherwise)",
    )
    add_argument(
        p, "--image_root", default=None, help="with --dataset: folder that relative image paths are resolved against"
    )
    add_argument(p, "--max_samples", type=int, default=None, help="with --dataset: index the first rows only")
    add_argument(
        p, "--output", required=True, help="index folder to write (an existing index there is replaced atomically)"
    )
    add_argument(
        p,
        "--kind",
        default="flat",
        choices=["flat", "ivf"],
        help="flat: exact search (default); ivf: approximate, for large galleries (needs faiss)",
    )
    add_argument(p, "--nlist", type=int, default=None, help="ivf: number of cells (default: about 4 sqrt(N))")
    add_argument(
        p, "--nprobe", type=int, default=None, help="ivf: cells searched per query (default: nlist / 128, at least 16)"
    )
    add_argument(
        p, "--batch_size", type=int, default=None, help="items per forward pass (default: 32 images, 256 texts)"
    )
    add_argument(p, "--num_workers", type=int, default=0, help="DataLoader workers that decode images")
    add_skip_bad_images_flag(p)
    add_argument(p, "--device", default=None, help="torch device (default: cpu, or the accelerate device)")

    p = add_subcommand(
        sub,
        "search",
        help="search an index with one text or image; prints JSON",
        description="Embed one query with the index's model and print its nearest gallery items as JSON.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_argument(p, "--index", required=True, help="index folder written by 'hysac-index build'")
    add_argument(p, "--model", required=True, help="the HySAC model that built the index (folder or Hub id)")
    query = p.add_mutually_exclusive_group(required=True)
    add_argument(query, "--text", default=None, help="a text query")
    add_argument(query, "--image", default=None, help="an image file as the query")
    add_argument(p, "--top_k", type=int, default=5, help="results to return (default: 5)")
    add_argument(
        p,
        "--policy",
        default="redirect",
        choices=["redirect", "retain"],
        help="redirect (default): move a query beyond the gallery's safe region onto it before ranking; retain: "
        "rank the query as it is",
    )
    add_argument(
        p, "--method", default="reference", choices=["reference", "geodesic"], help="traversal rule of redirect"
    )
    add_argument(p, "--bound", default="up_95", choices=["up_95", "avg", "low_05"], help="bound statistic of redirect")
    add_argument(p, "--nprobe", type=int, default=None, help="ivf: cells searched (default: the index's)")
    add_argument(p, "--exact", action="store_true", help="ivf: search every item (exact)")
    add_argument(p, "--device", default=None, help="torch device (default: cpu)")

    p = add_subcommand(sub, "info", help="describe an index folder (no model needed)")
    add_argument(p, "--index", required=True, help="index folder written by 'hysac-index build'")
    return parser


# ------------------------------------------------------------------------------------------------------------
def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{flag} must be >= 1, got {value}")


def _read_texts(path: str) -> list[str]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"--texts {path} does not exist (expected a text file with one gallery text per line)")
    try:
        texts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as error:
        raise UsageError(f"--texts {path} is not UTF-8 text ({error})") from None
    texts = [t for t in texts if t]
    if not texts:
        raise UsageError(f"--texts {path} holds no text; write one gallery text per line")
    return texts


def run_build(args) -> dict:
    from accelerate import Accelerator

    from ..data import bad_image_rows, bad_images_or_skip, find_bad_images
    from .gallery import GalleryIndex, check_output_folder, folder_images

    for value, flag in ((args.batch_size, "--batch_size"), (args.nlist, "--nlist"), (args.nprobe, "--nprobe")):
        _positive(value, flag)
    _positive(args.max_samples, "--max_samples")
    if args.kind == "ivf":
        require("faiss", purpose="--kind ivf")
    elif args.nlist is not None or args.nprobe is not None:
        raise UsageError("--nlist and --nprobe set up an approximate index; add --kind ivf")
    if args.dataset is None:
        for flag in ("column", "modality", "image_root", "max_samples"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag} applies to --dataset only")
    check_output_folder(args.output)
    options = {"kind": args.kind, "nlist": args.nlist, "nprobe": args.nprobe, "num_workers": args.num_workers}
    if args.batch_size is not None:
        options["batch_size"] = args.batch_size
    # Every input is read and every image checked here, in one pass, before the model loads.
    skipped = 0
    if args.images is not None:
        paths, metadata = folder_images(args.images)
        bad = find_bad_images(paths, show_progress=True)
        keep = bad_images_or_skip(bad, len(paths), args.images, args.skip_bad_images)
        skipped = len(paths) - len(keep)
        source = [paths[i] for i in keep]

        def build(model, processor, items, **kwargs):
            return GalleryIndex.from_images(model, processor, items, metadata=[metadata[i] for i in keep], **kwargs)

    elif args.texts is not None:
        source, build = _read_texts(args.texts), GalleryIndex.from_texts
    else:
        from ..data.quadruplets import open_dataset

        dataset = open_dataset(args.dataset, args.split)
        if args.max_samples is not None:
            dataset = dataset.select(range(min(args.max_samples, len(dataset))))
        if len(dataset) == 0:
            raise UsageError(f"split {args.split!r} of {args.dataset} is empty; an index needs at least one item")
        column, modality = GalleryIndex._dataset_column(dataset, args.column, args.modality, args.image_root)
        if modality == "image":
            bad = bad_image_rows(dataset, [column], args.image_root, show_progress=True)
            keep = bad_images_or_skip(bad, len(dataset), f"column {column!r}", args.skip_bad_images)
            skipped = len(dataset) - len(keep)
            dataset = dataset.select(keep) if skipped else dataset
        source = dataset

        def build(model, processor, data, **kwargs):
            return GalleryIndex.from_dataset(
                model, processor, data, column, modality=modality, image_root=args.image_root, **kwargs
            )

    from ..loading import load_model

    accelerator = Accelerator()  # one process unless started by `accelerate launch`
    model, processor = load_model(args.model, args.device or str(accelerator.device))
    index = build(model, processor, source, accelerator=accelerator, **options)
    if accelerator.is_main_process:
        index.save(args.output)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return {}
    return {
        "index": str(Path(args.output).expanduser().resolve()),
        "count": len(index),
        "modality": index.modality,
        "dim": index.dim,
        "kind": index.kind,
        **({"params": index.params} if index.params else {}),
        "model": index.model_name,
        **({"skipped_bad_images": skipped} if skipped else {}),
    }


def run_search(args) -> dict:
    import torch

    from ..encode import encode_images, encode_texts
    from .gallery import GalleryIndex

    _positive(args.top_k, "--top_k")
    _positive(args.nprobe, "--nprobe")
    with usage_errors():
        info = read_index_json(args.index)  # a missing or malformed folder fails before the model loads
    if args.top_k > info["count"]:
        raise UsageError(f"--top_k {args.top_k} is larger than the gallery ({info['count']} items); lower it")
    if info.get("faiss") is not None:
        require("faiss", purpose=f"the approximate index {args.index}")
    elif args.nprobe is not None or args.exact:
        raise UsageError(f"--nprobe and --exact apply to approximate (ivf) indexes; {args.index} is exact already")
    if args.image is not None and not Path(args.image).expanduser().is_file():
        raise UsageError(f"--image {args.image} does not exist")
    from ..loading import load_model

    model, processor = load_model(args.model, args.device)
    index = GalleryIndex.load(args.index, model=model, processor=processor)
    if args.text is not None:
        queries, query = encode_texts(model, processor, [args.text], show_progress=False), {"text": args.text}
    else:
        queries, query = encode_images(model, processor, [args.image], show_progress=False), {"image": args.image}
    with torch.no_grad():
        (result,) = index.search(
            queries,
            args.top_k,
            policy=args.policy,
            method=args.method,
            bound=args.bound,
            nprobe=args.nprobe,
            exact=args.exact,
        )
    return {"index": args.index, "query": query, "policy": args.policy, **result}


def run_info(args) -> dict:
    with usage_errors():
        info = read_index_json(args.index)
    keep = ("modality", "count", "dim", "curvature", "model", "faiss", "bounds", "traversal_offset")
    return {"index": args.index, **{key: info.get(key) for key in keep}}


COMMANDS = {"build": run_build, "search": run_search, "info": run_info}


def _command(args: argparse.Namespace) -> int:
    result = COMMANDS[args.command](args)
    if result:  # empty on the non-main processes of a multi-process build
        print(json.dumps(result, indent=1, ensure_ascii=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`hysac-index`: exit status 0, or 2 with one line on a usage or input error."""
    from ..cli import run, setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    return run(_command, args, PROG)


if __name__ == "__main__":
    sys.exit(main())
