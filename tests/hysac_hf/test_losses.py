"""HySAC losses against an independent float64 numpy computation on fixed embeddings.

The hand computation works in the ambient Minkowski space: it builds the full (time, space) vectors, uses the
metric diag(-1, 1, ..., 1) and writes the cross-entropy with an explicit log-sum-exp. The reference's eps
values (docs/method.md §2.6) are part of the formulas and are reproduced, since they shift results by ~1e-6.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hysac_hf.losses import LOSS_TERMS, HySACLoss, entailment_loss, loss_weights

EPS = 1e-5  # reference eps of half_aperture / oxy_angle


def ambient(x: np.ndarray, c: float) -> np.ndarray:
    return np.concatenate([np.sqrt(1 / c + (x**2).sum(-1, keepdims=True)), x], axis=-1)


def minkowski(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    metric = np.diag([-1.0] + [1.0] * (a.shape[-1] - 1))
    return a @ metric @ b.T


def np_dist(x: np.ndarray, y: np.ndarray, c: float) -> np.ndarray:
    return np.arccosh(np.maximum(-c * minkowski(ambient(x, c), ambient(y, c)), 1.0)) / math.sqrt(c)


def np_infonce(logits: np.ndarray) -> float:
    log_probs = (
        logits
        - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
        - logits.max(1, keepdims=True)
    )
    return float(-np.mean(np.diag(log_probs)))


def np_contrastive(text: np.ndarray, image: np.ndarray, c: float, log_scale: float) -> float:
    scale = math.exp(log_scale)
    return 0.5 * (np_infonce(-scale * np_dist(image, text, c)) + np_infonce(-scale * np_dist(text, image, c)))


def np_entailment(general: np.ndarray, specific: np.ndarray, c: float, eta: float, k: float = 0.1) -> float:
    losses = []
    for x, y in zip(general, specific):
        xa, ya = ambient(x[None], c)[0], ambient(y[None], c)[0]
        c_inner = c * minkowski(xa[None], ya[None])[0, 0]
        cos = (ya[0] + c_inner * xa[0]) / (np.linalg.norm(x) * math.sqrt(max(c_inner**2 - 1, EPS)) + EPS)
        angle = math.acos(min(max(cos, -1 + EPS), 1 - EPS))
        aperture = math.asin(min(max(2 * k / (math.sqrt(c) * np.linalg.norm(x) + EPS), -1 + EPS), 1 - EPS))
        losses.append(max(angle - eta * aperture, 0.0))
    return float(np.mean(losses))


@pytest.fixture()
def quadruplet():
    """Fixed embeddings with the intended radial order (safe text nearest the root); some cones violated."""
    rng = np.random.default_rng(7)
    b, d = 6, 5
    directions = rng.normal(size=(b, d))
    text = 0.3 * directions + 0.05 * rng.normal(size=(b, d))
    image = 0.6 * directions + 0.3 * rng.normal(size=(b, d))
    unsafe_text = 0.9 * directions + 0.4 * rng.normal(size=(b, d))
    unsafe_image = 1.4 * directions + 0.5 * rng.normal(size=(b, d))
    return {"V": image, "G": unsafe_image, "S": text, "U": unsafe_text}  # keyed by kind of content


def as_torch(q):
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in q.items()}


@pytest.mark.parametrize("c, log_scale, eta", [(1.0, math.log(1 / 0.07), 1.0), (1.7, math.log(20.0), 0.7)])
def test_every_term_matches_float64_hand_computation(quadruplet, c, log_scale, eta):
    q = quadruplet
    loss = HySACLoss(entailment_weight=0.5, aperture_scale=eta)
    out = loss(as_torch(q), curvature=torch.tensor(c, dtype=torch.float64), logit_scale=torch.tensor(log_scale))
    expected = {
        "contrastive_safe": np_contrastive(q["S"], q["V"], c, log_scale),
        "contrastive_unsafe": np_contrastive(q["U"], q["G"], c, log_scale),
        "contrastive_cross_a": np_contrastive(q["S"], q["G"], c, log_scale),
        "contrastive_cross_b": np_contrastive(q["U"], q["V"], c, log_scale),
        "entailment_text_image": np_entailment(q["S"], q["V"], c, eta),
        "entailment_unsafe": np_entailment(q["U"], q["G"], c, eta),
        "entailment_safety": np_entailment(q["V"], q["U"], c, eta),
    }
    for name, value in expected.items():
        assert out[name].item() == pytest.approx(value, abs=1e-6), name
    # Some cones are violated and some are not: the clamp is exercised in both directions.
    assert 0 < expected["entailment_safety"]
    # Reference weighting: [1,1,1,1,le,le,le] / sum / 7.
    lambdas = np.array([1, 1, 1, 1, 0.5, 0.5, 0.5])
    lambdas = lambdas / lambdas.sum() / 7
    total = float(np.dot(lambdas, [expected[n] for n in LOSS_TERMS]))
    assert out["loss"].item() == pytest.approx(total, abs=1e-6)


def test_float32_matches_float64_hand_computation(quadruplet):
    q = quadruplet
    out = HySACLoss()(
        {k: torch.tensor(v, dtype=torch.float32) for k, v in q.items()},
        curvature=torch.tensor(1.3),
        logit_scale=torch.tensor(math.log(1 / 0.07)),
    )
    assert out["contrastive_safe"].item() == pytest.approx(
        np_contrastive(q["S"], q["V"], 1.3, math.log(1 / 0.07)), rel=1e-5
    )
    assert out["entailment_unsafe"].item() == pytest.approx(np_entailment(q["U"], q["G"], 1.3, 1.0), abs=1e-5)


def test_entailment_angle_is_taken_at_the_general_element(quadruplet):
    q = as_torch(quadruplet)
    forward = entailment_loss(q["V"], q["U"], 1.0).item()
    backward = entailment_loss(q["U"], q["V"], 1.0).item()
    assert forward == pytest.approx(np_entailment(quadruplet["V"], quadruplet["U"], 1.0, 1.0), abs=1e-9)
    assert backward != pytest.approx(forward, abs=1e-3)


def test_point_inside_cone_costs_nothing():
    general = torch.tensor([[0.5, 0.0, 0.0]], dtype=torch.float64)
    specific = torch.tensor([[2.0, 0.01, 0.0]], dtype=torch.float64)  # further out along the same ray
    assert entailment_loss(general, specific, 1.0).item() == 0.0


def test_plain_weighting_and_bad_arguments(quadruplet):
    assert loss_weights(2.0, "plain") == dict(zip(LOSS_TERMS, [1.0] * 4 + [2.0] * 3))
    assert sum(loss_weights(1.0).values()) == pytest.approx(1 / 7)
    with pytest.raises(ValueError, match="weighting"):
        loss_weights(1.0, "sum")
    with pytest.raises(ValueError, match="entailment_weight"):
        loss_weights(-1.0)
    q = as_torch(quadruplet)
    with pytest.raises(ValueError, match="one shape"):
        HySACLoss()({**q, "G": q["G"][:3]}, torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="all four kinds"):
        HySACLoss()({k: q[k] for k in ("S", "V", "U")}, torch.tensor(1.0), torch.tensor(1.0))
    empty = torch.zeros(0, 5)
    with pytest.raises(ValueError, match="empty batch"):
        HySACLoss()(dict.fromkeys("SVUG", empty), torch.tensor(1.0), torch.tensor(1.0))


def test_local_negatives_equal_single_process_loss(quadruplet):
    q = as_torch(quadruplet)
    args = {"curvature": torch.tensor(1.0), "logit_scale": torch.tensor(2.0)}
    single = HySACLoss()(q, **args)["loss"]
    local = HySACLoss(local_negatives=True, rank=1, world_size=2)(q, **args)["loss"]
    assert torch.equal(single, local)


def np_sigmoid(text: np.ndarray, image: np.ndarray, c: float, log_scale: float, bias: float) -> float:
    """SigLIP's pairwise loss, -(1/B) sum_ij log sigmoid(s_ij z_ij), z = -exp(scale) d(image_i, text_j) + b."""
    z = -math.exp(log_scale) * np_dist(image, text, c) + bias
    signs = 2 * np.eye(len(image)) - 1
    return float(np.mean(np.sum(np.log1p(np.exp(-signs * z)), axis=1)))


