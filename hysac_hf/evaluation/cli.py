"""`hysac-eval`: the paper's evaluation suite from the command line.

Subcommands:
- `embed`: embed a quadruplet dataset into a cache folder (reused by `retrieval`, `histogram` and `classify`);
  under `accelerate launch` every process embeds its share.
- `retrieval`: Tables 1 and 2 (and the Table 8 per-tag breakdown) from a cache; JSON + markdown.
- `classify`: Tables 5/6-style Acc/FPR/FNR of the distance-to-root classifier on a labelled image folder
  (`root/safe/*`, `root/unsafe/*`) or on a cache; threshold calibration, sweep + PNG, `--save` to a model.
- `histogram`: distance-from-root histograms per kind of content (Figure 2) as a PNG.
- `zeroshot`: zero-shot accuracy on a class-per-folder image tree (Table 7 robustness).

Results go to stdout as JSON (the only print); with `--output_json`/`--output_md` they are also written to files.
A usage or input error prints one line and exits 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..cli import (
    add_argument,
    add_dataset_arguments,
    add_global_flags,
    add_skip_bad_images_flag,
    add_subcommand,
    dataset_from_args,
)
from ..errors import UsageError
from ..loading import load_model

logger = logging.getLogger(__name__)


def _floats(spec: str) -> list[float]:
    try:
        return [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--sweep takes comma-separated numbers or 'auto', got {spec!r}") from None


def _ints(spec: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated integers, got {spec!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"{flag} takes positive integers, got {spec!r}")
    return values


def _writable(path: str | None, flag: str) -> None:
    if path and not Path(path).resolve().parent.is_dir():
        raise UsageError(f"{flag} {path}: folder {Path(path).parent} does not exist")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hysac-eval", description=__doc__.split("\n\n")[0])
    add_global_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = add_subcommand(sub, "embed", help="embed a quadruplet dataset into a cache folder")
    add_argument(p, "--model", required=True, help="HySAC model folder or Hub id")
    add_dataset_arguments(p, split="test", dataset_default=None)
    add_argument(p, "--tag_column", default="tag", help="category column for the per-tag breakdown")
    add_argument(p, "--batch_size", type=int, default=32, help="quadruplets per forward pass (per process)")
    add_argument(p, "--num_workers", type=int, default=0, help="DataLoader workers that decode images")
    add_argument(p, "--device", default=None, help="torch device (default: cpu, or the accelerate device)")
    add_argument(p, "--output", required=True, help="cache folder to write (replaced atomically)")

    p = add_subcommand(sub, "retrieval", help="Tables 1 and 2 retrieval from an embedding cache")
    add_argument(p, "--cache", required=True, help="folder written by 'hysac-eval embed'")
    add_argument(p, "--tasks", default=None, help="comma-separated task names (default: all eight)")
    add_argument(p, "--ks", default="1,5,10,20", help="recall levels")
    add_argument(p, "--no_traversal", action="store_true", help="rank the union pools without the safety traversal")
    add_argument(
        p, "--bound", default="up_95", choices=["up_95", "avg", "low_05"], help="bound statistic of the traversal"
    )
    add_argument(p, "--method", default="reference", choices=["reference", "geodesic"], help="traversal rule")
    add_argument(
        p,
        "--offset",
        type=float,
        default=None,
        help="traversal margin offset (default: the model's traversal_offset)",
        aliases=["--alpha"],
    )
    add_argument(p, "--float64", action="store_true", help="rank in float64")
    add_argument(p, "--output_json", default=None, help="write the results JSON here")
    add_argument(p, "--output_md", default=None, help="write the markdown tables here")

    p = add_subcommand(sub, "classify", help="Acc/FPR/FNR of the distance-to-root unsafe classifier")
    src = p.add_mutually_exclusive_group(required=True)
    add_argument(src, "--images", default=None, help="labelled image folder with sub-folders safe/ and unsafe/")
    add_argument(src, "--cache", default=None, help="embedding cache: safe = S/V rows, unsafe = U/G rows of --modality")
    add_argument(p, "--model", default=None, help="HySAC model folder (needed with --images, and for --save)")
    add_argument(p, "--modality", default="image", choices=["image", "text"], help="which threshold and content")
    add_argument(p, "--safe_class", default="safe", help="sub-folder name of safe images")
    add_argument(p, "--unsafe_class", default="unsafe", help="sub-folder name of unsafe images")
    add_argument(p, "--threshold", type=float, default=None, help="evaluate this threshold (default: the model's)")
    add_argument(
        p, "--calibrate", default=None, choices=["accuracy", "fpr"], help="calibrate the threshold on this data"
    )
    add_argument(p, "--target_fpr", type=float, default=0.05, help="FPR bound for --calibrate fpr (fraction)")
    add_argument(p, "--sweep", default=None, help="comma-separated thresholds for a Table-6 sweep (or 'auto')")
    add_argument(p, "--plot", default=None, help="PNG of Acc/FPR/FNR against the threshold")
    add_argument(p, "--save", action="store_true", help="store the calibrated threshold in --model's config.json")
    add_argument(p, "--overwrite", action="store_true", help="with --save: replace a threshold the model already has")
    add_argument(p, "--batch_size", type=int, default=32, help="images per forward pass")
    add_argument(p, "--device", default=None, help="torch device (default: cpu)")
    add_argument(p, "--output_json", default=None, help="write the results JSON here")
    add_skip_bad_images_flag(p)

    p = add_subcommand(sub, "histogram", help="distance-from-root histograms per kind of content (Figure 2)")
    add_argument(p, "--cache", required=True, help="folder written by 'hysac-eval embed'")
    add_argument(p, "--output", required=True, help="PNG file to write")
    add_argument(p, "--bins", type=int, default=60, help="histogram bins")
    add_argument(p, "--title", default="Distance from the root", help="figure title")

    p = add_subcommand(sub, "zeroshot", help="zero-shot accuracy on a class-per-folder image tree")
    add_argument(p, "--model", required=True, help="HySAC model folder or Hub id")
    add_argument(p, "--images", required=True, help="image folder, one sub-folder per class (the class name)")
    add_argument(p, "--template", default="a photo of a {}.", help="prompt template with one {}")
    add_argument(p, "--batch_size", type=int, default=32, help="images per forward pass")
    add_argument(p, "--device", default=None, help="torch device (default: cpu)")
    add_argument(p, "--output_json", default=None, help="write the results JSON here")
    add_skip_bad_images_flag(p)
    return parser


def _usable_images(args, paths: list, labels: list[int]) -> tuple[list, list[int]]:
    """The labelled images of `--images` that decode, checked in one pass before the model loads (`--skip_bad_images`
    leaves the others out; without it they are an error naming them)."""
    from ..data import bad_images_or_skip, find_bad_images

    keep = bad_images_or_skip(find_bad_images(paths, show_progress=True), len(paths), args.images, args.skip_bad_images)
    return [paths[i] for i in keep], [labels[i] for i in keep]


def run_embed(args) -> dict:
    from accelerate import Accelerator

    from ..encode import encode_quadruplets

    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {args.batch_size}")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} exists and is not a folder")
    dataset = dataset_from_args(args, required=())
    accelerator = Accelerator()  # one process unless started by `accelerate launch`
    model, processor = load_model(args.model, args.device or str(accelerator.device))
    cache = encode_quadruplets(
        model,
        processor,
        dataset,
        tag_column=args.tag_column,
        image_root=args.image_root,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        accelerator=accelerator,
        source={"dataset": str(args.dataset), "split": args.split},
    )
    if accelerator.is_main_process:
        cache.save(output)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return {}
    return {"cache": str(output), "num_rows": cache.num_rows, "content": sorted(cache.embeds)}


def run_retrieval(args) -> dict:
    import torch

    from ..encode import EmbeddingCache
    from .retrieval import TASKS, evaluate_retrieval, results_to_markdown

    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    unknown = [t for t in tasks or [] if t not in TASKS]
    if unknown:
        raise UsageError(f"--tasks: unknown task(s) {unknown}; choose from {list(TASKS)}")
    ks = _ints(args.ks, "--ks")
    _writable(args.output_md, "--output_md")
    _writable(args.output_json, "--output_json")
    cache = EmbeddingCache.load(args.cache)
    results = evaluate_retrieval(
        cache,
        tasks=tasks,
        ks=ks,
        use_traversal=not args.no_traversal,
        bound=args.bound,
        method=args.method,
        offset=args.offset,
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
        from ..data.folders import list_image_folder
        from ..encode import encode_images

        paths, labels, names = list_image_folder(args.images)
        for required in (args.safe_class, args.unsafe_class):
            if required not in names:
                raise UsageError(
                    f"{args.images} has no sub-folder {required!r} (found {names}); set --safe_class/--unsafe_class"
                )
        keep = [i for i, lab in enumerate(labels) if names[lab] in (args.safe_class, args.unsafe_class)]
        paths, labels = _usable_images(args, [paths[i] for i in keep], [labels[i] for i in keep])
        model, processor = load_model(args.model, args.device)
        embeds = encode_images(model, processor, paths, batch_size=args.batch_size)
        scores = model.distance_to_root(embeds)
        y = torch.tensor([int(names[label] == args.unsafe_class) for label in labels])
        default_threshold = (model.config.unsafe_thresholds or {}).get(args.modality)
        return scores, y, default_threshold
    from ..encode import EmbeddingCache
    from ..modeling.configuration_hysac import SAFE_KIND, UNSAFE_KIND

    cache = EmbeddingCache.load(args.cache)
    safe_key, unsafe_key = SAFE_KIND[args.modality].key, UNSAFE_KIND[args.modality].key
    cache.require(safe_key, unsafe_key)
    scores = dist_to_origin(torch.cat([cache.embeds[safe_key], cache.embeds[unsafe_key]]), cache.curvature)
    y = torch.cat([torch.zeros(cache.num_rows, dtype=torch.long), torch.ones(cache.num_rows, dtype=torch.long)])
    return scores, y, (cache.unsafe_thresholds or {}).get(args.modality)


def run_classify(args) -> dict:
    import numpy as np

    from ..calibration import calibrate_threshold, save_thresholds
    from .classification import (
        classification_metrics,
        plot_sweep,
        threshold_sweep,
    )

    if args.save and not (args.calibrate and args.model):
        raise UsageError("--save stores a calibrated threshold: use it with --calibrate and --model")
    if args.images and not args.model:
        raise UsageError("--images needs --model to embed the images")
    if args.save:  # refuse before any embedding
        from ..modeling.configuration_hysac import HySACConfig

        existing = (HySACConfig.from_pretrained(args.model).unsafe_thresholds or {}).get(args.modality)
        if existing is not None and not args.overwrite:
            raise UsageError(
                f"{args.model} already has an unsafe threshold for {args.modality} ({existing:.6g}); pass --overwrite "
                "to replace it"
            )
    sweep_values = None if args.sweep in (None, "auto") else _floats(args.sweep)
    _writable(args.plot, "--plot")
    _writable(args.output_json, "--output_json")
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
        raise UsageError(
            f"no threshold: the model/cache has no unsafe_thresholds[{args.modality!r}]; pass --threshold or --calibrate"
        )
    if args.sweep or args.plot:
        out["sweep"] = threshold_sweep(scores, labels, sweep_values)
        if args.plot:
            sweep = out["sweep"] if sweep_values is not None else threshold_sweep(scores, labels, None, 200)
            out["plot"] = str(plot_sweep(sweep, args.plot, marks=marks))
    out["score_range"] = [float(np.min(scores.numpy())), float(np.max(scores.numpy()))]
    return out


def run_histogram(args) -> dict:
    from ..calibration import distance_stats, plot_root_histogram, root_distances
    from ..encode import EmbeddingCache

    if args.bins < 1:
        raise UsageError(f"--bins must be >= 1, got {args.bins}")
    _writable(args.output, "--output")
    cache = EmbeddingCache.load(args.cache)
    distances = root_distances(cache)
    plot_root_histogram(distances, args.output, bounds=cache.bounds, bins=args.bins, title=args.title)
    return {"plot": str(args.output), "stats": distance_stats(distances)}


def run_zeroshot(args) -> dict:
    from ..data.folders import list_image_folder
    from ..encode import encode_images
    from .zeroshot import class_prompts, zero_shot_accuracy

    paths, labels, names = list_image_folder(args.images)
    class_prompts(names, args.template)  # checks the template before the model loads
    paths, labels = _usable_images(args, paths, labels)
    model, processor = load_model(args.model, args.device)
    embeds = encode_images(model, processor, paths, batch_size=args.batch_size)
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


def _command(args: argparse.Namespace) -> int:
    result = COMMANDS[args.command](args)
    if not result:  # a non-main process of a multi-process run
        return 0
    text = json.dumps(result, indent=1)
    output_json = getattr(args, "output_json", None)
    if output_json:
        Path(output_json).write_text(text + "\n")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`hysac-eval`: exit status 0, or 2 with one line on a usage or input error."""
    from ..cli import run, setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    return run(_command, args, "hysac-eval")


if __name__ == "__main__":
    sys.exit(main())
