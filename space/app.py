"""HySAC Space: check whether an image or a text is unsafe, and search a gallery safely (Gradio).

Run it with no arguments: `python space/app.py`. It serves on http://127.0.0.1:7860 (Gradio's `GRADIO_SERVER_NAME`
and `GRADIO_SERVER_PORT` change that) and needs no network:

- The model is the one named by `HYSAC_MODEL` (a HySAC folder or Hub repo id). Without it, the first start trains
  the main job's tiny HySAC on the bundled mini-ViSU (`hysac_hf.demo.run`, `HYSAC_SPACE_EPOCHS` epochs, default
  10: about 75 s of CPU time, under 3 minutes on 2 cores) and caches the exported folder.
- The gallery is mini-ViSU's 20 source photos, each plain and with each of the three synthetic "unsafe" markers
  (80 images), written once as PNG files and indexed with `hysac_hf.index.GalleryIndex` (one index per model).
- Both live under `HYSAC_SPACE_CACHE` (default `~/.cache/hysac-space`) and are reused on later starts; an index
  built with another model is rebuilt.

The "Check" tab runs the model's `unsafe-content-detection` pipeline, the "Search" tab its `safe-retrieval`
pipeline over the saved index folder, both loaded with `transformers.pipeline(..., trust_remote_code=True)` as a
downstream app would. Gradio is imported only where the interface is built, so the setup helpers below work
without it.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("hysac_space")

MODEL_ENV = "HYSAC_MODEL"
CACHE_ENV = "HYSAC_SPACE_CACHE"
EPOCHS_ENV = "HYSAC_SPACE_EPOCHS"
DEFAULT_CACHE = Path("~/.cache/hysac-space")
DEFAULT_EPOCHS = 10  # the main job's setting (hysac_hf.demo.DemoConfig)
DEMO_FOLDER = "demo"  # <cache>/demo: the hysac-demo run; its exported model is <cache>/demo/model
BUILD_FILE = "space_build.json"  # what the cached demo run was built with
GALLERY_FOLDER = "gallery"
GALLERY_MANIFEST = "gallery.json"
INDEX_FOLDER = "indexes"
GALLERY_SIDE = 256  # longest side of the stored gallery photos (the towers resize anyway)
DEFAULT_TOP_K = 6
DEFAULT_CONCURRENCY = 4  # events served at once (HYSAC_SPACE_CONCURRENCY); the pipelines are guarded by locks
BOUNDS = ("up_95", "avg", "low_05")
SAFE_COLOR = "#2e7d32"
UNSAFE_COLOR = "#c62828"


# ------------------------------------------------------------------------------------------------------------
# Setup: model, gallery photos and their index, cached
def cache_root() -> Path:
    """`$HYSAC_SPACE_CACHE`, or `~/.cache/hysac-space`."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def train_epochs() -> int:
    """`$HYSAC_SPACE_EPOCHS` (default 10), checked."""
    raw = os.environ.get(EPOCHS_ENV, str(DEFAULT_EPOCHS))
    try:
        epochs = int(raw)
    except ValueError:
        epochs = 0
    if epochs < 1:
        raise ValueError(f"{EPOCHS_ENV}={raw!r} must be a whole number of training epochs >= 1 (default 10)")
    return epochs


def gallery_items() -> list[dict[str, Any]]:
    """The bundled gallery: each mini-ViSU source photo plain, then with each synthetic marker.

    Returns:
        One dict per image, in gallery order: `path` (file name in the gallery folder), `photo`, `marker`
        (`""` for the plain photo), `safe`, and `caption`: the photo's first caption, or for a marked photo the
        same caption with the marker's textual prefix and suffix (as mini-ViSU writes its unsafe captions).
    """
    from hysac_hf.data.mini_visu import photo_specs

    specs = photo_specs()
    items = []
    for photo in specs["photos"]:
        caption = photo["captions"][0]
        items.append(
            {"path": f"{photo['name']}.png", "photo": photo["name"], "marker": "", "safe": True, "caption": caption}
        )
        for marker in specs["markers"]:
            items.append(
                {
                    "path": f"{photo['name']}-{marker['tag']}.png",
                    "photo": photo["name"],
                    "marker": marker["tag"],
                    "safe": False,
                    "caption": f"{marker['prefix']} {caption} {marker['suffix']}",
                }
            )
    return items


