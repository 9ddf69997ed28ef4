"""Lorentz (hyperboloid) geometry for HySAC.

Convention: every function takes and returns the *space components* ``x_s`` of points on the hyperboloid
``{x : <x, x>_L = -1/c, x_t > 0}`` of curvature ``-c`` (``c > 0``, the argument ``curvature``). The time
component is never stored; it follows from the constraint as ``x_t = sqrt(1/c + ||x_s||^2)``. The origin
("root") is ``x_s = 0``.

Numerics: every geometry function is wrapped in :func:`full_precision`, the one precision policy of this
file: the math runs in float32 (float64 stays float64) with autocast disabled, so fp16/bf16 inputs and
mixed-precision training never evaluate ``sinh``/``acosh`` in half precision. Results are returned in that
compute dtype; callers that need the input dtype cast back themselves.

Export: the legacy (TorchScript) ONNX exporter has no symbolic for ``aten::sinh``, ``aten::asinh`` or
``aten::acosh``. While it traces, and only then, those three are computed from ``exp``/``log``/``sqrt`` with
formulas that keep float32 accuracy: at most 1.3e-7 relative error for ``sinh`` on ``[1e-8, asinh(2**15)]``,
2.0e-7 for ``asinh`` on ``[1e-8, 1e5]`` and 2.3e-7 for ``acosh`` on ``[1, 1e9]``, against float64 (the torch
ops themselves: 1.2e-7). Eager calls, ``torch.compile``, ``torch.export`` and the dynamo ONNX exporter use the
torch ops.

The clamps follow the authors' released code (``eps`` values in each docstring); each one is commented.
This file ships to the Hub as remote code: torch only.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import Tensor

__all__ = [
    "autocast_disabled",
    "dist_to_origin",
    "exp_map0",
    "full_precision",
    "half_aperture",
    "log_map0",
    "mips_pool_vectors",
    "mips_query_vectors",
    "oxy_angle",
    "paired_dist",
    "pairwise_dist",
    "pairwise_inner",
    "time_component",
]

# sinh(asinh(2**15)) = 2**15: the largest space-component norm exp_map0 produces, representable in fp16.
MAX_SINH_INPUT = math.asinh(2**15)

_Function = TypeVar("_Function", bound=Callable[..., Tensor])


@contextmanager
def autocast_disabled(device: torch.device | str):
    """Context in which autocast is off on `device`, so that float32 math is not silently re-run in half precision.

    Devices without autocast (meta, ...) run the body unchanged.
    """
    device_type = torch.device(device).type
    if device_type in ("cpu", "cuda", "xpu", "mps"):
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    else:  # pragma: no cover - meta and exotic devices have no autocast
        yield


def full_precision(function: _Function) -> _Function:
    """Decorator: run a geometry function in float32 (float64 stays float64) with autocast disabled.

    The compute dtype is float64 if any floating-point tensor argument other than `curvature` is float64,
    float32 otherwise: fp16/bf16 (and float32) points are computed in float32. Every floating-point tensor
    argument, `curvature` included, is cast to it before the call; Python numbers are left alone. Autocast is
    disabled on the device of the first tensor argument for the whole call, so nested calls and the result
    stay in the compute dtype.
    """
    names = list(inspect.signature(function).parameters)

    def is_float_tensor(value) -> bool:
        return isinstance(value, Tensor) and value.is_floating_point()

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        named = list(zip(names, args)) + list(kwargs.items())
        tensors = [value for _, value in named if is_float_tensor(value)]
        if not tensors:
            return function(*args, **kwargs)
        points = [value for name, value in named if name != "curvature" and is_float_tensor(value)]
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in points) else torch.float32
        args = tuple(value.to(dtype) if is_float_tensor(value) else value for value in args)
        kwargs = {name: value.to(dtype) if is_float_tensor(value) else value for name, value in kwargs.items()}
        with autocast_disabled(tensors[0].device):
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _as_tensor(curvature: float | Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(curvature, dtype=like.dtype, device=like.device)


def _in_legacy_onnx_export() -> bool:
    """True while the TorchScript-based ONNX exporter traces (it lacks sinh/asinh/acosh); False under dynamo."""
    return torch.onnx.is_in_onnx_export() and torch.jit.is_tracing()


def _log1p(z: Tensor) -> Tensor:
    # Goldberg's log1p from log alone: w = fl(1 + z); log(w) * z / (w - 1) cancels the rounding of 1 + z.
    w = 1 + z
    return torch.where(w == 1, z, torch.log(w) * z / torch.where(w == 1, torch.ones_like(w), w - 1))


def _sinh(x: Tensor) -> Tensor:
    if not _in_legacy_onnx_export():
        return torch.sinh(x)
    # |x| < 1: odd Taylor series to x^9 (truncation < 3e-8 relative); otherwise (e^x - e^-x) / 2, whose
    # cancellation costs at most a factor e / (2 sinh 1) = 1.16 there.
    x2 = x * x
    series = x * (1 + x2 / 6 * (1 + x2 / 20 * (1 + x2 / 42 * (1 + x2 / 72))))
    return torch.where(x.abs() < 1, series, (torch.exp(x) - torch.exp(-x)) / 2)


def _asinh(x: Tensor) -> Tensor:
    if not _in_legacy_onnx_export():
        return torch.asinh(x)
    # asinh(|x|) = log1p(|x| + x^2 / (1 + sqrt(1 + x^2))): no cancellation near 0, odd in x.
    a = x.abs()
    return torch.sign(x) * _log1p(a + a * a / (1 + torch.sqrt(1 + a * a)))


def _acosh(y: Tensor) -> Tensor:
    if not _in_legacy_onnx_export():
        return torch.acosh(y)
    # acosh(1 + t) = log1p(t + sqrt(t (t + 2))), with t = y - 1 exact near 1 (Sterbenz).
    t = y - 1
    return _log1p(t + torch.sqrt(t * (t + 2)))


@full_precision
def time_component(x: Tensor, curvature: float | Tensor = 1.0) -> Tensor:
    """Time component of hyperboloid points.

    Args:
        x: `(..., D)` space components.
        curvature: positive curvature magnitude `c`.
    Returns:
        `(..., 1)` time components `sqrt(1/c + ||x||^2)`, > 0.
    """
    c = _as_tensor(curvature, x)
    return torch.sqrt(1.0 / c + x.pow(2).sum(dim=-1, keepdim=True))


@full_precision
def exp_map0(v: Tensor, curvature: float | Tensor = 1.0, eps: float = 1e-8) -> Tensor:
    """Exponential map at the origin: lift a tangent vector onto the hyperboloid.

    ``exp_0(v) = sinh(sqrt(c) ||v||) v / (sqrt(c) ||v||)``.

    Args:
        v: `(..., D)` tangent vectors at the origin (Euclidean).
        curvature: positive curvature magnitude `c`.
        eps: lower clamp of `sqrt(c)||v||` (reference: 1e-8).
    Returns:
        `(..., D)` space components, float32 (float64 for float64 input).
    """
    c = _as_tensor(curvature, v)
    rc_norm = torch.sqrt(c) * v.norm(dim=-1, keepdim=True)
    # Lower clamp: avoid 0/0 at v = 0 (sinh(z)/z -> 1). Upper clamp: keep sinh finite and fp16-representable.
    sinh_input = rc_norm.clamp(min=eps, max=MAX_SINH_INPUT)
    return _sinh(sinh_input) * v / rc_norm.clamp(min=eps)


@full_precision
def log_map0(x: Tensor, curvature: float | Tensor = 1.0, eps: float = 1e-8) -> Tensor:
    """Logarithmic map at the origin: the inverse of :func:`exp_map0`.

    ``log_0(x) = asinh(sqrt(c) ||x||) x / (sqrt(c) ||x||)``; ``asinh(sqrt(c)||x||)/sqrt(c)`` is the geodesic
    distance to the origin. Written with ``asinh`` rather than the reference's ``acosh(sqrt(c) x_t)``, which
    loses all precision near the origin in float32 (it needs a 1e-5 clamp that floors the result at 4.5e-3).

    Args:
        x: `(..., D)` space components.
        curvature: positive curvature magnitude `c`.
        eps: lower clamp of `sqrt(c)||x||`, guards the division at the origin.
    Returns:
        `(..., D)` tangent vectors at the origin.
    """
    c = _as_tensor(curvature, x)
    rc_norm = (torch.sqrt(c) * x.norm(dim=-1, keepdim=True)).clamp(min=eps)  # asinh(z)/z -> 1 at 0
    return _asinh(rc_norm) * x / rc_norm


@full_precision
def pairwise_inner(x: Tensor, y: Tensor, curvature: float | Tensor = 1.0) -> Tensor:
    """Lorentzian inner product between every pair of points.

    ``<x, y>_L = x_s . y_s - x_t y_t``.

    Args:
        x: `(B1, D)` space components.
        y: `(B2, D)` space components.
        curvature: positive curvature magnitude `c`.
    Returns:
        `(B1, B2)` inner products, <= -1/c.
    """
    x_time = time_component(x, curvature)
    y_time = time_component(y, curvature)
    return x @ y.transpose(-1, -2) - x_time @ y_time.transpose(-1, -2)


@full_precision
def pairwise_dist(x: Tensor, y: Tensor, curvature: float | Tensor = 1.0, eps: float = 1e-8) -> Tensor:
    """Geodesic distance between every pair of points (one matrix product; use for retrieval).

    ``d(x, y) = acosh(-c <x, y>_L) / sqrt(c)``.

    Args:
        x: `(B1, D)` space components.
        y: `(B2, D)` space components.
        curvature: positive curvature magnitude `c`.
        eps: the acosh argument is clamped to `>= 1 + eps` (reference: 1e-8; a no-op in float32).
    Returns:
        `(B1, B2)` distances, >= 0. Near-coincident points carry float rounding of order
        `sqrt(2 * 1e-7 * c * ||x||^2)` in float32; :func:`paired_dist` is exact there.
    """
    c = _as_tensor(curvature, x)
    # acosh is only defined on [1, inf); rounding can push -c<x,y>_L slightly below 1 for x ~ y.
    arg = (-c * pairwise_inner(x, y, c)).clamp(min=1 + eps)
    return _acosh(arg) / torch.sqrt(c)


@full_precision
def paired_dist(x: Tensor, y: Tensor, curvature: float | Tensor = 1.0) -> Tensor:
    """Geodesic distance between matching rows (the diagonal of :func:`pairwise_dist`, without the matrix).

    Uses the Lorentzian chord ``||x - y||_L^2 = ||x_s - y_s||^2 - (x_t - y_t)^2`` and
    ``d = 2 asinh(sqrt(c) ||x - y||_L / 2) / sqrt(c)``, which is exact for coincident points (d(x, x) = 0).

    Args:
        x: `(..., D)` space components.
        y: `(..., D)` space components, broadcastable with `x`.
        curvature: positive curvature magnitude `c`.
    Returns:
        `(...)` distances, >= 0.
    """
    c = _as_tensor(curvature, x)
    x_time = time_component(x, c).squeeze(-1)
    y_time = time_component(y, c).squeeze(-1)
    # x_t - y_t = (||x||^2 - ||y||^2) / (x_t + y_t) = ((x - y).(x + y)) / (x_t + y_t): no cancellation.
    time_diff = ((x - y) * (x + y)).sum(dim=-1) / (x_time + y_time)
    chord_sq = ((x - y).pow(2).sum(dim=-1) - time_diff.pow(2)).clamp(min=0)  # >= 0 in exact arithmetic
    return 2 * _asinh(torch.sqrt(c * chord_sq) / 2) / torch.sqrt(c)


@full_precision
def dist_to_origin(x: Tensor, curvature: float | Tensor = 1.0) -> Tensor:
    """Geodesic distance from the origin ("root") of the hyperboloid.

    ``d(0, x) = asinh(sqrt(c) ||x_s||) / sqrt(c)``: exact, no clamp needed.

    Args:
        x: `(..., D)` space components.
        curvature: positive curvature magnitude `c`.
    Returns:
        `(...)` distances, >= 0.
    """
    c = _as_tensor(curvature, x)
    return _asinh(torch.sqrt(c) * x.norm(dim=-1)) / torch.sqrt(c)


@full_precision
def half_aperture(x: Tensor, curvature: float | Tensor = 1.0, min_radius: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Half-aperture of the entailment cone rooted at each point.

    ``omega(x) = asin(2 K / (sqrt(c) ||x_s||))`` with ``K = min_radius``.

    Args:
        x: `(..., D)` space components.
        curvature: positive curvature magnitude `c`.
        min_radius: `K`; points within this radius of the origin get the widest cone.
        eps: added to the denominator (no division by zero at the origin) and used to keep the asin
            argument inside `(-1 + eps, 1 - eps)` (its derivative is infinite at +-1). Reference: 1e-5.
    Returns:
        `(...)` half-apertures in `(0, pi/2)`.
    """
    c = _as_tensor(curvature, x)
    ratio = 2 * min_radius / (torch.sqrt(c) * x.norm(dim=-1) + eps)
    return torch.asin(ratio.clamp(min=-1 + eps, max=1 - eps))


