"""ACD's collaborative logit distillation (methods.md §4): Xie et al., Asymmetric collaborative distillation for
asymmetric image retrieval.

``acd`` works on logits: the frozen query network's ``query_logits`` z^q, the co-trained gallery's
``gallery_logits`` z^g and the collaborative ``collab_logits`` z^c = W_g(½(g + q)). The base distillers it is
combined with are those of :mod:`asymret.training.losses.distill`.
"""

from __future__ import annotations

from torch import Tensor, nn

from asymret.training.losses.distill import logit_kd
from asymret.training.losses.registry import LossBatch, LossOutput, detached_parts, register_loss

ACD = "Xie et al., Asymmetric collaborative distillation for asymmetric image retrieval"


def acd_loss(z_q: Tensor, z_g: Tensor, z_c: Tensor, alpha: float = 3.0, beta: float = 2.0,
             tau: float = 2.0) -> tuple[Tensor, Tensor]:
    """ACD Eq. (3), its two terms: ``α τ² KL(σ(z^g/τ) ‖ σ(z^q/τ))`` and
    ``β (τ/2)² KL(σ(z^c/(τ/2)) ‖ σ(z^q/(τ/2)))``, mean over the batch.

    P comes from the gallery side (z^g, z^c) and carries the gradient; the frozen query network's z^q is
    a constant. This is the direction of methods.md and of the ACD code (``vanillakd_loss(z^q, z^g)``:
    ``F.kl_div(log_softmax(z^q/τ), softmax(z^g/τ))``). Defaults α = 3, β = 2, τ = 2 (τ = 4 for Swin).
    """
    z_q = z_q.detach()
    return alpha * logit_kd(z_g, z_q, tau), beta * logit_kd(z_c, z_q, tau / 2)


@register_loss("acd", family="acd", source=f"{ACD}, Eq. (3)",
               summary="asymmetric collaborative distillation: the co-trained gallery network's logits "
                       "and the collaborative logits follow the frozen query network's",
               equation="α τ² KL(σ(z^g/τ) ‖ σ(z^q/τ)) + β (τ/2)² KL(σ(z^c/(τ/2)) ‖ σ(z^q/(τ/2)))",
               needs=("query_logits", "gallery_logits", "collab_logits"))
class ACDLoss(nn.Module):
    """α = 3, β = 2, τ = 2 (τ = 4 for a Swin gallery network). z^q is frozen and gets no gradient."""

    def __init__(self, alpha: float = 3.0, beta: float = 2.0, tau: float = 2.0):
        super().__init__()
        self.alpha, self.beta, self.tau = alpha, beta, tau

    def forward(self, batch: LossBatch) -> LossOutput:
        z_q, z_g, z_c = batch.query_logits, batch.gallery_logits, batch.collab_logits
        gallery_kl, collab_kl = acd_loss(z_q, z_g, z_c, self.alpha, self.beta, self.tau)
        return LossOutput(gallery_kl + collab_kl, detached_parts(gallery_kl=gallery_kl, collab_kl=collab_kl))
