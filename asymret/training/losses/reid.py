"""Supervised re-ID losses (methods.md §1, §3): the trained network's own loss in every D3still/ACD method.

Cross-entropy with label smoothing on the classifier logits plus batch-hard triplet on the pooled
feature, over a P×K batch (16 identities × 6 images), weights 1 and 1 as in the D3still code. They read
the query side (``query_logits``, ``query``); for the co-trained gallery network of ACD the trainer
passes the gallery network's logits and pooled feature in those same fields. ``query`` here is the
pooled feature before the re-ID head and is NOT normalised: the D3still/ACD code (``TripletLoss(...,
normalize_feature=False)``) and fast-reid's default (``NORM_FEAT: False``) use raw Euclidean distances.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asymret.training.losses.aml import pairwise_distances
from asymret.training.losses.registry import LossBatch, LossOutput, register_loss

REID = "D3still / ACD code (fast-reid convention)"


def ce_label_smoothing(logits: Tensor, labels: Tensor, epsilon: float = 0.1) -> Tensor:
    """Cross-entropy against ``(1 − ε)·onehot + ε/C`` (Szegedy et al., CVPR 2016); ε = 0.1."""
    return F.cross_entropy(logits, labels, label_smoothing=epsilon)


def batch_hard_triplet(features: Tensor, labels: Tensor, margin: float = 0.3, normalize: bool = False) -> Tensor:
    """Batch-hard triplet (Hermans et al., In defense of the triplet loss, 2017):
    ``mean_a max(0, max_p d(a,p) − min_n d(a,n) + m)``, Euclidean d, m = 0.3.

    Positives exclude the anchor itself; anchors with no other positive or no negative are skipped (a
    P×K batch with K ≥ 2 has none; the D3still code would count the anchor as its own positive).
    """
    x = F.normalize(features, dim=1) if normalize else features
    dist = pairwise_distances(x)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    positive = same & ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    hardest_pos = dist.masked_fill(~positive, float("-inf")).amax(1)
    hardest_neg = dist.masked_fill(same, float("inf")).amin(1)
    valid = positive.any(1) & (~same).any(1)
    if not valid.any():
        return dist.sum() * 0  # keeps the graph: a batch without triplets contributes nothing
    return F.relu(hardest_pos - hardest_neg + margin)[valid].mean()


@register_loss("ce_ls", family="reid", source=f"Szegedy et al., CVPR 2016; {REID}",
               summary="cross-entropy with label smoothing on the trained network's identity logits",
               equation="w · CE(z, (1 − ε) onehot(y) + ε/C)", needs=("query_logits", "labels"))
class CELabelSmoothingLoss(nn.Module):
    def __init__(self, weight: float = 1.0, epsilon: float = 0.1):
        super().__init__()
        self.weight, self.epsilon = weight, epsilon

    def forward(self, batch: LossBatch) -> LossOutput:
        logits, labels = batch.query_logits, batch.labels
        ce = ce_label_smoothing(logits, labels, self.epsilon)
        return LossOutput(self.weight * ce, {"ce": ce.detach()})


@register_loss("triplet_bh", family="reid", source=f"Hermans et al., arXiv:1703.07737, 2017; {REID}",
               summary="batch-hard triplet on the trained network's pooled feature (raw Euclidean)",
               equation="w · mean_a max(0, max_p d(a,p) − min_n d(a,n) + m)", needs=("query", "labels"))
class BatchHardTripletLoss(nn.Module):
    def __init__(self, weight: float = 1.0, margin: float = 0.3, normalize: bool = False):
        super().__init__()
        self.weight, self.margin, self.normalize = weight, margin, normalize

    def forward(self, batch: LossBatch) -> LossOutput:
        features, labels = batch.query, batch.labels
        triplet = batch_hard_triplet(features, labels, self.margin, self.normalize)
        return LossOutput(self.weight * triplet, {"triplet": triplet.detach()})


@register_loss("reid_supervised", family="reid", source=f"{REID}; methods.md §3",
               summary="the re-ID network's own loss in every D3still/ACD method: CE with label "
                       "smoothing plus batch-hard triplet",
               equation="w_ce · CE_ls(z, y) + w_tri · triplet_bh(f, y)",
               needs=("query_logits", "query", "labels"))
class ReIDSupervisedLoss(nn.Module):
    def __init__(self, ce_weight: float = 1.0, triplet_weight: float = 1.0, epsilon: float = 0.1,
                 margin: float = 0.3, normalize: bool = False):
        super().__init__()
        self.ce_weight, self.triplet_weight = ce_weight, triplet_weight
        self.epsilon, self.margin, self.normalize = epsilon, margin, normalize

    def forward(self, batch: LossBatch) -> LossOutput:
        logits, features, labels = batch.query_logits, batch.query, batch.labels
        ce = ce_label_smoothing(logits, labels, self.epsilon)
        triplet = batch_hard_triplet(features, labels, self.margin, self.normalize)
        total = self.ce_weight * ce + self.triplet_weight * triplet
        return LossOutput(total, {"ce": ce.detach(), "triplet": triplet.detach()})
