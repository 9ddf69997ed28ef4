"""Safety traversal and unsafe classification: the batched code against the authors' per-sample rule."""

from __future__ import annotations

import math

import pytest
import torch
from hysac_hf.modeling.lorentz import dist_to_origin, exp_map0
from hysac_hf.modeling.traversal import traversal_threshold, traverse

from hysac_hf.testing import TINY_BOUNDS

CURV = 1.7
ALPHA = 0.8


def authors_threshold(b: float, c: float, alpha: float = ALPHA) -> float:
    """Method doc §3.5 step 3: b' = b + (tanh((b - alpha) / c) + 1), c = curv.exp() (not its square root)."""
    return b + (math.tanh((b - alpha) / c) + 1)


def authors_rule(rows: list[list[float]], b: float, c: float, lower: bool = False) -> list[list[float]]:
    """The authors' traversal, one embedding at a time (docs/method.md §5.3-§5.5, with the lower-bound branch of their evaluation).

    d = pairwise_dist(root, emb) = acosh(-c <0, x>_L) / sqrt(c) = acosh(sqrt(c) x_t) / sqrt(c);
    upper: if d > b' return emb / ||emb||_2 * b' else emb; lower: if d < b' return root + b' dir / ||dir||_2.
    """
    threshold = authors_threshold(b, c)
    out = []
    for emb in rows:
        sq = sum(v * v for v in emb)
        x_time = math.sqrt(1 / c + sq)
        d = math.acosh(max(math.sqrt(c) * x_time, 1.0)) / math.sqrt(c)
        norm = math.sqrt(sq)
        moves = d < threshold if lower else d > threshold
        out.append([v / norm * threshold for v in emb] if moves and norm > 0 else list(emb))
    return out