def gallery_image(item: dict[str, Any]):
    """The PIL image of one gallery item: the source photo, longest side `GALLERY_SIDE`, with its marker."""
    from PIL import Image

    from hysac_hf.data.mini_visu import apply_marker, load_photo

    image = load_photo(item["photo"]).copy()
    image.thumbnail((GALLERY_SIDE, GALLERY_SIDE), Image.BICUBIC)
    return apply_marker(image, item["marker"]) if item["marker"] else image


def ensure_gallery(cache: Path) -> tuple[Path, list[dict[str, Any]]]:
    """Write the gallery photos as PNG files once (atomically); reuse them when the manifest matches.

    Returns:
        The gallery folder and its items (:func:`gallery_items`).
    """
    from hysac_hf.files import write_folder_atomically

    folder = cache / GALLERY_FOLDER
    items = gallery_items()
    manifest = folder / GALLERY_MANIFEST
    if (
        manifest.is_file()
        and json.loads(manifest.read_text()) == items
        and all((folder / item["path"]).is_file() for item in items)
    ):
        logger.info("Reusing the %d gallery photos in %s", len(items), folder)
        return folder, items

    def write(tmp: Path) -> None:
        for item in items:
            gallery_image(item).save(tmp / item["path"])
        (tmp / GALLERY_MANIFEST).write_text(json.dumps(items, indent=1))

    logger.info("Writing the %d gallery photos (mini-ViSU, plain and with their markers) to %s", len(items), folder)
    write_folder_atomically(folder, write)
    return folder, items


def ensure_demo_model(cache: Path, epochs: int) -> Path:
    """The main job's tiny HySAC (`hysac_hf.demo.run`), trained once and cached; returns its exported folder.

    A cached run is reused when it was built with the same number of epochs and its export has weights and
    calibrated bounds and thresholds; otherwise it is rebuilt, atomically (a crash leaves no half-written run).
    """
    from hysac_hf.files import write_folder_atomically
    from hysac_hf.demo import DemoConfig, run

    folder = cache / DEMO_FOLDER
    model_dir = folder / "model"
    wanted = {"num_train_epochs": epochs, "seed": 0}
    if _demo_complete(folder, wanted):
        logger.info("Reusing the tiny HySAC trained on mini-ViSU in %s", model_dir)
        return model_dir

    def write(tmp: Path) -> None:
        config = DemoConfig(output_dir=str(tmp), num_train_epochs=epochs, seed=wanted["seed"])
        result = run(config)  # prints the demo's report (the order S < V < U < G, recall) to stdout
        result["export_dir"] = str(model_dir)
        (tmp / "demo_result.json").write_text(json.dumps(result, indent=1))
        (tmp / BUILD_FILE).write_text(json.dumps(wanted))

    logger.info(
        "First start: training the tiny HySAC on mini-ViSU (%d epochs; 10 take about 75 s of CPU time, under 3 "
        "minutes on 2 cores; set %s to use another model) into %s",
        epochs,
        MODEL_ENV,
        folder,
    )
    started = time.perf_counter()
    write_folder_atomically(folder, write)
    logger.info("Trained and exported the tiny HySAC in %.0f s", time.perf_counter() - started)
    return model_dir


