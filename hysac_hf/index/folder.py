"""The saved gallery index folder (format 1), as the library reads and writes it.

The format itself (file names, fields, model probe, tolerances; layout in its module docstring) and its readers are
defined once, in the remote-code module :mod:`hysac_hf.modeling.pipeline_hysac`, which the pipelines use to read
the folder where `hysac_hf` is not installed. This module re-exports them for the library, raising
:class:`~hysac_hf.errors.UsageError` (with the same messages) where they raise `ValueError`, and adds what only the
writer needs: the metadata lines and the model probe computed through the library's embedding path.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from torch import Tensor

from ..errors import UsageError
from ..modeling import pipeline_hysac as _format
from ..modeling.pipeline_hysac import (
    CURVATURE_TOLERANCE,
    EMBEDDINGS_FILE,
    EMBEDDINGS_KEY,
    FAISS_FILE,
    INDEX_FILE,
    INDEX_FORMAT,
    METADATA_FILE,
    PROBE_DECIMALS,
    PROBE_TEXTS,
    sha256_file,
)


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Turn the format readers' `ValueError` into the library's `UsageError`, message unchanged."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as error:
        raise UsageError(str(error)) from None


def read_index_json(folder: str | os.PathLike) -> dict[str, Any]:
    """`index.json` of a gallery index folder, with its fields checked
    (:func:`~hysac_hf.modeling.pipeline_hysac.read_index_json`).

    Raises:
        UsageError: not an index folder, unreadable JSON, another format, or a missing or malformed field.
    """
    with usage_errors():
        return _format.read_index_json(folder)


def load_index_folder(folder: str | os.PathLike) -> tuple[Tensor, dict[str, Any], list[dict[str, Any]]]:
    """Read a gallery index folder and check that its parts belong together; needs no FAISS, no model
    (:func:`~hysac_hf.modeling.pipeline_hysac.read_index_folder`).

    Returns:
        `(embeddings, info, metadata_rows)`: the `(count, dim)` float32 embeddings, the parsed `index.json`, and
        `count` metadata dicts (row `i` describes item `i`).
    Raises:
        UsageError: not an index folder, or a corrupt or empty one (what is wrong, and to rebuild it).
    """
    with usage_errors():
        return _format.read_index_folder(folder)


def read_faiss_index(folder: str | os.PathLike, faiss_info: dict[str, Any], count: int, dim: int):
    """The folder's `faiss.index`, checked against `index.json`
    (:func:`~hysac_hf.modeling.pipeline_hysac.read_faiss_index`; needs faiss).

    Raises:
        UsageError: a missing, altered or unreadable file, or one that does not fit the index.
    """
    with usage_errors():
        return _format.read_faiss_index(folder, faiss_info, count, dim)


def metadata_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One JSON line per metadata row (strict JSON: NaN/Infinity refused).

    Raises:
        UsageError: a row that is not a dict or holds a value JSON cannot represent (naming the row).
    """
    lines = []
    for number, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UsageError(f"metadata row {number} is a {type(row).__name__}; each item's metadata must be a dict")
        try:
            lines.append(json.dumps(row, ensure_ascii=False, allow_nan=False))
        except (TypeError, ValueError) as error:
            raise UsageError(
                f"metadata row {number} is not JSON-serialisable ({error}); keep strings, numbers, booleans, None, "
                "lists and dicts of them"
            ) from None
    return lines


# ------------------------------------------------------------------------------------------------------------
# The model probe
def model_probe(model, processor) -> list[list[float]]:
    """`encode_text` of :data:`PROBE_TEXTS` through the library's embedding path, rounded to `PROBE_DECIMALS`.

    Returns:
        `len(PROBE_TEXTS)` lists of `D` floats.
    """
    from ..encode import encode_texts

    probe = encode_texts(model, processor, list(PROBE_TEXTS), show_progress=False)
    return [[round(float(v), PROBE_DECIMALS) for v in row] for row in probe.double().tolist()]


def check_model(info: dict[str, Any], model, processor, folder: str | os.PathLike = "(unnamed)") -> None:
    """Refuse a model other than the one that embedded the index: dimension, curvature, then the probe
    (:func:`~hysac_hf.modeling.pipeline_hysac.check_index_model`, with the probe computed by :func:`model_probe`).

    Args:
        info: the parsed `index.json`.
    Raises:
        UsageError: saying which check failed and what to do.
    """
    with usage_errors():
        _format.check_index_model(info, model, lambda: model_probe(model, processor), folder)


__all__ = [
    "CURVATURE_TOLERANCE",
    "EMBEDDINGS_FILE",
    "EMBEDDINGS_KEY",
    "FAISS_FILE",
    "INDEX_FILE",
    "INDEX_FORMAT",
    "METADATA_FILE",
    "PROBE_TEXTS",
    "check_model",
    "load_index_folder",
    "metadata_lines",
    "model_probe",
    "read_faiss_index",
    "read_index_json",
    "sha256_file",
    "usage_errors",
]
