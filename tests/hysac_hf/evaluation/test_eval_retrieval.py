"""Tables 1/2 retrieval protocol: hand-made embeddings with known R@K (ties included) and an independent
per-query loop in the authors' style (traversal per sample, distances, pessimistic rank)."""

from __future__ import annotations

import math

import pytest
import torch
from hysac_hf.modeling.lorentz import exp_map0

from hysac_hf.encode import EmbeddingCache
from hysac_hf.evaluation.retrieval import TASKS, evaluate_retrieval, results_to_markdown
from hysac_hf.testing import TINY_BOUNDS


def cache_of(S=None, V=None, U=None, G=None, curvature=1.0, bounds=None, tags=None) -> EmbeddingCache:
    embeds = {
        k: torch.as_tensor(v, dtype=torch.float32) for k, v in {"S": S, "V": V, "U": U, "G": G}.items() if v is not None
    }
    return EmbeddingCache(embeds=embeds, curvature=curvature, bounds=bounds, tags=tags)


def test_plain_task_hand_made_with_ties():
    # query q = (1, 0) five times, target i = pool item i; see test_eval_topk for the distances.
    # Pessimistic ranks 3, 3, 1, 4, 0 -> R@1 20 %, R@2 40 %, R@3 40 %, R@4 80 %, R@5 100 %.
    pool = [[0.0, 1.0], [0.0, -1.0], [2.0, 0.0], [-1.0, 0.0], [1.0, 0.0]]
    cache = cache_of(S=[[1.0, 0.0]] * 5, V=pool)
    res = evaluate_retrieval(cache, tasks=["T->I"], ks=[1, 2, 3, 4, 5])
    assert res["tasks"]["T->I"] == {"R@1": 20.0, "R@2": 40.0, "R@3": 40.0, "R@4": 80.0, "R@5": 100.0, "num_queries": 5}
    # I->T: each safe image queries the texts (all equal to q): every text is tied with the target -> rank 4
    res = evaluate_retrieval(cache, tasks=["I->T"], ks=[1, 4, 5])
    assert (
        res["tasks"]["I->T"]["R@1"] == 0.0
        and res["tasks"]["I->T"]["R@4"] == 0.0
        and res["tasks"]["I->T"]["R@5"] == 100.0
    )


def test_union_task_hand_made_safe_rate_and_tie():
    # U0 = (1, 0) is equidistant (identical) to its target V0 and to G0: rank 1, and the top-1 tie counts unsafe.
    # U1 = (0, 3): -<U1, y>_L = sqrt(10) sqrt(2) - 3 = 1.47 for V1 = (0, 1), 4.47 for V0 and G0, 10 for G1 = (3, 0):
    # rank 0 and a safe top-1. So R@1 = 50 %, R@2 = 100 %, safe rate = 50 %.
    cache = cache_of(
        S=[[0.5, 0.0], [0.0, 0.5]], V=[[1.0, 0.0], [0.0, 1.0]], U=[[1.0, 0.0], [0.0, 3.0]], G=[[1.0, 0.0], [3.0, 0.0]]
    )
    res = evaluate_retrieval(cache, tasks=["T*->IuI*", "T*->I*uI"], ks=[1, 2, 3], use_traversal=False)
    assert res["tasks"]["T*->IuI*"] == {"R@1": 50.0, "R@2": 100.0, "R@3": 100.0, "safe_rate": 50.0, "num_queries": 2}
    # T*->I*uI: pool [G ; V], target G_i. U0: G0 tied with V0 -> rank 1, top-1 tie -> unsafe.
    # U1 = (0, 3): G1 = (3, 0) scores 10, worse than V1 (1.47), V0 and G0 (4.47) -> rank 3; top-1 V1 safe.
    assert res["tasks"]["T*->I*uI"] == {"R@1": 0.0, "R@2": 50.0, "R@3": 50.0, "safe_rate": 50.0, "num_queries": 2}


def authors_traverse(emb: list[float], b: float, c: float, alpha: float, lower: bool) -> list[float]:
    threshold = b + math.tanh((b - alpha) / c) + 1
    norm = math.sqrt(sum(v * v for v in emb))
    d = math.asinh(math.sqrt(c) * norm) / math.sqrt(c)
    if (d < threshold) if lower else (d > threshold):
        return [v / norm * threshold for v in emb]
    return emb