@pytest.mark.parametrize("c, log_scale, bias", [(1.0, math.log(10.0), -10.0), (1.7, math.log(20.0), -3.5)])
def test_sigmoid_terms_match_float64_hand_computation(quadruplet, c, log_scale, bias):
    q = quadruplet
    loss = HySACLoss(contrastive="sigmoid")
    out = loss(
        as_torch(q),
        curvature=torch.tensor(c, dtype=torch.float64),
        logit_scale=torch.tensor(log_scale, dtype=torch.float64),
        logit_bias=torch.tensor(bias, dtype=torch.float64),
    )
    expected = {
        "contrastive_safe": np_sigmoid(q["S"], q["V"], c, log_scale, bias),
        "contrastive_unsafe": np_sigmoid(q["U"], q["G"], c, log_scale, bias),
        "contrastive_cross_a": np_sigmoid(q["S"], q["G"], c, log_scale, bias),
        "contrastive_cross_b": np_sigmoid(q["U"], q["V"], c, log_scale, bias),
        "entailment_text_image": np_entailment(q["S"], q["V"], c, 1.0),
    }
    for name, value in expected.items():
        assert out[name].item() == pytest.approx(value, rel=1e-9, abs=1e-9), name
    # The bias matters: another bias gives another loss (the softmax loss would not see it).
    shifted = loss(as_torch(q), torch.tensor(c), torch.tensor(log_scale), logit_bias=torch.tensor(bias + 1.0))
    assert abs(shifted["contrastive_safe"].item() - expected["contrastive_safe"]) > 1e-3
    softmax = HySACLoss()
    args = (as_torch(q), torch.tensor(c), torch.tensor(log_scale))
    assert torch.equal(softmax(*args, logit_bias=torch.tensor(bias))["loss"], softmax(*args)["loss"])