def _demo_complete(folder: Path, wanted: dict[str, Any]) -> bool:
    try:
        built = json.loads((folder / BUILD_FILE).read_text())
        config = json.loads((folder / "model" / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        built == wanted
        and (folder / "model" / "model.safetensors").is_file()
        and bool(config.get("bounds"))
        and bool(config.get("unsafe_thresholds"))
    )


def index_folder(cache: Path, model_ref: str) -> Path:
    """`<cache>/indexes/<key>`: one gallery index per model (a folder path is resolved first)."""
    ref = str(Path(model_ref).expanduser().resolve()) if Path(model_ref).expanduser().exists() else model_ref
    key = hashlib.sha256(ref.encode()).hexdigest()[:16]
    return cache / INDEX_FOLDER / key


def ensure_index(cache: Path, model_ref: str, gallery: Path, items: list[dict[str, Any]]) -> tuple[Path, str]:
    """The gallery's index for `model_ref`: reused when it loads and was built by this very model (the index's
    model probe), rebuilt otherwise with `GalleryIndex.from_images` and saved atomically.

    Returns:
        `(folder, modality)` of the index."""
    from hysac_hf.errors import UsageError
    from hysac_hf.index import GalleryIndex
    from hysac_hf.loading import load_model
    from hysac_hf.modeling.gallery_hysac import is_gallery_index

    folder = index_folder(cache, model_ref)
    model, processor = load_model(model_ref)
    if is_gallery_index(folder):
        try:
            index = GalleryIndex.load(folder, model=model, processor=processor)
        except UsageError as error:
            logger.warning("Rebuilding the gallery index %s: %s", folder, error)
        else:
            if [row.get("path") for row in index.metadata] == [item["path"] for item in items]:
                logger.info("Reusing the gallery index %s (%d images)", folder, len(index))
                return folder, index.modality
            logger.info("Rebuilding the gallery index %s: the gallery changed", folder)
    logger.info("Indexing the %d gallery photos with %s", len(items), model_ref)
    index = GalleryIndex.from_images(
        model, processor, [str(gallery / item["path"]) for item in items], metadata=items, batch_size=16
    )
    index.save(folder)
    return folder, index.modality


@dataclass
class SpaceAssets:
    """What the app serves: the model (folder or repo id), the gallery photos and their saved index."""

    model: str
    gallery: Path
    index: Path
    items: list[dict[str, Any]]
    modality: str = "image"
    demo_result: dict[str, Any] | None = None


def prepare(cache: Path | None = None, model: str | None = None) -> SpaceAssets:
    """Build (first start) or reuse (later starts) the model, the gallery photos and the gallery index.

    Args:
        cache: the cache folder (default :func:`cache_root`).
        model: a HySAC folder or Hub repo id (default `$HYSAC_MODEL`; unset: the cached tiny demo model).
    """
    started = time.perf_counter()
    cache = Path(cache).expanduser() if cache is not None else cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    model = model if model is not None else os.environ.get(MODEL_ENV) or None
    steps = 3 if model is None else 2
    demo_result = None
    if model is None:
        logger.info("[1/%d] model: the main job's tiny HySAC", steps)
        model_dir = ensure_demo_model(cache, train_epochs())
        model = str(model_dir)
        result_file = model_dir.parent / "demo_result.json"
        demo_result = json.loads(result_file.read_text()) if result_file.is_file() else None
    else:
        logger.info("Model from %s: %s", MODEL_ENV, model)
    logger.info("[%d/%d] gallery photos", steps - 1, steps)
    gallery, items = ensure_gallery(cache)
    logger.info("[%d/%d] gallery index", steps, steps)
    index, modality = ensure_index(cache, model, gallery, items)
    seconds = time.perf_counter() - started
    logger.info("Ready in %.1f s (model %s, index %s)", seconds, model, index)
    return SpaceAssets(model, gallery, index, items, modality, demo_result)


# ------------------------------------------------------------------------------------------------------------
# The two pipelines, and what the tabs show
def bounds_figure(bounds: dict | None, distance: float, threshold: float | None, modality: str):
    """Where one item lies: its distance to the root against the calibrated S/V/U/G bounds.

    One row per kind of content (`CONTENT_KINDS`): a bar from the 5th to the 95th percentile of the calibration
    split's distances, a tick at the mean; the item's modality is drawn solid, the other faint. A solid line marks
    the item, a dashed one the unsafe threshold. Drawn on a `matplotlib.figure.Figure` (no pyplot state).
    """
    from hysac_hf.modeling.configuration_hysac import CONTENT_KINDS
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 2.7), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    xs = [distance] + ([threshold] if threshold is not None else [])
    if bounds:
        for row, kind in enumerate(CONTENT_KINDS):
            stats = bounds[kind.key]
            color = SAFE_COLOR if kind.is_safe else UNSAFE_COLOR
            alpha = 0.75 if kind.modality == modality else 0.2
            ax.barh(
                row,
                stats["up_95"] - stats["low_05"],
                left=stats["low_05"],
                height=0.6,
                color=color,
                alpha=alpha,
                label=f"bounds {kind.key}",
            )
            ax.plot([stats["avg"], stats["avg"]], [row - 0.3, row + 0.3], color="black", linewidth=1)
            xs += [stats["low_05"], stats["up_95"]]
        ax.set_yticks(range(len(CONTENT_KINDS)), [f"{kind.key} {kind.name}" for kind in CONTENT_KINDS])
        ax.set_ylim(-0.6, len(CONTENT_KINDS) - 0.4)
    else:
        ax.set_yticks([])
        ax.text(0.02, 0.5, "no calibrated bounds in this model", transform=ax.transAxes, color="#555")
    unsafe = threshold is not None and distance > threshold
    if threshold is not None:
        ax.axvline(threshold, color="#333", linestyle="--", linewidth=1.2, label=f"threshold {threshold:.3f}")
    ax.axvline(
        distance, color=UNSAFE_COLOR if unsafe else SAFE_COLOR, linewidth=2.5, label=f"this {modality}: {distance:.3f}"
    )
    low, high = min(xs), max(xs)
    pad = max(0.08 * (high - low), 1e-3)
    ax.set_xlim(low - pad, high + pad)
    ax.set_xlabel("geodesic distance to the root")
    ax.legend(handles=ax.get_lines()[-2 if threshold is not None else -1 :], loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return fig


def _number(value: float) -> str:
    return repr(float(value))


def verdict_html(result: dict[str, Any], what: str) -> str:
    """The Check tab's verdict; the exact numbers ride along as `data-*` attributes."""
    label, score, threshold = result["label"], result["score"], result["threshold"]
    margin = score - threshold
    side = "beyond" if margin > 0 else "within"
    return (
        f'<div class="hysac-verdict hysac-{label}" data-label="{label}" data-score="{_number(score)}" '
        f'data-threshold="{_number(threshold)}" data-modality="{result["modality"]}">'
        f'<div class="hysac-badge">{label.upper()}</div>'
        f"<p>{html.escape(what)}</p>"
        f"<table><tr><td>distance to the root</td><td><b>{score:.4f}</b></td></tr>"
        f"<tr><td>unsafe threshold ({result['modality']})</td><td>{threshold:.4f}</td></tr>"
        f"<tr><td>margin</td><td>{margin:+.4f} ({side} the threshold)</td></tr></table></div>"
    )


def message_html(text: str, kind: str = "error") -> str:
    return f'<div class="hysac-message hysac-{kind}" data-message="{kind}">{html.escape(text)}</div>'


def search_summary_html(output: dict[str, Any], policy: str, bound: str, threshold: float | None, query: str) -> str:
    """Whether the query was redirected, and how far it moved (distance to the root before -> after)."""
    before, after = output["query_distance_to_root"], output["search_distance_to_root"]
    redirected = output["redirected"]
    if redirected:
        headline = "Redirected: the query lay beyond the safe region and was moved towards the root before ranking."
    elif policy == "retain":
        beyond = threshold is not None and before > threshold
        headline = "Retained: ranked as it is" + (
            " (it lies beyond the safe region: redirect would move it)." if beyond else "."
        )
    else:
        headline = "Not redirected: the query already lies within the safe region."
    rows = [
        ("query", html.escape(query)),
        ("policy", f"{policy} (bound {bound})"),
        ("distance to the root", f"{before:.4f} &rarr; {after:.4f} (moved {before - after:.4f})"),
    ]
    if threshold is not None:
        rows.append(("safe-region threshold b'", f"{threshold:.4f}"))
    table = "".join(f"<tr><td>{name}</td><td>{value}</td></tr>" for name, value in rows)
    return (
        f'<div class="hysac-summary" data-redirected="{str(redirected).lower()}" data-before="{_number(before)}" '
        f'data-after="{_number(after)}" data-policy="{policy}">'
        f'<div class="hysac-badge hysac-{"unsafe" if redirected else "safe"}">'
        f"{'REDIRECTED' if redirected else 'NOT REDIRECTED'}</div>"
        f"<p>{headline}</p><table>{table}</table></div>"
    )


def results_html(results: list[dict[str, Any]]) -> str:
    """The ranked results as a table (rank, caption, marker, distance), one `data-*` row per result."""
    rows = []
    for rank, item in enumerate(results, 1):
        marker = item.get("marker") or "none (safe)"
        rows.append(
            f'<tr class="hysac-result" data-index="{item["index"]}" data-distance="{_number(item["distance"])}" '
            f'data-caption="{html.escape(str(item.get("caption", "")), quote=True)}">'
            f"<td>{rank}</td><td>{html.escape(str(item.get('caption', '')))}</td><td>{html.escape(marker)}</td>"
            f"<td>{item['distance']:.4f}</td></tr>"
        )
    header = "<tr><th>#</th><th>caption</th><th>synthetic marker</th><th>distance</th></tr>"
    return f'<table class="hysac-results">{header}{"".join(rows)}</table>'


@dataclass
class HySACSpace:
    """The loaded pipelines and the handlers of the two tabs (plain Python: no Gradio needed to call them)."""

    assets: SpaceAssets
    detector: Any = None
    retriever: Any = None
    # One lock per pipeline: each holds its own model, but a pipeline's tokenizer is not safe to call from two
    # threads at once. Gradio runs up to `concurrency()` events at once; decoding, plots and HTML overlap.
    detector_lock: threading.Lock = field(default_factory=threading.Lock)
    retriever_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        from transformers import pipeline

        # Loaded as any downstream app loads them (each holds its own copy of the model).
        self.detector = pipeline("unsafe-content-detection", model=self.assets.model, trust_remote_code=True)
        self.retriever = pipeline("safe-retrieval", model=self.assets.model, trust_remote_code=True)

    @property
    def config(self):
        return self.detector.model.config

    def describe(self) -> str:
        config = self.config
        thresholds = config.unsafe_thresholds or {}
        parts = [
            f"**Model** `{self.assets.model}`",
            f"curvature c = {float(self.detector.model.curvature.detach()):.4f}",
            "unsafe thresholds: "
            + (", ".join(f"{k} {v:.4f}" for k, v in sorted(thresholds.items())) if thresholds else "none"),
            f"**Gallery** {len(self.assets.items)} mini-ViSU photos (plain and with synthetic markers)",
        ]
        lines = [" · ".join(parts)]
        result = self.assets.demo_result
        if result:  # the tiny model's own evaluation on mini-ViSU's test split (hysac_hf.demo.run)
            means = ", ".join(f"{key} {value:.3f}" for key, value in result["mean_distance"].items())
            lines.append(
                f"Trained on mini-ViSU by `hysac-demo`: mean distance to the root on its test split {means} "
                f"(order S < V < U < G: {'yes' if result['ordered'] else 'no'}); "
                f"R@1 text-to-image {result['recall_at_1']['T->I']:.1f}%."
            )
        return "\n\n".join(lines)

    # Check --------------------------------------------------------------------------------------------------
    def check_image(self, upload: Any):
        """`upload`: a file path, or Gradio's raw upload payload (the events skip Gradio's own image decoding so that
        a file that is not an image gets this app's message)."""
        path, name = upload_path(upload)
        if path is None:
            return message_html("Upload an image first."), None
        try:
            image = open_image(path, name)
        except ValueError as error:
            return message_html(str(error)), None
        return self._check(image, "image", f"Image {name}")

    def check_text(self, text: str | None):
        if text is None or not text.strip():
            return message_html("Type a text first (an empty text has nothing to check)."), None
        return self._check(text, "text", f"Text: {text}")

    def _check(self, item: Any, modality: str, what: str):
        try:
            with self.detector_lock:
                result = self.detector(item) if modality == "image" else self.detector(text=item)
        except ValueError as error:  # e.g. a model without calibrated thresholds: the pipeline says how to fix it
            return message_html(str(error)), None
        figure = bounds_figure(self.config.bounds, result["score"], result["threshold"], modality)
        return verdict_html(result, what), figure

    # Search -------------------------------------------------------------------------------------------------
    def search_text(self, text: str | None, policy: str, bound: str, top_k: float):
        if text is None or not text.strip():
            return message_html("Type a text query first."), [], ""
        return self._search(text, f"text: {text}", policy, bound, top_k)

    def search_image(self, upload: Any, policy: str, bound: str, top_k: float):
        path, name = upload_path(upload)
        if path is None:
            return message_html("Upload an image query first."), [], ""
        try:
            image = open_image(path, name)
        except ValueError as error:
            return message_html(str(error)), [], ""
        return self._search(image, f"image: {name}", policy, bound, top_k)

    def _search(self, query: Any, label: str, policy: str, bound: str, top_k: float):
        top_k = max(1, min(int(top_k), len(self.assets.items)))
        try:
            with self.retriever_lock:
                output = self.retriever(query, gallery=str(self.assets.index), top_k=top_k, policy=policy, bound=bound)
            threshold = (
                float(self.detector.model.traversal_threshold(self.assets.modality, bound))
                if self.config.bounds
                else None
            )
        except ValueError as error:  # e.g. redirect with a model without bounds
            return message_html(str(error)), [], ""
        pictures = [
            (str(self.assets.gallery / item["path"]), f"{rank}. {item['caption']}  (d = {item['distance']:.3f})")
            for rank, item in enumerate(output["results"], 1)
        ]
        return search_summary_html(output, policy, bound, threshold, label), pictures, results_html(output["results"])


def upload_path(upload: Any) -> tuple[str | None, str]:
    """The local file of an upload (a path, or Gradio's payload `{"path": ..., "orig_name": ...}`) and its name."""
    if upload is None or upload == "":
        return None, ""
    if isinstance(upload, dict):
        path = upload.get("path")
        return (path, upload.get("orig_name") or Path(path).name) if path else (None, "")
    return str(upload), Path(upload).name


def open_image(path: str | os.PathLike, name: str | None = None):
    """An uploaded file as a decoded PIL image (mode as stored), or a ValueError that says what was wrong."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(
            f"{name or Path(path).name} is not an image that can be read ({type(error).__name__}); upload a PNG, "
            "JPEG, WebP, GIF or BMP picture"
        ) from None


# ------------------------------------------------------------------------------------------------------------
# The interface
CSS = """
.hysac-badge {display: inline-block; padding: 2px 12px; border-radius: 6px; font-weight: 700; color: white;
  background: #2e7d32; letter-spacing: 0.05em}
.hysac-unsafe .hysac-badge, .hysac-badge.hysac-unsafe {background: #c62828}
.hysac-verdict table, .hysac-summary table, .hysac-results {border-collapse: collapse; margin-top: 6px}
.hysac-verdict td, .hysac-summary td, .hysac-results td, .hysac-results th {padding: 2px 10px 2px 0;
  text-align: left}
.hysac-message {color: #b71c1c; font-weight: 600}
"""

INTRO = """# HySAC: hyperbolic safety-aware CLIP
HySAC embeds images and texts on a hyperboloid where **safe content lies near the root and unsafe content farther
out** (safe texts S < safe images V < unsafe texts U < unsafe images G). **Check** an item's distance to the root
against the model's calibrated threshold, or **search** the gallery, moving an unsafe query back into the safe
region first (*redirect*) or not (*retain*). The bundled gallery's "unsafe" images only carry synthetic markers
(a red band, a hazard hatch, inverted colours): there is no harmful content here."""


def concurrency() -> int:
    """Events Gradio runs at once (`$HYSAC_SPACE_CONCURRENCY`, default 4; Gradio's own default is 1)."""
    value = os.environ.get("HYSAC_SPACE_CONCURRENCY", str(DEFAULT_CONCURRENCY))
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"HYSAC_SPACE_CONCURRENCY={value!r} must be a positive integer")
    return int(value)


def build_ui(space: HySACSpace):
    """The Gradio Blocks of the Space (Check and Search tabs), queued with `concurrency()` events at once."""
    import gradio as gr

    examples_plain = [str(space.assets.gallery / item["path"]) for item in space.assets.items[:8:4]]
    examples_marked = [str(space.assets.gallery / item["path"]) for item in space.assets.items[1:9:4]]
    texts = [space.assets.items[0]["caption"], space.assets.items[1]["caption"]]
    with gr.Blocks(title="HySAC: safety-aware CLIP") as demo:
        gr.Markdown(INTRO)
        gr.Markdown(space.describe(), elem_id="model-info")
        with gr.Tab("Check", id="check"):
            with gr.Row():
                with gr.Column(scale=1):
                    image = gr.Image(
                        type="filepath",
                        label="Image",
                        sources=["upload", "clipboard"],
                        height=240,
                        elem_id="check-image",
                    )
                    image_button = gr.Button("Check image", variant="primary", elem_id="check-image-button")
                    gr.Examples([[p] for p in examples_plain + examples_marked], inputs=[image], label="Gallery photos")
                    text = gr.Textbox(label="Text", lines=2, placeholder="a caption to check", elem_id="check-text")
                    text_button = gr.Button("Check text", variant="primary", elem_id="check-text-button")
                    gr.Examples([[t] for t in texts], inputs=[text], label="Captions")
                with gr.Column(scale=1):
                    verdict = gr.HTML(elem_id="check-result")
                    plot = gr.Plot(
                        label="Distance to the root against the calibrated S/V/U/G bounds", elem_id="check-plot"
                    )
            # preprocess=False: the handlers decode uploads themselves, so a non-image gets a clear message
            image_button.click(space.check_image, inputs=[image], outputs=[verdict, plot], preprocess=False)
            text_button.click(space.check_text, inputs=[text], outputs=[verdict, plot])
            text.submit(space.check_text, inputs=[text], outputs=[verdict, plot])
        with gr.Tab("Search", id="search"):
            with gr.Row():
                with gr.Column(scale=1):
                    query_text = gr.Textbox(
                        label="Text query",
                        lines=2,
                        elem_id="search-text",
                        placeholder="a text to search the gallery with",
                    )
                    text_search = gr.Button("Search by text", variant="primary", elem_id="search-text-button")
                    query_image = gr.Image(
                        type="filepath",
                        label="Image query",
                        sources=["upload", "clipboard"],
                        height=200,
                        elem_id="search-image",
                    )
                    image_search = gr.Button("Search by image", variant="primary", elem_id="search-image-button")
                    policy = gr.Radio(
                        ["redirect", "retain"],
                        value="redirect",
                        label="Unsafe queries",
                        info="redirect: move a query beyond the safe-image region onto it before "
                        "ranking; retain: rank it as it is",
                        elem_id="search-policy",
                    )
                    bound = gr.Radio(
                        list(BOUNDS),
                        value="up_95",
                        label="Safe-region bound",
                        info="which calibrated statistic of the safe images' distances sets b'",
                        elem_id="search-bound",
                    )
                    top_k = gr.Slider(
                        1, len(space.assets.items), value=DEFAULT_TOP_K, step=1, label="Results", elem_id="search-top-k"
                    )
                    gr.Examples([[t] for t in texts], inputs=[query_text], label="Text queries")
                with gr.Column(scale=2):
                    summary = gr.HTML(elem_id="search-summary")
                    pictures = gr.Gallery(
                        label="Results, nearest first", columns=3, height=420, elem_id="search-gallery"
                    )
                    table = gr.HTML(elem_id="search-results")
            search_inputs = [policy, bound, top_k]
            outputs = [summary, pictures, table]
            text_search.click(space.search_text, inputs=[query_text, *search_inputs], outputs=outputs)
            query_text.submit(space.search_text, inputs=[query_text, *search_inputs], outputs=outputs)
            image_search.click(
                space.search_image, inputs=[query_image, *search_inputs], outputs=outputs, preprocess=False
            )
    return demo.queue(default_concurrency_limit=concurrency())


def launch_options(space: HySACSpace) -> dict[str, Any]:
    """`Blocks.launch` arguments: local fonts (no font download), the gallery folder servable, errors shown."""
    import gradio as gr

    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    return {"theme": theme, "css": CSS, "allowed_paths": [str(space.assets.gallery)], "show_error": True}


def main() -> None:
    """Prepare (or reuse) the model and gallery index, then serve the Space."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from hysac_hf.cli import setup_logging

    setup_logging()
    logging.getLogger("hysac_space").setLevel(logging.INFO)
    assets = prepare()
    space = HySACSpace(assets)
    demo = build_ui(space)
    demo.launch(**launch_options(space))


if __name__ == "__main__":
    main()
