"""sentence-transformers loads a HySAC folder as a model that ranks by Lorentz distance, never by cosine.

HySAC embeds texts and images as the space components of points on a hyperboloid and ranks by the geodesic
(Lorentz) distance between them. sentence-transformers' default for a transformers folder, cosine similarity of
those components, ranks differently. `HySACModel.save_pretrained` therefore writes, beside `config.json`:

- `modules.json`: one module, `HySACSentenceTransformer` from this file (loaded with `trust_remote_code=True`);
- `sentence_bert_config.json`: texts embed with `HySACModel.encode_text`, images with `encode_image`;
- `config_sentence_transformers.json`: a plain `SentenceTransformer`.

Once sentence-transformers has built the model, the module sets its similarity to the negative Lorentz
distance, named `"lorentz"`, so `model.similarity(model.encode(texts), model.encode(images))` is
`-pairwise_dist(texts, images, c)` and ranks exactly as HySAC does. Its evaluators that look similarity functions
up by name fail on `"lorentz"` instead of falling back to cosine. Options that change the embeddings' geometry
(`normalize_embeddings=True`, `truncate_dim`, a quantized `precision`) make the distance meaningless: leave them
off.

This needs sentence-transformers >= 6.0 (the `on_model_ready` hook through which a module reaches its model;
that release needs transformers >= 5). Older versions get an `ImportError` that says what to use instead.
Like the other remote-code files this one imports only torch and transformers: sentence-transformers is imported
when it asks for the module class, so the model does not depend on it and saving a model does not import it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers.utils import logging

from .lorentz import paired_dist, pairwise_dist

logger = logging.get_logger(__name__)

MODULE_CLASS = "HySACSentenceTransformer"
SIMILARITY_NAME = "lorentz"  # what `SentenceTransformer.similarity_fn_name` reports for HySAC
USE_INSTEAD = (
    "load the model with transformers instead: `AutoModel.from_pretrained(folder, trust_remote_code=True)` and "
    "`AutoProcessor.from_pretrained(folder, trust_remote_code=True)`, embed with `model.encode_text(...)` / "
    "`model.encode_image(...)`, and rank by `model(...).logits_per_image` (the scaled negative Lorentz distance)"
)


def save_sentence_transformers_config(save_directory: str | Path) -> None:
    """Write the files that make `SentenceTransformer(save_directory, trust_remote_code=True)` load HySAC with its
    Lorentz ranking: `modules.json`, `sentence_bert_config.json`, `config_sentence_transformers.json`.

    The module file itself ships with the remote code (`HySACModel.save_pretrained` imports this file).
    """
    folder = Path(save_directory)
    files = {
        "modules.json": [{"idx": 0, "name": "0", "path": "", "type": f"{Path(__file__).stem}.{MODULE_CLASS}"}],
        "sentence_bert_config.json": {
            "transformer_task": "feature-extraction",
            "modality_config": {
                "text": {"method": "encode_text", "method_output_name": None},
                "image": {"method": "encode_image", "method_output_name": None},
            },
            "module_output_name": "sentence_embedding",
        },
        # No `similarity_fn_name`: sentence-transformers < 6 rejects unknown names before it loads the module,
        # whose error says what to do; the module names the similarity itself once the model is built.
        "config_sentence_transformers.json": {
            "model_type": "SentenceTransformer",
            "prompts": {},
            "default_prompt_name": None,
        },
    }
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _as_batch(embeddings: Any) -> Tensor:
    """Embeddings as sentence-transformers passes them (tensor, numpy array, list of either) -> `(B, D)` tensor."""
    if isinstance(embeddings, (list, tuple)):
        embeddings = torch.stack([torch.as_tensor(e) for e in embeddings])
    embeddings = torch.as_tensor(embeddings)
    return embeddings.unsqueeze(0) if embeddings.ndim == 1 else embeddings


def lorentz_similarity(hysac: torch.nn.Module):
    """`(similarity, similarity_pairwise)`: negative Lorentz distances under `hysac`'s current curvature.

    `similarity(a, b)` is `(B1, B2)` `-pairwise_dist(a, b, c)`; `similarity_pairwise(a, b)` is `(B,)`
    `-paired_dist(a, b, c)`; inputs are `(B, D)` space components (tensors, numpy arrays or lists of either).
    """

    def operands(embeddings1: Any, embeddings2: Any) -> tuple[Tensor, Tensor, Tensor]:
        x = _as_batch(embeddings1)
        return x, _as_batch(embeddings2).to(x.device), hysac.curvature.detach().to(x.device)

    def similarity(embeddings1: Any, embeddings2: Any) -> Tensor:
        return -pairwise_dist(*operands(embeddings1, embeddings2))

    def similarity_pairwise(embeddings1: Any, embeddings2: Any) -> Tensor:
        return -paired_dist(*operands(embeddings1, embeddings2))

    return similarity, similarity_pairwise


def use_lorentz_similarity(model: Any, hysac: torch.nn.Module) -> None:
    """Make the `SentenceTransformer` `model` rank by Lorentz distance, then check through its public API that it
    does: a change in sentence-transformers' internals must fail loudly, never leave cosine in place.

    An explicit `similarity_fn_name=` given to `SentenceTransformer(...)` is kept, with a warning.
    """
    chosen = getattr(model, "_similarity_fn_name", None)
    if chosen not in (None, SIMILARITY_NAME):
        logger.warning(
            f"similarity_fn_name={chosen!r} was asked for: this model ranks by the {chosen} similarity of the "
            "hyperboloid space components, not by HySAC's Lorentz distance, and the rankings differ. Leave "
            "similarity_fn_name unset to rank as HySAC does."
        )
        return
    similarity, similarity_pairwise = lorentz_similarity(hysac)
    # sentence-transformers accepts only its built-in names through the `similarity_fn_name` setter; these are
    # the attributes that setter fills (the same from 3.0 to 6.x), and the check below proves they took effect.
    model._similarity, model._similarity_pairwise = similarity, similarity_pairwise
    model._similarity_fn_name = SIMILARITY_NAME
    probe = torch.tensor([[0.0, 0.0], [0.3, -0.2], [1.5, 0.7]])
    if not (
        torch.equal(model.similarity(probe, probe), similarity(probe, probe))
        and torch.equal(model.similarity_pairwise(probe, probe), similarity_pairwise(probe, probe))
        and model.similarity_fn_name == SIMILARITY_NAME
    ):
        raise RuntimeError(
            "this sentence-transformers version did not take HySAC's Lorentz similarity, and HySAC does not "
            f"rank by any built-in similarity; {USE_INSTEAD}"
        )


def _module_class() -> type:
    """Build `HySACSentenceTransformer` on sentence-transformers' `Transformer` module (imported here)."""
    # In a try block, which transformers' check of the remote code's imports skips: sentence-transformers is
    # optional, and a model loaded with AutoModel must not require it.
    try:
        import sentence_transformers
        from sentence_transformers.base.modules import Module, Transformer

        if not hasattr(Module, "on_model_ready"):
            raise ImportError(f"sentence-transformers {sentence_transformers.__version__} is installed")
    except ImportError as error:
        raise ImportError(
            f"HySAC ranks by Lorentz distance, which needs sentence-transformers >= 6.0 ({error}; 6.x needs "
            f"transformers >= 5): `pip install -U 'sentence-transformers>=6' 'transformers>=5'`. Or {USE_INSTEAD}"
        ) from error

    class HySACSentenceTransformer(Transformer):
        """sentence-transformers' `Transformer` module over a `HySACModel` that makes its model rank by Lorentz
        distance (see the module docstring). Embeddings are `encode_text`/`encode_image` outputs: `(B, D)`
        float32 space components on the hyperboloid."""

        def on_model_ready(self, model: Any) -> None:
            super().on_model_ready(model)
            use_lorentz_similarity(model, self.model)
            self.is_ranking_ready = True

        def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
            if not getattr(self, "is_ranking_ready", False):
                raise RuntimeError(
                    f"{MODULE_CLASS} was not set up by a SentenceTransformer (it is added when one loads a HySAC "
                    "folder), so its model would rank by cosine; load it with "
                    f"`SentenceTransformer(folder, trust_remote_code=True)`, or {USE_INSTEAD}"
                )
            return super().forward(features, **kwargs)

    HySACSentenceTransformer.__qualname__ = MODULE_CLASS  # defined in a function; named as modules.json names it
    return HySACSentenceTransformer


def __getattr__(name: str) -> Any:
    """Build the module class when sentence-transformers first asks for it (PEP 562): importing
    sentence-transformers takes seconds and only its loader needs the class."""
    if name != MODULE_CLASS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_class = globals()[MODULE_CLASS] = _module_class()
    return module_class


__all__ = ["MODULE_CLASS", "SIMILARITY_NAME", "lorentz_similarity", "save_sentence_transformers_config"]
