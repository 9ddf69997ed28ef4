"""A persistent gallery index for safe retrieval: build once, search many times by Lorentz distance.

    from hysac_hf.encode import encode_texts
    from hysac_hf.index import GalleryIndex
    from hysac_hf.loading import load_model

    model, processor = load_model("my-hysac")
    index = GalleryIndex.from_images(model, processor, "photos/")        # or from_texts / from_dataset / from_embeddings
    index.save("photos-index")
    index = GalleryIndex.load("photos-index", model=model, processor=processor)
    index.search(encode_texts(model, processor, ["a dog on a beach"]), k=5, policy="redirect")

- `gallery.py`: :class:`GalleryIndex` (sources, the FAISS structure it builds, growing, atomic saves, loading,
  `extend_folder`); searching, the redirect step and the folder format (read and written) are the search engine's,
  `hysac_hf.modeling.gallery_hysac`, which the pipelines use too.
- `ivf.py`: the approximate structures it builds, FAISS IVFs with radial cells, over float32 or product-quantised
  vectors (why these cells: its docstring).
- `tuning.py`: builds them for a target recall measured on held-out gallery items, or refuses (exact search kept).
- `streaming.py`: builds a folder chunk by chunk, never holding the whole gallery, resumable after a crash.
- `sources.py`: images, texts, dataset columns and embedding shards, embedded (or read) a slice at a time.
- `cli.py`: the `hysac-index` command (`build`, `add`, `search`, `info`).
"""

from ..modeling.gallery_hysac import INDEX_FORMAT, INDEX_KINDS, POLICIES, PROBE_TEXTS
from .gallery import GalleryIndex, check_output_folder

__all__ = ["INDEX_FORMAT", "INDEX_KINDS", "POLICIES", "PROBE_TEXTS", "GalleryIndex", "check_output_folder"]
