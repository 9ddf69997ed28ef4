"""`hysac-index`: build a gallery index folder once, then search it by text or image, safely.

Subcommands:
- `build`: embed a folder of images, a text file (one text per line) or a dataset column with a HySAC model (or read
  shards of embeddings) and write the index folder: exact `flat` search, approximate `ivf`, or approximate and
  compressed `ivfpq`, each approximate kind tuned for `--target_recall` (or refused, keeping exact search). `ivfpq`
  builds stream: chunk by chunk, resumable after a crash by running the same command again. Under `accelerate
  launch` every process embeds its share; the main process writes the folder.
- `add`: append items (or embeddings) to a saved index, checked against the model that built it.
- `search`: embed one query (`--text` or `--image`), or every query of `--queries_file`, and print the nearest
  gallery items as JSON (JSON lines for a file), after moving an unsafe query into the gallery's safe region
  (`--policy redirect`, the default) or as it is (`retain`).
- `info`: print an index folder's description, with what its build measured (no model needed).

Results go to stdout as JSON (the only print). A usage or input error prints one line and exits 2 (`--debug`
shows the traceback); every check that can fail runs before the model is loaded and before anything is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

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
  # a compressed index streamed from shards of embeddings (resumable: run it again after a crash)
  hysac-index build --model my-hysac --embeddings shards/*.safetensors --modality image --output big --kind ivfpq
  # append items to an index (checked against the model that built it)
  hysac-index add --index photos-index --model my-hysac --images new-photos/
  # the image column of a dataset (Hub id, save_to_disk folder or a .jsonl/.csv/.parquet file)
  hysac-index build --model my-hysac --dataset my_data.parquet --column image --split train --output data-index
  # several processes (GPUs) embed their share of the gallery
  accelerate launch -m hysac_hf.index.cli build --model my-hysac --images photos/ --output photos-index

  # search: the nearest images of a text; an unsafe query is first moved into the safe-image region
  hysac-index search --index photos-index --model my-hysac --text "a dog on a beach" --top_k 5
  hysac-index search --index photos-index --model my-hysac --image query.jpg --policy retain
  # many queries: a .jsonl file of {"text": ...} or {"image": path} objects, or a text file (one query per line)
  hysac-index search --index photos-index --model my-hysac --queries_file queries.jsonl > results.jsonl

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
    sub = parser.add_subparsers(dest="command", required=True, metavar="{build,add,search,info}")

    p = add_subcommand(
        sub,
        "build",
        help="embed a gallery and write its index folder",
        description="Embed a gallery (images, texts or a dataset column) with a HySAC model and write an index folder.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_argument(
        p,
        "--model",
        default=None,
        help="HySAC model folder or Hub id (the one that will search the index); optional with --embeddings",
    )
    _add_sources(p)
    add_argument(
        p, "--output", required=True, help="index folder to write (an existing index there is replaced atomically)"
    )
    add_argument(
        p,
        "--kind",
        default="flat",
        choices=["flat", "ivf", "ivfpq"],
        help="flat: exact search (default); ivf: approximate, for large galleries; ivfpq: approximate with "
        "compressed vectors (about 1/14 of the embeddings' size) and memory-mapped embeddings, for galleries larger "
        "than memory, built chunk by chunk (both need faiss)",
    )
    add_argument(
        p,
        "--target_recall",
        default="0.95",
        help="ivf/ivfpq: recall@10 against exact search to reach, measured on held-out gallery items; the settings "
        "are chosen for it, and exact search is kept where it cannot be reached at 2x the exact speed; 'none': "
        "measure nothing (default: 0.95)",
    )
    add_argument(p, "--nlist", type=int, default=None, help="ivf/ivfpq: number of cells (default: chosen)")
    add_argument(
        p, "--nprobe", type=int, default=None, help="ivf/ivfpq: cells searched per query (default: the fewest that "
        "reach --target_recall)"
    )  # fmt: skip
    add_argument(p, "--rerank", type=int, default=None, help="ivfpq: candidates re-ranked exactly (default: chosen)")
    add_argument(
        p,
        "--chunk_size",
        type=int,
        default=65_536,
        help="ivfpq: items embedded and written per chunk (a resumed build restarts at the last complete chunk)",
    )
    add_argument(p, "--restart", action="store_true", help="ivfpq: discard an unfinished build instead of resuming it")
    _add_embedding_flags(p, "torch device (default: cpu, or the accelerate device)")

    p = add_subcommand(
        sub,
        "add",
        help="append items or embeddings to an index folder",
        description="Embed new items with the index's model (checked against its model probe) and append them.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_argument(p, "--index", required=True, help="index folder written by 'hysac-index build'")
    add_argument(
        p,
        "--model",
        default=None,
        help="the HySAC model that built the index (required unless --embeddings go into an index without a probe)",
    )
    _add_sources(p)
    _add_embedding_flags(p, "torch device (default: cpu)")

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
    add_argument(
        query,
        "--queries_file",
        default=None,
        help="many queries: a .jsonl file of objects with a 'text' or an 'image' (path) key, or a text file with one "
        "text query per line; prints one JSON line per query",
    )
    add_argument(p, "--batch_size", type=int, default=64, help="--queries_file: queries embedded at once")
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
    add_argument(
        p,
        "--verify",
        action="store_true",
        help="also read the embeddings whole and check their checksum (loading an ivfpq index checks their size only)",
    )
    return parser


def _add_embedding_flags(parser: argparse.ArgumentParser, device_help: str) -> None:
    """How `build` and `add` embed their items."""
    add_argument(
        parser, "--batch_size", type=int, default=None, help="items per forward pass (default: 32 images, 256 texts)"
    )
    add_argument(parser, "--num_workers", type=int, default=0, help="DataLoader workers that decode images")
    add_skip_bad_images_flag(parser)
    add_argument(parser, "--device", default=None, help=device_help)


def _add_sources(parser: argparse.ArgumentParser) -> None:
    """The gallery sources of `build` and `add`, one of them required."""
    source = parser.add_mutually_exclusive_group(required=True)
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
    add_argument(
        source,
        "--embeddings",
        nargs="+",
        default=None,
        help="files of precomputed embeddings (shards, in order): .safetensors holding one (n, D) float tensor, or "
        ".npy; with --modality, and --model or --curvature",
    )
    add_argument(parser, "--column", default=None, help="with --dataset: the image or text column (default: the only one)")
    add_argument(parser, "--split", default="train", help="with --dataset: the split (default: train)")
    add_argument(
        parser,
        "--modality",
        default=None,
        choices=["image", "text"],
        help="with --dataset: what --column holds (default: an Image column holds images, a string column images "
        "when its values are paths of existing image files or http(s) URLs, texts otherwise); with --embeddings: "
        "what they embed (required)",
    )
    add_argument(
        parser, "--image_root", default=None, help="with --dataset: folder that relative image paths are resolved against"
    )
    add_argument(parser, "--max_samples", type=int, default=None, help="with --dataset: index the first rows only")
    add_argument(
        parser,
        "--curvature",
        type=float,
        default=None,
        help="with --embeddings and no --model: the curvature c of the model that embedded them",
    )


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


def _target_recall(value: str) -> float | None:
    if str(value).lower() == "none":
        return None
    try:
        target = float(value)
    except ValueError:
        raise UsageError(f"--target_recall {value!r} is not a number in (0, 1] or 'none'") from None
    if not 0 < target <= 1:
        raise UsageError(f"--target_recall {value} must be in (0, 1], or 'none' to measure nothing")
    return target


def _source(args, purpose: str):
    """The gallery source named by the flags and how many bad images `--skip_bad_images` left out (every input is
    read and every image checked here, in one pass, before any model loads)."""
    return _named_source(args, purpose).without_bad_images(args.skip_bad_images)


def _named_source(args, purpose: str):
    from . import sources

    _positive(args.max_samples, "--max_samples")
    if args.dataset is None:
        for flag in ("column", "image_root", "max_samples"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag} applies to --dataset only")
    if args.embeddings is None and args.curvature is not None:
        raise UsageError("--curvature applies to --embeddings only (a model records its own)")
    if args.modality is not None and args.dataset is None and args.embeddings is None:
        raise UsageError("--modality applies to --dataset and --embeddings only")
    if args.images is not None:
        return sources.images_source(args.images)
    if args.texts is not None:
        return sources.texts_source(_read_texts(args.texts), str(Path(args.texts).expanduser().resolve()))
    if args.embeddings is not None:
        if args.modality is None:
            raise UsageError(f"--embeddings needs --modality image or text (what they embed) to {purpose}")
        if args.model is None and args.curvature is None:
            raise UsageError("--embeddings needs --model (recorded and checked) or --curvature (the model's c)")
        if args.curvature is not None and not args.curvature > 0:
            raise UsageError(f"--curvature must be positive, got {args.curvature}")
        return sources.embeddings_source(args.embeddings, args.modality)
    from ..data.quadruplets import open_dataset
    from .gallery import GalleryIndex

    dataset = open_dataset(args.dataset, args.split)
    if args.max_samples is not None:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    column, modality = GalleryIndex._dataset_column(dataset, args.column, args.modality, args.image_root)
    if len(dataset) == 0:
        raise UsageError(f"split {args.split!r} of {args.dataset} is empty; an index needs at least one item")
    if modality == "text":
        GalleryIndex._check_items(dataset[column], "text")
    return sources.dataset_source(dataset, column, modality, args.image_root, f"{args.dataset}:{args.split}")


def _model_fields(args, source, device: str | None) -> tuple[Any, Any, dict[str, Any]]:
    """The model (or None), its processor and what the index records of it (curvature, name, probe, bounds)."""
    if args.model is None:
        if source.needs_model:
            raise UsageError("--model is required to embed --images, --texts or --dataset")
        return None, None, {"curvature": float(args.curvature)}
    from ..loading import load_model
    from .gallery import _model_fields as record

    model, processor = load_model(args.model, device)
    fields = record(model, processor)
    if args.curvature is not None and abs(args.curvature - fields["curvature"]) > 1e-5 * fields["curvature"]:
        raise UsageError(f"--curvature {args.curvature} disagrees with the model's curvature {fields['curvature']}")
    if source.dim is not None and source.dim != int(model.config.projection_dim):
        raise UsageError(
            f"the --embeddings have dimension {source.dim}, the model embeds in {model.config.projection_dim}; "
            "pass the model that embedded them"
        )
    return model, processor, fields


def run_build(args) -> dict:
    from accelerate import Accelerator

    from .gallery import GalleryIndex, check_output_folder
    from .sources import EmbedOptions

    for value, flag in (
        (args.batch_size, "--batch_size"),
        (args.nlist, "--nlist"),
        (args.nprobe, "--nprobe"),
        (args.rerank, "--rerank"),
        (args.chunk_size, "--chunk_size"),
    ):
        _positive(value, flag)
    target = _target_recall(args.target_recall)
    if args.kind != "flat":
        require("faiss", purpose=f"--kind {args.kind}")
    elif args.nlist is not None or args.nprobe is not None or args.rerank is not None:
        raise UsageError("--nlist, --nprobe and --rerank set up an approximate index; add --kind ivf or ivfpq")
    if args.rerank is not None and args.kind != "ivfpq":
        raise UsageError("--rerank applies to --kind ivfpq")
    if args.restart and args.kind != "ivfpq":
        raise UsageError("--restart applies to --kind ivfpq (the only kind built chunk by chunk)")
    check_output_folder(args.output)
    source, skipped = _source(args, "build an index")

    accelerator = Accelerator()  # one process unless started by `accelerate launch`
    model, processor, fields = _model_fields(args, source, args.device or str(accelerator.device))
    embed = EmbedOptions(model, processor, args.batch_size, args.num_workers, accelerator, show_progress=True)
    settings = {"nlist": args.nlist, "nprobe": args.nprobe, "rerank": args.rerank, "target_recall": target}
    output = Path(args.output).expanduser().resolve()
    if args.kind == "ivfpq":
        from .streaming import build_streaming, resume_point

        size = args.chunk_size

        def chunks(start: int):
            for number in range(start, -(-len(source) // size)):
                yield source.slice(number * size, min(len(source), (number + 1) * size), embed)

        dim = source.dim if source.dim is not None else int(model.config.projection_dim)
        fingerprint = {"source": source.fingerprint, "chunk_size": size, "model": fields.get("model_probe")}
        # Every process starts at the chunk the main process resumes from (each embeds its share of every chunk).
        start = resume_point(output, fingerprint, kind="ivfpq", dim=dim, modality=source.modality, restart=args.restart)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            build_streaming(
                output,
                chunks,
                dim=dim,
                modality=source.modality,
                fingerprint=fingerprint,
                kind="ivfpq",
                restart=args.restart,
                nlist=args.nlist,
                nprobe=args.nprobe,
                rerank=args.rerank,
                target_recall=target,
                **fields,
            )
        elif start is not None:
            for _ in chunks(start):
                pass
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return {}
        index = GalleryIndex.load(output)
    else:
        embeddings, metadata = source.slice(0, len(source), embed)
        index = GalleryIndex(
            embeddings, source.modality, metadata=metadata, kind=args.kind, **settings, **fields
        )
        if accelerator.is_main_process:
            index.save(output)
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return {}
    return {
        "index": str(output),
        "count": len(index),
        "modality": index.modality,
        "dim": index.dim,
        "kind": index.kind,
        **({"params": index.params} if index.params else {}),
        **({"tuning": _tuning_summary(index.tuning)} if index.tuning else {}),
        "model": index.model_name,
        **({"skipped_bad_images": skipped} if skipped else {}),
    }


def _tuning_summary(tuning: dict[str, Any]) -> dict[str, Any]:
    """What a build measured, without the per-candidate rows."""
    return {key: value for key, value in tuning.items() if key != "candidates"}


def run_add(args) -> dict:
    from .gallery import GalleryIndex
    from .sources import EmbedOptions

    _positive(args.batch_size, "--batch_size")
    with usage_errors():
        info = read_index_json(args.index)  # a missing or malformed folder fails before the model loads
    source, skipped = _source(args, "add to an index")
    if source.modality != info["modality"]:
        raise UsageError(f"{args.index} holds {info['modality']}s; these items are {source.modality}s")
    if args.model is None and info.get("model_probe") is not None:
        raise UsageError(
            f"{args.index} was built by {info.get('model') or 'a model'}: pass it as --model, so that the new items "
            "are embedded by (or checked against) the same model"
        )
    if args.curvature is not None and abs(args.curvature - info["curvature"]) > 1e-5 * info["curvature"]:
        raise UsageError(f"--curvature {args.curvature} is not the index's curvature {info['curvature']}")
    if source.dim is not None and source.dim != info["dim"]:
        raise UsageError(f"the --embeddings have dimension {source.dim}; {args.index} holds dimension {info['dim']}")
    if args.embeddings is not None and args.curvature is None and args.model is None:
        args.curvature = info["curvature"]
    model, processor, _ = _model_fields(args, source, args.device) if args.model is not None else (None, None, {})
    embeddings, metadata = source.slice(0, len(source), EmbedOptions(model, processor, args.batch_size, args.num_workers))
    index = GalleryIndex.extend_folder(args.index, embeddings, metadata, model=model, processor=processor)
    return {
        "index": str(Path(args.index).expanduser().resolve()),
        "added": int(embeddings.shape[0]),
        "count": len(index),
        "kind": index.kind,
        **({"skipped_bad_images": skipped} if skipped else {}),
    }


def _read_queries(path: str) -> list[dict[str, str]]:
    """The queries of `--queries_file`: `{"text": ...}` or `{"image": path}` per query (other keys kept)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"--queries_file {path} does not exist")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise UsageError(f"--queries_file {path} is not UTF-8 text ({error})") from None
    queries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if file.suffix != ".jsonl":
            queries.append({"text": line.strip()})
            continue
        try:
            query = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"line {number} of --queries_file {path} is not JSON ({error})") from None
        kinds = [key for key in ("text", "image") if isinstance(query, dict) and key in query]
        if len(kinds) != 1 or not isinstance(query[kinds[0]], str):
            raise UsageError(
                f"line {number} of --queries_file {path} must be an object with a 'text' or an 'image' (path) string"
            )
        if kinds == ["image"] and not Path(query["image"]).expanduser().is_file():
            raise UsageError(f"line {number} of --queries_file {path}: image {query['image']} does not exist")
        queries.append(query)
    if not queries:
        raise UsageError(f"--queries_file {path} holds no query")
    return queries


