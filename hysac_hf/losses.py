"""HySAC training losses: Lorentzian contrastive terms plus entailment cones, as one configured module.

Per batch of quadruplets (safe image ``I``, unsafe image ``I*``, safe text ``T``, unsafe text ``T*``) the
reference trains seven terms (docs/method.md §4.1):

====  =========================  ============================================
 #    name                       what
====  =========================  ============================================
 1    ``contrastive_safe``       InfoNCE on (T, I)
 2    ``contrastive_unsafe``     InfoNCE on (T*, I*)
 3    ``contrastive_cross_a``    InfoNCE on (T, I*)
 4    ``contrastive_cross_b``    InfoNCE on (T*, I)
 5    ``entailment_text_image``  T entails I      (angle and aperture at T)
 6    ``entailment_unsafe``      T* entails I*    (angle and aperture at T*)
 7    ``entailment_safety``      I entails T*     (angle and aperture at I)
====  =========================  ============================================

Each contrastive term is one of two losses on the logits ``z = -exp(logit_scale) * d_L(image, text)``:

- ``"softmax"`` (CLIP's, the reference): symmetric InfoNCE, ``0.5 * (CE(image -> texts) + CE(text -> images))``;
- ``"sigmoid"`` (SigLIP's, the default of SigLIP families): ``z + logit_bias`` for every pair is an independent
  binary decision, ``-(1/B) sum_i sum_j log sigmoid(+-z_ij)`` (+ on the positive pair), so no softmax couples the
  rows and the pairs of each process's chunk of candidates are summed on their own.

Contrastive negatives come from every process when ``world_size > 1``: embeddings are all-gathered with
autograd and each process scores its local rows against the global batch with rank-shifted labels (the
open_clip/MERU "local loss + gather with grad" scheme); the sigmoid loss takes the gathered candidates chunk by chunk,
one process's rows at a time. DDP's gradient averaging then yields exactly the gradient of the global-batch loss.
``local_negatives=True`` reproduces the authors' per-process loss instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import gather_with_grad
from .modeling.lorentz import autocast_disabled, half_aperture, oxy_angle, pairwise_dist

CONTRASTIVE_TERMS = ("contrastive_safe", "contrastive_unsafe", "contrastive_cross_a", "contrastive_cross_b")
ENTAILMENT_TERMS = ("entailment_text_image", "entailment_unsafe", "entailment_safety")
LOSS_TERMS = CONTRASTIVE_TERMS + ENTAILMENT_TERMS
CONTRASTIVE_LOSSES = ("softmax", "sigmoid")


def _at_least_float32(t: Tensor) -> Tensor:
    """Upcast half precision to float32; float64 stays float64 (tests compare against float64 math)."""
    return t if t.dtype == torch.float64 else t.float()


def entailment_loss(
    general: Tensor, specific: Tensor, curvature: float | Tensor, aperture_scale: float = 1.0, min_radius: float = 0.1
) -> Tensor:
    """Entailment-cone loss: `specific` should lie inside the cone rooted at `general` (MERU form).

    ``mean(max(0, oxy_angle(general, specific) - aperture_scale * half_aperture(general)))``.

    Args:
        general: `(B, D)` space components of the more general concepts (cone apexes, nearer the root).
        specific: `(B, D)` space components of the paired, more specific concepts.
        curvature: positive curvature magnitude `c`.
        aperture_scale: `eta`, widens (> 1) or narrows (< 1) every cone.
        min_radius: `K` of :func:`half_aperture`.
    Returns:
        `()` mean over the batch, >= 0.
    """
    angle = oxy_angle(general, specific, curvature)
    aperture = half_aperture(general, curvature, min_radius=min_radius)
    return torch.clamp(angle - aperture_scale * aperture, min=0).mean()


def loss_weights(
    entailment_weight: float = 1.0, weighting: Literal["reference", "plain"] = "reference"
) -> dict[str, float]:
    """Weights of the seven terms.

    ``"reference"`` matches the authors' code: lambdas ``[1, 1, 1, 1, le, le, le]`` divided by their sum and
    then again by 7 (docs/method.md §4.4; a constant factor, AdamW is nearly scale-invariant).
    ``"plain"`` uses the lambdas as they are (total = sum of contrastive terms + le * sum of entailment terms).
    """
    if entailment_weight < 0:
        raise ValueError(f"entailment_weight must be >= 0, got {entailment_weight}")
    lambdas = [1.0] * len(CONTRASTIVE_TERMS) + [float(entailment_weight)] * len(ENTAILMENT_TERMS)
    if weighting == "reference":
        total = sum(lambdas)
        lambdas = [lam / total / len(lambdas) for lam in lambdas]
    elif weighting != "plain":
        raise ValueError(f"weighting must be 'reference' or 'plain', got {weighting!r}")
    return dict(zip(LOSS_TERMS, lambdas))


def sigmoid_pair_loss(logits: Tensor, positives: Tensor | None) -> Tensor:
    """SigLIP's pairwise loss summed over a `(B, N)` block of logits: `sum_ij softplus(-s_ij * z_ij)`, `s = +1` on
    the positive pairs and `-1` elsewhere.

    Args:
        logits: `(B, N)` logits of B local rows against N candidates.
        positives: `(B,)` column of each row's positive in this block, or None when the block holds none.
    Returns:
        `()` sum over the block (not a mean: the caller divides by B once every block is summed).
    """
    signs = -torch.ones_like(logits)
    if positives is not None:
        signs = signs.scatter(1, positives[:, None], 1.0)
    return F.softplus(-signs * logits).sum()


class HySACLoss(nn.Module):
    """The seven HySAC terms, weighted and summed; built once, called on each step's embeddings.

    Args:
        contrastive: ``"softmax"`` (CLIP's InfoNCE, the reference) or ``"sigmoid"`` (SigLIP's pairwise loss on the
            logits plus a learned bias; pass ``logit_bias`` when calling).
        entailment_weight: `lambda_e` of the three entailment terms (reference default 1.0).
        aperture_scale: `eta` of the entailment cones (reference default 1.0).
        min_radius: `K` of the half-aperture (use the model's `config.min_radius`).
        weighting: ``"reference"`` (double normalisation, as the authors' code) or ``"plain"``.
        local_negatives: score against the local batch only (the authors' per-GPU loss).
        rank: this process's rank.
        world_size: number of processes; above 1 the embeddings are all-gathered with autograd.
    """

    def __init__(
        self,
        entailment_weight: float = 1.0,
        aperture_scale: float = 1.0,
        min_radius: float = 0.1,
        weighting: Literal["reference", "plain"] = "reference",
        local_negatives: bool = False,
        rank: int = 0,
        world_size: int = 1,
        contrastive: Literal["softmax", "sigmoid"] = "softmax",
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if contrastive not in CONTRASTIVE_LOSSES:
            raise ValueError(f"contrastive must be one of {list(CONTRASTIVE_LOSSES)}, got {contrastive!r}")
        self.contrastive_loss = contrastive
        self.weights = loss_weights(entailment_weight, weighting)
        self.aperture_scale = aperture_scale
        self.min_radius = min_radius
        self.local_negatives = local_negatives
        self.rank = rank
        self.world_size = world_size

    def _gather(self, embeds: Tensor) -> Tensor:
        if self.world_size == 1 or self.local_negatives:
            return embeds
        return gather_with_grad(embeds)

    def labels(self, batch_size: int, device: torch.device) -> Tensor:
        """`(B,)` indices of each local row's positive inside the (gathered) candidate set."""
        offset = 0 if (self.world_size == 1 or self.local_negatives) else batch_size * self.rank
        return torch.arange(batch_size, device=device) + offset

    def contrastive(
        self,
        text: Tensor,
        image: Tensor,
        all_text: Tensor,
        all_image: Tensor,
        curvature: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
    ) -> Tensor:
        """One contrastive term with logits `-exp(logit_scale) * d(local, candidates)`.

        Args:
            text, image: `(B, D)` local paired embeddings.
            all_text, all_image: `(N, D)` candidates (the gathered global batch, or the local one).
            curvature: `()` curvature magnitude. logit_scale: `()` log scale.
            logit_bias: `()` bias added to the logits (the sigmoid loss only).
        Returns:
            `()` softmax: ``0.5 * (CE(image -> texts) + CE(text -> images))``; sigmoid: the pairwise loss of the
            local images against every candidate text, ``-(1/B) sum_i sum_j log sigmoid(+-(z_ij + b))``, computed
            chunk by chunk (one chunk per process's rows, the positives in this process's own chunk).
        """
        scale = _at_least_float32(logit_scale).exp()
        labels = self.labels(text.shape[0], text.device)
        if self.contrastive_loss == "sigmoid":
            return self._sigmoid(image, all_text, curvature, scale, logit_bias)
        logits_image = -scale * pairwise_dist(image, all_text, curvature)
        logits_text = -scale * pairwise_dist(text, all_image, curvature)
        return 0.5 * (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels))

    def _sigmoid(self, image: Tensor, all_text: Tensor, curvature: Tensor, scale: Tensor, logit_bias: Tensor) -> Tensor:
        """SigLIP's loss of `(B, D)` local images against `(N, D)` candidate texts, one `(B, B)` chunk at a time.

        Every (image, text) pair of the global batch is scored exactly once across processes (each process scores
        its own images), as SigLIP's chunked loss does, so no `(B, N)` matrix and no global softmax is needed. Which
        chunk holds the positives is known on the host (this process's own rows), so no step waits on the device.
        """
        batch = image.shape[0]
        own = 0 if (self.world_size == 1 or self.local_negatives) else batch * self.rank
        positives = torch.arange(batch, device=image.device)
        total = image.new_zeros((), dtype=scale.dtype)
        for start in range(0, all_text.shape[0], batch):
            logits = -scale * pairwise_dist(image, all_text[start : start + batch], curvature) + logit_bias
            total = total + sigmoid_pair_loss(logits, positives if start == own else None)
        return total / batch

    def forward(
        self,
        embeds: Mapping[str, Tensor],
        curvature: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | float | None = None,
    ) -> dict[str, Tensor]:
        """Compute every term and the weighted total.

        Args:
            embeds: `(B, D)` space components keyed by kind of content: `S` (T, safe text), `V` (I, safe image),
                `U` (T*, unsafe text), `G` (I*, unsafe image), same B; other keys are ignored (so the output of
                `QuadrupletEncoder` passes straight in).
            curvature: `()` curvature magnitude `c` (not its log).
            logit_scale: `()` log contrastive scale.
            logit_bias: `()` logit bias, needed by the sigmoid loss (ignored by the softmax one, which no constant
                shift changes).
        Returns:
            dict with the seven named terms (unweighted, `()` each) and ``"loss"``, their weighted sum.
        """
        if self.contrastive_loss == "sigmoid" and logit_bias is None:
            raise ValueError(
                "the sigmoid contrastive loss needs the model's logit_bias; this model has none: build it with "
                "HySACModel.from_dual_encoder(..., logit_bias_init_value=-10.0), or train with --contrastive softmax"
            )
        missing = [k for k in ("S", "V", "U", "G") if k not in embeds]
        if missing:
            raise ValueError(f"HySACLoss needs the embeddings of all four kinds; missing {missing}")
        shapes = {tuple(embeds[k].shape) for k in ("S", "V", "U", "G")}
        if len(shapes) != 1 or embeds["V"].ndim != 2:
            raise ValueError(f"HySACLoss expects four (B, D) embeddings of one shape, got {sorted(shapes)}")
        if embeds["V"].shape[0] == 0:
            raise ValueError("HySACLoss got an empty batch; check the dataloader (drop_last=True, dataset size)")
        with autocast_disabled(embeds["V"].device):
            text, image, unsafe_text, unsafe_image = (_at_least_float32(embeds[k]) for k in ("S", "V", "U", "G"))
            curvature, logit_scale = _at_least_float32(curvature), _at_least_float32(logit_scale)
            if logit_bias is not None:
                logit_bias = _at_least_float32(torch.as_tensor(logit_bias, device=curvature.device))
            if self.contrastive_loss == "sigmoid":  # scores local images against every text: no image is gathered
                all_image, all_unsafe_image = image, unsafe_image
            else:
                all_image, all_unsafe_image = self._gather(image), self._gather(unsafe_image)
            all_text, all_unsafe_text = self._gather(text), self._gather(unsafe_text)
            terms = {
                "contrastive_safe": self.contrastive(
                    text, image, all_text, all_image, curvature, logit_scale, logit_bias
                ),
                "contrastive_unsafe": self.contrastive(
                    unsafe_text, unsafe_image, all_unsafe_text, all_unsafe_image, curvature, logit_scale, logit_bias
                ),
                "contrastive_cross_a": self.contrastive(
                    text, unsafe_image, all_text, all_unsafe_image, curvature, logit_scale, logit_bias
                ),
                "contrastive_cross_b": self.contrastive(
                    unsafe_text, image, all_unsafe_text, all_image, curvature, logit_scale, logit_bias
                ),
                "entailment_text_image": entailment_loss(text, image, curvature, self.aperture_scale, self.min_radius),
                "entailment_unsafe": entailment_loss(
                    unsafe_text, unsafe_image, curvature, self.aperture_scale, self.min_radius
                ),
                "entailment_safety": entailment_loss(
                    image, unsafe_text, curvature, self.aperture_scale, self.min_radius
                ),
            }
            terms["loss"] = sum(self.weights[name] * terms[name] for name in LOSS_TERMS)
        return terms
