"""Build an index folder from chunks of embeddings, never holding the whole `(N, D)` matrix; resume after a crash.

For galleries that do not fit in memory (the compressed kind `ivfpq` is for them), :func:`build_streaming` takes its
items as a source of chunks (`(n, D)` embeddings and their metadata rows; `hysac-index build` embeds one chunk of the
gallery at a time, or reads shards of embeddings) and works in a hidden folder beside the output, `.NAME.build/`:

1. **Collect.** Each chunk is appended to `embeddings.safetensors` and `metadata.jsonl` there, flushed to disk, and
   recorded in `state.json` (rows and bytes written); a killed build is resumed by running it again: the files are
   cut back to the last recorded chunk and the source is asked for the chunks after it.
2. **Cells and codes.** A uniform sample of the written rows (memory-mapped, at most `SAMPLE_ROWS`) chooses the cells
   (`tuning.choose_cells`) and trains them and the product quantiser.
3. **Fill.** The rows are filed into the structure chunk by chunk from the memory-mapped file; the structure is saved
   every `checkpoint_rows` rows, so a resumed build continues from there.
4. **Tune and write.** `nprobe` and the re-ranking depth are tuned on held-out rows (`tuning.tune_structure`), and the
   folder is written atomically (the embeddings file is hard-linked into it, not copied); the hidden folder goes.

The whole build holds the output folder's writers' lock (`hysac_hf.files.folder_lock`): another writer of the same
folder waits, or fails with one line, instead of mixing its files in.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import UsageError, usage_errors
from ..files import folder_lock, write_folder_atomically
from ..modeling.gallery_hysac import (
    EMBEDDINGS_FILE,
    EmbeddingsWriter,
    Gallery,
    add_to_structure,
    load_structure,
    memory_map_embeddings,
    metadata_lines,
    save_structure,
    write_gallery,
)
from .ivf import PQ_TRAIN_ROWS, default_nlist, training_sample
from .tuning import DEFAULT_TARGET_RECALL, RECALL_K, build_structure, choose_cells, tune_structure

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
STRUCTURE_FILE = "structure.faiss"
METADATA_PART = "metadata.part.jsonl"
SAMPLE_ROWS = 262_144  # rows read back to choose and train the cells and codes
CHECKPOINT_ROWS = 1_000_000  # rows filed between two saves of the structure
STATE_VERSION = 1

ChunkSource = Callable[[int], Iterator[tuple[Tensor, list[dict[str, Any]]]]]


def work_folder(output: str | os.PathLike) -> Path:
    """The hidden folder where a streaming build of `output` keeps its unfinished files: `.NAME.build` beside it."""
    output = Path(output).expanduser().resolve()
    return output.with_name(f".{output.name}.build")


def _write_state(folder: Path, state: dict[str, Any]) -> None:
    """Record the build's progress atomically (a crash leaves the previous record)."""
    part = folder / (STATE_FILE + ".part")
    with open(part, "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(part, folder / STATE_FILE)


def _read_state(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _fingerprint(fingerprint: dict[str, Any], kind: str, dim: int, modality: str) -> dict[str, Any]:
    return json.loads(json.dumps({**fingerprint, "kind": kind, "dim": dim, "modality": modality}))


def resume_point(
    output: str | os.PathLike, fingerprint: dict[str, Any], *, kind: str, dim: int, modality: str, restart: bool = False
) -> int | None:
    """The chunk a build of `output` with this fingerprint will ask its source for first: 0 for a new build, the
    number of committed chunks for an unfinished collection, None once every chunk is collected. (The other
    processes of a multi-process build embed their share of the same chunks.)"""
    work = work_folder(output)
    state = _read_state(work) if work.is_dir() else None
    if restart or state is None or state.get("fingerprint") != _fingerprint(fingerprint, kind, dim, modality):
        return 0
    return state["chunks"] if state.get("phase") == "collect" else None


def build_streaming(
    output: str | os.PathLike,
    chunks: ChunkSource,
    *,
    dim: int,
    modality: str,
    curvature: float,
    fingerprint: dict[str, Any],
    kind: str = "ivfpq",
    target_recall: float | None = DEFAULT_TARGET_RECALL,
    nlist: int | None = None,
    nprobe: int | None = None,
    rerank: int | None = None,
    model_name: str = "",
    model_probe: list[list[float]] | None = None,
    bounds: dict[str, dict[str, float]] | None = None,
    traversal_offset: float | None = None,
    seed: int = 0,
    checkpoint_rows: int = CHECKPOINT_ROWS,
    restart: bool = False,
    show_progress: bool = True,
) -> Path:
    """Build the index folder `output` from a source of chunks (module docstring), resuming an unfinished build.

    Args:
        output: the index folder to write (an existing index there is replaced atomically at the end).
        chunks: `chunks(start)` yields the chunks from number `start` on, each `((n, D) embeddings, n metadata
            dicts)`; the same chunks in the same order on every call (a resumed build asks for the rest).
        dim: `D`.
        modality, curvature, model_name, model_probe, bounds, traversal_offset: as in `GalleryIndex`.
        fingerprint: what identifies the source and settings (JSON); an unfinished build with another fingerprint is
            not resumed (UsageError, unless `restart`).
        kind: `"ivfpq"` (or `"ivf"`, or `"flat"`).
        target_recall, nlist, nprobe, rerank, seed: as in `GalleryIndex`.
        checkpoint_rows: rows filed into the structure between two saves of it.
        restart: discard an unfinished build of `output` instead of resuming it.
        show_progress: tqdm bars.
    Returns:
        `output`, resolved.
    Raises:
        UsageError: an unfinished build of another source, an empty source, or chunks of the wrong shape.
    """
    from tqdm.auto import tqdm

    output = Path(output).expanduser().resolve()
    fingerprint = _fingerprint(fingerprint, kind, dim, modality)
    with folder_lock(output):
        work = work_folder(output)
        state = _read_state(work) if work.is_dir() else None
        if state is not None and not restart and state.get("fingerprint") != fingerprint:
            raise UsageError(
                f"{work} holds an unfinished build of another source or settings; pass --restart (restart=True) to "
                "discard it, or run the same build again to resume it"
            )
        if state is None or restart or state.get("version") != STATE_VERSION:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            state = {"version": STATE_VERSION, "fingerprint": fingerprint, "rows": 0, "chunks": 0, "metadata_bytes": 0}
            state["phase"] = "collect"
            _write_state(work, state)
        elif state["rows"]:
            logger.info("Resuming the build of %s after chunk %d (%d rows)", output, state["chunks"], state["rows"])

        # 1. Collect the chunks.
        if state["phase"] == "collect":
            writer = EmbeddingsWriter(work / EMBEDDINGS_FILE, dim, resume_rows=state["rows"])
            with open(work / METADATA_PART, "ab") as handle:
                handle.truncate(state["metadata_bytes"])
            progress = tqdm(desc="Collecting chunks", unit="rows", initial=state["rows"], disable=None if show_progress else True)
            with open(work / METADATA_PART, "ab") as metadata_file:
                for embeddings, rows in chunks(state["chunks"]):
                    embeddings = torch.as_tensor(embeddings)
                    if embeddings.ndim != 2 or embeddings.shape[1] != dim or len(rows) != embeddings.shape[0]:
                        raise UsageError(
                            f"chunk {state['chunks']} holds {tuple(embeddings.shape)} embeddings and {len(rows)} "
                            f"metadata rows; expected (n, {dim}) and n rows"
                        )
                    if not bool(torch.isfinite(embeddings).all()):
                        raise UsageError(f"chunk {state['chunks']} holds NaN or infinite embeddings")
                    with usage_errors():
                        data = "".join(line + "\n" for line in metadata_lines(rows)).encode("utf-8")
                    writer.write(embeddings)
                    writer.flush()
                    metadata_file.write(data)
                    metadata_file.flush()
                    os.fsync(metadata_file.fileno())
                    state.update(
                        rows=writer.rows, chunks=state["chunks"] + 1, metadata_bytes=state["metadata_bytes"] + len(data)
                    )
                    _write_state(work, state)  # the chunk is committed
                    progress.update(embeddings.shape[0])
            progress.close()
            if state["rows"] == 0:
                raise UsageError("the source yielded no items; an index needs at least one")
            state["sha256"] = writer.finish()
            state["phase"] = "cells"
            _write_state(work, state)

        count = state["rows"]
        embeddings = memory_map_embeddings(work, count, dim)
        gallery = Gallery(
            embeddings=embeddings,
            modality=modality,
            curvature=float(curvature),
            kind=kind,
            model_name=model_name,
            model_probe=model_probe,
            bounds=bounds,
            traversal_offset=traversal_offset,
            source=str(output),
        )
        structure, tuning = None, None
        if kind != "flat":
            structure, settings = _cells_and_codes(work, state, embeddings, curvature, kind, target_recall, nlist, seed)
            _fill(work, state, structure, embeddings, curvature, checkpoint_rows, show_progress)
            structure, gallery.params, tuning = tune_structure(
                structure,
                embeddings,
                curvature,
                kind,
                target=target_recall,
                nprobe=nprobe,
                rerank_depth=rerank,
                seed=seed,
                report=settings,
            )
            if structure is None:
                gallery.kind = "flat"
        gallery.structure, gallery.tuning = structure, tuning

        def write(folder: Path) -> None:
            os.link(work / EMBEDDINGS_FILE, folder / EMBEDDINGS_FILE)  # the same file, not a copy
            gallery.metadata = None  # written below from the part file, line by line
            write_gallery(gallery, folder, embeddings_sha256=state["sha256"], metadata_file=work / METADATA_PART)

        with usage_errors():
            write_folder_atomically(output, write)
        shutil.rmtree(work, ignore_errors=True)
    logger.info("Built a %s index of %d %ss at %s", gallery.kind, count, modality, output)
    return output


def _cells_and_codes(
    work: Path,
    state: dict[str, Any],
    embeddings: Tensor,
    curvature: float,
    kind: str,
    target: float | None,
    nlist: int | None,
    seed: int,
):
    """Phase 2: the empty structure (read back when a resumed build had saved it) and the cell report."""
    import faiss

    if state["phase"] in ("fill", "tune") and (work / STRUCTURE_FILE).is_file():
        return load_structure(work / STRUCTURE_FILE), state["cells_report"]
    count = embeddings.shape[0]
    rng = np.random.default_rng(seed + 3)
    picked = np.arange(count) if count <= SAMPLE_ROWS else np.sort(rng.choice(count, SAMPLE_ROWS, replace=False))
    sample = embeddings[torch.from_numpy(picked)].clone()  # rows read from disk once
    report: dict[str, Any] = {}
    if target is not None:  # the sample stands for the whole gallery; cell counts are for all `count` rows
        layout, cells, candidates, _ = choose_cells(sample, curvature, target, RECALL_K, seed, nlist, total=count)
        report = {"candidates": candidates}
    else:
        layout, cells = "shells", nlist or default_nlist(count)
    train = sample[torch.from_numpy(training_sample(sample.shape[0], cells, seed))]
    codes = sample[:: max(1, sample.shape[0] // PQ_TRAIN_ROWS)]  # spread over the gallery (the sample is sorted)
    structure = build_structure(train, curvature, kind, layout, cells, seed, codes_sample=codes)
    report["cells"] = {"layout": layout, "nlist": int(faiss.extract_index_ivf(structure).nlist)}
    save_structure(structure, work / STRUCTURE_FILE)
    state.update(phase="fill", filled=0, cells_report=report)
    _write_state(work, state)
    return structure, report


def _fill(
    work: Path,
    state: dict[str, Any],
    structure: Any,
    embeddings: Tensor,
    curvature: float,
    checkpoint_rows: int,
    show_progress: bool,
) -> None:
    """Phase 3: file the rows into the structure chunk by chunk, saving it every `checkpoint_rows` rows. The saved
    structure is the checkpoint: a resumed build files the rows after its last item again (a crash after the last
    save, even while tuning, loses only the rows filed since)."""
    from tqdm.auto import tqdm

    count = embeddings.shape[0]
    filled = structure.ntotal
    progress = tqdm(desc="Filing rows", unit="rows", total=count, initial=filled, disable=None if show_progress else True)
    step = max(1, int(checkpoint_rows))
    while filled < count:
        stop = min(count, filled + step)
        add_to_structure(structure, embeddings[filled:stop], curvature, cells="radial")
        filled = stop
        if filled < count:
            save_structure(structure, work / STRUCTURE_FILE)
        progress.update(stop - progress.n)
    progress.close()
    state.update(filled=filled, phase="tune")
    _write_state(work, state)


__all__ = ["CHECKPOINT_ROWS", "SAMPLE_ROWS", "ChunkSource", "build_streaming", "resume_point", "work_folder"]