def run_search(args) -> dict | None:
    import torch

    from ..encode import encode_images, encode_texts
    from .gallery import GalleryIndex

    _positive(args.top_k, "--top_k")
    _positive(args.nprobe, "--nprobe")
    _positive(args.batch_size, "--batch_size")
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
    queries = _read_queries(args.queries_file) if args.queries_file is not None else None
    from ..loading import load_model

    model, processor = load_model(args.model, args.device)
    index = GalleryIndex.load(args.index, model=model, processor=processor)
    options = {
        "policy": args.policy,
        "method": args.method,
        "bound": args.bound,
        "nprobe": args.nprobe,
        "exact": args.exact,
    }
    if queries is None:
        if args.text is not None:
            embedded, query = encode_texts(model, processor, [args.text], show_progress=False), {"text": args.text}
        else:
            embedded, query = encode_images(model, processor, [args.image], show_progress=False), {"image": args.image}
        with torch.no_grad():
            (result,) = index.search(embedded, args.top_k, **options)
        return {"index": args.index, "query": query, "policy": args.policy, **result}
    texts = [i for i, q in enumerate(queries) if "text" in q]
    images = [i for i, q in enumerate(queries) if "image" in q]
    embedded: list[Any] = [None] * len(queries)
    size = args.batch_size
    if texts:
        rows = encode_texts(model, processor, [queries[i]["text"] for i in texts], batch_size=size, show_progress=False)
        for i, row in zip(texts, rows):
            embedded[i] = row
    if images:
        rows = encode_images(model, processor, [queries[i]["image"] for i in images], batch_size=size, show_progress=False)
        for i, row in zip(images, rows):
            embedded[i] = row
    with torch.no_grad():
        results = []
        for start in range(0, len(queries), size):
            results += index.search(torch.stack(embedded[start : start + size]), args.top_k, **options)
    for query, result in zip(queries, results):
        print(json.dumps({"query": query, "policy": args.policy, **result}, ensure_ascii=False))
    return None


def run_info(args) -> dict:
    with usage_errors():
        info = read_index_json(args.index)
    keep = ("modality", "count", "dim", "curvature", "model", "faiss", "tuning", "bounds", "traversal_offset")
    result = {"index": args.index, **{key: info.get(key) for key in keep}}
    if args.verify:
        from ..modeling.gallery_hysac import read_gallery, verify_embeddings

        with usage_errors():
            gallery = read_gallery(args.index, memory_map=True)
            verify_embeddings(gallery)
        result["verified"] = True
    return result


COMMANDS = {"build": run_build, "add": run_add, "search": run_search, "info": run_info}


def _command(args: argparse.Namespace) -> int:
    result = COMMANDS[args.command](args)
    if result:  # empty on the non-main processes of a multi-process build, None after JSON lines
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
