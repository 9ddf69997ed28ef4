"""`hysac-eval`: the paper's evaluation suite from the command line.

Subcommands:
- `embed`: embed a quadruplet dataset into a cache folder (reused by `retrieval` and `histogram`).
- `retrieval`: Tables 1 and 2 (and the Table 8 per-tag breakdown) from a cache; JSON + markdown.
- `classify`: Tables 5/6-style Acc/FPR/FNR of the distance-to-root classifier on a labelled image folder
  (`root/safe/*`, `root/unsafe/*`) or on a cache; threshold calibration, sweep + PNG, `--save` to a model.
- `histogram`: distance-from-root histograms per content type (Figure 2) as a PNG.
- `zeroshot`: zero-shot accuracy on a class-per-folder image tree (Table 7 robustness).

Results go to stdout as JSON (the only print); with `--output-json`/`--output-md` they are written to files.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def _load_model(path: str, device: str | None):
    from transformers import AutoConfig

    from .. import HySACConfig, HySACModel, HySACProcessor

    # The processor's AutoTokenizer reads config.json; with "hysac" registered it uses our installed class
    # instead of asking whether to run the folder's remote code (an interactive prompt on stdout).
    AutoConfig.register("hysac", HySACConfig, exist_ok=True)
    model = HySACModel.from_pretrained(path).eval()
    if device:
        model.to(device)
    return model, HySACProcessor.from_pretrained(path)


def _parse_columns(spec: str | None) -> dict[str, str] | None:
    if not spec:
        return None
    columns = {}
    for item in spec.split(","):
        if "=" not in item:
            raise ValueError(f"--columns items look like column=KEY (KEY one of S,V,U,G), got {item!r}")
        col, key = item.split("=", 1)
        columns[col.strip()] = key.strip()
    return columns


def _floats(spec: str) -> list[float]:
    return [float(x) for x in spec.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hysac-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("embed", help="embed a quadruplet dataset into a cache folder")
    p.add_argument("--model", required=True, help="HySAC model folder or Hub id")
    p.add_argument("--dataset", required=True, help="'mini-visu', a .jsonl/.csv/.parquet file or a save_to_disk folder")
    p.add_argument("--split", default="test", help="split to embed (default: test)")
    p.add_argument("--max-samples", type=int, default=None, help="embed the first rows only")
    p.add_argument(
        "--columns",
        default=None,
        help="column=KEY pairs, KEY in S (safe text), V (safe image), U (unsafe text), G (unsafe image); default "
        "safe_text=S,safe_image=V,unsafe_text=U,unsafe_image=G",
    )
    p.add_argument("--tag-column", default="tag", help="category column for the per-tag breakdown")
    p.add_argument("--image-root", default=None, help="folder that relative image paths are resolved against")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--output", required=True, help="cache folder to write")

    p = sub.add_parser("retrieval", help="Tables 1 and 2 retrieval from an embedding cache")
    p.add_argument("--cache", required=True, help="folder written by 'hysac-eval embed'")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: all eight)")
    p.add_argument("--ks", default="1,5,10,20", help="recall levels")
    p.add_argument("--no-traversal", action="store_true", help="rank the union pools without the safety traversal")
    p.add_argument(
        "--bound", default="up_95", choices=["up_95", "avg", "low_05"], help="bound statistic of the traversal"
    )
    p.add_argument("--method", default="reference", choices=["reference", "geodesic"], help="traversal rule")
    p.add_argument("--alpha", type=float, default=None, help="traversal margin offset (default: the model's)")
    p.add_argument("--float64", action="store_true", help="rank in float64")
    p.add_argument("--output-json", default=None, help="write the results JSON here")
    p.add_argument("--output-md", default=None, help="write the markdown tables here")

    p = sub.add_parser("classify", help="Acc/FPR/FNR of the distance-to-root unsafe classifier")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", default=None, help="labelled image folder with sub-folders safe/ and unsafe/")
    src.add_argument("--cache", default=None, help="embedding cache: safe = S/V rows, unsafe = U/G rows of --modality")
    p.add_argument("--model", default=None, help="HySAC model folder (needed with --images, and for --save)")
    p.add_argument("--modality", default="image", choices=["image", "text"], help="which threshold and content")
    p.add_argument("--safe-class", default="safe", help="sub-folder name of safe images")
    p.add_argument("--unsafe-class", default="unsafe", help="sub-folder name of unsafe images")
    p.add_argument("--threshold", type=float, default=None, help="evaluate this threshold (default: the model's)")
    p.add_argument(
        "--calibrate", default=None, choices=["accuracy", "fpr"], help="calibrate the threshold on this data"
    )
    p.add_argument("--target-fpr", type=float, default=0.05, help="FPR bound for --calibrate fpr (fraction)")
    p.add_argument("--sweep", default=None, help="comma-separated thresholds for a Table-6 sweep (or 'auto')")
    p.add_argument("--plot", default=None, help="PNG of Acc/FPR/FNR against the threshold")
    p.add_argument("--save", action="store_true", help="store the calibrated threshold in --model's config.json")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--output-json", default=None)

    p = sub.add_parser("histogram", help="distance-from-root histograms per content type (Figure 2)")
    p.add_argument("--cache", required=True, help="folder written by 'hysac-eval embed'")
    p.add_argument("--output", required=True, help="PNG file to write")
    p.add_argument("--bins", type=int, default=60)
    p.add_argument("--title", default="Distance from the root")

    p = sub.add_parser("zeroshot", help="zero-shot accuracy on a class-per-folder image tree")
    p.add_argument("--model", required=True, help="HySAC model folder or Hub id")
    p.add_argument("--images", required=True, help="image folder, one sub-folder per class (the class name)")
    p.add_argument("--template", default="a photo of a {}.", help="prompt template with one {}")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--output-json", default=None)
    return parser


def run_embed(args) -> dict:
    from .embed import embed_dataset, open_quadruplets

    model, processor = _load_model(args.model, args.device)
    dataset = open_quadruplets(args.dataset, args.split, args.max_samples)
    cache = embed_dataset(
        model,
        processor,
        dataset,
        columns=_parse_columns(args.columns),
        tag_column=args.tag_column,
        image_root=args.image_root,
        batch_size=args.batch_size,
        source={"dataset": str(args.dataset), "split": args.split},
    )
    cache.save(args.output)
    return {"cache": str(args.output), "num_rows": cache.num_rows, "content": sorted(cache.embeds)}


def run_retrieval(args) -> dict:
    import torch

    from .embed import EmbeddingCache
    from .retrieval import evaluate_retrieval, results_to_markdown

    cache = EmbeddingCache.load(args.cache)
    results = evaluate_retrieval(
        cache,
        tasks=args.tasks.split(",") if args.tasks else None,
        ks=[int(k) for k in args.ks.split(",")],
        use_traversal=not args.no_traversal,
        bound=args.bound,
        method=args.method,
        alpha=args.alpha,
        dtype=torch.float64 if args.float64 else torch.float32,
    )
    if args.output_md:
        Path(args.output_md).write_text(results_to_markdown(results))
    return results


def _classification_scores(args):
    """Scores (distance to the root) and labels (1 = unsafe) from an image folder or a cache."""
    import torch

    from ..modeling.lorentz import dist_to_origin

    if args.images:
        from .embed import embed_images, list_image_folder

        if not args.model:
            raise ValueError("--images needs --model to embed the images")
        paths, labels, names = list_image_folder(args.images)
        for required in (args.safe_class, args.unsafe_class):
            if required not in names:
                raise ValueError(
                    f"{args.images} has no sub-folder {required!r} (found {names}); set --safe-class/--unsafe-class"
                )
        keep = [i for i, lab in enumerate(labels) if names[lab] in (args.safe_class, args.unsafe_class)]
        model, processor = _load_model(args.model, args.device)
        embeds = embed_images(model, processor, [paths[i] for i in keep], batch_size=args.batch_size)
        scores = model.unsafe_score(embeds)
        y = torch.tensor([int(names[labels[i]] == args.unsafe_class) for i in keep])
        default_threshold = (model.config.unsafe_thresholds or {}).get(args.modality)
        return scores, y, default_threshold
    from .embed import EmbeddingCache

    cache = EmbeddingCache.load(args.cache)
    safe_key, unsafe_key = ("V", "G") if args.modality == "image" else ("S", "U")
    cache.require(safe_key, unsafe_key)
    scores = dist_to_origin(torch.cat([cache.embeds[safe_key], cache.embeds[unsafe_key]]), cache.curv)
    y = torch.cat([torch.zeros(cache.num_rows, dtype=torch.long), torch.ones(cache.num_rows, dtype=torch.long)])
    return scores, y, (cache.unsafe_thresholds or {}).get(args.modality)


def run_classify(args) -> dict:
    import numpy as np

    from .classification import (
        calibrate_threshold,
        classification_metrics,
        plot_sweep,
        save_thresholds,
        threshold_sweep,
    )

    if args.save and not (args.calibrate and args.model):
        raise ValueError("--save stores a calibrated threshold: use it with --calibrate and --model")
    scores, labels, default_threshold = _classification_scores(args)
    out: dict = {"num_items": int(labels.numel()), "num_unsafe": int(labels.sum()), "modality": args.modality}
    marks = {}
    if args.calibrate:
        cal = calibrate_threshold(scores, labels, args.calibrate, args.target_fpr)
        out["calibrated"] = cal
        marks["calibrated"] = cal["threshold"]
        if args.save:
            out["saved_unsafe_thresholds"] = save_thresholds(args.model, {args.modality: cal["threshold"]})
    threshold = args.threshold if args.threshold is not None else default_threshold
    if threshold is not None:
        out["at_threshold"] = classification_metrics(scores, labels, threshold)
        marks["threshold"] = threshold
    elif not args.calibrate:
        raise ValueError(
            f"no threshold: the model/cache has no unsafe_thresholds[{args.modality!r}]; pass --threshold or --calibrate"
        )
    if args.sweep or args.plot:
        values = None if args.sweep in (None, "auto") else _floats(args.sweep)
        out["sweep"] = threshold_sweep(scores, labels, values)
        if args.plot:
            out["plot"] = str(
                plot_sweep(
                    out["sweep"] if values is not None else threshold_sweep(scores, labels, None, 200),
                    args.plot,
                    marks=marks,
                )
            )
    out["score_range"] = [float(np.min(scores.numpy())), float(np.max(scores.numpy()))]
    return out


def run_histogram(args) -> dict:
    from .embed import EmbeddingCache
    from .histogram import distance_stats, plot_root_histogram, root_distances

    cache = EmbeddingCache.load(args.cache)
    distances = root_distances(cache)
    plot_root_histogram(distances, args.output, bins=args.bins, title=args.title, bounds=cache.bounds)
    return {"plot": str(args.output), "stats": distance_stats(distances)}


def run_zeroshot(args) -> dict:
    from .embed import embed_images, list_image_folder
    from .zeroshot import zero_shot_accuracy

    paths, labels, names = list_image_folder(args.images)
    model, processor = _load_model(args.model, args.device)
    embeds = embed_images(model, processor, paths, batch_size=args.batch_size)
    result = zero_shot_accuracy(model, processor, embeds, labels, names, args.template)
    result["images"] = [str(p) for p in paths]
    return result


COMMANDS = {
    "embed": run_embed,
    "retrieval": run_retrieval,
    "classify": run_classify,
    "histogram": run_histogram,
    "zeroshot": run_zeroshot,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO), format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        result = COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        logger.error("%s", err)
        return 2
    text = json.dumps(result, indent=1)
    output_json = getattr(args, "output_json", None)
    if output_json:
        Path(output_json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