def loop_recall(cache: EmbeddingCache, task_name: str, ks, bound: str) -> dict:
    """Per-query loop as in the authors' evaluation: traverse one query, rank the pool by distance."""
    task = TASKS[task_name]
    pool = torch.cat([cache.embeds[k].double() for k in task.pool])
    c = cache.curvature
    pool_time = torch.sqrt(1 / c + pool.pow(2).sum(-1))
    hits = {k: 0 for k in ks}
    safe = 0
    n = cache.num_rows
    for i in range(n):
        q = cache.embeds[task.query][i].double().tolist()
        if task.traversal_key is not None:
            q = authors_traverse(
                q, cache.bounds[task.traversal_key][bound], c, cache.traversal_offset, task.direction == "outward"
            )
        q = torch.tensor(q, dtype=torch.float64)
        q_time = math.sqrt(1 / c + float(q.pow(2).sum()))
        dist = torch.acosh((c * (q_time * pool_time - pool @ q)).clamp(min=1)) / math.sqrt(c)
        rank = int((dist <= dist[i]).sum()) - 1
        for k in ks:
            hits[k] += rank < k
        if task.safe_block is not None:
            half = cache.num_rows
            safe_part = dist[:half] if task.safe_block == 0 else dist[half:]
            other = dist[half:] if task.safe_block == 0 else dist[:half]
            safe += bool(safe_part.min() < other.min())
    row = {f"R@{k}": 100.0 * hits[k] / n for k in ks}
    if task.safe_block is not None:
        row["safe_rate"] = 100.0 * safe / n
    return row


@pytest.mark.parametrize("bound", ["up_95", "avg"])
def test_all_eight_tasks_match_a_per_query_loop(bound):
    n, dim, curv = 120, 6, 1.7
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, dim, generator=g, dtype=torch.float64)
    # safe text < safe image < unsafe text < unsafe image in radius, paired items share a direction
    radii = {"S": 0.4, "V": 0.7, "U": 1.0, "G": 1.3}
    embeds = {
        k: exp_map0(
            (base + 0.6 * torch.randn(n, dim, generator=g, dtype=torch.float64)) / math.sqrt(dim) * r * 2.0, curv
        )
        for k, r in radii.items()
    }
    tags = [["hate", "violence", "sexual"][i % 3] for i in range(n)]
    cache = EmbeddingCache(embeds=embeds, curvature=curv, bounds=TINY_BOUNDS, traversal_offset=0.8, tags=tags)
    ks = [1, 5, 10, 20]
    res = evaluate_retrieval(cache, ks=ks, bound=bound, dtype=torch.float64)
    assert list(res["tasks"]) == list(TASKS)
    for name in TASKS:
        expected = loop_recall(cache, name, ks, bound)
        got = {k: v for k, v in res["tasks"][name].items() if k != "num_queries"}
        assert got == pytest.approx(expected, abs=1e-9), name
    # the traversal changes the union tasks (the test data has rows beyond the bounds)
    off = evaluate_retrieval(cache, ks=ks, use_traversal=False, dtype=torch.float64)
    assert any(off["tasks"][t] != res["tasks"][t] for t in ("T*->IuI*", "I*->TuT*", "T*->I*uI", "I*->T*uT"))
    for t in ("T->I", "I->T", "T*->I*", "I*->T*"):
        assert off["tasks"][t] == res["tasks"][t]
    # per-tag breakdown: hits averaged over each tag's queries, weighted back to the overall number
    per_tag = res["per_tag"]
    assert sorted(per_tag) == ["hate", "sexual", "violence"]
    for name in TASKS:
        weighted = sum(per_tag[t][name]["R@5"] * per_tag[t][name]["num_queries"] for t in per_tag) / n
        assert weighted == pytest.approx(res["tasks"][name]["R@5"])
    md = results_to_markdown(res)
    assert "| T*->IuI* | 1 |" in md and "| hate | 40 |" in md


def test_float32_default_matches_float64_on_well_separated_data():
    g = torch.Generator().manual_seed(1)
    embeds = {k: exp_map0(torch.randn(200, 16, generator=g) * s, 1.0) for k, s in zip("SVUG", (0.3, 0.5, 0.7, 0.9))}
    cache = EmbeddingCache(embeds=embeds, curvature=1.0, bounds=TINY_BOUNDS)
    r32 = evaluate_retrieval(cache, method="geodesic")
    r64 = evaluate_retrieval(cache, method="geodesic", dtype=torch.float64)
    assert r32["tasks"] == r64["tasks"]


def test_clear_errors():
    cache = cache_of(S=[[0.1, 0.0]], U=[[0.5, 0.5]])
    with pytest.raises(ValueError, match="no V = safe image"):
        evaluate_retrieval(cache, tasks=["T->I"])
    with pytest.raises(ValueError, match="unknown retrieval tasks"):
        evaluate_retrieval(cache, tasks=["T->X"])
    cache = cache_of(S=[[0.1, 0.0]], V=[[0.2, 0.0]], U=[[0.5, 0.5]], G=[[0.9, 0.1]])
    with pytest.raises(ValueError, match="no bounds"):
        evaluate_retrieval(cache, tasks=["T*->IuI*"])
    with pytest.raises(ValueError, match="same N"):
        cache_of(S=[[0.1, 0.0]], V=[[0.2, 0.0], [0.3, 0.0]])
