"""Lorentz (hyperboloid) geometry for HySAC.

Convention: every function takes and returns the *space components* ``x_s`` of points on the hyperboloid
``{x : <x, x>_L = -1/c, x_t > 0}`` of curvature ``-c`` (``c > 0``). The time component is never stored; it
follows from the constraint as ``x_t = sqrt(1/c + ||x_s||^2)``. The origin ("root") is ``x_s = 0``.

Numerics: all math runs in float32 (float64 stays float64) with autocast disabled, so fp16/bf16 inputs and
mixed-precision training never evaluate ``sinh``/``acosh`` in half precision. Results are returned in that
compute dtype; callers that need the input dtype cast back themselves.

The clamps follow the authors' released code (``eps`` values in each docstring); each one is commented.
This file ships to the Hub as remote code: torch only.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = [
    "time_component",
    "exp_map0",
    "log_map0",
    "pairwise_inner",
    "pairwise_dist",
    "paired_dist",
    "dist_to_origin",
    "half_aperture",
    "oxy_angle",
    "mips_query_vectors",
    "mips_pool_vectors",
]

# sinh(asinh(2**15)) = 2**15: the largest space-component norm exp_map0 produces, representable in fp16.
MAX_SINH_INPUT = math.asinh(2**15)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@contextmanager
def _full_precision(device: torch.device):
    """Disable autocast so that the hyperbolic math is not silently re-run in half precision."""
    if device.type in ("cpu", "cuda", "xpu", "mps"):
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:  # pragma: no cover - meta and exotic devices have no autocast
        yield


def _curv(curv: float | Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(curv, dtype=like.dtype, device=like.device)


def time_component(x: Tensor, curv: float | Tensor = 1.0) -> Tensor:
    """Time component of hyperboloid points.

    Args:
        x: `(..., D)` space components.
        curv: positive curvature magnitude `c`.
    Returns:
        `(..., 1)` time components `sqrt(1/c + ||x||^2)`, > 0.
    """
    with _full_precision(x.device):
        x = x.to(_compute_dtype(x))
        c = _curv(curv, x)
        return torch.sqrt(1.0 / c + x.pow(2).sum(dim=-1, keepdim=True))


def exp_map0(v: Tensor, curv: float | Tensor = 1.0, eps: float = 1e-8) -> Tensor:
    """Exponential map at the origin: lift a tangent vector onto the hyperboloid.

    ``exp_0(v) = sinh(sqrt(c) ||v||) v / (sqrt(c) ||v||)``.

    Args:
        v: `(..., D)` tangent vectors at the origin (Euclidean).
        curv: positive curvature magnitude `c`.
        eps: lower clamp of `sqrt(c)||v||` (reference: 1e-8).
    Returns:
        `(..., D)` space components, float32 (float64 for float64 input).
    """
    with _full_precision(v.device):
        v = v.to(_compute_dtype(v))
        c = _curv(curv, v)
        rc_norm = torch.sqrt(c) * v.norm(dim=-1, keepdim=True)
        # Lower clamp: avoid 0/0 at v = 0 (sinh(z)/z -> 1). Upper clamp: keep sinh finite and fp16-representable.
        sinh_input = rc_norm.clamp(min=eps, max=MAX_SINH_INPUT)
        return torch.sinh(sinh_input) * v / rc_norm.clamp(min=eps)


def log_map0(x: Tensor, curv: float | Tensor = 1.0, eps: float = 1e-8) -> Tensor:
    """Logarithmic map at the origin: the inverse of :func:`exp_map0`.

    ``log_0(x) = asinh(sqrt(c) ||x||) x / (sqrt(c) ||x||)``; ``asinh(sqrt(c)||x||)/sqrt(c)`` is the geodesic
    distance to the origin. Written with ``asinh`` rather than the reference's ``acosh(sqrt(c) x_t)``, which
    loses all precision near the origin in float32 (it needs a 1e-5 clamp that floors the result at 4.5e-3).

    Args:
        x: `(..., D)` space components.
        curv: positive curvature magnitude `c`.
        eps: lower clamp of `sqrt(c)||x||`, guards the division at the origin.
    Returns:
        `(..., D)` tangent vectors at the origin.
    """
    with _full_precision(x.device):
        x = x.to(_compute_dtype(x))
        c = _curv(curv, x)
        rc_norm = (torch.sqrt(c) * x.norm(dim=-1, keepdim=True)).clamp(min=eps)  # asinh(z)/z -> 1 at 0
        return torch.asinh(rc_norm) * x / rc_norm


def pairwise_inner(x: Tensor, y: Tensor, curv: float | Tensor = 1.0) -> Tensor:
    """Lorentzian inner product between every pair of points.

    ``<x, y>_L = x_s . y_s - x_t y_t``.

    Args:
        x: `(B1, D)` space components.
        y: `(B2, D)` space components.
        curv: positive curvature magnitude `c`.
    Returns:
        `(B1, B2)` inner products, <= -1/c.
    """
    with _full_precision(x.device):
        dtype = _compute_dtype(x, y)
        x, y = x.to(dtype), y.to(dtype)
        x_time = time_component(x, curv)
        y_time = time_component(y, curv)
        return x @ y.transpose(-1, -2) - x_time @ y_time.transpose(-1, -2)


def pairwise_dist(x: Tensor, y: Tensor, curv: float | Tensor = 1.0, eps: float = 1e-8) -> Tensor:
    """Geodesic distance between every pair of points (one matrix product; use for retrieval).

    ``d(x, y) = acosh(-c <x, y>_L) / sqrt(c)``.

    Args:
        x: `(B1, D)` space components.
        y: `(B2, D)` space components.
        curv: positive curvature magnitude `c`.
        eps: the acosh argument is clamped to `>= 1 + eps` (reference: 1e-8; a no-op in float32).
    Returns:
        `(B1, B2)` distances, >= 0. Near-coincident points carry float rounding of order
        `sqrt(2 * 1e-7 * c * ||x||^2)` in float32; :func:`paired_dist` is exact there.
    """
    with _full_precision(x.device):
        dtype = _compute_dtype(x, y)
        c = _curv(curv, x.to(dtype))
        # acosh is only defined on [1, inf); rounding can push -c<x,y>_L slightly below 1 for x ~ y.
        arg = (-c * pairwise_inner(x, y, curv)).clamp(min=1 + eps)
        return torch.acosh(arg) / torch.sqrt(c)


def paired_dist(x: Tensor, y: Tensor, curv: float | Tensor = 1.0) -> Tensor:
    """Geodesic distance between matching rows (the diagonal of :func:`pairwise_dist`, without the matrix).

    Uses the Lorentzian chord ``||x - y||_L^2 = ||x_s - y_s||^2 - (x_t - y_t)^2`` and
    ``d = 2 asinh(sqrt(c) ||x - y||_L / 2) / sqrt(c)``, which is exact for coincident points (d(x, x) = 0).

    Args:
        x: `(..., D)` space components.
        y: `(..., D)` space components, broadcastable with `x`.
        curv: positive curvature magnitude `c`.
    Returns:
        `(...)` distances, >= 0.
    """
    with _full_precision(x.device):
        dtype = _compute_dtype(x, y)
        x, y = x.to(dtype), y.to(dtype)
        c = _curv(curv, x)
        x_time = time_component(x, curv).squeeze(-1)
        y_time = time_component(y, curv).squeeze(-1)
        # x_t - y_t = (||x||^2 - ||y||^2) / (x_t + y_t) = ((x - y).(x + y)) / (x_t + y_t): no cancellation.
        time_diff = ((x - y) * (x + y)).sum(dim=-1) / (x_time + y_time)
        chord_sq = ((x - y).pow(2).sum(dim=-1) - time_diff.pow(2)).clamp(min=0)  # >= 0 in exact arithmetic
        return 2 * torch.asinh(torch.sqrt(c * chord_sq) / 2) / torch.sqrt(c)


def dist_to_origin(x: Tensor, curv: float | Tensor = 1.0) -> Tensor:
    """Geodesic distance from the origin ("root") of the hyperboloid.

    ``d(0, x) = asinh(sqrt(c) ||x_s||) / sqrt(c)``: exact, no clamp needed.

    Args:
        x: `(..., D)` space components.
        curv: positive curvature magnitude `c`.
    Returns:
        `(...)` distances, >= 0.
    """
    with _full_precision(x.device):
        x = x.to(_compute_dtype(x))
        c = _curv(curv, x)
        return torch.asinh(torch.sqrt(c) * x.norm(dim=-1)) / torch.sqrt(c)


def half_aperture(x: Tensor, curv: float | Tensor = 1.0, min_radius: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Half-aperture of the entailment cone rooted at each point.

    ``omega(x) = asin(2 K / (sqrt(c) ||x_s||))`` with ``K = min_radius``.

    Args:
        x: `(..., D)` space components.
        curv: positive curvature magnitude `c`.
        min_radius: `K`; points within this radius of the origin get the widest cone.
        eps: added to the denominator (no division by zero at the origin) and used to keep the asin
            argument inside `(-1 + eps, 1 - eps)` (its derivative is infinite at +-1). Reference: 1e-5.
    Returns:
        `(...)` half-apertures in `(0, pi/2)`.
    """
    with _full_precision(x.device):
        x = x.to(_compute_dtype(x))
        c = _curv(curv, x)
        ratio = 2 * min_radius / (torch.sqrt(c) * x.norm(dim=-1) + eps)
        return torch.asin(ratio.clamp(min=-1 + eps, max=1 - eps))


