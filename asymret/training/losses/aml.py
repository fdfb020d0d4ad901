"""The losses compared by AML (methods.md §2): Budnik & Avrithis, "Asymmetric metric learning for
knowledge transfer", CVPR 2021, Eq. (4)-(10).

Tuple losses (``contrastive``, ``contr_plus``, ``triplet``, ``multi_similarity``): the anchor
``batch.query`` (B, D) went through the query network; ``batch.positive`` (B, P, D) and
``batch.negative`` (B, N, D) are the other members of each anchor's tuple (gallery side in asymmetric
training, query side in the symmetric baseline: the trainer decides, these losses never detach them).
Reduction as in the AML code: a sum over a tuple's pairs and a **sum over the B tuples** of the step
(AML ``training.py`` back-propagates each tuple's summed loss and accumulates the gradients over the
step's 5 tuples; the paper's lr 1e-6 is for that scale). ``regression`` sums over the B images likewise.
Distances add the AML code's eps = 1e-6 to ``q − g`` before the norm (cirtorch ``contrastive_loss``);
triplet's squared distances and multi-similarity's dot products have none, as there. An empty member
set (P or N = 0) contributes nothing, which gives the ablations of Table 5 (e.g. positives only).
These losses carry ``batch_reduction = "sum"``: the trainer then sums (not averages) the gradients
of several processes and of accumulated steps, so that any split of a step's tuples gives its gradient.

Relational losses (``rkd``, ``darkrank``) compare the relations among the B items as seen by the query
network (``batch.query``) and by the gallery network (``batch.gallery``, used without gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asymret.errors import InputError
from asymret.training.losses.registry import LossBatch, LossOutput, register_loss

AML = "Budnik & Avrithis, CVPR 2021"


# ---- distances and similarities ------------------------------------------------------------------

EPS = 1e-6  # the AML/cirtorch code's eps inside the distance


def tuple_distances(anchor: Tensor, members: Tensor, eps: float = EPS) -> Tensor:
    """``d(a, y) = ‖q_a − g_y + ε‖`` between each anchor (B, D) and its tuple members (B, K, D): (B, K).

    ε = 1e-6 is added to every coordinate of the difference, as in cirtorch's ``contrastive_loss``
    (``pow(x1 − x2 + eps, 2).sum().sqrt()``); it also keeps the gradient finite where q_a = g_y.
    """
    return (anchor.unsqueeze(1) - members + eps).pow(2).sum(-1).clamp_min(1e-24).sqrt()


def tuple_similarities(anchor: Tensor, members: Tensor) -> Tensor:
    """Asymmetric similarity ``s(a, y) = q_aᵀ g_y`` (AML Eq. 3): (B, K)."""
    return torch.einsum("bd,bkd->bk", anchor, members)


def pairwise_distances(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``‖x_i − x_j‖`` for all pairs of the batch (B, B), exactly zero on the diagonal (RKD's ``pdist``)."""
    sq = x.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * x @ x.t()).clamp_min(eps).sqrt()
    return d.masked_fill(torch.eye(len(x), dtype=torch.bool, device=x.device), 0)


# ---- the formulas ----------------------------------------------------------------------------------

def contrastive_loss(d_pos: Tensor, d_neg: Tensor, margin: float = 0.7) -> Tensor:
    """AML Eq. (4), Hadsell et al. 2006: ``Σ_p ½ d_p² + Σ_n ½ max(0, m − d_n)²`` per tuple, summed over tuples.

    ``d_pos`` (B, P), ``d_neg`` (B, N). Default m = 0.7 (0.85 in the cirtorch ResNet101 recipe).
    """
    pos = 0.5 * d_pos.pow(2).sum(1)
    neg = 0.5 * F.relu(margin - d_neg).pow(2).sum(1)
    return (pos + neg).sum()


def triplet_loss(d_pos: Tensor, d_neg: Tensor, margin: float = 0.1) -> Tensor:
    """AML Eq. (5): ``Σ_p Σ_n max(0, d_p² − d_n² + m)`` on squared distances, summed over tuples.

    ``d_pos`` (B, P), ``d_neg`` (B, N); AML tuples have P = 1. Default m = 0.1.
    """
    violation = d_pos.pow(2).unsqueeze(2) - d_neg.pow(2).unsqueeze(1) + margin
    return F.relu(violation).sum()


def multi_similarity_loss(s_pos: Tensor, s_neg: Tensor, alpha: float = 2.0, beta: float = 40.0,
                          base: float = 0.5) -> Tensor:
    """AML Eq. (6), Wang et al. CVPR 2019 without pair mining, summed over tuples:
    ``1/α log(1 + Σ_p e^{−α(s_p − λ)}) + 1/β log(1 + Σ_n e^{β(s_n − λ)})``, λ = ``base``.

    ``s_pos`` (B, P), ``s_neg`` (B, N). Defaults α = 2, β = 40, λ = 0.5.
    """
    pos = _log_one_plus_sum_exp(-alpha * (s_pos - base)) / alpha
    neg = _log_one_plus_sum_exp(beta * (s_neg - base)) / beta
    return (pos + neg).sum()


