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

Contrastive negatives come from every process when ``world_size > 1``: embeddings are all-gathered with
autograd and each process scores its local rows against the global batch with rank-shifted labels (the
open_clip/MERU "local loss + gather with grad" scheme). DDP's gradient averaging then yields exactly the
gradient of the global-batch loss. ``local_negatives=True`` reproduces the authors' per-process loss instead.
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


class HySACLoss(nn.Module):
    """The seven HySAC terms, weighted and summed; built once, called on each step's embeddings.

    Args:
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
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
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
    ) -> Tensor:
        """Symmetric InfoNCE with logits `-exp(logit_scale) * d(local, candidates)`.

        Args:
            text, image: `(B, D)` local paired embeddings.
            all_text, all_image: `(N, D)` candidates (the gathered global batch, or the local one).
            curvature: `()` curvature magnitude. logit_scale: `()` log scale.
        Returns:
            `()` ``0.5 * (CE(image -> texts) + CE(text -> images))``.
        """
        scale = _at_least_float32(logit_scale).exp()
        labels = self.labels(text.shape[0], text.device)
        logits_image = -scale * pairwise_dist(image, all_text, curvature)
        logits_text = -scale * pairwise_dist(text, all_image, curvature)
        return 0.5 * (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels))

    def forward(self, embeds: Mapping[str, Tensor], curvature: Tensor, logit_scale: Tensor) -> dict[str, Tensor]:
        """Compute every term and the weighted total.

        Args:
            embeds: `(B, D)` space components keyed by kind of content: `S` (T, safe text), `V` (I, safe image),
                `U` (T*, unsafe text), `G` (I*, unsafe image), same B; other keys are ignored (so the output of
                `QuadrupletEncoder` passes straight in).
            curvature: `()` curvature magnitude `c` (not its log).
            logit_scale: `()` log contrastive scale.
        Returns:
            dict with the seven named terms (unweighted, `()` each) and ``"loss"``, their weighted sum.
        """
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
            all_image, all_unsafe_image = self._gather(image), self._gather(unsafe_image)
            all_text, all_unsafe_text = self._gather(text), self._gather(unsafe_text)
            terms = {
                "contrastive_safe": self.contrastive(text, image, all_text, all_image, curvature, logit_scale),
                "contrastive_unsafe": self.contrastive(
                    unsafe_text, unsafe_image, all_unsafe_text, all_unsafe_image, curvature, logit_scale
                ),
                "contrastive_cross_a": self.contrastive(
                    text, unsafe_image, all_text, all_unsafe_image, curvature, logit_scale
                ),
                "contrastive_cross_b": self.contrastive(
                    unsafe_text, image, all_unsafe_text, all_image, curvature, logit_scale
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
