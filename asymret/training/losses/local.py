"""Carried over from local-feature distillation to global descriptors (methods.md §5): mutual query divergence
and attentive regression (3DG-STFM), and confidence-weighted joint similarity distillation (seed 000).

``mqd``, ``simdistill`` and ``attentive`` compare ``batch.query`` and ``batch.gallery``, the two networks'
L2-normalised embeddings of the same images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asymret.training.losses.distill import kl_elements
from asymret.training.losses.registry import LossBatch, LossOutput, detached_parts, register_loss

STFM = "Mao et al., 3DG-STFM: 3D geometric guided student-teacher feature matching, ECCV 2022"
SIMDISTILL = "seed 000 (asymmetric local-feature distillation), Eq. (10), Tables 3-4"


def mqd_loss(query: Tensor, gallery: Tensor, temperature: float = 2.0, tau: float = 0.1,
             focal: bool = False, focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> Tensor:
    """Mutual query divergence (3DG-STFM Eq. 4-5) on the batch similarity matrices.

    Logits ``S/τ`` (τ = 0.1, the paper's dual-softmax temperature) for ``S^qg`` and ``S^gg``; each row
    and each column is one query distribution; loss ``T² mean over the 2B distributions of
    KL(p_gallery ‖ p_query)`` at KD temperature T = 2 (reference code), gallery side without gradient.
    ``focal`` weights each element by Eq. 2, ``α (1 − p̂)^γ`` with p the query side's confidence at
    T = 1 and p̂ = p on the true match (the diagonal: the same image), 1 − p elsewhere (α = 0.25, γ = 2).
    """
    q, g = F.normalize(query, dim=1), F.normalize(gallery, dim=1)
    logits_q, logits_g = q @ g.t() / tau, (g @ g.t()).detach() / tau
    match = torch.eye(len(q), dtype=torch.bool, device=q.device)
    per_direction = []
    for dim in (1, 0):  # rows: query i searches the gallery; columns: gallery j searches the queries
        kl = kl_elements(logits_g / temperature, logits_q / temperature, dim)
        if focal:
            p = F.softmax(logits_q, dim)
            kl = kl * focal_alpha * (1 - torch.where(match, p, 1 - p)).pow(focal_gamma)
        per_direction.append(kl.sum(dim).mean())
    return temperature ** 2 * (per_direction[0] + per_direction[1]) / 2


def simdistill_loss(query: Tensor, gallery: Tensor, w_q: Tensor | None = None, w_g: Tensor | None = None,
                    tau_s: float = 0.5, tau_t: float = 0.5) -> Tensor:
    """Confidence-weighted joint similarity distillation (seed 000, Eq. 10):
    ``S̄^qg_ij = (w^q_i/τ_s) S^qg_ij (w^g_j/τ_t)``, ``S̄^gg_ij = (w^g_i/τ_t) S^gg_ij (w^g_j/τ_t)``,
    loss ``mean_i KL(softmax(S̄^gg_i) ‖ softmax(S̄^qg_i))``, the gallery row without gradient.

    Confidences w default to 1. Defaults τ_s = τ_t = 0.5 (Table 3).
    """
    q, g = F.normalize(query, dim=1), F.normalize(gallery, dim=1)
    ones = q.new_ones(len(q))
    a_q = (ones if w_q is None else w_q) / tau_s
    a_g = (ones if w_g is None else w_g) / tau_t
    s_qg = a_q.unsqueeze(1) * (q @ g.t()) * a_g.unsqueeze(0)
    s_gg = a_g.unsqueeze(1) * (g @ g.t()) * a_g.unsqueeze(0)
    return kl_elements(s_gg.detach(), s_qg).sum(1).mean()


def attentive_loss(query: Tensor, gallery: Tensor, variance: Tensor, eps: float = 1e-3) -> Tensor:
    """Attentive regression (3DG-STFM Eq. 7): ``mean_i ‖q_i − μ_t,i‖² / (2 σ²_t,i)``.

    σ²_t is the gallery network's uncertainty for the image, without gradient (else the loss falls by
    raising it), floored at ``eps`` (our choice, not the paper's) so that one near-certain item cannot
    take over the batch.
    """
    return ((query - gallery).pow(2).sum(1) / (2 * variance.detach().clamp_min(eps))).mean()


@register_loss("mqd", family="local", source=f"{STFM}, Eq. (4)-(5)",
               summary="mutual query divergence: every row and column of S^qg follows the same one of "
                       "S^gg as a query distribution, optionally focal-weighted. Direction: the teacher's "
                       "distribution is the target, KL(p_T ‖ p_S) (Hinton's KD). Eq. (4) as printed weights "
                       "log p_T by p_S, which would make the teacher's log-probabilities the target of a "
                       "student distribution; the paper's text calls the loss 'the mean of KD loss of all n "
                       "distributions', and KD's gradient in the student equals -Σ p_T log p_S's, so the "
                       "printed S/T are read as swapped",
               equation="w · T² mean_{2B distributions} KL(softmax(S^gg/τT) ‖ softmax(S^qg/τT))",
               needs=("query", "gallery"))
class MQDLoss(nn.Module):
    """``weight`` 1 (the paper's outdoor weight; 4 indoor)."""

    def __init__(self, weight: float = 1.0, temperature: float = 2.0, tau: float = 0.1, focal: bool = False,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        self.weight, self.temperature, self.tau = weight, temperature, tau
        self.focal, self.focal_alpha, self.focal_gamma = focal, focal_alpha, focal_gamma

    def forward(self, batch: LossBatch) -> LossOutput:
        query, gallery = batch.query, batch.gallery
        mqd = mqd_loss(query, gallery, self.temperature, self.tau, self.focal, self.focal_alpha, self.focal_gamma)
        return LossOutput(self.weight * mqd, detached_parts(mqd=mqd))


@register_loss("simdistill", family="local", source=SIMDISTILL,
               summary="confidence-weighted joint similarity distillation: row-softmax KL between the "
                       "weighted S^gg and S^qg",
               equation="w · mean_i KL(softmax(S̄^gg_i) ‖ softmax(S̄^qg_i)),  "
                        "S̄_ij = (w_i/τ) S_ij (w_j/τ)",
               needs=("query", "gallery"))
class SimDistillLoss(nn.Module):
    """``weight`` 2 (λ_KD, Table 4). Reads ``query_confidence``/``gallery_confidence`` when present."""

    def __init__(self, weight: float = 2.0, tau_s: float = 0.5, tau_t: float = 0.5):
        super().__init__()
        self.weight, self.tau_s, self.tau_t = weight, tau_s, tau_t

    def forward(self, batch: LossBatch) -> LossOutput:
        query, gallery = batch.query, batch.gallery
        kl = simdistill_loss(query, gallery, batch.query_confidence, batch.gallery_confidence,
                             self.tau_s, self.tau_t)
        return LossOutput(self.weight * kl, detached_parts(kl=kl))


@register_loss("attentive", family="local", source=f"{STFM}, Eq. (7)",
               summary="attentive regression: regress onto the gallery embedding, weighted by the "
                       "gallery network's certainty for the image",
               equation="w · mean_i ‖q_i − μ_t,i‖² / (2 max(σ²_t,i, eps))",
               needs=("query", "gallery", "uncertainty"))
class AttentiveLoss(nn.Module):
    def __init__(self, weight: float = 1.0, eps: float = 1e-3):
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, batch: LossBatch) -> LossOutput:
        query, gallery, variance = batch.query, batch.gallery, batch.uncertainty
        att = attentive_loss(query, gallery, variance, self.eps)
        return LossOutput(self.weight * att, detached_parts(attentive=att))
