"""Image folders: a class-per-folder tree (`root/<class>/*.jpg`) or a plain folder of images (any depth)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def list_images(root: str | os.PathLike) -> list[Path]:
    """Every image file under `root` (recursive, hidden folders skipped), sorted by path."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UsageError(f"image folder {root} does not exist")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise UsageError(f"no images under {root} (suffixes {', '.join(IMAGE_SUFFIXES)})")
    return files


def list_image_folder(root: str | os.PathLike) -> tuple[list[Path], list[int], list[str]]:
    """Images of a class-per-folder tree (`root/<class>/*.jpg`), sorted; class names are the folder names.

    Returns:
        `(paths, labels, class_names)` with `labels[i]` indexing `class_names` (sorted folder names).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UsageError(f"image folder {root} does not exist")
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths, labels = [], []
    for label, name in enumerate(class_names):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise UsageError(
            f"no images found under {root}; expected one sub-folder per class, e.g. {root}/safe/*.jpg and "
            f"{root}/unsafe/*.jpg (suffixes {IMAGE_SUFFIXES})"
        )
    return paths, labels, class_names


__all__ = ["IMAGE_SUFFIXES", "list_image_folder", "list_images"]