def _log_one_plus_sum_exp(x: Tensor) -> Tensor:
    # log(1 + Σ e^x) as a logsumexp over [0, x]: β = 40 overflows a plain exp in float32.
    return torch.logsumexp(F.pad(x, (1, 0)), dim=-1)


def regression_loss(query: Tensor, gallery: Tensor, eps: float = EPS) -> Tensor:
    """AML Eq. (7): ``½ ‖q_a − g_a + ε‖²``, summed over the batch; no labels, no mining, random images.

    The AML code runs it as the contrastive loss with the gallery embedding as the only positive, hence
    the same ε = 1e-6 and the sum over images.
    """
    return 0.5 * (query - gallery + eps).pow(2).sum()


def rkd_distance_loss(query: Tensor, gallery: Tensor) -> Tensor:
    """RKD-D (Park et al. CVPR 2019; AML Eq. 8): smooth-L1 between the pair-distance matrices, each
    divided by its mean non-zero distance; mean over the B² pairs. The gallery side gets no gradient."""
    return F.smooth_l1_loss(_normalised_distances(query), _normalised_distances(gallery.detach()))


def _normalised_distances(x: Tensor) -> Tensor:
    d = pairwise_distances(x)
    return d / d[d > 0].mean()


def rkd_angle_loss(query: Tensor, gallery: Tensor) -> Tensor:
    """RKD-A (Park et al. CVPR 2019; AML Eq. 8): smooth-L1 between the cosines of the angles of all
    triplets; mean over the B³ triplets. The gallery side gets no gradient."""
    return F.smooth_l1_loss(_angles(query), _angles(gallery.detach()))


def _angles(x: Tensor) -> Tensor:
    """``cos ∠(x_j, x_i, x_k)`` for all (i, j, k): (B, B, B); degenerate triplets (j or k = i) give 0."""
    e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), dim=2)  # e[i, j] = unit(x_j − x_i)
    return e @ e.transpose(1, 2)


def darkrank_loss(query: Tensor, gallery: Tensor, alpha: float = 3.0, beta: float = 3.0,
                  list_len: int = 4) -> Tensor:
    """Hard DarkRank (Chen et al. AAAI 2018; AML Eq. 9), mean over the B anchors.

    Scores ``−α d^β``; the gallery network ranks each anchor's ``list_len`` nearest other items; the
    loss is the ListMLE negative log-likelihood of that order under the query network's scores:
    ``−Σ_i (s_i − log Σ_{j≥i} e^{s_j})``. Defaults α = 3, β = 3, list 4.
    """
    if len(query) <= list_len:
        raise InputError(f"darkrank ranks {list_len} neighbours per item, so it needs a batch of more "
                         f"than {list_len} items, not {len(query)}; raise the batch size")
    is_self = torch.eye(len(query), dtype=torch.bool, device=query.device)
    order = pairwise_distances(gallery.detach()).masked_fill(is_self, float("inf"))
    order = order.topk(list_len, dim=1, largest=False).indices
    scores = (-alpha * pairwise_distances(query).pow(beta)).gather(1, order)
    log_tail_mass = torch.logcumsumexp(scores.flip(1), dim=1).flip(1)  # log Σ_{j≥i} e^{s_j}
    return -(scores - log_tail_mass).sum(1).mean()


def _means(**terms: Tensor) -> dict[str, Tensor]:
    """Detached means for logging (the AML code logs e.g. the mean negative distance); empty ones skipped."""
    return {name: t.detach().mean() for name, t in terms.items() if t.numel()}


# ---- registered losses -----------------------------------------------------------------------------

@register_loss("contrastive", family="aml", batch_reduction="sum", source=f"{AML}, Eq. (4)",
               summary="contrastive loss between the query-side anchor and its tuple (1 positive, "
                       "hard negatives)",
               equation="Σ_j ½ y_j d_j² + ½ (1−y_j) max(0, m − d_j)²",
               needs=("query", "positive", "negative"))
class ContrastiveLoss(nn.Module):
    def __init__(self, margin: float = 0.7):
        super().__init__()
        self.margin = margin

    def forward(self, batch: LossBatch) -> LossOutput:
        query, positive, negative = batch.query, batch.positive, batch.negative
        d_pos, d_neg = tuple_distances(query, positive), tuple_distances(query, negative)
        return LossOutput(contrastive_loss(d_pos, d_neg, self.margin), _means(d_pos=d_pos, d_neg=d_neg))


@register_loss("contr_plus", family="aml", batch_reduction="sum", source=f"{AML}, Eq. (10)",
               summary="Contr+: contrastive with the anchor's own gallery embedding g_a as one more "
                       "positive (SELF); the paper's best asymmetric loss with labels",
               equation="½ ‖q_a − g_a‖² + Σ_j ½ y_j d_j² + ½ (1−y_j) max(0, m − d_j)²",
               needs=("query", "gallery", "positive", "negative"))
