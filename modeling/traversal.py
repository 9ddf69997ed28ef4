"""Batched safety traversal: move embeddings radially towards (or away from) the root of the hyperboloid.

HySAC places safe content near the origin and unsafe content further out. The traversal moves every row
whose distance to the root is beyond a threshold back onto it, keeping its direction; rows inside are
returned bit for bit. Two ways of landing exist:

- ``"reference"``: the authors' rule (``hysac/models.py``, ``hysac/recalls.py``). The threshold ``b'`` is a
  hyperbolic distance, but the move sets the *Euclidean norm of the space components* to ``b'``, so the
  point lands at hyperbolic distance ``asinh(sqrt(c) b') / sqrt(c) < b'``. The published numbers use it.
- ``"geodesic"``: move along the geodesic through the origin until the hyperbolic distance equals ``b'``
  (space-component norm ``sinh(sqrt(c) b') / sqrt(c)``).

Both keep the direction of the space components, so both stay on the geodesic ray from the root.
Torch only: ships to the Hub as remote code.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .lorentz import autocast_disabled, dist_to_origin

METHODS = ("reference", "geodesic")
DIRECTIONS = ("inward", "outward")


def traversal_threshold(bound: float | Tensor, curvature: float | Tensor, offset: float = 0.8) -> Tensor:
    """The authors' threshold with its tanh margin: ``b' = b + tanh((b - offset) / c) + 1``.

    Args:
        bound: `b`, a distance to the root (a calibrated bound such as `bounds["V"]["up_95"]`).
        curvature: positive curvature magnitude `c` (the reference divides by it, not by its square root).
        offset: the margin's offset (`alpha` in the authors' code; reference: 0.8).
    Returns:
        scalar float64 tensor `b'` on the CPU (computed in float64 so that float64 traversals reproduce the
        reference rule to the last bit; :func:`traverse` casts it to the dtype of the embeddings).
    """
    # Python floats go straight to float64 (torch.as_tensor would round them to float32 first).
    bound = (
        bound.detach().to("cpu", torch.float64) if torch.is_tensor(bound) else torch.tensor(bound, dtype=torch.float64)
    )
    curvature = (
        curvature.detach().to("cpu", torch.float64)
        if torch.is_tensor(curvature)
        else torch.tensor(curvature, dtype=torch.float64)
    )
    return bound + torch.tanh((bound - offset) / curvature) + 1


def traverse(
    embeds: Tensor,
    threshold: float | Tensor,
    curvature: float | Tensor = 1.0,
    method: Literal["reference", "geodesic"] = "reference",
    direction: Literal["inward", "outward"] = "inward",
    eps: float = 1e-12,
) -> Tensor:
    """Radially move the rows beyond `threshold` onto it.

    Args:
        embeds: `(B, D)` space components on the hyperboloid; any float dtype, B may be 0.
        threshold: target hyperbolic distance to the root `b'` (see :func:`traversal_threshold`).
        curvature: positive curvature magnitude `c`.
        method: `"reference"` (Euclidean norm of the space components := `b'`, as the authors) or
            `"geodesic"` (hyperbolic distance := `b'`).
        direction: `"inward"` moves rows with `d(0, x) > b'` towards the root (the safety traversal);
            `"outward"` moves rows with `d(0, x) < b'` away from it (the reference's lower-bound branch).
            A row at the root has no direction and is never moved outward.
        eps: guards the division by the norm.
    Returns:
        `(B, D)` embeddings in the dtype of `embeds`; rows that are not moved are returned unchanged.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r} is not one of {DIRECTIONS}")
    if embeds.ndim != 2:
        raise ValueError(f"embeds must have shape (batch, dim), got {tuple(embeds.shape)}")
    with autocast_disabled(embeds.device):
        points = embeds.float() if embeds.dtype != torch.float64 else embeds
        c = torch.as_tensor(curvature, dtype=points.dtype, device=points.device)
        b = torch.as_tensor(threshold, dtype=points.dtype, device=points.device)
        dist = dist_to_origin(points, c)
        norm = points.norm(dim=-1, keepdim=True)
        if direction == "inward":
            move = dist > b
        else:
            move = (dist < b) & (norm.squeeze(-1) > 0)
        target_norm = b if method == "reference" else torch.sinh(torch.sqrt(c) * b) / torch.sqrt(c)
        moved = points / norm.clamp(min=eps) * target_norm
        return torch.where(move.unsqueeze(-1), moved.to(embeds.dtype), embeds)


__all__ = ["DIRECTIONS", "METHODS", "traversal_threshold", "traverse"]
