"""Reading and checking image references: paths (relative to an image root), `datasets.Image` values, PIL images,
numpy arrays and mini-ViSU's rendered specs.

- :func:`load_image`: one reference -> an RGB PIL image (what the collators decode in DataLoader workers).
- :func:`find_bad_images`: every reference that is missing or cannot be decoded, in one pass over all of them, before
  a model loads; :func:`bad_images_or_skip` turns the result into one clear error, or (with `--skip_bad_images`) the
  rows to leave out, counted in the log.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import UsageError
from ..modeling.processing_hysac import to_rgb
from .mini_visu import render

logger = logging.getLogger(__name__)

CHECK_THREADS = 8  # image files checked at once (decoding releases the GIL)
LISTED_BAD_IMAGES = 5  # bad images named in an error line


def _decode(source: Any, opener) -> Image.Image:
    """Open and fully decode an image, turning PIL's errors into one that names the image."""
    try:
        with opener() as image:
            image.load()  # decode now: a truncated file fails here, not later
            return to_rgb(image)
    except OSError as error:  # UnidentifiedImageError and "image file is truncated" are OSErrors
        raise UsageError(f"cannot decode image {source}: {error}; re-export or remove it") from None


def load_image(value: Any, image_root: str | Path | None = None) -> Image.Image:
    """Decode one image reference to RGB (transparency composited over white, as `HySACProcessor` does).

    Args:
        value: a PIL image, a numpy array, a path (absolute or relative to `image_root`), a `datasets.Image`
            dict (`{"bytes", "path"}`) or a mini-ViSU spec (`{"photo", "crop", "flip", "marker"}`).
        image_root: folder that relative paths are resolved against.
    Raises:
        UsageError: a missing or undecodable file (named), or an unsupported value.
    """
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if isinstance(value, np.ndarray):
        return to_rgb(value)
    if isinstance(value, dict) and "photo" in value:
        return render(value)
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        if value.get("bytes"):
            name = value.get("path") or "<image bytes>"
            return _decode(name, lambda: Image.open(io.BytesIO(value["bytes"])))
        value = value["path"]
    if isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        if not path.is_absolute() and image_root is not None:
            path = Path(image_root) / path
        if not path.is_file():
            raise UsageError(f"image {path} does not exist; check --image_root / --coco_root and the dataset")
        return _decode(path, lambda: Image.open(path))
    raise UsageError(
        f"cannot load an image from a {type(value).__name__}; expected a PIL image, a numpy array, a path or a "
        "datasets.Image dict"
    )


def image_problem(value: Any, image_root: str | os.PathLike | None = None) -> str | None:
    """Why an image reference cannot be used (`"<where> (<reason>)"`), or None when it decodes.

    The whole file is read, so a file truncated after a valid header is found too: JPEGs are decoded at 1/8 of their
    size (PIL's draft mode still reads every byte of the stream), PNGs are verified (every chunk's CRC), other formats
    decoded. Decoded images, arrays and mini-ViSU specs are fine by construction.
    """
    if isinstance(value, (Image.Image, np.ndarray)) or (isinstance(value, dict) and "photo" in value):
        return None
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        if value.get("bytes"):
            where, opener = value.get("path") or "<image bytes>", lambda: Image.open(io.BytesIO(value["bytes"]))
        else:
            return image_problem(value["path"], image_root)
    elif isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser()
        if not path.is_absolute() and image_root is not None:
            path = Path(image_root) / path
        if not path.is_file():
            return f"{path} (missing)"
        where, opener = str(path), lambda: Image.open(path)
    else:
        return f"a {type(value).__name__} (not an image reference)"
    try:
        with opener() as image:
            if image.format == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
            elif image.format == "PNG":
                image.verify()
            else:
                image.load()
    except (OSError, SyntaxError, ValueError) as error:  # UnidentifiedImageError and truncation are OSErrors
        return f"{where} ({type(error).__name__}: {error})"
    return None


def find_bad_images(
    values: Sequence[Any], image_root: str | os.PathLike | None = None, show_progress: bool = False, desc: str = "Checking images"
) -> dict[int, str]:
    """Every unusable image reference among `values`, in one pass (threads), before any model loads.

    Returns:
        `{position: "<where> (<reason>)"}` in position order (:func:`image_problem`).
    """
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=CHECK_THREADS) as pool:
        problems = list(
            tqdm(
                pool.map(lambda value: image_problem(value, image_root), values),
                total=len(values),
                desc=desc,
                disable=None if show_progress else True,  # None: shown on a terminal only (a quick check, no log noise)
                leave=False,
            )
        )
    return {position: problem for position, problem in enumerate(problems) if problem is not None}


def bad_images_or_skip(bad: dict[int, str], count: int, what: str, skip: bool) -> list[int]:
    """The positions to keep of `count` items once `bad` ones (:func:`find_bad_images`) are handled.

    Raises:
        UsageError: when there are bad images and `skip` is False: how many, the first few, and the two fixes.
    """
    if not bad:
        return list(range(count))
    listed = "; ".join(list(bad.values())[:LISTED_BAD_IMAGES]) + ("; ..." if len(bad) > LISTED_BAD_IMAGES else "")
    if not skip:
        raise UsageError(
            f"{len(bad)} of the {count} images of {what} are missing or cannot be decoded: {listed}. Fix or remove "
            "them (check --image_root), or pass --skip_bad_images to leave those rows out"
        )
    logger.warning("Leaving out %d of the %d rows of %s (--skip_bad_images): %s", len(bad), count, what, listed)
    return [position for position in range(count) if position not in bad]


def bad_image_rows(
    dataset: Any, columns: Sequence[str], image_root: str | os.PathLike | None = None, show_progress: bool = False
) -> dict[int, str]:
    """The rows of `dataset` with an unusable image in any of `columns` (those present), in one pass per column
    (undecoded: `datasets.Image` columns are read as their `{"bytes", "path"}` values).

    Returns:
        `{row: "<column>: <where> (<reason>)"}`, the first problem of each bad row.
    """
    import datasets

    bad: dict[int, str] = {}
    for column in columns:
        if column not in dataset.column_names:
            continue
        data = dataset
        if isinstance(dataset, datasets.Dataset) and isinstance(dataset.features[column], datasets.Image):
            data = dataset.cast_column(column, datasets.Image(decode=False))
        for row, problem in find_bad_images(data[column], image_root, show_progress, f"Checking {column}").items():
            bad.setdefault(row, f"{column}: {problem}")
    return dict(sorted(bad.items()))


__all__ = ["bad_image_rows", "bad_images_or_skip", "find_bad_images", "image_problem", "load_image"]
