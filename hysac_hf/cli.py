"""One command-line style for every hysac-hf command (`train.py`, `hysac-eval`, `hysac-calibrate`, `hysac-demo`,
the converter).

- Flags are spelled with underscores (`--batch_size`), as transformers and accelerate scripts do. Older dashed
  spellings stay accepted as hidden aliases for one release (:func:`add_argument`).
- A usage or input error (a missing file, a bad column, an empty split, a missing optional dependency) ends the
  command with ONE line on stderr that names the file/row/key and the fix, and exit status 2; `--debug` shows
  the traceback instead. A bug (anything else) keeps its traceback and exits 1.
- Dataset columns are mapped the same way everywhere: `--columns SOURCE=KIND,...` (`hysac_hf.data.parse_columns`).
- A missing optional dependency is reported at start with the extra to install (:func:`require`).
- Logs go through `logging`; the final result is the only thing printed to stdout.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import UsageError, one_line

logger = logging.getLogger(__name__)

EXIT_USAGE = 2
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATEFMT = "%H:%M:%S"

def add_argument(parser: argparse.ArgumentParser | Any, *flags: str, aliases: Sequence[str] = (), **kwargs) -> None:
    """`parser.add_argument(*flags, **kwargs)` plus hidden aliases, accepted but not shown in --help: the dashed
    spelling of every underscore flag (`--batch-size` for `--batch_size`, the first release's) and `aliases`."""
    action = parser.add_argument(*flags, **kwargs)
    alias_kwargs = {k: v for k, v in kwargs.items() if k in ("type", "nargs", "choices", "action", "const")}
    for alias in [*dashed_aliases(*flags), *aliases]:
        parser.add_argument(alias, dest=action.dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **alias_kwargs)


class OneSpellingHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows every flag once, in its underscore spelling (`--batch_size`), with its default; the dashed
    aliases (`--batch-size`, which `transformers.HfArgumentParser` adds too) still parse."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        aliases = set(dashed_aliases(*action.option_strings))
        if not aliases & set(action.option_strings):
            return super()._format_action_invocation(action)
        shown = copy.copy(action)
        shown.option_strings = [flag for flag in action.option_strings if flag not in aliases]
        return super()._format_action_invocation(shown)


def dashed_aliases(*flags: str) -> list[str]:
    """The dashed spellings (`--batch-size`) of underscore flags (`--batch_size`) that differ from them."""
    return [f"--{f[2:].replace('_', '-')}" for f in flags if f.startswith("--") and "_" in f[2:]]


def add_dataset_arguments(parser: argparse.ArgumentParser | Any, split: str, dataset_default: str | None) -> None:
    """The flags that name a quadruplet dataset, the same for every command that reads one (see
    :func:`dataset_from_args`). `dataset_default=None` makes `--dataset` required."""
    add_argument(
        parser,
        "--dataset",
        required=dataset_default is None,
        default=dataset_default,
        help="'mini-visu' (bundled), 'visu:<ViSU-Text source>', a .jsonl/.csv/.parquet file, a folder of per-split "
        "files, a save_to_disk folder or a Hub dataset id",
    )
    add_argument(parser, "--split", default=split, help=f"split to read (default: {split})")
    add_argument(
        parser,
        "--columns",
        default=None,
        help="map your columns: SOURCE=KIND pairs, KIND one of S (safe text), V (safe image), U (unsafe text), "
        "G (unsafe image); e.g. --columns coco_caption=S,coco_path=V,nsfw=U,nsfw_image=G",
    )
    add_argument(parser, "--max_samples", type=int, default=None, help="read the first rows only")
    add_argument(parser, "--image_root", default=None, help="folder that relative image paths are resolved against")
    add_argument(parser, "--coco_root", default=None, help="COCO 2017 root (for --dataset visu:...)")
    add_argument(parser, "--visu_unsafe_images", default=None, help="your ViSU unsafe images (for --dataset visu:...)")
    add_skip_bad_images_flag(parser)


SKIP_BAD_IMAGES_HELP = (
    "leave out rows whose images are missing or cannot be decoded (counted in the log) instead of stopping; every "
    "image is checked in one pass before the model loads either way"
)


def add_skip_bad_images_flag(parser: argparse.ArgumentParser | Any) -> None:
    add_argument(parser, "--skip_bad_images", action="store_true", help=SKIP_BAD_IMAGES_HELP)


def dataset_from_args(args: argparse.Namespace, required: tuple[str, ...] | None = None):
    """The split named by :func:`add_dataset_arguments`' flags, with canonical column names, its images checked in one
    pass (rows with unusable images are an error, or left out with `--skip_bad_images`).

    Args:
        required: canonical columns that must be present (default: all four).
    """
    from .data import IMAGE_COLUMNS, bad_image_rows, bad_images_or_skip, load_dataset_split

    kwargs = {} if required is None else {"required": required}
    dataset = load_dataset_split(
        args.dataset,
        args.split,
        columns=args.columns,
        coco_root=args.coco_root,
        visu_unsafe_images=args.visu_unsafe_images,
        max_samples=args.max_samples,
        **kwargs,
    )
    bad = bad_image_rows(dataset, IMAGE_COLUMNS, args.image_root, show_progress=True)
    keep = bad_images_or_skip(bad, len(dataset), f"{args.dataset} ({args.split})", args.skip_bad_images)
    return dataset.select(keep) if len(keep) < len(dataset) else dataset


def add_debug_flag(parser: argparse.ArgumentParser, default: Any = False) -> None:
    parser.add_argument(
        "--debug", action="store_true", default=default, help="Show the full traceback of an error instead of one line."
    )


def add_global_flags(parser: argparse.ArgumentParser, default_level: Any = "INFO", default_debug: Any = False) -> None:
    """`--log_level` and `--debug`, the flags every command takes."""
    add_argument(parser, "--log_level", default=default_level, help="logging level (DEBUG, INFO, WARNING, ERROR)")
    add_debug_flag(parser, default_debug)


def add_subcommand(subparsers: Any, name: str, **kwargs) -> argparse.ArgumentParser:
    """`subparsers.add_parser(name, **kwargs)` that also takes the global flags after the subcommand's name
    (`hysac-index build --debug ...` as well as `hysac-index --debug build ...`): there they default to nothing, so
    the value given before the name, or the command's default, stands unless repeated after it."""
    parser = subparsers.add_parser(name, **kwargs)
    add_global_flags(parser, default_level=argparse.SUPPRESS, default_debug=argparse.SUPPRESS)
    return parser


def command_name(default: str, argv: Sequence[str] | None = None) -> str:
    """The name the user typed for the running command (`hysac-convert`, `convert_hysac_original_to_hf.py`), for its
    error lines: `default` when the command was started as a module (`python -m ...`) or from code (`argv` given)."""
    if argv is not None or getattr(sys.modules.get("__main__"), "__spec__", None) is not None:
        return default
    name = Path(sys.argv[0]).name if sys.argv else ""
    return name if name not in ("", "-c") else default


def setup_logging(level: int | str = logging.INFO, quiet_libraries: bool = True) -> None:
    """Configure logging for a command: our loggers at `level`, third-party INFO noise off.

    Call it where a command starts (never from library code). The root handler stays at WARNING, so libraries
    that log at INFO (datasets, accelerate, httpx...) stay quiet; `hysac_hf`, `__main__` and the training script
    log at `level`. When stderr is not a terminal, transformers' and datasets' progress bars are off too (ours show
    on a terminal only), so a log file holds whole lines.
    """
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
        if not isinstance(level, int):
            raise UsageError("--log_level must be one of DEBUG, INFO, WARNING, ERROR")
    logging.basicConfig(format=LOG_FORMAT, datefmt=LOG_DATEFMT, level=logging.WARNING, force=True)
    for name in ("hysac_hf", "__main__", "train", "convert_hysac"):
        logging.getLogger(name).setLevel(level)
    if quiet_libraries:
        # Not a terminal (a log file, a pipe): their progress bars' redraws would glue onto the log lines.
        terminal = sys.stderr.isatty()
        try:
            import transformers

            transformers.utils.logging.set_verbosity_warning()
            if not terminal:
                transformers.utils.logging.disable_progress_bar()
        except ImportError:  # pragma: no cover - transformers is a dependency
            pass
        try:
            import datasets

            datasets.utils.logging.set_verbosity_warning()
            if not terminal:
                datasets.disable_progress_bars()
        except ImportError:  # pragma: no cover
            pass


INPUT_ERRORS: tuple[type[BaseException], ...] = (
    UsageError,
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    ImportError,
)


def run(main: Callable[[argparse.Namespace], int | None], args: argparse.Namespace, prog: str) -> int:
    """Run a command's `main(args)` with the shared error policy; returns the exit status.

    Input errors (see :data:`INPUT_ERRORS`) print `prog: error: <message>` on one line and return 2; with
    `args.debug` they are re-raised with their traceback. Ctrl-C returns 130.
    """
    try:
        status = main(args)
    except INPUT_ERRORS as error:
        if getattr(args, "debug", False):
            raise
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return status if isinstance(status, int) else 0


__all__ = [
    "OneSpellingHelpFormatter",
    "EXIT_USAGE",
    "add_argument",
    "add_dataset_arguments",
    "add_debug_flag",
    "add_global_flags",
    "add_skip_bad_images_flag",
    "add_subcommand",
    "command_name",
    "dashed_aliases",
    "dataset_from_args",
    "run",
    "setup_logging",
]