def hyperboloid_points(n: int, dim: int = 32, seed: int = 0, spread: float = 1.0) -> torch.Tensor:
    """Random points whose distances to the root spread across the traversal thresholds (0.3 to ~4)."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(n, dim, generator=g, dtype=torch.float64)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    radii = 0.3 + spread * 3.5 * torch.rand(n, 1, generator=g, dtype=torch.float64)  # tangent norm = distance
    return exp_map0(directions * radii, CURV)


def away_from_threshold(points: torch.Tensor, threshold: float, margin: float = 1e-6) -> torch.Tensor:
    """Drop rows whose distance is within `margin` of the threshold (the comparison is float-ambiguous there)."""
    keep = (dist_to_origin(points, CURV) - threshold).abs() > margin
    return points[keep]


@pytest.mark.parametrize("b", [0.45, 0.7, 1.2])
@pytest.mark.parametrize("lower", [False, True])
def test_reference_equals_authors_rule_row_for_row(b, lower):
    points = away_from_threshold(hyperboloid_points(300), authors_threshold(b, CURV))
    expected = torch.tensor(authors_rule(points.tolist(), b, CURV, lower=lower), dtype=torch.float64)
    threshold = traversal_threshold(b, CURV, ALPHA).double()
    got = traverse(points, threshold, CURV, method="reference", direction="outward" if lower else "inward")
    moved = (expected != points).any(dim=1)
    assert 0 < int(moved.sum()) < points.shape[0]  # both branches are exercised
    assert torch.equal((got != points).any(dim=1), moved)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    # float32 inputs follow the same rule within float32 rounding
    got32 = traverse(
        points.float(),
        traversal_threshold(b, CURV, ALPHA),
        CURV,
        method="reference",
        direction="outward" if lower else "inward",
    )
    torch.testing.assert_close(got32.double(), expected, rtol=2e-6, atol=1e-6)


def test_threshold_divides_by_curvature_not_its_root():
    b = TINY_BOUNDS["V"]["up_95"]
    expected = b + math.tanh((b - ALPHA) / CURV) + 1
    assert traversal_threshold(b, CURV, ALPHA).item() == pytest.approx(expected, abs=1e-6)
    assert abs(expected - (b + math.tanh((b - ALPHA) / math.sqrt(CURV)) + 1)) > 1e-3  # the two readings differ


def test_model_reference_traversal_matches_authors_rule(hysac):
    curv = hysac.curvature.item()
    assert curv == pytest.approx(CURV)
    for target, key in (("image", "V"), ("text", "S"), ("U", "U")):
        b = TINY_BOUNDS[key]["up_95"]
        points = away_from_threshold(hyperboloid_points(200, seed=1), authors_threshold(b, curv)).float()
        expected = torch.tensor(authors_rule(points.double().tolist(), b, curv), dtype=torch.float64)
        got = hysac.traverse_to_safe(points, target=target)
        torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=1e-6)
        assert hysac.traversal_threshold(target).item() == pytest.approx(authors_threshold(b, curv), abs=1e-6)
    # the "avg" statistic and the outward variant through the model
    b = TINY_BOUNDS["G"]["avg"]
    points = away_from_threshold(hyperboloid_points(200, seed=2), authors_threshold(b, curv)).float()
    expected = torch.tensor(authors_rule(points.double().tolist(), b, curv, lower=True), dtype=torch.float64)
    got = hysac.traverse_to_safe(points, target="G", bound="avg", direction="outward")
    torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("direction", ["inward", "outward"])
def test_geodesic_lands_on_bound_and_keeps_direction(hysac, direction):
    points = hyperboloid_points(400, seed=3).float()
    threshold = hysac.traversal_threshold("image").item()
    before = dist_to_origin(points, CURV)
    got = hysac.traverse_to_safe(points, target="image", method="geodesic", direction=direction)
    after = dist_to_origin(got.double(), CURV)
    moved = before > threshold if direction == "inward" else before < threshold
    assert 0 < int(moved.sum()) < points.shape[0]
    assert (after[moved] - threshold).abs().max().item() < 1e-5
    cosine = torch.nn.functional.cosine_similarity(got[moved].double(), points[moved].double(), dim=-1)
    assert (cosine - 1).abs().max().item() < 1e-6
    assert torch.equal(got[~moved], points[~moved])  # untouched rows, bit for bit
    # the reference overshoots: its landing distance is asinh(sqrt(c) b') / sqrt(c), below b'
    if direction == "inward":
        ref = hysac.traverse_to_safe(points, target="image", method="reference")
        landing = dist_to_origin(ref[moved].double(), CURV)
        expected = math.asinh(math.sqrt(CURV) * threshold) / math.sqrt(CURV)
        assert (landing - expected).abs().max().item() < 1e-5 and expected < threshold - 0.1


def test_rows_within_bound_are_untouched_bitwise(hysac):
    points = hyperboloid_points(100, seed=4, spread=0.05).float()  # distances 0.3..0.48, all inside V's b'
    assert (dist_to_origin(points, CURV) < hysac.traversal_threshold("image")).all()
    for method in ("reference", "geodesic"):
        out = hysac.traverse_to_safe(points, target="image", method=method)
        assert torch.equal(out, points) and out.data_ptr() != points.data_ptr()


def test_empty_batch_and_fp16(hysac):
    empty = torch.zeros(0, hysac.config.projection_dim)
    for method in ("reference", "geodesic"):
        out = hysac.traverse_to_safe(empty, method=method)
        assert out.shape == (0, hysac.config.projection_dim)
    points = hyperboloid_points(64, seed=5).float()
    half = points.half()
    for method in ("reference", "geodesic"):
        out = hysac.traverse_to_safe(half, target="image", method=method)
        assert out.dtype == torch.float16 and torch.isfinite(out).all()
        ref32 = hysac.traverse_to_safe(half.float(), target="image", method=method)
        torch.testing.assert_close(out.float(), ref32.half().float(), rtol=0, atol=0)
    assert hysac.distance_to_root(half).dtype == torch.float32


def test_clear_errors(hysac):
    points = hyperboloid_points(4).float()
    hysac.config.bounds = None
    with pytest.raises(ValueError, match="no calibrated bounds"):
        hysac.traverse_to_safe(points)
    with pytest.raises(ValueError, match="shape"):
        hysac.traverse_to_safe(points[:, :5])
    with pytest.raises(ValueError, match="method"):
        hysac.traverse_to_safe(points, method="euclid")
    with pytest.raises(ValueError, match="target"):
        hysac.traversal_threshold("audio")


def test_distance_to_root_and_classification(hysac):
    points = hyperboloid_points(50, seed=6).float()
    c = hysac.curvature.item()
    expected = torch.tensor(
        [
            math.asinh(math.sqrt(c) * math.sqrt(sum(v * v for v in row))) / math.sqrt(c)
            for row in points.double().tolist()
        ],
        dtype=torch.float64,
    )
    score = hysac.distance_to_root(points)
    torch.testing.assert_close(score.double(), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="no calibrated unsafe threshold"):
        hysac.classify_unsafe(points)
    threshold = float(expected.median())
    assert torch.equal(hysac.classify_unsafe(points, threshold=threshold), score > threshold)
    hysac.config.unsafe_thresholds = {"image": threshold, "text": 0.1}
    assert torch.equal(hysac.classify_unsafe(points), score > threshold)
    assert hysac.classify_unsafe(points, modality="text").all()
    with pytest.raises(ValueError, match="modality"):
        hysac.classify_unsafe(points, modality="audio")
