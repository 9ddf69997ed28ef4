"""Streaming builds (`hysac_hf.index.streaming`): chunk by chunk, killed midway and resumed, against a build that was
never interrupted and a float64 brute force."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from hysac_hf.modeling.lorentz import exp_map0, pairwise_dist

from hysac_hf.errors import UsageError
from hysac_hf.index import GalleryIndex
from hysac_hf.index.streaming import build_streaming, work_folder
from hysac_hf.testing import REPO_ROOT

faiss = pytest.importorskip("faiss")

CHUNK, CHUNKS, DIM = 500, 6, 12


def points(count: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(count, DIM, generator=gen), dim=1)
    return exp_map0(directions * (0.3 + torch.rand(count, 1, generator=gen)), 1.0)


GALLERY = points(CHUNK * CHUNKS, 0)


def chunks(start: int):
    for number in range(start, CHUNKS):
        rows = range(number * CHUNK, (number + 1) * CHUNK)
        yield GALLERY[rows.start : rows.stop], [{"row": i, "name": f"item {i}"} for i in rows]


OPTIONS = {"dim": DIM, "modality": "image", "curvature": 1.0, "fingerprint": {"test": 1}, "show_progress": False}
KILL = """
import os, sys, torch
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
import test_streaming as t
from hysac_hf.index import streaming
{patch}
streaming.build_streaming({output!r}, chunks, **t.OPTIONS, target_recall=None, nlist=8, checkpoint_rows=700)
"""


def _killed_build(output, patch: str) -> None:
    script = KILL.format(root=str(REPO_ROOT), tests=str(REPO_ROOT / "tests" / "hysac_hf"), output=str(output), patch=patch)
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 3, run.stderr[-3000:]


@pytest.mark.slow
def test_a_build_killed_midway_resumes_from_its_last_chunk_and_equals_an_uninterrupted_one(tmp_path):
    reference = build_streaming(tmp_path / "reference", chunks, **OPTIONS, target_recall=None, nlist=8)
    # Killed while collecting: after 2 complete chunks, half-way through writing the third.
    _killed_build(
        tmp_path / "index",
        """
def chunks(start):
    for number, chunk in enumerate(t.chunks(start), start=start):
        if number == 2:
            streaming.EmbeddingsWriter.write(writer_of[0], chunk[0][:100])  # a torn, uncommitted chunk
            os._exit(3)
        yield chunk
writer_of = []
real = streaming.EmbeddingsWriter.__init__
def remember(self, *args, **kwargs):
    real(self, *args, **kwargs)
    writer_of.append(self)
streaming.EmbeddingsWriter.__init__ = remember
""",
    )
    state = json.loads((work_folder(tmp_path / "index") / "state.json").read_text())
    assert state["chunks"] == 2 and state["rows"] == 2 * CHUNK and not (tmp_path / "index").exists()
    asked = []

    def resumed(start):
        asked.append(start)
        return chunks(start)

    # Killed again while filing the structure (after its first checkpoint of 700 rows).
    _killed_build(
        tmp_path / "index",
        """
chunks = t.chunks
calls = []
real = streaming.add_to_structure
def add(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        os._exit(3)
    real(*args, **kwargs)
streaming.add_to_structure = add
""",
    )
    state = json.loads((work_folder(tmp_path / "index") / "state.json").read_text())
    assert state["phase"] == "fill" and state["rows"] == CHUNK * CHUNKS  # every chunk collected before the kill
    build_streaming(tmp_path / "index", resumed, **OPTIONS, target_recall=None, nlist=8, checkpoint_rows=700)
    assert asked == []  # nothing left to collect: the structure was filled from its checkpoint on
    built, expected = GalleryIndex.load(tmp_path / "index"), GalleryIndex.load(reference)
    for name in ("embeddings.safetensors", "metadata.jsonl"):
        assert (tmp_path / "index" / name).read_bytes() == (reference / name).read_bytes()
    assert built.structure.ntotal == CHUNK * CHUNKS and built.metadata[1234] == {"row": 1234, "name": "item 1234"}
    queries = points(10, 5)
    everything = {"nprobe": built.params["nlist"]}
    assert torch.equal(built.knn(queries, 5, **everything)[1], expected.knn(queries, 5, **everything)[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".index.lock", ".reference.lock", "index", "reference"]


def test_a_resumed_collection_asks_only_for_the_chunks_after_the_last_committed_one(tmp_path):
    calls = []

    def failing(start):
        calls.append(start)
        for number, chunk in enumerate(chunks(start), start=start):
            if number == 3 and len(calls) == 1:
                raise RuntimeError("the embedding job died")
            yield chunk

    with pytest.raises(RuntimeError, match="died"):
        build_streaming(tmp_path / "index", failing, **OPTIONS, kind="flat")
    build_streaming(tmp_path / "index", failing, **OPTIONS, kind="flat")
    assert calls == [0, 3]
    index = GalleryIndex.load(tmp_path / "index")
    assert torch.equal(index.embeddings, GALLERY) and [m["row"] for m in index.metadata] == list(range(3000))
    assert not work_folder(tmp_path / "index").exists()
    # Another source (or settings) is not resumed into an unfinished build, unless told to restart.
    del calls[:]
    with pytest.raises(RuntimeError):
        build_streaming(tmp_path / "other", failing, **OPTIONS, kind="flat")
    other = {**OPTIONS, "fingerprint": {"test": 2}}
    with pytest.raises(UsageError, match="unfinished build of another source"):
        build_streaming(tmp_path / "other", chunks, **other, kind="flat")
    build_streaming(tmp_path / "other", chunks, **other, kind="flat", restart=True)
    assert torch.equal(GalleryIndex.load(tmp_path / "other").embeddings, GALLERY)


def test_a_streamed_compressed_index_searches_exactly_with_every_cell_and_candidate(tmp_path):
    output = build_streaming(tmp_path / "index", chunks, **OPTIONS, kind="ivfpq", target_recall=None, nlist=16)
    index = GalleryIndex.load(output)
    assert index.kind == "ivfpq" and index.memory_mapped and index.params["code"] == "PQ4x6"
    # 13 dims -> 16 = 4 sub-vectors; 3,000 training rows give 6 bits: FAISS's k-means asks 39 rows per code word
    queries = points(20, 9)
    distances = pairwise_dist(queries.double(), GALLERY.double(), 1.0, eps=0.0)
    truth = torch.sort(distances, dim=1, stable=True).indices[:, :5]
    from hysac_hf.modeling import gallery_hysac as engine

    found = engine.search(queries, index.embeddings, 1.0, 5, index.structure, index.params["nlist"], len(index))
    assert torch.equal(found[0], truth)
    info = json.loads((output / "index.json").read_text())
    assert info["faiss"]["type"] == "ivfpq" and "tuning" not in info  # nothing measured: target_recall=None