class ContrPlusLoss(nn.Module):
    def __init__(self, margin: float = 0.7):
        super().__init__()
        self.margin = margin

    def forward(self, batch: LossBatch) -> LossOutput:
        query, gallery, positive, negative = batch.query, batch.gallery, batch.positive, batch.negative
        d_self = tuple_distances(query, gallery.unsqueeze(1))
        d_pos, d_neg = tuple_distances(query, positive), tuple_distances(query, negative)
        total = contrastive_loss(torch.cat([d_self, d_pos], 1), d_neg, self.margin)
        return LossOutput(total, _means(d_self=d_self, d_pos=d_pos, d_neg=d_neg))


@register_loss("triplet", family="aml", batch_reduction="sum", source=f"{AML}, Eq. (5)",
               summary="triplet loss on squared distances, anchor vs its positive and each negative",
               equation="Σ_n max(0, ‖q_a − g_p‖² − ‖q_a − g_n‖² + m)",
               needs=("query", "positive", "negative"))
class TripletLoss(nn.Module):
    def __init__(self, margin: float = 0.1):
        super().__init__()
        self.margin = margin

    def forward(self, batch: LossBatch) -> LossOutput:
        query, positive, negative = batch.query, batch.positive, batch.negative
        d_pos, d_neg = tuple_distances(query, positive, eps=0), tuple_distances(query, negative, eps=0)  # no ε there
        return LossOutput(triplet_loss(d_pos, d_neg, self.margin), _means(d_pos=d_pos, d_neg=d_neg))


@register_loss("multi_similarity", family="aml", batch_reduction="sum", source=f"{AML}, Eq. (6)",
               summary="multi-similarity loss (Wang et al. 2019, no pair mining) on the asymmetric "
                       "similarities of the tuple",
               equation="1/α log(1 + Σ_p e^{−α(s_p − λ)}) + 1/β log(1 + Σ_n e^{β(s_n − λ)})",
               needs=("query", "positive", "negative"))
class MultiSimilarityLoss(nn.Module):
    def __init__(self, alpha: float = 2.0, beta: float = 40.0, base: float = 0.5):
        super().__init__()
        self.alpha, self.beta, self.base = alpha, beta, base

    def forward(self, batch: LossBatch) -> LossOutput:
        query, positive, negative = batch.query, batch.positive, batch.negative
        s_pos, s_neg = tuple_similarities(query, positive), tuple_similarities(query, negative)
        total = multi_similarity_loss(s_pos, s_neg, self.alpha, self.beta, self.base)
        return LossOutput(total, _means(s_pos=s_pos, s_neg=s_neg))


@register_loss("regression", family="aml", batch_reduction="sum", source=f"{AML}, Eq. (7)",
               summary="regress the query embedding onto the gallery embedding of the same image; "
                       "no labels, random images",
               equation="½ ‖q_a − g_a‖²",
               needs=("query", "gallery"))
class RegressionLoss(nn.Module):
    def forward(self, batch: LossBatch) -> LossOutput:
        query, gallery = batch.query, batch.gallery
        return LossOutput(regression_loss(query, gallery), _means(d_self=(query - gallery).norm(dim=1)))


@register_loss("rkd", family="aml", source=f"{AML}, Eq. (8); Park et al., CVPR 2019",
               summary="relational KD: match the batch's pair distances and triplet angles of the query "
                       "network to the gallery network's (smooth-L1, gallery without grad)",
               equation="w_a·smoothL1(ψ_A(Q), ψ_A(G)) + w_d·smoothL1(ψ_D(Q), ψ_D(G))",
               needs=("query", "gallery"))
class RKDLoss(nn.Module):
    def __init__(self, angle_weight: float = 2.0, distance_weight: float = 1.0):
        super().__init__()
        self.angle_weight, self.distance_weight = angle_weight, distance_weight

    def forward(self, batch: LossBatch) -> LossOutput:
        query, gallery = batch.query, batch.gallery
        angle, distance = rkd_angle_loss(query, gallery), rkd_distance_loss(query, gallery)
        total = self.angle_weight * angle + self.distance_weight * distance
        return LossOutput(total, {"angle": angle.detach(), "distance": distance.detach()})


@register_loss("darkrank", family="aml", source=f"{AML}, Eq. (9); Chen et al., AAAI 2018",
               summary="hard DarkRank: ListMLE of the query network's scores in the order the gallery "
                       "network ranks each item's nearest neighbours",
               equation="−Σ_i (s_i − log Σ_{j≥i} e^{s_j}),  s = −α d^β in the gallery's top-list order",
               needs=("query", "gallery"))
class DarkRankLoss(nn.Module):
    def __init__(self, alpha: float = 3.0, beta: float = 3.0, list_len: int = 4):
        super().__init__()
        self.alpha, self.beta, self.list_len = alpha, beta, list_len

    def forward(self, batch: LossBatch) -> LossOutput:
        query, gallery = batch.query, batch.gallery
        return LossOutput(darkrank_loss(query, gallery, self.alpha, self.beta, self.list_len))
