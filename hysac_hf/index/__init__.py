"""A persistent gallery index for safe retrieval: build once, search many times by Lorentz distance.

    from hysac_hf.loading import load_model
    from hysac_hf.encode import encode_texts
    from hysac_hf.index import GalleryIndex

    model, processor = load_model("my-hysac")
    index = GalleryIndex.from_images(model, processor, "photos/")        # or from_texts / from_dataset / from_embeddings
    index.save("photos-index")
    index = GalleryIndex.load("photos-index", model=model, processor=processor)
    index.search(encode_texts(model, processor, ["a dog on a beach"]), k=5, policy="redirect")

- `gallery.py`: :class:`GalleryIndex` (sources, exact and approximate search, the redirect/retain policies, add,
  save/load).
- `folder.py`: the saved folder (format 1), defined in `hysac_hf.modeling.pipeline_hysac` (the pipelines read it
  there without hysac_hf): :func:`load_index_folder`, the model probe and its check, raising `UsageError`.
- `ivf.py`: the approximate structure, a FAISS IVF whose cells are directions (why: its docstring).
- `cli.py`: the `hysac-index` command (`build`, `search`, `info`).
"""

from .folder import INDEX_FORMAT, PROBE_TEXTS, check_model, load_index_folder, model_probe
from .gallery import KINDS, POLICIES, GalleryIndex

__all__ = [
    "INDEX_FORMAT",
    "KINDS",
    "POLICIES",
    "PROBE_TEXTS",
    "GalleryIndex",
    "check_model",
    "load_index_folder",
    "model_probe",
]
