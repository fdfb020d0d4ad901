"""Re-ID distillers (methods.md §3); ACD's logit distillation is in :mod:`.acd` (§4), the local-feature
carry-overs in :mod:`.local` (§5).

§3 distillers (``fitnet``, ``cc``, ``csd``, ``raml``, ``rop``, ``d3still``, ``pkt``, ``ugd``) compare
``batch.query_raw`` (B, D) and ``batch.gallery_raw`` (B, D): the two networks' retrieval features of the
same B images (the distillation batch: query resolution for φ_q, gallery resolution for φ_g) as the
D3still code feeds them, the BN-neck output before any L2 normalisation (``retrieval_feat``). FitNet
regresses them as they are; the others normalise them first, as their code does. ``vanilla_kd`` compares
the two networks' logits. Similarity matrices are computed in float64, as the D3still code does for CSD,
ROP and D3still (``.double()``; autocast leaves float64 alone): a bf16 product under AMP would round a
cosine by up to 4e-3, which CSD's τ_g = 0.01 and ROP's 1e-6 step magnify. None of them detaches the
gallery side unless its method says so: under ACD (§4) the base loss's gradient reaches the co-trained
gallery network. Each class's ``weight`` defaults to the paper's weight for ResNet query networks; the
MobileNet alternative is in its docstring.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asymret.errors import ConfigError, InputError
from asymret.retrieval.encoders import grid_tokens
from asymret.training.losses.registry import LossBatch, LossOutput, detached_parts, register_loss

D3STILL = "Xie et al., D3still: Decoupled differential distillation for asymmetric image retrieval, CVPR 2024"
UGD = ("Unambiguous granularity distillation for asymmetric image retrieval, Neural Networks 2025 "
       "(sciencedirect S0893608025001820; its official code is D3still's distillers/UGD.py)")


# ---- shared pieces -----------------------------------------------------------------------------------

def kl_elements(target_logits: Tensor, logits: Tensor, dim: int = -1) -> Tensor:
    """Elementwise terms of ``KL(P ‖ Q) = Σ P log(P/Q)``, P = softmax(target_logits), Q = softmax(logits).

    Summing over ``dim`` gives the divergence of each distribution (``F.kl_div(log Q, P)`` per element).
    """
    log_p = F.log_softmax(target_logits, dim)
    return log_p.exp() * (log_p - F.log_softmax(logits, dim))


def logit_kd(target_logits: Tensor, logits: Tensor, tau: float) -> Tensor:
    """Hinton KD: ``τ² mean_i KL(σ(z_target/τ) ‖ σ(z/τ))``."""
    return tau ** 2 * kl_elements(target_logits / tau, logits / tau).sum(1).mean()


def unit64(x: Tensor) -> Tensor:
    """Rows L2-normalised, in float64 (the similarities below are float64, as in the D3still code)."""
    return F.normalize(x, dim=1).double()


def ranked_similarities(query: Tensor, gallery: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
    """Each row of ``S^gg`` sorted descending, and ``S^qg`` gathered at the same gallery indices: (B, k).

    This is the list CSD, ROP and D3still distil: the gallery network's own ranking of the batch for
    each anchor, and the query network's scores against that ranked list. ``k`` None keeps the batch.
    Cosines of the L2-normalised rows, in float64.
    """
    q, g = unit64(query), unit64(gallery)
    s_gg, order = (g @ g.t()).sort(dim=1, descending=True)
    s_qg = (q @ g.t()).gather(1, order)
    return s_gg[:, :k], s_qg[:, :k]


# ---- §3: the D3still table ---------------------------------------------------------------------------

def fitnet_loss(query: Tensor, gallery: Tensor) -> Tensor:
    """FitNet (Romero et al., ICLR 2015) as D3still runs it: ``MSE(q_i, g_i)``, mean over B·D entries."""
    return F.mse_loss(query, gallery)


def cc_loss(query: Tensor, gallery: Tensor) -> Tensor:
    """Correlation congruence as in the D3still code (Peng et al., ICCV 2019):
    ``δ_i = |q̂_i − ĝ_i|``, loss ``mean_i ⟨δ_i, δ_{i+1}⟩`` over consecutive items of the batch."""
    delta = (F.normalize(query, dim=1) - F.normalize(gallery, dim=1)).abs()
    return (delta[:-1] * delta[1:]).sum(1).mean()


def csd_loss(s_gg: Tensor, s_qg: Tensor, tau_q: float = 1.0, tau_g: float = 0.01) -> Tensor:
    """Contextual similarity distillation (Wu et al., CVPR 2023), on :func:`ranked_similarities` rows:
    ``p_g = softmax(S^gg_{i,:k}/τ_g)``, ``p_q = softmax(S^qg_{i,:k}/τ_q)``, ``Σ_i KL(p_g ‖ p_q) / B``.

    p_g is the target and gets no gradient (CSD code). Defaults τ_q = 1, τ_g = 0.01.
    """
    return kl_elements(s_gg.detach() / tau_g, s_qg / tau_q).sum() / len(s_gg)


def offdiag_mse(a: Tensor, b: Tensor, eps: float = 0.0) -> Tensor:
    """Mean squared difference of two (B, B) matrices over the B(B−1) off-diagonal entries,
    ``Σ_{i≠j} (a_ij − b_ij + eps)² / (B(B−1))`` (``eps``: the RAML code's shift inside the square)."""
    off = ~torch.eye(len(a), dtype=torch.bool, device=a.device)
    return (a - b + eps)[off].pow(2).mean()


def raml_loss(query: Tensor, gallery: Tensor, lambda1: float = 0.7482, lambda2: float = 0.6778,
              eps: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """RAML second-order loss (Suma et al., WACV 2023): the three terms
    ``mean_i (1 − q̂_iᵀĝ_i)²``, ``λ1 MSE_offdiag(S^qg, S^gg)``, ``λ2 MSE_offdiag(S^qq, S^gg)``.

    Defaults λ1 = 0.7482, λ2 = 0.6778, in float64. The RAML / D3still code adds ``eps`` = 1e-6 inside each
    square, ``(x + eps)²``; the paper's form (eps 0) is the default, because nothing here needs it: no square
    root or division, and the gradient at q = g is exactly 0 without it (``2·eps`` with it; measured in
    docs/reid.md). ``eps`` reproduces the code.
    """
    q, g = unit64(query), unit64(gallery)
    s_gg = g @ g.t()
    absolute = (1 - (q * g).sum(1) + eps).pow(2).mean()
    return (absolute, lambda1 * offdiag_mse(q @ g.t(), s_gg, eps),
            lambda2 * offdiag_mse(q @ q.t(), s_gg, eps))


def rop_rank_weights(s_gg: Tensor, rank_weight: float = 0.2) -> Tensor:
    """ROP Eq. (9): ``w_a = softmax(0.2 s^g)_a · a`` for ranks a = 1..k of each row: (B, k)."""
    ranks = torch.arange(1, s_gg.shape[1] + 1, dtype=s_gg.dtype, device=s_gg.device)
    return F.softmax(rank_weight * s_gg, dim=1) * ranks


def rop_loss(s_gg: Tensor, s_qg: Tensor, tau: float = 0.1, rank_weight: float = 0.2, tau_g: float = 1e-6) -> Tensor:
    """Rank order preservation (Wu et al., ICLR 2023, Eq. 8-10), on :func:`ranked_similarities` rows:
    ``I_g[a,b] = σ((s^g_b − s^g_a)/τ_g)``, ``I_q[a,b] = σ((s^q_b − s^g_a)/τ)``,
    loss ``mean_i Σ_{a,b} w_a (I_g − I_q)² / k``. Defaults τ = 0.1, rank weight 0.2, τ_g = 1e-6 (a step, as
    D3still's code); ACD's ``ROP.py`` softens the gallery indicator with τ_g = 0.1.
    """
    threshold = s_gg.unsqueeze(2)  # [i, a, ·] = s^g_a: is item b above the gallery's rank-a score?
    i_g = torch.sigmoid((s_gg.unsqueeze(1) - threshold) / tau_g)
    i_q = torch.sigmoid((s_qg.unsqueeze(1) - threshold) / tau)
    weights = rop_rank_weights(s_gg, rank_weight).unsqueeze(2)
    return ((i_g - i_q).pow(2) * weights).sum((1, 2)).mean() / s_gg.shape[1]


def d3still_masks(d_q: Tensor, d_g: Tensor) -> tuple[Tensor, Tensor]:
    """D3still's hard and simple pairs: ``r = D^q / D^g < 0`` (the query network orders the two items
    against the gallery's order) and ``r > 0``; constants, no gradient.

    Written as sign products so that gallery ties (D^g = 0, the diagonal among them) fall in neither
    mask; the D3still code instead divides by 1 there, which only differs on exact ties off the diagonal.
    """
    r_sign = (d_q * d_g).detach()
    return r_sign < 0, r_sign > 0


def d3still_loss(s_gg: Tensor, s_qg: Tensor, alpha: float = 50.0, beta: float = 2.0,
                 gamma: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """D3still (CVPR 2024) on the top-K :func:`ranked_similarities` rows; its three terms:

    feature ``α/B ‖s^g_(1) − s^q_(1)‖₂`` (norm over the batch); with the differentials over ranks 2..K
    ``D[a,b] = s_(b) − s_(a)`` and ``E = (D^q − D^g)/(0.1 + |D^g|)``: hard ``β mean_i ‖M_hard⊙E_i‖₂/(K−1)``
    and simple ``γ mean_i ‖M_simple⊙E_i‖₂/(K−1)``. Defaults K = 10, α, β, γ = 50, 2, 1.
    """
    feature = alpha * torch.linalg.vector_norm(s_gg[:, 0] - s_qg[:, 0]) / len(s_gg)
    top_g, top_q = s_gg[:, 1:], s_qg[:, 1:]
    d_g = top_g.unsqueeze(1) - top_g.unsqueeze(2)
    d_q = top_q.unsqueeze(1) - top_q.unsqueeze(2)
    hard, simple = d3still_masks(d_q, d_g)
    error = (d_q - d_g) / (0.1 + d_g.abs())
    n = top_g.shape[1]  # K − 1

    def term(mask: Tensor) -> Tensor:
        return torch.linalg.vector_norm(error * mask, dim=(1, 2)).mean() / n

    return feature, beta * term(hard), gamma * term(simple)


def pkt_conditionals(x: Tensor, eps: float = 1e-7) -> Tensor:
    """PKT's conditional probabilities ``p_{j|i} = K_ij / Σ_j K_ij`` of the cosine kernel ``K = (x̂ x̂ᵀ + 1)/2``,
    with ``x̂ = x / (‖x‖ + eps)`` (the eps of the PKT code, not F.normalize's clamp); float64."""
    x = x.double()
    x = x / (x.norm(dim=1, keepdim=True) + eps)
    kernel = (x @ x.t() + 1) / 2
    return kernel / kernel.sum(1, keepdim=True)


def pkt_loss(query: Tensor, gallery: Tensor, eps: float = 1e-7) -> Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018), as D3still's ``PKT.py`` runs it:
    ``mean_{i,j} p^g_{j|i} log((p^g_{j|i} + eps) / (p^q_{j|i} + eps))`` over all B² entries (diagonal
    included) of :func:`pkt_conditionals`, eps = 1e-7. (The code also replaces NaN entries of x̂ by 0, which
    only a NaN feature produces; here a NaN feature gives a NaN loss, which stops training with its error.)"""
    p_q, p_g = pkt_conditionals(query, eps), pkt_conditionals(gallery, eps)
    return (p_g * torch.log((p_g + eps) / (p_q + eps))).mean()


def ugd_loss(query: Tensor, gallery: Tensor, query_local: list[Tensor], gallery_local: list[Tensor],
             gallery_local_logits: list[Tensor], labels: Tensor) -> tuple[Tensor, list[Tensor]]:
    """UGD (Neural Networks 2025; D3still code ``UGD.py``): the global term ``mean_i ‖ĝ_i − q̂_i‖₂`` and, per
    granularity, ``mean ‖t̂ − ŝ‖₂`` over the *unambiguous* local tokens: those whose gallery-side logits predict
    the image's own identity (``argmax z = y_i``); 0 when a batch has none.

    ``query_local`` / ``gallery_local``: (B, T, D) local features of each granularity (the query network's
    projected stage cells, the gallery head's features of its map's cells); ``gallery_local_logits`` (B, T, C).
    """
    glob = (F.normalize(gallery, dim=1) - F.normalize(query, dim=1)).norm(dim=1).mean()
    local = []
    for s_tok, t_tok, z in zip(query_local, gallery_local, gallery_local_logits, strict=True):
        keep = z.argmax(-1) == labels.unsqueeze(1)
        dist = (F.normalize(t_tok, dim=-1) - F.normalize(s_tok, dim=-1)).norm(dim=-1)
        local.append(dist[keep].mean() if keep.any() else dist.new_zeros(()))
    return glob, local


@register_loss("vanilla_kd", family="reid", source="Hinton et al., Distilling the knowledge in a neural network, "
                                                    "2015; as the D3still code runs it (VanillaKD, distillers/KD.py)",
               summary="Hinton KD between the classifiers: the query network's identity distribution on the "
                       "distillation batch follows the gallery network's, at temperature T",
               equation="w · T² mean_i KL(σ(z^g_i/T) ‖ σ(z^q_i/T))", needs=("query_logits", "gallery_logits"))
class VanillaKDLoss(nn.Module):
    """``weight`` 1, ``temperature`` 2 (every D3still config). Both networks need classifiers over the same
    training identities."""

    def __init__(self, weight: float = 1.0, temperature: float = 2.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"vanilla_kd needs a positive temperature, got {temperature}")
        self.weight, self.temperature = weight, temperature

    def forward(self, batch: LossBatch) -> LossOutput:
        z_q, z_g = batch.query_logits, batch.gallery_logits
        if z_q.shape != z_g.shape:
            raise InputError(f"vanilla_kd compares query logits of shape {tuple(z_q.shape)} with gallery logits of "
                             f"shape {tuple(z_g.shape)}; give both networks num_classes: the training identities")
        kd = logit_kd(z_g, z_q, self.temperature)
        return LossOutput(self.weight * kd, detached_parts(kd=kd))


@register_loss("pkt", family="reid", source="Passalis & Tefas, Learning deep representations with probabilistic "
                                             "knowledge transfer, ECCV 2018; as the D3still code runs it (distillers/PKT.py)",
               summary="probabilistic knowledge transfer: the query network's cosine-kernel neighbour "
                       "distributions over the batch follow the gallery network's",
               equation="w · mean_{i,j} p^g_{j|i} log((p^g_{j|i} + ε)/(p^q_{j|i} + ε)),  "
                        "p_{j|i} ∝ (x̂_iᵀx̂_j + 1)/2, x̂ = x/(‖x‖ + ε)",
               needs=("query_raw", "gallery_raw"))
class PKTLoss(nn.Module):
    """``weight`` 30000 (every D3still config), ``eps`` 1e-7 (PKT code)."""

    def __init__(self, weight: float = 30000.0, eps: float = 1e-7):
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, batch: LossBatch) -> LossOutput:
        query, gallery = batch.query_raw, batch.gallery_raw
        pkt = pkt_loss(query, gallery, self.eps)
        return LossOutput(self.weight * pkt, detached_parts(pkt=pkt))


def ugd_projector(in_dim: int, dim: int) -> nn.Sequential:
    """UGD's student-side projector ``BN1d → Linear(no bias) → BN1d``, the Linear Kaiming-initialised (fan-out)."""
    linear = nn.Linear(in_dim, dim, bias=False)
    nn.init.kaiming_normal_(linear.weight, a=0, mode="fan_out")
    return nn.Sequential(nn.BatchNorm1d(in_dim), linear, nn.BatchNorm1d(dim))


@register_loss("ugd", family="reid", source=UGD,
               summary="unambiguous granularity distillation: the global retrieval features plus local features "
                       "at two granularities (the query network's stage-`layer` map and the gallery network's "
                       "final map pooled to P×P and P/2×P/2 cells), kept only where the gallery's classifier "
                       "recognises the image's identity in the cell",
               equation="w · [α mean_i ‖ĝ_i − q̂_i‖ + β Σ_{P, P/2} mean_{cells: argmax z^g = y} ‖t̂ − Proj(ŝ)‖]",
               needs=("query_raw", "gallery_raw", "query_stages", "gallery_local", "gallery_local_logits", "labels"))
class UGDLoss(nn.Module):
    """α = 2, β = 2 for a ResNet18 query network (α = 5 for MobileNetV3-Small), ``layer`` 3 (D3still code); the
    cells: ``grid`` P = the query input's height // 16 (D3still: ``STUDENT_SIZE_TRAIN[0] // 16``) and P // 2.
    Two learned projectors (one per granularity) map the query network's stage-``layer`` cells (``in_dim``
    channels) to the gallery head's ``dim`` = 512; :meth:`setup` takes P and ``in_dim`` from the query
    network when they are not given. The gallery side is a constant (frozen gallery network)."""

    def __init__(self, weight: float = 1.0, alpha: float = 2.0, beta: float = 2.0, layer: int = 3,
                 grid: int | None = None, in_dim: int | None = None, dim: int = 512):
        super().__init__()
        if layer not in (1, 2, 3, 4):
            raise ConfigError(f"ugd's layer is a backbone stage 1-4, got {layer}")
        self.weight, self.alpha, self.beta, self.layer, self.dim = weight, alpha, beta, layer, dim
        self.grid, self.in_dim = grid, in_dim
        self.projectors = nn.ModuleList()
        if grid is not None and in_dim is not None:
            self._build(grid, in_dim)

    def _build(self, grid: int, in_dim: int) -> None:
        if grid < 2:
            raise ConfigError(f"ugd pools the stage maps to P × P and P/2 × P/2 cells and needs P ≥ 2, got P = {grid}; "
                              "give the query network an input at least 32 px high, or set grid")
        self.grid, self.in_dim = grid, in_dim
        self.projectors = nn.ModuleList([ugd_projector(in_dim, self.dim) for _ in self.local_grids])

    def setup(self, query_net, gallery_net) -> None:
        """Fix P and ``in_dim`` from the networks (once: a resumed run keeps its projectors)."""
        if len(self.projectors):
            return
        size = query_net.spec.input.size
        if isinstance(size, int):
            raise ConfigError("ugd needs a fixed query input size; set input.size: [height, width] on query_net")
        self._build(self.grid or size[0] // 16, self.in_dim or query_net.stage_channels()[self.layer - 1])

    @property
    def local_grids(self) -> tuple[int, int]:
        if self.grid is None:
            raise ConfigError("ugd does not know its cell grid yet; set grid and in_dim, or let the re-ID recipe "
                              "call setup() with the networks")
        return self.grid, self.grid // 2

    def forward(self, batch: LossBatch) -> LossOutput:
        query, gallery, stages, labels = batch.query_raw, batch.gallery_raw, batch.query_stages, batch.labels
        g_local, g_logits = batch.gallery_local, batch.gallery_local_logits
        if not len(self.projectors):
            raise ConfigError("ugd has no projectors yet: set grid and in_dim, or let the re-ID recipe call setup() "
                              "with the networks")
        fmap = stages[self.layer - 1]
        if fmap.shape[1] != self.in_dim:
            raise InputError(f"ugd's projectors take {self.in_dim} channels but stage {self.layer} of the query "
                             f"network has {fmap.shape[1]}; set in_dim: {fmap.shape[1]}")
        q_local = []
        for grid, projector in zip(self.local_grids, self.projectors):
            tokens = grid_tokens(fmap, grid)
            b, t, c = tokens.shape
            q_local.append(projector(tokens.reshape(b * t, c)).reshape(b, t, -1))
        glob, (local, local_half) = ugd_loss(query, gallery, q_local, list(g_local), list(g_logits), labels)
        total = self.weight * (self.alpha * glob + self.beta * (local + local_half))
        return LossOutput(total, detached_parts(glob=glob, local=local, local_half=local_half))


# ---- registered losses -------------------------------------------------------------------------------

@register_loss("fitnet", family="reid", source=f"Romero et al., FitNets, ICLR 2015; {D3STILL}, Table 1",
               summary="MSE between the query and gallery retrieval features as D3still's FitNet.py feeds them: "
                       "the raw BN-neck outputs, not L2-normalised (a Linear projector when their dimensions "
                       "differ)",
               equation="w · MSE(P q_i, g_i),  q, g raw", needs=("query_raw", "gallery_raw"))
class FitNetLoss(nn.Module):
    """``weight`` 2 (5 for a MobileNet query network). ``in_dim``/``out_dim`` add a learned
    ``Linear(in_dim, out_dim)`` on the query side; the trainer must optimise its parameters too."""

    def __init__(self, weight: float = 2.0, in_dim: int | None = None, out_dim: int | None = None):
        super().__init__()
        self.weight = weight
        self.projector = nn.Linear(in_dim, out_dim) if in_dim and out_dim and in_dim != out_dim else nn.Identity()

    def forward(self, batch: LossBatch) -> LossOutput:
        query, gallery = batch.query_raw, batch.gallery_raw
        query = self.projector(query)
        if query.shape != gallery.shape:
            raise InputError(f"fitnet compares query features of shape {tuple(query.shape)} with gallery "
                             f"features of shape {tuple(gallery.shape)}; set in_dim and out_dim to add a "
                             "projector")
        mse = fitnet_loss(query, gallery)
        return LossOutput(self.weight * mse, detached_parts(mse=mse))


@register_loss("cc", family="reid", source=f"Peng et al., Correlation congruence, ICCV 2019; {D3STILL}, Table 1",
               summary="correlation congruence: consecutive items' query-gallery residuals should not "
                       "correlate",
               equation="w · mean_i ⟨δ_i, δ_{i+1}⟩,  δ_i = |q̂_i − ĝ_i|", needs=("query_raw", "gallery_raw"))
class CCLoss(nn.Module):
    """``weight`` 5 (10 for a MobileNet query network)."""

    def __init__(self, weight: float = 5.0):
        super().__init__()
        self.weight = weight

    def forward(self, batch: LossBatch) -> LossOutput:
        query, gallery = batch.query_raw, batch.gallery_raw
        cc = cc_loss(query, gallery)
        return LossOutput(self.weight * cc, detached_parts(cc=cc))


@register_loss("csd", family="reid", source=f"Wu et al., Contextual similarity distillation, CVPR 2023; "
                                             f"{D3STILL}, Table 1",
               summary="KL between the gallery's and the query's softmax over each anchor's top-k "
                       "gallery-ranked list",
               equation="w · Σ_i KL(softmax(S^gg_{i,k}/τ_g) ‖ softmax(S^qg_{i,k}/τ_q)) / B",
               needs=("query_raw", "gallery_raw"))
class CSDLoss(nn.Module):
    """``weight`` 10 (20 for a MobileNet query network); ``k`` None = the whole batch."""

    def __init__(self, weight: float = 10.0, k: int | None = None, tau_q: float = 1.0, tau_g: float = 0.01):
        super().__init__()
        self.weight, self.k, self.tau_q, self.tau_g = weight, k, tau_q, tau_g

    def forward(self, batch: LossBatch) -> LossOutput:
        query, gallery = batch.query_raw, batch.gallery_raw
        kl = csd_loss(*ranked_similarities(query, gallery, self.k), self.tau_q, self.tau_g)
        return LossOutput(self.weight * kl, detached_parts(kl=kl))


@register_loss("raml", family="reid", source=f"Suma et al., Large-to-small image resolution asymmetry in "
                                              f"deep metric learning, WACV 2023; {D3STILL}, Table 1",
               summary="RAML: absolute cosine alignment plus second-order (similarity-matrix) matching",
               equation="w · [mean_i (1 − q̂_iᵀĝ_i)² + λ1 MSE_off(S^qg, S^gg) + λ2 MSE_off(S^qq, S^gg)]",
               needs=("query_raw", "gallery_raw"))
class RAMLLoss(nn.Module):
    """``weight`` 10 (20 for a MobileNet query network). ``compat=True`` reproduces the D3still code, which
    passes λ1 for both terms and adds eps = 1e-6 inside each square."""

    def __init__(self, weight: float = 10.0, lambda1: float = 0.7482, lambda2: float = 0.6778,
                 compat: bool = False):
        super().__init__()
        self.weight, self.lambda1 = weight, lambda1
        self.lambda2 = lambda1 if compat else lambda2
        self.eps = 1e-6 if compat else 0.0

    def forward(self, batch: LossBatch) -> LossOutput:
        query, gallery = batch.query_raw, batch.gallery_raw
        absolute, rel_qg, rel_qq = raml_loss(query, gallery, self.lambda1, self.lambda2, self.eps)
        total = self.weight * (absolute + rel_qg + rel_qq)
        return LossOutput(total, detached_parts(absolute=absolute, rel_qg=rel_qg, rel_qq=rel_qq))


@register_loss("rop", family="reid", source=f"Wu et al., A general rank preserving framework for asymmetric "
                                             f"image retrieval, ICLR 2023; {D3STILL}, Table 1",
               summary="rank order preservation: the query network's scores should rank the gallery's "
                       "top-k list in the gallery's order, rank-weighted",
               equation="w · mean_i Σ_{a,b} w_a (σ((s^g_b − s^g_a)/τ_g) − σ((s^q_b − s^g_a)/τ))² / k",
               needs=("query_raw", "gallery_raw"))
class ROPLoss(nn.Module):
    """``weight`` 1 (2 for a MobileNet query network); ``k`` None = the whole batch; ``tau_g`` 1e-6 (D3still),
    0.1 as ACD runs it."""

    def __init__(self, weight: float = 1.0, k: int | None = None, tau: float = 0.1, rank_weight: float = 0.2,
                 tau_g: float = 1e-6):
        super().__init__()
        if tau <= 0 or tau_g <= 0:
            raise ValueError(f"rop needs positive temperatures, got tau={tau}, tau_g={tau_g}")
        self.weight, self.k, self.tau, self.rank_weight, self.tau_g = weight, k, tau, rank_weight, tau_g

    def forward(self, batch: LossBatch) -> LossOutput:
        query, gallery = batch.query_raw, batch.gallery_raw
        rop = rop_loss(*ranked_similarities(query, gallery, self.k), self.tau, self.rank_weight, self.tau_g)
        return LossOutput(self.weight * rop, detached_parts(rop=rop))


@register_loss("d3still", family="reid", source=f"{D3STILL}, Table 1",
               summary="decoupled differential distillation: top-1 similarity plus the pairwise "
                       "differentials of the top-K list, hard and simple pairs weighted apart",
               equation="w · [α/B ‖s^g_(1) − s^q_(1)‖ + β mean_i ‖M_hard⊙E_i‖/(K−1) "
                        "+ γ mean_i ‖M_simple⊙E_i‖/(K−1)]",
               needs=("query_raw", "gallery_raw"))
class D3stillLoss(nn.Module):
    """K = 10, α, β, γ = 50, 2, 1 (ResNet18 query network: 100, 5, 1; MobileNetV3: 200, 10, 2).
    K is capped at the batch size."""

    def __init__(self, weight: float = 1.0, k: int = 10, alpha: float = 50.0, beta: float = 2.0,
                 gamma: float = 1.0):
        super().__init__()
        self.weight, self.k, self.alpha, self.beta, self.gamma = weight, k, alpha, beta, gamma

    def forward(self, batch: LossBatch) -> LossOutput:
        query, gallery = batch.query_raw, batch.gallery_raw
        feature, hard, simple = d3still_loss(*ranked_similarities(query, gallery, self.k),
                                             self.alpha, self.beta, self.gamma)
        total = self.weight * (feature + hard + simple)
        return LossOutput(total, detached_parts(feature=feature, hard=hard, simple=simple))
