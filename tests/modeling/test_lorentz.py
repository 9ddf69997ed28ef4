"""Lorentz geometry: properties (hypothesis), agreement with geoopt, float64 hand formulas, half precision."""

from __future__ import annotations

import math

import geoopt
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hysac_hf.modeling import lorentz as L

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
curvs = st.sampled_from([0.1, 0.5, 1.0, 2.3, 10.0])
dtypes = st.sampled_from([torch.float32, torch.float64])


def points(seed: int, n: int, dim: int, scale: float, dtype=torch.float64) -> torch.Tensor:
    """Random space components with norms spread around `scale` (log-uniform over 2 decades)."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)
    radius = scale * torch.exp(torch.empty(n, 1, dtype=torch.float64).uniform_(-2.3, 2.3, generator=g))
    return (direction * radius).to(dtype)


def np_time(x: np.ndarray, c: float) -> np.ndarray:
    return np.sqrt(1.0 / c + (x**2).sum(-1))


def np_dist(x: np.ndarray, y: np.ndarray, c: float) -> np.ndarray:
    """float64 hand formula: d = acosh(-c <x, y>_L) / sqrt(c), <x, y>_L = x_s.y_s - x_t y_t."""
    inner = x @ y.T - np.outer(np_time(x, c), np_time(y, c))
    return np.arccosh(np.maximum(-c * inner, 1.0)) / math.sqrt(c)


def manifold(c: float) -> geoopt.Lorentz:
    """geoopt's Lorentz model uses k = 1/c and full (time, space) coordinates."""
    return geoopt.Lorentz(k=torch.tensor(1.0 / c, dtype=torch.float64))


def with_time(x: torch.Tensor, c: float) -> torch.Tensor:
    return torch.cat([L.time_component(x, c), x], dim=-1)


