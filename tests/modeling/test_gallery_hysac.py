"""The search engine (modeling/gallery_hysac.py): every ranking against float64 brute force written out here, the two
tie rules on hand-made ties, FAISS paths against the exact one, the redirect step against the model's traversal, and
format-1 folders written by the code before the engine existed (tests/fixtures) read and re-written (every file byte for byte,
index.json with the two checksums added).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hysac_hf.modeling import gallery_hysac as engine
from hysac_hf.modeling.lorentz import exp_map0
from hysac_hf.modeling.traversal import traverse

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def random_points(n: int, dim: int, seed: int, scale: float = 1.0, curv: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return exp_map0(scale * torch.randn(n, dim, generator=g, dtype=torch.float64), curv)


def distances64(queries: torch.Tensor, pool: torch.Tensor, c: float) -> torch.Tensor:
    """d(x, y) = acosh(-c <x, y>_L) / sqrt(c) in float64, the time components from the hyperboloid."""
    q, p = queries.double(), pool.double()
    inner = q @ p.T - torch.outer(torch.sqrt(1 / c + q.pow(2).sum(-1)), torch.sqrt(1 / c + p.pow(2).sum(-1)))
    return torch.acosh((-c * inner).clamp(min=1.0)) / math.sqrt(c)


def brute_force(queries: torch.Tensor, pool: torch.Tensor, c: float, k: int) -> tuple[list, list]:
    """Per query, the k nearest by (float64 distance, index), written without torch's sort."""
    rows = distances64(queries, pool, c).tolist()
    order = [sorted(range(len(row)), key=lambda j: (row[j], j))[:k] for row in rows]
    return order, [[row[j] for j in o] for row, o in zip(rows, order)]