def test_sigmoid_chunks_of_each_process_add_up_to_the_global_loss(quadruplet):
    """Each process scores its own images against every gathered text, one chunk per process, its positives in its own
    chunk; the mean over processes is the one-process loss of the whole batch (no softmax couples the chunks)."""
    q = as_torch(quadruplet)  # B = 6: two "processes" of 3 rows
    c, log_scale, bias = (torch.tensor(v, dtype=torch.float64) for v in (1.3, 2.0, -4.0))
    whole = HySACLoss(contrastive="sigmoid").contrastive(q["S"], q["V"], q["S"], q["V"], c, log_scale, bias)
    per_rank = [
        HySACLoss(contrastive="sigmoid", rank=rank, world_size=2).contrastive(
            q["S"][3 * rank : 3 * rank + 3], q["V"][3 * rank : 3 * rank + 3], q["S"], q["V"], c, log_scale, bias
        )
        for rank in range(2)
    ]
    assert (per_rank[0] + per_rank[1]).item() / 2 == pytest.approx(whole.item(), rel=1e-12)
    assert abs(per_rank[0].item() - whole.item()) > 1e-3  # not trivially equal
    # With local negatives each process scores its own chunk only: the authors' per-process scheme.
    local = HySACLoss(contrastive="sigmoid", local_negatives=True, rank=1, world_size=2)
    rows = slice(3, 6)
    value = local.contrastive(q["S"][rows], q["V"][rows], q["S"][rows], q["V"][rows], c, log_scale, bias).item()
    assert value == pytest.approx(np_sigmoid(quadruplet["S"][rows], quadruplet["V"][rows], 1.3, 2.0, -4.0), rel=1e-9)


def test_sigmoid_loss_needs_a_logit_bias_and_contrastive_is_checked(quadruplet):
    with pytest.raises(ValueError, match="needs the model's logit_bias"):
        HySACLoss(contrastive="sigmoid")(as_torch(quadruplet), torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="contrastive must be one of"):
        HySACLoss(contrastive="hinge")