def oxy_angle(x: Tensor, y: Tensor, curv: float | Tensor = 1.0, eps: float = 1e-5) -> Tensor:
    """Exterior angle at `x` of the geodesic triangle origin-`x`-`y`, row by row.

    It is the angle between the geodesic from `x` to `y` and the extension of the geodesic from the origin
    through `x`; `y` lies inside the entailment cone of `x` when it is below ``half_aperture(x)``. From the
    hyperbolic law of cosines:
    ``cos = (y_t + c <x, y>_L x_t) / (||x_s|| sqrt((c <x, y>_L)^2 - 1))``.

    Args:
        x: `(B, D)` space components (the cone apex; the more general concept).
        y: `(B, D)` space components (the more specific concept).
        curv: positive curvature magnitude `c`.
        eps: keeps the square root positive for coincident points, the denominator non-zero at the origin
            and the acos argument inside `(-1 + eps, 1 - eps)`. Reference: 1e-5.
    Returns:
        `(B,)` angles in `(0, pi)`.
    """
    with _full_precision(x.device):
        dtype = _compute_dtype(x, y)
        x, y = x.to(dtype), y.to(dtype)
        c = _curv(curv, x)
        x_time = time_component(x, curv).squeeze(-1)
        y_time = time_component(y, curv).squeeze(-1)
        c_inner = c * ((x * y).sum(dim=-1) - x_time * y_time)  # c <x, y>_L, <= -1
        numerator = y_time + c_inner * x_time
        denominator = x.norm(dim=-1) * torch.sqrt((c_inner.pow(2) - 1).clamp(min=eps)) + eps
        return torch.acos((numerator / denominator).clamp(min=-1 + eps, max=1 - eps))


def mips_query_vectors(x: Tensor, curv: float | Tensor = 1.0) -> Tensor:
    """Query side of the exact reduction of Lorentz nearest neighbours to maximum inner product search.

    ``argmin_y d(x, y) = argmax_y <[x_s, -x_t], [y_s, y_t]>`` because `d` is increasing in `-<x, y>_L`.

    Args:
        x: `(B, D)` space components.
    Returns:
        `(B, D + 1)` vectors `[x_s, -x_t]`.
    """
    return torch.cat([x.to(_compute_dtype(x)), -time_component(x, curv)], dim=-1)


def mips_pool_vectors(y: Tensor, curv: float | Tensor = 1.0) -> Tensor:
    """Pool side of the reduction in :func:`mips_query_vectors`.

    Args:
        y: `(N, D)` space components.
    Returns:
        `(N, D + 1)` vectors `[y_s, y_t]`.
    """
    return torch.cat([y.to(_compute_dtype(y)), time_component(y, curv)], dim=-1)
