"""mini-ViSU: a tiny, bundled, offline stand-in for ViSU built from real photos.

Safe side: 20 real photos shipped with scikit-image, scikit-learn and matplotlib (crops and flips give the
rows), with hand-written captions (`photos.json`, beside this file). Unsafe side: the same photo with a clearly synthetic
visual marker (a red diagonal band, a hatched hazard grid, or a colour inversion) and the same caption with
synthetic textual markers (``"[UNSAFE] ... crossed by a crimson zorblax band"``). There is no real harmful
content. Rows and splits (train 160 / validation 40 / test 40) are in `mini_visu.jsonl`; images are
rendered on access (in DataLoader workers), never stored.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ...modeling.configuration_hysac import CONTENT

DATA_DIR = Path(__file__).parent  # photos.json and mini_visu.jsonl, beside this file
SPLITS = ("train", "validation", "test")
RENDER_SIZE = 256  # rendered side length; the processor resizes to the tower's input size


@lru_cache(maxsize=1)
def photo_specs() -> dict[str, Any]:
    """The bundled photo list, captions and marker definitions."""
    return json.loads((DATA_DIR / "photos.json").read_text())


@lru_cache(maxsize=32)
def load_photo(name: str) -> Image.Image:
    """One source photo as an RGB PIL image (cached per process)."""
    source = {p["name"]: p["source"] for p in photo_specs()["photos"]}.get(name)
    if source is None:
        raise KeyError(f"unknown mini-ViSU photo {name!r}; known: {sorted(p['name'] for p in photo_specs()['photos'])}")
    library, key = source.split(":", 1)
    if library == "skimage":
        from skimage import data

        array = getattr(data, key)()
    elif library == "sklearn":
        from sklearn.datasets import load_sample_image

        array = load_sample_image(key)
    elif library == "matplotlib":
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data(key) as handle:
            array = np.asarray(Image.open(handle).convert("RGB"))
    else:  # pragma: no cover - the bundled file only names the three libraries
        raise ValueError(f"unknown photo library {library!r} in {source!r}")
    array = np.asarray(array)
    if array.dtype != np.uint8:
        array = (255 * (array - array.min()) / max(float(array.max() - array.min()), 1e-8)).astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def apply_marker(image: Image.Image, marker: str) -> Image.Image:
    """Add one of the synthetic "unsafe" markers to an RGB image.

    Args:
        image: RGB image.
        marker: ``"crimson_band"``, ``"hazard_hatch"`` or ``"inverted"``.
    """
    array = np.asarray(image, dtype=np.float32).copy()
    height, width = array.shape[:2]
    rows, cols = np.mgrid[0:height, 0:width]
    if marker == "crimson_band":
        band = np.abs(rows / height - cols / width) < 0.18
        array[band] = 0.35 * array[band] + 0.65 * np.array([220.0, 20.0, 40.0])
    elif marker == "hazard_hatch":
        stripes = ((rows + cols) // max(height // 12, 1)) % 2 == 0
        array[stripes] = 0.4 * array[stripes] + 0.6 * np.array([250.0, 210.0, 0.0])
        array[~stripes] = 0.5 * array[~stripes]
    elif marker == "inverted":
        array = 255.0 - array
        array = 0.6 * array + 0.4 * np.array([255.0, 0.0, 255.0])
    else:
        raise ValueError(f"unknown marker {marker!r}; expected crimson_band, hazard_hatch or inverted")
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def render(spec: dict[str, Any], size: int = RENDER_SIZE) -> Image.Image:
    """Render a mini-ViSU image from its spec `{"photo", "crop": [top, left, h, w] (fractions), "flip", "marker"}`."""
    photo = load_photo(spec["photo"])
    width, height = photo.size
    top, left, crop_h, crop_w = spec["crop"]
    box = (int(left * width), int(top * height), int((left + crop_w) * width), int((top + crop_h) * height))
    image = photo.crop(box).resize((size, size), Image.BICUBIC)
    if spec.get("flip"):
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    if spec.get("marker"):
        image = apply_marker(image, spec["marker"])
    return image


def mini_visu_rows(split: str) -> list[dict[str, Any]]:
    """The raw rows of one split (ViSU-Text-like fields: `safe`, `nsfw`, `tag`, plus the image spec)."""
    if split not in SPLITS:
        from ...errors import UsageError

        raise UsageError(f"mini-ViSU has splits {SPLITS}, not {split!r}")
    with open(DATA_DIR / "mini_visu.jsonl") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [row for row in rows if row["split"] == split]


def load_mini_visu(split: str = "train", max_samples: int | None = None):
    """mini-ViSU as a `datasets.Dataset` in the canonical quadruplet schema.

    Columns: `safe_image`, `unsafe_image` (image specs, rendered by the collator), `safe_text`, `unsafe_text`,
    `tag`, `id`.
    """
    import datasets

    from ...errors import require

    # The photos are rendered in DataLoader workers; check their libraries here, before any training starts.
    require("skimage", "sklearn", "matplotlib", purpose="the bundled mini-ViSU photos")
    records = []
    for row in mini_visu_rows(split)[:max_samples]:
        image = {"photo": row["photo"], "crop": row["crop"], "flip": row["flip"], "marker": ""}
        records.append(
            {
                "id": row["id"],
                "tag": row["tag"],
                CONTENT["V"].column: image,
                CONTENT["G"].column: {**image, "marker": row["tag"]},
                CONTENT["S"].column: row["safe"],
                CONTENT["U"].column: row["nsfw"],
            }
        )
    return datasets.Dataset.from_list(records)