@full_precision
def oxy_angle(x: Tensor, y: Tensor, curvature: float | Tensor = 1.0, eps: float = 1e-5) -> Tensor:
    """Exterior angle at `x` of the geodesic triangle origin-`x`-`y`, row by row.

    It is the angle between the geodesic from `x` to `y` and the extension of the geodesic from the origin
    through `x`; `y` lies inside the entailment cone of `x` when it is below ``half_aperture(x)``. From the
    hyperbolic law of cosines:
    ``cos = (y_t + c <x, y>_L x_t) / (||x_s|| sqrt((c <x, y>_L)^2 - 1))``.

    Args:
        x: `(B, D)` space components (the cone apex; the more general concept).
        y: `(B, D)` space components (the more specific concept).
        curvature: positive curvature magnitude `c`.
        eps: keeps the square root positive for coincident points, the denominator non-zero at the origin
            and the acos argument inside `(-1 + eps, 1 - eps)`. Reference: 1e-5.
    Returns:
        `(B,)` angles in `(0, pi)`.
    """
    c = _as_tensor(curvature, x)
    x_time = time_component(x, c).squeeze(-1)
    y_time = time_component(y, c).squeeze(-1)
    c_inner = c * ((x * y).sum(dim=-1) - x_time * y_time)  # c <x, y>_L, <= -1
    numerator = y_time + c_inner * x_time
    denominator = x.norm(dim=-1) * torch.sqrt((c_inner.pow(2) - 1).clamp(min=eps)) + eps
    return torch.acos((numerator / denominator).clamp(min=-1 + eps, max=1 - eps))


@full_precision
def mips_query_vectors(x: Tensor, curvature: float | Tensor = 1.0) -> Tensor:
    """Query side of the exact reduction of Lorentz nearest neighbours to maximum inner product search.

    ``argmin_y d(x, y) = argmax_y <[x_s, -x_t], [y_s, y_t]>`` because `d` is increasing in `-<x, y>_L`.

    Args:
        x: `(B, D)` space components.
        curvature: positive curvature magnitude `c`.
    Returns:
        `(B, D + 1)` vectors `[x_s, -x_t]`.
    """
    return torch.cat([x, -time_component(x, curvature)], dim=-1)


@full_precision
def mips_pool_vectors(y: Tensor, curvature: float | Tensor = 1.0) -> Tensor:
    """Pool side of the reduction in :func:`mips_query_vectors`.

    Args:
        y: `(N, D)` space components.
        curvature: positive curvature magnitude `c`.
    Returns:
        `(N, D + 1)` vectors `[y_s, y_t]`.
    """
    return torch.cat([y, time_component(y, curvature)], dim=-1)