# ------------------------------------------------------------------------------------------------------------
# Agreement with geoopt (float64, tolerance 1e-5)
@pytest.mark.parametrize("c", [0.1, 1.0, 2.3, 10.0])
def test_exp_map0_matches_geoopt(c):
    v = points(0, 64, 16, scale=0.3 / math.sqrt(c))  # radii up to 3 / sqrt(c): the constraint check stays exact
    ours = L.exp_map0(v, c)
    ref = manifold(c).expmap0(torch.nn.functional.pad(v, (1, 0)))
    torch.testing.assert_close(ours, ref[..., 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(L.time_component(ours, c), ref[..., :1], atol=1e-5, rtol=1e-5)
    assert manifold(c).check_point_on_manifold(with_time(ours, c), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("c", [0.1, 1.0, 2.3, 10.0])
def test_log_map0_matches_geoopt(c):
    x = points(1, 64, 16, scale=1.0 / math.sqrt(c))
    ours = L.log_map0(x, c)
    ref = manifold(c).logmap0(with_time(x, c))
    # geoopt returns an ambient tangent vector at the origin; its time component is 0.
    torch.testing.assert_close(ref[..., :1], torch.zeros_like(ref[..., :1]), atol=1e-8, rtol=0)
    torch.testing.assert_close(ours, ref[..., 1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("c", [0.1, 1.0, 2.3, 10.0])
def test_distances_match_geoopt(c):
    x = points(2, 32, 16, scale=1.0 / math.sqrt(c))
    y = points(3, 24, 16, scale=1.0 / math.sqrt(c))
    m = manifold(c)
    ref = m.dist(with_time(x, c)[:, None, :], with_time(y, c)[None, :, :])
    torch.testing.assert_close(L.pairwise_dist(x, y, c), ref, atol=1e-5, rtol=1e-5)
    ref_paired = m.dist(with_time(x[:24], c), with_time(y, c))
    torch.testing.assert_close(L.paired_dist(x[:24], y, c), ref_paired, atol=1e-5, rtol=1e-5)
    ref_origin = m.dist0(with_time(x, c))
    torch.testing.assert_close(L.dist_to_origin(x, c), ref_origin, atol=1e-5, rtol=1e-5)
    inner = m.inner(None, with_time(x, c)[:, None, :], with_time(y, c)[None, :, :])
    torch.testing.assert_close(L.pairwise_inner(x, y, c), inner, atol=1e-5, rtol=1e-5)


def test_half_aperture_matches_geoopt_and_hand_formula():
    # geoopt's half_aperture agrees with ours only at c = 1 (it puts sqrt(k) in the denominator; our formula: docs/method.md §2.5).
    x = points(4, 64, 8, scale=1.0)
    if hasattr(geoopt.manifolds.lorentz.math, "half_aperture"):
        ref = geoopt.manifolds.lorentz.math.half_aperture(with_time(x, 1.0), k=torch.tensor(1.0, dtype=x.dtype))
        torch.testing.assert_close(L.half_aperture(x, 1.0, eps=0.0 + 1e-12), ref.squeeze(-1), atol=1e-5, rtol=1e-5)
    for c in (0.5, 2.0):
        norm = x.norm(dim=-1).numpy()
        hand = np.arcsin(np.clip(2 * 0.1 / (math.sqrt(c) * norm + 1e-5), -1 + 1e-5, 1 - 1e-5))
        np.testing.assert_allclose(L.half_aperture(x, c).numpy(), hand, atol=1e-12)


@pytest.mark.parametrize("c", [0.5, 1.0, 3.0])
def test_oxy_angle_matches_hyperbolic_law_of_cosines(c):
    """Exterior angle at x of triangle O-x-y = pi - interior angle, from the hyperbolic law of cosines."""
    x = points(5, 48, 6, scale=1.0)
    y = points(6, 48, 6, scale=1.0)
    a = L.dist_to_origin(x, c).numpy()  # side O-x
    b = L.paired_dist(x, y, c).numpy()  # side x-y
    o = L.dist_to_origin(y, c).numpy()  # side O-y (opposite the angle at x)
    rc = math.sqrt(c)
    cos_interior = (np.cosh(rc * a) * np.cosh(rc * b) - np.cosh(rc * o)) / (np.sinh(rc * a) * np.sinh(rc * b))
    hand = math.pi - np.arccos(np.clip(cos_interior, -1, 1))
    # The formula itself, with the reference's eps=1e-5 guards switched down:
    np.testing.assert_allclose(L.oxy_angle(x, y, c, eps=1e-12).numpy(), hand, atol=1e-6)
    # and the reference eps moves it by less than 1e-3 rad on these points.
    np.testing.assert_allclose(L.oxy_angle(x, y, c).numpy(), hand, atol=1e-3)


def test_pairwise_dist_matches_float64_hand_formula():
    x, y = points(7, 20, 12, 0.7), points(8, 30, 12, 0.7)
    for c in (0.3, 1.0, 4.0):
        np.testing.assert_allclose(L.pairwise_dist(x, y, c).numpy(), np_dist(x.numpy(), y.numpy(), c), atol=1e-10)


def test_mips_reduction_ranks_like_distance():
    x, y = points(9, 16, 10, 1.0), points(10, 500, 10, 1.0)
    c = 1.7
    scores = L.mips_query_vectors(x, c) @ L.mips_pool_vectors(y, c).T
    torch.testing.assert_close(scores, L.pairwise_inner(x, y, c))
    assert torch.equal(scores.argsort(dim=1, descending=True)[:, :5], L.pairwise_dist(x, y, c).argsort(dim=1)[:, :5])


# ------------------------------------------------------------------------------------------------------------
# Properties (hypothesis), float32 and float64
@SETTINGS
@given(seed=st.integers(0, 10_000), c=curvs, dtype=dtypes, scale=st.floats(0.05, 3.0))
def test_distance_axioms(seed, c, dtype, scale):
    x, y, z = (points(seed + i, 6, 5, scale / math.sqrt(c), dtype) for i in range(3))
    d_xy = L.pairwise_dist(x, y, c)
    tol = 1e-9 if dtype == torch.float64 else 2e-3
    assert (d_xy >= 0).all()
    torch.testing.assert_close(d_xy, L.pairwise_dist(y, x, c).T, atol=tol, rtol=1e-5)
    # paired_dist is exact at x = x; the matrix form carries acosh rounding near 1.
    assert (L.paired_dist(x, x, c) == 0).all()
    diag = torch.diagonal(L.pairwise_dist(x, x, c))
    if dtype == torch.float64:  # the reference clamp acosh(max(., 1 + 1e-8)) is the only error left
        bound = math.acosh(1 + 1e-8) / math.sqrt(c) + 1e-9
    else:  # float32 rounding of c * x_t^2 - c * ||x||^2 ~ 1e-7 * (1 + c ||x||^2), through acosh near 1
        bound = 3 * math.sqrt(2 * 1.2e-7 * (1 + c * float(x.double().norm(dim=-1).max()) ** 2)) / math.sqrt(c)
    assert diag.max() <= bound
    # triangle inequality, row-wise
    d_xz, d_zy, d_xy_rows = L.paired_dist(x, z, c), L.paired_dist(z, y, c), L.paired_dist(x, y, c)
    assert (d_xy_rows <= d_xz + d_zy + tol).all()
    torch.testing.assert_close(d_xy_rows, torch.diagonal(d_xy), atol=tol * 10, rtol=1e-4)


@SETTINGS
@given(seed=st.integers(0, 10_000), c=curvs, dtype=dtypes, log_norm=st.floats(-6.0, math.log10(8.0)))
def test_log_exp_round_trip(seed, c, dtype, log_norm):
    v = points(seed, 8, 7, 1.0, torch.float64)
    v = (torch.nn.functional.normalize(v, dim=-1) * (10**log_norm) / math.sqrt(c)).to(dtype)
    back = L.log_map0(L.exp_map0(v, c), c)
    assert back.dtype == dtype
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(back, v, rtol=rtol, atol=rtol * float(v.abs().max()))
    torch.testing.assert_close(L.dist_to_origin(L.exp_map0(v, c), c), v.norm(dim=-1), rtol=rtol * 5, atol=1e-12)


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    c=curvs,
    log_norm=st.floats(-8.0, 4.0),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
)
def test_no_nan_or_inf_for_extreme_norms_and_half_precision(seed, c, log_norm, dtype):
    v = torch.nn.functional.normalize(points(seed, 4, 6, 1.0), dim=-1) * 10**log_norm
    v = v.to(dtype)
    x = L.exp_map0(v, c)
    assert x.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    outputs = [
        x,
        L.log_map0(x, c),
        L.pairwise_dist(x, x.flip(0), c),
        L.paired_dist(x, x.flip(0), c),
        L.dist_to_origin(x, c),
        L.half_aperture(x, c),
        L.oxy_angle(x, x.flip(0), c),
        L.pairwise_inner(x, x, c),
    ]
    for out in outputs:
        assert torch.isfinite(out).all(), out


def test_half_precision_inputs_are_computed_in_float32():
    v = points(11, 16, 32, 0.8, torch.float32)
    ref = L.exp_map0(v.half().float(), 1.3)
    half = L.exp_map0(v.half(), 1.3)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, ref, atol=0, rtol=0)  # identical: the math itself never ran in fp16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = L.pairwise_dist(ref, ref.flip(0), 1.3)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, L.pairwise_dist(ref, ref.flip(0), 1.3), atol=0, rtol=0)


def test_functions_do_not_modify_inputs_and_keep_batch_shapes():
    x = points(12, 5, 4, 1.0, torch.float32)
    before = x.clone()
    assert L.exp_map0(x).shape == (5, 4)
    assert L.pairwise_dist(x, x[:3]).shape == (5, 3)
    assert L.dist_to_origin(x).shape == (5,)
    assert L.half_aperture(x).shape == (5,)
    assert L.oxy_angle(x, x.flip(0)).shape == (5,)
    assert L.exp_map0(x[None]).shape == (1, 5, 4)  # arbitrary leading dims for the element-wise functions
    assert torch.equal(x, before)


def test_gradients_are_finite_at_and_near_the_origin():
    v = torch.tensor([[0.0, 0.0, 0.0], [1e-9, 0.0, 0.0], [0.3, -0.2, 0.1]], requires_grad=True)
    x = L.exp_map0(v, 1.0)
    (L.dist_to_origin(x, 1.0).sum() + L.half_aperture(x).sum() + L.log_map0(x).sum()).backward()
    assert torch.isfinite(v.grad).all()


# ------------------------------------------------------------------------------------------------------------
# The precision policy: one decorator (issue 11)
def test_full_precision_upcasts_half_keeps_float64_and_disables_autocast():
    seen = []

    @L.full_precision
    def probe(x, y=None, curvature=1.0, eps=1e-8):
        """Docstring kept."""
        seen.append((x.dtype, None if y is None else y.dtype, curvature, eps, torch.is_autocast_enabled("cpu")))
        return x @ x.T  # a matmul: autocast would run it in bf16

    x = torch.randn(4, 3)
    for dtype in (torch.float16, torch.bfloat16):
        out = probe(x.to(dtype), y=x.to(dtype))
        assert out.dtype == torch.float32 and seen[-1][:2] == (torch.float32, torch.float32)
    out = probe(x.double(), x.half())
    assert out.dtype == torch.float64 and seen[-1][:2] == (torch.float64, torch.float64)
    # curvature does not decide the compute dtype (points do) but is cast to it; plain numbers pass unchanged
    probe(x.half(), curvature=torch.tensor(2.0, dtype=torch.float64), eps=1e-3)
    assert seen[-1][0] == torch.float32 and seen[-1][2].dtype == torch.float32 and seen[-1][3] == 1e-3
    probe(x, curvature=2.5)
    assert seen[-1][2] == 2.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
        out = probe(x)
        assert torch.is_autocast_enabled("cpu")  # restored after the call
    assert seen[-1][4] is False and out.dtype == torch.float32
    torch.testing.assert_close(out, x @ x.T, rtol=0, atol=0)
    probe(x.half(), y=torch.arange(3))  # integer tensors are left alone
    assert seen[-1][:2] == (torch.float32, torch.int64)
    assert probe.__name__ == "probe" and probe.__doc__ == "Docstring kept."


def test_every_geometry_function_uses_the_decorator_and_takes_curvature_by_name():
    import inspect

    for name in L.__all__:
        if name in ("autocast_disabled", "full_precision"):
            continue
        function = getattr(L, name)
        assert hasattr(function, "__wrapped__"), name  # functools.wraps of full_precision
        assert "curvature" in inspect.signature(function).parameters, name
    x = points(13, 5, 4, 0.5, torch.float32)
    torch.testing.assert_close(L.exp_map0(x, curvature=2.0), L.exp_map0(x, 2.0), rtol=0, atol=0)
    torch.testing.assert_close(L.pairwise_dist(x, x, curvature=2.0), L.pairwise_dist(x, x, 2.0), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------
# Formulas used only while the legacy (TorchScript) ONNX exporter traces (it has no sinh/asinh/acosh)
@pytest.mark.parametrize(
    "function, reference, grid",
    [
        ("_sinh", torch.sinh, torch.logspace(-8, math.log10(L.MAX_SINH_INPUT), 100_000)),
        ("_asinh", torch.asinh, torch.cat([torch.logspace(-8, 5, 100_000), -torch.logspace(-8, 5, 1_000)])),
        ("_acosh", torch.acosh, torch.cat([1 + torch.arange(0, 4096) * 2.0**-23, torch.logspace(0, 9, 100_000)])),
    ],
)
def test_legacy_onnx_formulas_keep_float32_accuracy(monkeypatch, function, reference, grid):
    x = grid.float()
    exact = reference(x.double())
    native_error = ((reference(x).double() - exact).abs() / exact.abs().clamp(min=1e-300)).max().item()
    monkeypatch.setattr(L, "_in_legacy_onnx_export", lambda: True)
    ours = getattr(L, function)(x)
    assert ours.dtype == torch.float32
    rel = (ours.double() - exact).abs() / exact.abs().clamp(min=1e-300)
    rel = torch.where(exact == 0, (ours.double() - exact).abs(), rel)  # acosh(1) = 0 exactly
    assert rel.max().item() < 3e-7, (rel.max().item(), native_error)  # ~2 ulp; torch's own ops are at ~1 ulp
    monkeypatch.setattr(L, "_in_legacy_onnx_export", lambda: False)
    assert torch.equal(getattr(L, function)(x), reference(x))  # eager: the torch op itself
