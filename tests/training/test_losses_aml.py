"""AML losses (methods.md §2) against independent computations: explicit Python loops over tuples and
pairs, the AML reference code's formulas written out (its D×N tuple layout, one backward per tuple),
hand-computed tiny cases, and pytorch-metric-learning where its definitions coincide."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances, losses, reducers

from asymret.api.cli import main
from asymret.errors import ConfigError, InputError
from asymret.training.losses import LOSSES, LossBatch, create_loss
from asymret.training.losses.aml import contrastive_loss, multi_similarity_loss, tuple_distances

B, P, N, D = 6, 2, 5, 8
MARGIN = {"contrastive": 0.7, "triplet": 0.1}


def unit(x):
    return F.normalize(x, dim=-1)


@pytest.fixture
def tuples():
    """Anchors and their tuple members spread from very close to far, so that every hinge is hit on
    both sides."""
    g = torch.Generator().manual_seed(0)
    query = unit(torch.randn(B, D, generator=g, dtype=torch.float64))
    gallery = unit(query + 0.2 * torch.randn(B, D, generator=g, dtype=torch.float64))

    def around(k):
        scale = torch.empty(B, k, 1, dtype=torch.float64).uniform_(0.02, 0.5, generator=g)
        return unit(query.unsqueeze(1) + scale * torch.randn(B, k, D, generator=g, dtype=torch.float64))

    return LossBatch(query=query, gallery=gallery, positive=around(P), negative=around(N))


EPS = 1e-6  # AML/cirtorch add it to every coordinate of q − g before the norm


def dist(x, y, eps=EPS):
    return math.sqrt(sum((a - b + eps) ** 2 for a, b in zip(x.tolist(), y.tolist())))


def dot(x, y):
    return sum(a * b for a, b in zip(x.tolist(), y.tolist()))


# ---- tuple losses: loops ---------------------------------------------------------------------------

def contrastive_by_loops(b, m, with_self=False):
    total = 0.0
    for a in range(len(b.query)):
        pairs = [(1, x) for x in b.positive[a]] + [(0, x) for x in b.negative[a]]
        if with_self:
            pairs.append((1, b.gallery[a]))
        for y, x in pairs:
            d = dist(b.query[a], x)
            total += 0.5 * y * d**2 + 0.5 * (1 - y) * max(0.0, m - d) ** 2
    return total  # summed over the tuples, as AML back-propagates each tuple and accumulates


def triplet_by_loops(b, m):
    total = 0.0
    for a in range(len(b.query)):
        for p in b.positive[a]:
            for n in b.negative[a]:
                total += max(0.0, dist(b.query[a], p, 0) ** 2 - dist(b.query[a], n, 0) ** 2 + m)
    return total


def ms_by_loops(b, alpha, beta, base):
    total = 0.0
    for a in range(len(b.query)):
        pos = sum(math.exp(-alpha * (dot(b.query[a], p) - base)) for p in b.positive[a])
        neg = sum(math.exp(beta * (dot(b.query[a], n) - base)) for n in b.negative[a])
        total += math.log(1 + pos) / alpha + math.log(1 + neg) / beta
    return total


def test_the_fixture_hits_both_sides_of_every_hinge(tuples):
    d_neg = (tuples.negative - tuples.query.unsqueeze(1)).norm(dim=-1)
    assert (d_neg < 0.7).any() and (d_neg > 0.7).any()
    d2_pos = (tuples.positive - tuples.query.unsqueeze(1)).pow(2).sum(-1)
    violation = d2_pos.unsqueeze(2) - d_neg.pow(2).unsqueeze(1) + 0.1
    assert (violation > 0).any() and (violation < 0).any()


def test_contrastive_matches_loops(tuples):
    out = create_loss("contrastive")(tuples)
    assert out.total.item() == pytest.approx(contrastive_by_loops(tuples, 0.7), abs=1e-9)
    assert set(out.parts) == {"d_pos", "d_neg"}


def test_contr_plus_is_contrastive_with_the_anchors_gallery_embedding_as_positive(tuples):
    out = create_loss("contr_plus", margin=0.85)(tuples)
    assert out.total.item() == pytest.approx(contrastive_by_loops(tuples, 0.85, with_self=True), abs=1e-9)


def test_contr_plus_by_hand():
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    g_a = torch.tensor([[0.0, 1.0]], dtype=torch.float64)  # d² = 2: ½·2 = 1
    pos = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)  # d = 0
    neg = torch.tensor([[[0.8, 0.6], [-1.0, 0.0]]], dtype=torch.float64)  # d² = 0.4 inside m; d = 2 outside
    batch = LossBatch(query=q, gallery=g_a, positive=pos, negative=neg)
    expected = 1.0 + 0.5 * (0.7 - math.sqrt(0.4)) ** 2
    assert create_loss("contr_plus")(batch).total.item() == pytest.approx(expected, abs=1e-5)  # the ε residual
    e = EPS  # with ε written out: ‖(1,−1)+ε‖², ‖(ε,ε)‖², ‖(0.2,−0.6)+ε‖
    exact = (0.5 * ((1 + e) ** 2 + (-1 + e) ** 2) + 0.5 * (2 * e * e)
             + 0.5 * (0.7 - math.sqrt((0.2 + e) ** 2 + (-0.6 + e) ** 2)) ** 2)
    assert create_loss("contr_plus")(batch).total.item() == pytest.approx(exact, abs=1e-14)


def test_contr_plus_without_tuple_members_is_regression(tuples):
    empty = tuples.positive[:, :0]
    alone = LossBatch(query=tuples.query, gallery=tuples.gallery, positive=empty, negative=empty)
    expected = sum(0.5 * dist(q, g) ** 2 for q, g in zip(tuples.query, tuples.gallery))
    assert create_loss("contr_plus")(alone).total.item() == pytest.approx(expected, abs=1e-9)
    assert create_loss("regression")(tuples).total.item() == pytest.approx(expected, abs=1e-9)


def test_triplet_matches_loops(tuples):
    assert create_loss("triplet")(tuples).total.item() == pytest.approx(triplet_by_loops(tuples, 0.1), abs=1e-9)


def test_multi_similarity_matches_loops(tuples):
    out = create_loss("multi_similarity")(tuples)
    assert out.total.item() == pytest.approx(ms_by_loops(tuples, 2.0, 40.0, 0.5), abs=1e-9)


def test_multi_similarity_does_not_overflow_in_float32():
    # β(s − λ) = 40·2.5 = 100 overflows exp in float32 (max ≈ e^88.7); the loss stays finite and exact.
    s_pos = torch.tensor([[0.9]])
    s_neg = torch.tensor([[3.0, 0.1]])
    got = multi_similarity_loss(s_pos, s_neg)
    expected = math.log(1 + math.exp(-2 * 0.4)) / 2 + math.log(1 + math.exp(100) + math.exp(-16)) / 40
    assert got.item() == pytest.approx(expected, rel=1e-6)


# ---- tuple losses: the AML reference code's formulas ------------------------------------------------
# budnikm/aml ``lib/layers/functional.py`` takes one tuple as a D×N matrix of columns [q_a, members...] with
# labels [-1, 1 (positive), 0 (negative)...]; ``training.py`` calls it once per tuple and back-propagates
# each tuple's loss, so a step's gradient is that of the sum over its tuples. Written out here on columns.

def aml_reference(name, b, margin=None):
    total = 0.0
    for a in range(len(b.query)):
        members = [b.gallery[a]] if name == "regression" else (
            ([b.gallery[a]] if name == "contr_plus" else []) + list(b.positive[a]) + list(b.negative[a]))
        n_pos = 1 if name == "regression" else (name == "contr_plus") + b.positive.shape[1]
        x = torch.stack([b.query[a], *members], 1)  # D × N
        label = torch.tensor([-1] + [1] * n_pos + [0] * (len(members) - n_pos), dtype=torch.float64)
        if name in ("contrastive", "contr_plus", "regression"):  # ``contrastive_loss(x, label, margin, eps)``
            x1, x2, lbl = x[:, :1].expand(-1, len(members)), x[:, 1:], label[1:]
            dd = torch.pow(x1 - x2 + EPS, 2).sum(0).sqrt()
            total += (0.5 * lbl * dd**2 + 0.5 * (1 - lbl) * torch.clamp((margin or 0.7) - dd, min=0) ** 2).sum()
        elif name == "triplet":  # ``triplet_loss``: squared distances, no ε
            xa, xp, xn = x[:, label == -1], x[:, label == 1], x[:, label == 0]
            for p in range(xp.shape[1]):
                dp = (xa - xp[:, p:p + 1]).pow(2).sum(0)
                total += torch.clamp(dp - (xa - xn).pow(2).sum(0) + (margin or 0.1), min=0).sum()
        elif name == "multi_similarity":  # ``MultiSimilarityLoss``: row 0 of xᵀx, thresh 0.5, scales 2 / 40
            sim = (x.t() @ x)[0]
            total += (torch.log(1 + torch.exp(-2.0 * (sim[label == 1] - 0.5)).sum()) / 2.0
                      + torch.log(1 + torch.exp(40.0 * (sim[label == 0] - 0.5)).sum()) / 40.0)
    return total


@pytest.mark.parametrize("name", ["contrastive", "contr_plus", "triplet", "multi_similarity", "regression"])
def test_tuple_losses_equal_the_aml_reference_in_value_and_gradient(tuples, name):
    q_ours = tuples.query.clone().requires_grad_(True)
    q_ref = tuples.query.clone().requires_grad_(True)
    ours = create_loss(name)(LossBatch(query=q_ours, gallery=tuples.gallery, positive=tuples.positive,
                                       negative=tuples.negative)).total
    ref = aml_reference(name, LossBatch(query=q_ref, gallery=tuples.gallery, positive=tuples.positive,
                                        negative=tuples.negative))
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    ours.backward(), ref.backward()
    torch.testing.assert_close(q_ours.grad, q_ref.grad, rtol=1e-10, atol=1e-12)
    assert LOSSES[name].batch_reduction == "sum"


def test_relational_losses_keep_the_mean_over_the_batch():
    # RKD and DarkRank are computed once on the step's batch in the AML code ('rand' mode), with means.
    assert LOSSES["rkd"].batch_reduction == LOSSES["darkrank"].batch_reduction == "mean"


# ---- tuple losses: pytorch-metric-learning ---------------------------------------------------------
# PML pairs anchors (``embeddings``) with references (``ref_emb``); an AML tuple pairs each anchor
# only with its own members, so the references are the flattened members and the pairs are given
# explicitly as ``indices_tuple`` (labels alone would pair anchor a with every other tuple's members).

def flat_members(b):
    refs = torch.cat([b.positive.reshape(-1, D), b.negative.reshape(-1, D)])
    anchor_p = torch.arange(B).repeat_interleave(P)
    anchor_n = torch.arange(B).repeat_interleave(N)
    return refs, anchor_p, torch.arange(B * P), anchor_n, B * P + torch.arange(B * N)


def test_contrastive_matches_pml_per_pair(tuples):
    # PML's per-pair losses are the un-squared hinges relu(d − 0) and relu(m − d) (LpDistance, power 1);
    # AML's are ½ of their squares. PML's reducers average over pairs, AML sums a tuple's pairs and
    # averages over tuples, so take PML's per-pair values (DoNothingReducer) and reduce them here.
    refs, a1, p, a2, n = flat_members(tuples)
    pml = losses.ContrastiveLoss(pos_margin=0, neg_margin=0.7, reducer=reducers.DoNothingReducer(),
                                 distance=distances.LpDistance(normalize_embeddings=False, power=1))
    per_pair = pml(tuples.query, indices_tuple=(a1, p, a2, n), ref_emb=refs)
    per_tuple = torch.zeros(B, dtype=torch.float64)
    for part, anchors in (("pos_loss", a1), ("neg_loss", a2)):
        per_tuple.index_add_(0, anchors, 0.5 * per_pair[part]["losses"] ** 2)
    ours = contrastive_loss(tuple_distances(tuples.query, tuples.positive, eps=0),
                            tuple_distances(tuples.query, tuples.negative, eps=0))  # PML has no ε
    assert ours.item() == pytest.approx(per_tuple.sum().item(), abs=1e-9)
    assert create_loss("contrastive")(tuples).total.item() == pytest.approx(per_tuple.sum().item(), rel=1e-4)


def test_triplet_matches_pml(tuples):
    # Same formula with squared L2 distances (LpDistance power 2); PML sums the given triplets
    # (SumReducer), as AML sums over the B tuples.
    refs = flat_members(tuples)[0]
    triplets = (torch.arange(B).repeat_interleave(P * N),
                torch.arange(B * P).repeat_interleave(N),
                B * P + torch.arange(B * N).view(B, 1, N).expand(B, P, N).reshape(-1))
    pml = losses.TripletMarginLoss(margin=0.1, reducer=reducers.SumReducer(),
                                   distance=distances.LpDistance(normalize_embeddings=False, power=2))
    expected = pml(tuples.query, indices_tuple=triplets, ref_emb=refs).item()
    assert create_loss("triplet")(tuples).total.item() == pytest.approx(expected, abs=1e-9)


def test_multi_similarity_matches_pml(tuples):
    # Same formula (PML's ``base`` is λ); PML's default MeanReducer averages over anchors where AML sums
    # over tuples, hence × B. AML's s(a, y) is a plain dot product of L2-normalised vectors.
    refs, a1, p, a2, n = flat_members(tuples)
    pml = losses.MultiSimilarityLoss(alpha=2, beta=40, base=0.5,
                                     distance=distances.DotProductSimilarity(normalize_embeddings=False))
    expected = pml(tuples.query, indices_tuple=(a1, p, a2, n), ref_emb=refs).item() * B
    assert create_loss("multi_similarity")(tuples).total.item() == pytest.approx(expected, abs=1e-9)


# ---- relational losses -----------------------------------------------------------------------------

def smooth_l1(x, y):
    e = abs(x - y)
    return 0.5 * e * e if e < 1 else e - 0.5


def rkd_by_loops(q, g):
    n = len(q)

    def distances(x):
        d = [[dist(x[i], x[j], 0) for j in range(n)] for i in range(n)]
        mean = sum(v for row in d for v in row if v > 0) / (n * n - n)
        return [[v / mean for v in row] for row in d]

    def cos_angle(x, i, j, k):  # at vertex i, between j and k; 0 when degenerate (RKD convention)
        if j == i or k == i:
            return 0.0
        u, v = x[j] - x[i], x[k] - x[i]
        return dot(u, v) / (u.norm().item() * v.norm().item())

    dq, dg = distances(q), distances(g)
    dist_term = sum(smooth_l1(dq[i][j], dg[i][j]) for i in range(n) for j in range(n)) / n**2
    angle_term = sum(smooth_l1(cos_angle(q, i, j, k), cos_angle(g, i, j, k))
                     for i in range(n) for j in range(n) for k in range(n)) / n**3
    return angle_term, dist_term


def test_rkd_matches_loops_with_weights_2_and_1(tuples):
    # RKD is scale-invariant; an outlier on the query side makes some angle and distance errors
    # exceed 1, so both parts of smooth-L1 are exercised.
    query = tuples.positive[:, 0] * torch.tensor([8.0, 1, 1, 1, 1, 1], dtype=torch.float64).unsqueeze(1)
    batch = LossBatch(query=query, gallery=unit(torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))))
    angle, distance = rkd_by_loops(batch.query, batch.gallery)
    out = create_loss("rkd")(batch)
    assert out.parts["angle"].item() == pytest.approx(angle, abs=1e-9)
    assert out.parts["distance"].item() == pytest.approx(distance, abs=1e-9)
    assert out.total.item() == pytest.approx(2 * angle + distance, abs=1e-9)


def darkrank_by_loops(q, g, alpha=3.0, beta=3.0, list_len=4):
    total = 0.0
    for i in range(len(q)):
        others = sorted((j for j in range(len(q)) if j != i), key=lambda j: dist(g[i], g[j], 0))[:list_len]
        s = [-alpha * dist(q[i], q[j], 0) ** beta for j in others]
        total -= sum(s[k] - math.log(sum(math.exp(v) for v in s[k:])) for k in range(list_len))
    return total / len(q)


def test_darkrank_matches_loops(tuples):
    queries = tuples.positive.reshape(-1, D)[:9]
    batch = LossBatch(query=queries, gallery=unit(queries + 0.3 * tuples.negative.reshape(-1, D)[:9]))
    assert create_loss("darkrank")(batch).total.item() == pytest.approx(
        darkrank_by_loops(batch.query, batch.gallery), abs=1e-9)
    assert create_loss("darkrank", list_len=2)(batch).total.item() == pytest.approx(
        darkrank_by_loops(batch.query, batch.gallery, list_len=2), abs=1e-9)


def test_darkrank_by_hand():
    # Points 0, 1, 3 on a line, α = β = 1 so scores are −d, list of 2; ListMLE of the order (j, k)
    # with scores (s_j, s_k) is −(s_j − log(e^{s_j} + e^{s_k})).
    x = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)

    def listmle(s_j, s_k):
        return -(s_j - math.log(math.exp(s_j) + math.exp(s_k)))

    # item 0 ranks 1 (d 1) then 2 (d 3); item 1: 0 (d 1) then 2 (d 2); item 2: 1 (d 2) then 0 (d 3)
    expected = (listmle(-1, -3) + listmle(-1, -2) + listmle(-2, -3)) / 3
    got = create_loss("darkrank", alpha=1.0, beta=1.0, list_len=2)(LossBatch(query=x, gallery=x))
    assert got.total.item() == pytest.approx(expected, abs=1e-12)
    # The same query scores in the reverse of the gallery's order are less likely: a larger loss.
    reversed_gallery = torch.tensor([[0.0], [3.0], [1.0]], dtype=torch.float64)
    worse = create_loss("darkrank", alpha=1.0, beta=1.0, list_len=2)(LossBatch(query=x, gallery=reversed_gallery))
    assert worse.total.item() > got.total.item()


def test_darkrank_needs_more_items_than_its_list():
    x = unit(torch.randn(4, D))
    with pytest.raises(InputError, match="batch"):
        create_loss("darkrank")(LossBatch(query=x, gallery=x))


# ---- gradients -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["contrastive", "contr_plus", "triplet", "multi_similarity"])
def test_tuple_losses_pass_gradient_to_every_member_the_trainer_lets_through(tuples, name):
    # Asymmetric: members are cached gallery embeddings (no grad). Symmetric baseline: they are
    # query-side outputs, so the loss must not cut their gradient.
    for members_require_grad in (False, True):
        batch = LossBatch(**{k: v.clone().requires_grad_(k == "query" or members_require_grad)
                             for k, v in vars(tuples).items() if v is not None})
        create_loss(name)(batch).total.backward()
        assert batch.query.grad.abs().sum() > 0
        assert (batch.negative.grad is not None) == members_require_grad


@pytest.mark.parametrize("name", ["contrastive", "contr_plus", "triplet", "multi_similarity", "regression",
                                  "rkd", "darkrank"])
def test_gradient_matches_finite_differences(tuples, name):
    def loss_of_query(query):
        return create_loss(name)(LossBatch(**{**vars(tuples), "query": query})).total

    assert torch.autograd.gradcheck(loss_of_query, (tuples.query.clone().requires_grad_(),))


@pytest.mark.parametrize("name", ["rkd", "darkrank"])
def test_relational_losses_send_no_gradient_to_the_gallery_side(tuples, name):
    gallery = tuples.gallery.clone().requires_grad_()
    query = tuples.query.clone().requires_grad_()
    create_loss(name)(LossBatch(query=query, gallery=gallery)).total.backward()
    assert query.grad.abs().sum() > 0
    assert gallery.grad is None


# ---- registry --------------------------------------------------------------------------------------

PAPER_DEFAULTS = {  # methods.md §2
    "contrastive": {"margin": 0.7},
    "contr_plus": {"margin": 0.7},
    "triplet": {"margin": 0.1},
    "multi_similarity": {"alpha": 2.0, "beta": 40.0, "base": 0.5},
    "regression": {},
    "rkd": {"angle_weight": 2.0, "distance_weight": 1.0},
    "darkrank": {"alpha": 3.0, "beta": 3.0, "list_len": 4},
}


def test_registered_with_paper_defaults_and_valid_needs():
    for name, defaults in PAPER_DEFAULTS.items():
        info = LOSSES[name]
        assert info.family == "aml" and info.defaults == defaults
        assert set(info.needs) <= set(vars(LossBatch()))


def test_missing_batch_field_is_a_config_error(tuples):
    with pytest.raises(ConfigError, match="'negative'"):
        create_loss("triplet")(LossBatch(query=tuples.query, positive=tuples.positive))


# ---- `asymret losses` ------------------------------------------------------------------------------

def test_cli_table_lists_every_loss(capsys):
    assert main(["losses"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("NAME")
    for name in LOSSES:
        assert any(line.startswith(name + " ") for line in out.splitlines())
    assert "alpha=2.0, beta=40.0, base=0.5" in out and "Eq. (10)" in out


def test_cli_json_lists_every_loss_with_its_defaults(capsys):
    assert main(["losses", "--json"]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(records) == set(LOSSES)
    for name, defaults in PAPER_DEFAULTS.items():
        assert records[name]["defaults"] == defaults and records[name]["family"] == "aml"
    assert records["contr_plus"]["needs"] == ["query", "gallery", "positive", "negative"]


def test_cli_shows_one_loss(capsys):
    assert main(["losses", "rkd", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["name"] == "rkd" and "Eq. (8)" in record["source"]
    assert main(["losses", "rkd"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("rkd ") and "angle_weight=2.0, distance_weight=1.0" in lines[1]
    assert len([line for line in lines if line and not line.startswith(" ")]) == 2  # header + rkd


def test_cli_unknown_loss_says_what_to_choose(capsys):
    assert main(["losses", "tripplet"]) == 2
    err = capsys.readouterr().err
    assert "no loss named 'tripplet'" in err and "triplet" in err
