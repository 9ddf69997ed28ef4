"""Exact hyperbolic top-k: pessimistic ranks on hand-made ties, chunked top-k and FAISS against float64 brute force."""

from __future__ import annotations

import math

import pytest
import torch
from hysac_hf.modeling.lorentz import exp_map0, pairwise_dist

from hysac_hf.evaluation.topk import (
    FaissLorentzIndex,
    chunked_topk,
    lorentz_scores,
    paired_ranks,
    scores_to_distances,
    target_ranks,
)


def random_points(n: int, dim: int, seed: int, scale: float = 1.0, curv: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return exp_map0(scale * torch.randn(n, dim, generator=g, dtype=torch.float64), curv)


def test_target_ranks_hand_made_with_ties():
    # c = 1, query q = (1, 0). -<q, y>_L per pool item: v0 = (0, 1): 2; v1 = (0, -1): 2 (tie with v0);
    # v2 = (2, 0): sqrt(10) - 2 = 1.16; v3 = (-1, 0): 3; v4 = (1, 0): 1 (q itself).
    # Order: v4, v2, {v0, v1}, v3. Pessimistic ranks of targets 0..4: 3, 3, 1, 4, 0.
    pool = torch.tensor([[0.0, 1.0], [0.0, -1.0], [2.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    queries = torch.tensor([[1.0, 0.0]]).repeat(5, 1)
    for dtype in (torch.float32, torch.float64):
        ranks = target_ranks(queries.to(dtype), pool.to(dtype), torch.arange(5))
        assert ranks.tolist() == [3, 3, 1, 4, 0]
        # tiny score blocks (one query at a time) give the same ranks
        assert target_ranks(queries.to(dtype), pool.to(dtype), torch.arange(5), max_block_elements=1).tolist() == [
            3,
            3,
            1,
            4,
            0,
        ]
    dist = scores_to_distances(lorentz_scores(queries[:1].double(), pool.double()))
    expected = torch.tensor(
        [[math.acosh(2), math.acosh(2), math.acosh(math.sqrt(10) - 2), math.acosh(3), 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(dist, expected, atol=1e-7, rtol=0)


def test_target_ranks_errors():
    pool = random_points(10, 4, 0)
    with pytest.raises(ValueError, match="targets must index the pool"):
        target_ranks(pool[:3], pool, torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match="dim"):
        target_ranks(pool[:3, :3], pool, torch.tensor([0, 1, 2]))


def test_chunked_topk_matches_full_sort():
    pool, queries = random_points(5000, 8, 1), random_points(50, 8, 2)
    reference = pairwise_dist(queries, pool)  # float64
    ref_dist, ref_index = reference.sort(dim=1, stable=True)
    dist, index = chunked_topk(queries, pool, k=15, chunk_size=777)
    assert torch.equal(index, ref_index[:, :15])
    torch.testing.assert_close(dist, ref_dist[:, :15], atol=1e-9, rtol=0)
    # exact duplicates in the pool: ties are ordered by index, across chunk borders too
    dup_pool = torch.cat([pool[:10], pool[:10]])
    _, index = chunked_topk(pool[:3], dup_pool, k=2, chunk_size=7)
    assert index.tolist() == [[0, 10], [1, 11], [2, 12]]
    with pytest.raises(ValueError, match="k="):
        chunked_topk(queries, pool[:5], k=6)


def test_faiss_and_brute_force_agree_exactly_on_100k_points():
    k, curv = 10, 1.3
    pool = random_points(100_000, 16, 3, scale=0.7, curv=curv)
    queries = random_points(300, 16, 4, scale=0.7, curv=curv)
    # float64 brute force reference, sorted by (score desc, index asc)
    scores64 = lorentz_scores(queries, pool, curv)
    top_scores, ref_index = scores64.topk(k + 1, dim=1)
    # Deliberate tie handling: a query whose (k+1) best float64 scores are closer than float32 can resolve
    # is ambiguous for a float32 index; require there are almost none and compare the rest exactly.
    gaps = (top_scores[:, :-1] - top_scores[:, 1:]).min(dim=1).values
    resolvable = gaps > 1e-5 * top_scores.abs().max(dim=1).values  # float32 resolves ~1e-7 relative
    assert resolvable.float().mean() > 0.98
    index = FaissLorentzIndex(pool.float(), curv)
    assert len(index) == 100_000
    dist, faiss_index = index.search(queries.float(), k)
    assert torch.equal(faiss_index[resolvable], ref_index[resolvable, :k])
    brute_dist, brute_index = chunked_topk(queries.float(), pool.float(), k, curv, chunk_size=32_768)
    assert torch.equal(brute_index[resolvable], ref_index[resolvable, :k])
    # ambiguous queries still return items whose true scores are the best k up to float32 resolution
    ambiguous = ~resolvable
    if ambiguous.any():
        got = scores64[ambiguous].gather(1, faiss_index[ambiguous])
        torch.testing.assert_close(got, top_scores[ambiguous, :k], atol=1e-4, rtol=1e-4)
    ref_dist = pairwise_dist(queries[:, None, :], pool[ref_index[:, :k]], curv)[:, 0, :]
    torch.testing.assert_close(dist[resolvable].double(), ref_dist[resolvable], atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(brute_dist[resolvable].double(), ref_dist[resolvable], atol=2e-3, rtol=1e-4)


def test_shared_product_ranks_equal_ranks_of_rescaled_queries():
    from hysac_hf.modeling.traversal import traverse

    from hysac_hf.evaluation.topk import RankRequest, shared_product_ranks

    curv = 1.7
    queries, pool = random_points(300, 8, 5, curv=curv), random_points(600, 8, 6, curv=curv)
    moved = traverse(queries, 1.0, curv, method="geodesic")
    scales = moved.norm(dim=-1) / queries.norm(dim=-1)
    targets = torch.randint(0, 300, (300,), generator=torch.Generator().manual_seed(0))
    requests = [
        RankRequest(torch.ones(300), targets),  # plain, whole pool
        RankRequest(scales, targets, block_edges=(0, 300, 600)),  # traversed, with block maxima
        RankRequest(torch.ones(300), targets + 300, start=300, stop=600),  # second block only
    ]
    (plain, none), (trav, block_max), (second, _) = shared_product_ranks(
        queries, pool, requests, curv, max_block_elements=5000
    )
    assert none is None
    assert torch.equal(plain, target_ranks(queries, pool, targets, curv))
    assert torch.equal(trav, target_ranks(moved, pool, targets, curv))
    assert torch.equal(second, target_ranks(queries, pool[300:], targets, curv))
    scores = lorentz_scores(moved, pool, curv)
    torch.testing.assert_close(block_max, torch.stack([scores[:, :300].amax(1), scores[:, 300:].amax(1)], 1))
    with pytest.raises(ValueError, match="targets must index the pool"):
        shared_product_ranks(queries, pool, [RankRequest(torch.ones(300), targets, start=300, stop=600)], curv)


def test_paired_ranks_serve_both_directions_from_one_matrix():
    x, y = random_points(40, 6, 11, curv=1.3), random_points(40, 6, 12, curv=1.3)
    y[5] = y[7]  # a tie: pessimistic in both directions
    targets = torch.arange(40)
    expected = (target_ranks(x, y, targets, 1.3), target_ranks(y, x, targets, 1.3))
    for limit in (40 * 40, 40 * 40 - 1):  # one shared matrix, and two blocked passes when it does not fit
        got = paired_ranks(x, y, 1.3, max_block_elements=limit)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert expected[0][5] >= 1 and expected[0][7] >= 1  # y_5 = y_7: each target has a tie ranked above it
    with pytest.raises(ValueError, match="as many rows"):
        paired_ranks(x, y[:-1], 1.3)