# ------------------------------------------------------------------------------------------------------------
# Top-k lists: nearest first, equal distances in gallery order
def test_rank_exact_equals_brute_force_across_chunk_borders(monkeypatch):
    monkeypatch.setattr(engine, "RANK_CHUNK", 777)  # several chunks, ties across their borders
    c = 1.3
    pool, queries = random_points(5000, 8, 1, curv=c).float(), random_points(50, 8, 2, curv=c).float()
    pool[4000] = pool[10]  # an exact tie across a chunk border: index 10 first
    queries[0] = pool[10]
    indices, distances = engine.rank_exact(queries, pool, c, 15)
    order, expected = brute_force(queries, pool, c, 15)
    assert indices.tolist() == order and indices.dtype == torch.long and distances.dtype == torch.float64
    torch.testing.assert_close(distances, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert indices[0, :2].tolist() == [10, 4000]
    duplicated = torch.cat([pool[:10], pool[:10]])
    assert engine.rank_exact(pool[:3], duplicated, c, 2)[0].tolist() == [[0, 10], [1, 11], [2, 12]]


def test_faiss_paths_equal_the_exact_one_on_100k_points():
    pytest.importorskip("faiss")
    k, c = 10, 1.3
    pool = random_points(100_000, 16, 3, scale=0.7, curv=c).float()
    queries = random_points(300, 16, 4, scale=0.7, curv=c).float()
    exact_indices, exact_distances = engine.rank_exact(queries, pool, c, k)
    structure = engine.flat_structure(pool, c)
    assert structure.ntotal == 100_000 and structure.d == 17
    indices, distances = engine.search(queries, pool, c, k, structure)
    # float32 candidates with spare ones, re-ranked in float64: the exact ranking (distances from other BLAS block
    # shapes: equal to float64 rounding)
    assert torch.equal(indices, exact_indices)
    torch.testing.assert_close(distances, exact_distances, rtol=0, atol=1e-12)


def test_rerank_searches_exactly_where_a_structure_found_too_few():
    c, k = 1.0, 3
    pool, queries = random_points(60, 6, 5).float(), random_points(4, 6, 6).float()
    exact_indices, exact_distances = engine.rank_exact(queries, pool, c, k)
    candidates = torch.cat([exact_indices[:, [2, 0, 1]], torch.full((4, 2), -1)], dim=1)  # right ones, wrong order
    candidates[1] = -1  # a structure that found nothing for query 1: the whole gallery is ranked
    candidates[2, 0] = -1  # query 2: two of its candidates left, fewer than k: the whole gallery too
    indices, distances = engine.rerank(queries, pool, candidates, c, k)
    assert torch.equal(indices, exact_indices)
    # batched float64 products: equal to the exact ranking's up to float64 rounding
    torch.testing.assert_close(distances, exact_distances, rtol=0, atol=1e-12)
    empty = engine.rerank(queries[:0], pool, candidates[:0], c, k)
    assert empty[0].shape == (0, k) and empty[1].dtype == torch.float64


def test_rerank_keeps_gallery_order_on_ties_and_drops_missing_candidates():
    c = 1.0
    pool = random_points(30, 5, 7).float()
    pool[20] = pool[4]  # an exact tie
    query = pool[4:5]
    candidates = torch.tensor([[20, -1, 9, 4, 17, -1, 2]])  # unordered, with holes
    indices, distances = engine.rerank(query, pool, candidates, c, 5)
    order, expected = brute_force(query, pool[[2, 4, 9, 17, 20]], c, 5)
    assert indices.tolist() == [[[2, 4, 9, 17, 20][j] for j in order[0]]]
    assert indices[0, :2].tolist() == [4, 20]  # equal distances: gallery order
    torch.testing.assert_close(distances, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_radial_cells_file_items_by_shell_then_direction():
    """The engine's filing rule, recomputed here by hand: the outermost shell whose edge time is <= the item's time
    component, then the most aligned of that shell's directions."""
    faiss = pytest.importorskip("faiss")
    from hysac_hf.index.ivf import empty_structure, radial_quantizer

    c, dim = 1.3, 8
    items = random_points(3000, dim, 21, scale=0.4, curv=c).float()
    vectors = radial_quantizer(items[:1500], c, nlist=24, layout="shells")
    times = sorted(set(vectors[:, dim].tolist()))
    assert len(times) > 2 and times[0] == pytest.approx(1 / math.sqrt(c))  # several shells, the first at the root
    structure = empty_structure(vectors, "ivf")
    engine.add_to_structure(structure, items, c, cells="radial")
    assert structure.ntotal == 3000
    filed = {}
    invlists = structure.invlists
    for cell in range(structure.nlist):
        ids = faiss.rev_swig_ptr(invlists.get_ids(cell), invlists.list_size(cell)).copy()
        filed.update({int(i): cell for i in ids})
    pool = engine.mips_pool_vectors(items, torch.tensor(c, dtype=torch.float32)).numpy()
    for i in range(0, 3000, 37):
        y_t, y_s = pool[i, dim], pool[i, :dim]
        edge = max(t for t in times if t <= y_t)
        members = [j for j in range(len(vectors)) if vectors[j, dim] == edge]
        cosines = {j: float(y_s @ vectors[j, :dim]) / (float((vectors[j, :dim] ** 2).sum()) ** 0.5 or 1.0) for j in members}
        assert filed[i] == max(cosines, key=cosines.get)


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_ivf_probes_set_per_search_equal_probes_set_on_the_structure(kind):
    faiss = pytest.importorskip("faiss")
    from hysac_hf.index.ivf import empty_structure, radial_quantizer, train_codes

    c = 1.0
    pool, queries = random_points(4000, 8, 7).float(), random_points(30, 8, 8).float()
    structure = empty_structure(radial_quantizer(pool, c, nlist=64), kind)
    if kind == "ivfpq":
        train_codes(structure, engine.mips_pool_vectors(pool, torch.tensor(1.0)).numpy())
    engine.add_to_structure(structure, pool, c, cells="radial")
    ivf = faiss.extract_index_ivf(structure)
    ivf.nprobe = 2
    per_search = engine.structure_candidates(structure, queries, c, 12, nprobe=9)
    assert ivf.nprobe == 2  # a per-search setting leaves the structure alone (thread-safe)
    ivf.nprobe = 9
    assert torch.equal(per_search, engine.structure_candidates(structure, queries, c, 12))
    ivf.nprobe = ivf.nlist
    # every cell probed, every item a candidate (through the padding IndexPreTransform for ivfpq), re-ranked: exact
    indices, _ = engine.search(queries, pool, c, 5, structure, candidates=len(pool))
    assert torch.equal(indices, engine.rank_exact(queries, pool, c, 5)[0])


def test_embeddings_files_are_what_safetensors_writes_and_map_back():
    from safetensors.torch import save_file

    embeddings = random_points(1000, 12, 3).float()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        save_file({"embeddings": embeddings}, str(folder / "reference.safetensors"))
        digest = engine.write_embeddings(embeddings, folder / "embeddings.safetensors")
        data = (folder / "embeddings.safetensors").read_bytes()
        assert data == (folder / "reference.safetensors").read_bytes() and digest == engine.sha256_file(
            folder / "embeddings.safetensors"
        )
        mapped = engine.memory_map_embeddings(folder, 1000, 12)
        assert torch.equal(mapped, embeddings) and isinstance(mapped, torch.Tensor)
        with pytest.raises(ValueError, match=r"expected one float32 tensor 'embeddings' of shape \(999, 12\)"):
            engine.memory_map_embeddings(folder, 999, 12)
        # A streaming writer, interrupted after 300 rows and resumed, writes a readable file of the same values.
        writer = engine.EmbeddingsWriter(folder / "streamed", 12)
        writer.write(embeddings[:300])
        writer.write(embeddings[300:350])  # not committed: the resumed writer cuts it
        writer.flush()
        writer = engine.EmbeddingsWriter(folder / "streamed", 12, resume_rows=300)
        writer.write(embeddings[300:])
        digest = writer.finish()
        from safetensors.torch import load_file

        assert torch.equal(load_file(str(folder / "streamed"))["embeddings"], embeddings)
        assert digest == engine.sha256_file(folder / "streamed")


# ------------------------------------------------------------------------------------------------------------
# The redirect step and the results
def test_redirect_is_the_models_traversal_and_search_safely_composes_it(hysac):
    c = hysac.curvature.detach()
    dim = hysac.config.projection_dim
    tangent = torch.randn(20, dim, generator=torch.Generator().manual_seed(9))
    queries = exp_map0(tangent / tangent.norm(dim=1, keepdim=True) * torch.linspace(0.05, 2.0, 20)[:, None], c)
    gallery = random_points(40, dim, 10, scale=0.15, curv=float(c)).float()
    for modality in ("image", "text"):
        for method in ("reference", "geodesic"):
            moved, redirected = engine.redirect(
                queries, modality, hysac.config.bounds, c, hysac.config.traversal_offset, method, "avg"
            )
            expected = hysac.traverse_to_safe(queries, target=modality, method=method, bound="avg")
            assert torch.equal(moved, expected) and torch.equal(redirected, (expected != queries).any(dim=1))
            assert 0 < int(redirected.sum()) < len(queries)
            out = engine.search_safely(
                queries, gallery, modality, c, 4, bounds=hysac.config.bounds,
                offset=hysac.config.traversal_offset, method=method, bound="avg",
            )  # fmt: skip
            order, _ = brute_force(expected, gallery, float(c), 4)
            assert out["indices"].tolist() == order
            assert torch.equal(out["query_distance_to_root"], hysac.distance_to_root(queries))
            assert torch.equal(out["search_distance_to_root"], hysac.distance_to_root(expected))
    kept = engine.search_safely(queries, gallery, "image", c, 4, policy="retain")
    assert not kept["redirected"].any() and kept["indices"].tolist() == brute_force(queries, gallery, float(c), 4)[0]
    with pytest.raises(ValueError, match="calibrated bounds"):
        engine.redirect(queries, "image", None, c, 0.8)
    with pytest.raises(ValueError, match="policy='block'"):
        engine.search_safely(queries, gallery, "image", c, 4, policy="block")


def test_describe_results_puts_the_rankings_keys_first_and_keeps_them():
    outputs = {
        "redirected": torch.tensor([True, False]),
        "query_distance_to_root": torch.tensor([1.5, 0.25]),
        "search_distance_to_root": torch.tensor([1.0, 0.25]),
        "indices": torch.tensor([[1, 0], [0, 1]]),
        "distances": torch.tensor([[0.5, 0.75], [0.125, 2.0]], dtype=torch.float64),
    }
    metadata = [{"caption": "a", "index": 99}, {"distance": -1, "path": "b.png"}]
    rows = engine.describe_results(outputs, metadata)
    assert rows[0] == {
        "redirected": True,
        "query_distance_to_root": 1.5,
        "search_distance_to_root": 1.0,
        "results": [{"index": 1, "distance": 0.5, "path": "b.png"}, {"index": 0, "distance": 0.75, "caption": "a"}],
    }
    assert list(rows[0]["results"][0]) == ["index", "distance", "path"] and rows[1]["redirected"] is False
    assert engine.describe_results(outputs)[1]["results"] == [{"index": 0, "distance": 0.125}, {"index": 1, "distance": 2.0}]


# ------------------------------------------------------------------------------------------------------------
# Ranks of a known target: pessimistic
def test_target_ranks_hand_made_with_ties():
    # c = 1, query q = (1, 0). -<q, y>_L per pool item: v0 = (0, 1): 2; v1 = (0, -1): 2 (tie with v0);
    # v2 = (2, 0): sqrt(10) - 2 = 1.16; v3 = (-1, 0): 3; v4 = (1, 0): 1 (q itself).
    # Order: v4, v2, {v0, v1}, v3. Pessimistic ranks of targets 0..4: 3, 3, 1, 4, 0.
    pool = torch.tensor([[0.0, 1.0], [0.0, -1.0], [2.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    queries = torch.tensor([[1.0, 0.0]]).repeat(5, 1)
    for dtype in (torch.float32, torch.float64):
        ranks = engine.target_ranks(queries.to(dtype), pool.to(dtype), torch.arange(5))
        assert ranks.tolist() == [3, 3, 1, 4, 0]
        one_at_a_time = engine.target_ranks(queries.to(dtype), pool.to(dtype), torch.arange(5), max_block_elements=1)
        assert one_at_a_time.tolist() == [3, 3, 1, 4, 0]
    # the same ties in a top-k list: gallery order (v0 before v1), distances acosh(-<q, y>_L)
    indices, distances = engine.rank_exact(queries[:1].double(), pool.double(), 1.0, 5)
    assert indices.tolist() == [[4, 2, 0, 1, 3]]
    expected = [0.0, math.acosh(math.sqrt(10) - 2), math.acosh(2), math.acosh(2), math.acosh(3)]
    torch.testing.assert_close(distances, torch.tensor([expected], dtype=torch.float64), atol=1e-7, rtol=0)


def test_target_ranks_errors():
    pool = random_points(10, 4, 0)
    with pytest.raises(ValueError, match="targets must index the pool"):
        engine.target_ranks(pool[:3], pool, torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match="dim"):
        engine.target_ranks(pool[:3, :3], pool, torch.tensor([0, 1, 2]))


def test_shared_product_ranks_equal_ranks_of_rescaled_queries():
    curv = 1.7
    queries, pool = random_points(300, 8, 5, curv=curv), random_points(600, 8, 6, curv=curv)
    moved = traverse(queries, 1.0, curv, method="geodesic")
    scales = moved.norm(dim=-1) / queries.norm(dim=-1)
    targets = torch.randint(0, 300, (300,), generator=torch.Generator().manual_seed(0))
    requests = [
        engine.RankRequest(torch.ones(300), targets),  # plain, whole pool
        engine.RankRequest(scales, targets, block_edges=(0, 300, 600)),  # traversed, with block maxima
        engine.RankRequest(torch.ones(300), targets + 300, start=300, stop=600),  # second block only
    ]
    (plain, none), (trav, block_max), (second, _) = engine.shared_product_ranks(
        queries, pool, requests, curv, max_block_elements=5000
    )
    assert none is None
    assert torch.equal(plain, engine.target_ranks(queries, pool, targets, curv))
    assert torch.equal(trav, engine.target_ranks(moved, pool, targets, curv))
    assert torch.equal(second, engine.target_ranks(queries, pool[300:], targets, curv))
    scores = engine.lorentz_scores(moved, pool, curv)
    torch.testing.assert_close(block_max, torch.stack([scores[:, :300].amax(1), scores[:, 300:].amax(1)], 1))
    with pytest.raises(ValueError, match="targets must index the pool"):
        engine.shared_product_ranks(queries, pool, [engine.RankRequest(torch.ones(300), targets, start=300, stop=600)], curv)


def test_paired_ranks_serve_both_directions_from_one_matrix():
    x, y = random_points(40, 6, 11, curv=1.3), random_points(40, 6, 12, curv=1.3)
    y[5] = y[7]  # a tie: pessimistic in both directions
    targets = torch.arange(40)
    expected = (engine.target_ranks(x, y, targets, 1.3), engine.target_ranks(y, x, targets, 1.3))
    for limit in (40 * 40, 40 * 40 - 1):  # one shared matrix, and two blocked passes when it does not fit
        got = engine.paired_ranks(x, y, 1.3, max_block_elements=limit)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert expected[0][5] >= 1 and expected[0][7] >= 1  # y_5 = y_7: each target has a tie ranked above it
    with pytest.raises(ValueError, match="as many rows"):
        engine.paired_ranks(x, y[:-1], 1.3)


# ------------------------------------------------------------------------------------------------------------
# Format-1 folders written before the engine existed (tests/fixtures, by the code of commit b4928df)
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_a_folder_written_by_the_previous_code_reads_searches_and_rewrites_with_checksums(kind, tmp_path):
    if kind == "ivf":
        pytest.importorskip("faiss")
    from hysac_hf.index import GalleryIndex

    folder = FIXTURES / f"format1_{kind}"
    gallery = engine.read_gallery(folder)
    assert (len(gallery), gallery.dim, gallery.modality, gallery.curvature) == (48, 8, "image", 1.25)
    assert gallery.kind == kind and gallery.model_name == "tiny-fixture" and gallery.traversal_offset == 0.8
    assert gallery.metadata[5]["caption"] == "ünïcødé café" and gallery.metadata[3]["index"] == -3
    queries = random_points(6, 8, 12, curv=1.25).float()
    structure = engine.read_structure(gallery) if kind == "ivf" else None
    indices, distances = engine.search(queries, gallery.embeddings, gallery.curvature, 48, structure, nprobe=4)
    order, expected = brute_force(queries, gallery.embeddings, gallery.curvature, 48)
    assert indices.tolist() == order  # all 4 cells probed: exact
    torch.testing.assert_close(distances, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert order[0].index(13) < order[0].index(30)  # the fixture's exact tie, in gallery order
    index = GalleryIndex.load(folder)
    index.save(tmp_path / "again")
    for path in sorted(folder.iterdir()):
        if path.name != "index.json":
            assert (tmp_path / "again" / path.name).read_bytes() == path.read_bytes(), path.name
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == sorted(p.name for p in folder.iterdir())
    # index.json keeps every field and gains the two checksums that guard it and the metadata
    old, new = (json.loads((f / "index.json").read_text()) for f in (folder, tmp_path / "again"))
    assert "fields_sha256" not in old and {key: new.pop(key) for key in old} == old
    assert new == {
        "metadata_sha256": hashlib.sha256((folder / "metadata.jsonl").read_bytes()).hexdigest(),
        "fields_sha256": hashlib.sha256(
            json.dumps({**old, "metadata_sha256": new["metadata_sha256"]}, sort_keys=True, separators=(",", ":"),
                       ensure_ascii=False).encode()
        ).hexdigest(),
    }  # fmt: skip


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda info, meta: info.update(modality="text"), "was changed after the index was written"),
        (lambda info, meta: info.update(model="another-model"), "was changed after the index was written"),
        (lambda info, meta: info.update(count=47), "was changed after the index was written"),
        (lambda info, meta: meta.__setitem__(5, {"caption": "safe"}), "SHA-256 of metadata.jsonl differs"),
    ],
)
def test_an_edited_index_json_or_metadata_line_is_refused(edit, message, tmp_path):
    """The checksums written since format 1's second release cover index.json's own fields and the metadata file,
    so that a hand edit (a wrong modality, another model name, one metadata line) is an error, not a wrong answer."""
    from hysac_hf.index import GalleryIndex

    GalleryIndex.load(FIXTURES / "format1_flat").save(tmp_path / "index")
    folder = tmp_path / "index"
    engine.read_gallery(folder)  # intact: reads
    info = json.loads((folder / "index.json").read_text())
    meta = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    before = (dict(info), list(meta))
    edit(info, meta)
    if info != before[0]:
        (folder / "index.json").write_text(json.dumps(info, indent=1) + "\n")
    if meta != before[1]:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in meta))
    with pytest.raises(ValueError, match=message):
        engine.read_gallery(folder)


def test_reader_refusals_name_the_problem(tmp_path):
    folder = tmp_path / "index"
    shutil.copytree(FIXTURES / "format1_ivf", folder)
    (folder / "faiss.index").unlink()
    gallery = engine.read_gallery(folder)  # the embeddings alone are searchable exactly
    with pytest.raises(ValueError, match="names a FAISS index but faiss.index is missing"):
        engine.read_structure(gallery)
    (folder / "metadata.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="has 1 lines for 48 items"):
        engine.read_gallery(folder)
    with pytest.raises(ValueError, match="not a saved gallery index"):
        engine.read_gallery(tmp_path)
    assert engine.is_gallery_index(folder) and not engine.is_gallery_index(tmp_path)
