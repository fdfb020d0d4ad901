"""Re-ID distillers, ACD, local-feature carry-overs and supervised re-ID losses (methods.md §1, §3-5).

Every loss is checked against a second implementation written differently: explicit Python loops over
items, pairs and ranks on 0-d tensors (so they also give reference gradients), or numbers worked out by
hand. float64 throughout for 1e-9 agreement.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from asymret.errors import ConfigError, InputError
from asymret.training.losses import LossBatch, create_loss, list_losses
from asymret.training.losses.distill import (
    d3still_loss,
    d3still_masks,
    ranked_similarities,
    rop_loss,
    rop_rank_weights,
)

TOL = {"rtol": 1e-9, "atol": 1e-12}


@pytest.fixture(autouse=True)
def float64_default():
    """float64 for 1e-9 agreement, restored after each test so other modules keep float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def leaf(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).requires_grad_()


def pair(b=6, d=4, seed=0):
    """Query and gallery features of the same images: correlated, not identical, not normalised."""
    g = leaf(b, d, seed=seed)
    q = (g.detach() + 0.5 * torch.randn(b, d, generator=torch.Generator().manual_seed(seed + 1))).requires_grad_()
    return q, g


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True, retain_graph=True)


def assert_same_loss_and_grads(ours, reference, q, g):
    """Same value, and the same gradients on both sides (which also checks what is detached)."""
    assert torch.isclose(ours, reference, **TOL), (ours.item(), reference.item())
    for a, b in zip(grads(ours, q, g), grads(reference, q, g)):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a, b, **TOL)


# ---- loop helpers: one item, one pair, one rank at a time ------------------------------------------

def num(t):
    """A plain number from a 0-d tensor, for ordering and for constants (no gradient)."""
    return t.detach().item() if torch.is_tensor(t) else t


def unit_rows(x):
    rows = []
    for i in range(len(x)):
        norm = torch.sqrt(sum(x[i, d] ** 2 for d in range(x.shape[1])))
        rows.append([x[i, d] / norm for d in range(x.shape[1])])
    return rows


def dot(a, b):
    return sum(ai * bi for ai, bi in zip(a, b))


def sims(a_rows, b_rows):
    return [[dot(a, b) for b in b_rows] for a in a_rows]


def softmax(values):
    m = max(num(v) for v in values)
    e = [torch.exp(v - m) for v in values]
    total = sum(e)
    return [x / total for x in e]


def kl(p, q):
    return sum(pi * (torch.log(pi) - torch.log(qi)) for pi, qi in zip(p, q))


def ranked(q, g, k=None):
    """Per anchor: gallery indices in descending S^gg order, with both rows' values, as Python lists."""
    qn, gn = unit_rows(q), unit_rows(g)
    s_gg, s_qg = sims(gn, gn), sims(qn, gn)
    out = []
    for i in range(len(q)):
        order = sorted(range(len(q)), key=lambda j: -num(s_gg[i][j]))[:k]
        out.append(([s_gg[i][j] for j in order], [s_qg[i][j] for j in order]))
    return out


def batch(q=None, g=None, **kw):
    """Both networks' features of the same images: as the embeddings and as the raw features (the D3still
    distillers read the raw ones and normalise where their formula does; the local-feature losses read the
    embeddings)."""
    return LossBatch(query=q, gallery=g, query_raw=q, gallery_raw=g, **kw)


# ---- §3 ----------------------------------------------------------------------------------------------

def test_fitnet_is_weighted_mse_over_all_entries():
    q, g = pair()
    ref = 2.0 * sum((q[i, d] - g[i, d]) ** 2 for i in range(6) for d in range(4)) / 24
    out = create_loss("fitnet")(batch(q, g))
    assert_same_loss_and_grads(out.total, ref, q, g)
    assert isinstance(create_loss("fitnet", in_dim=4, out_dim=4).projector, torch.nn.Identity)


def test_fitnet_projector_maps_query_dims_onto_gallery_dims():
    q, g = leaf(5, 6, seed=1), leaf(5, 3, seed=2)
    loss = create_loss("fitnet", in_dim=6, out_dim=3)
    W, bias = loss.projector.weight, loss.projector.bias
    projected = [[sum(W[o, d] * q[i, d] for d in range(6)) + bias[o] for o in range(3)] for i in range(5)]
    ref = 2.0 * sum((projected[i][o] - g[i, o]) ** 2 for i in range(5) for o in range(3)) / 15
    out = loss(batch(q, g))
    assert torch.isclose(out.total, ref, **TOL)
    out.total.backward()
    assert W.grad is not None and torch.count_nonzero(W.grad) > 0 and torch.count_nonzero(q.grad) > 0
    with pytest.raises(InputError, match="in_dim and out_dim"):
        create_loss("fitnet")(batch(q, g))


def test_cc_correlates_consecutive_residuals():
    q, g = pair(b=5)
    qn, gn = unit_rows(q), unit_rows(g)
    delta = [[abs(qn[i][d] - gn[i][d]) for d in range(4)] for i in range(5)]
    ref = 5.0 * sum(dot(delta[i], delta[i + 1]) for i in range(4)) / 4
    assert_same_loss_and_grads(create_loss("cc")(batch(q, g)).total, ref, q, g)


@pytest.mark.parametrize("k", [None, 3])
def test_csd_kl_over_gallery_ranked_list_with_constant_target(k):
    q, g = pair(b=6, seed=3)
    total = 0
    for s_g, s_q in ranked(q, g, k):
        p_g = softmax([s.detach() / 0.01 for s in s_g])  # the target: no gradient (CSD code)
        p_q = softmax([s / 1.0 for s in s_q])
        total = total + kl(p_g, p_q)
    ref = 10.0 * total / 6
    assert_same_loss_and_grads(create_loss("csd", k=k)(batch(q, g)).total, ref, q, g)


@pytest.mark.parametrize("compat", [False, True])
def test_raml_terms_and_the_compat_lambda_and_eps(compat):
    # compat: the D3still code's RAML.py, λ1 for both terms and 1e-6 added inside each square
    q, g = pair(b=5, seed=4)
    qn, gn = unit_rows(q), unit_rows(g)
    l1, l2 = 0.7482, 0.7482 if compat else 0.6778
    e = 1e-6 if compat else 0.0
    absolute = sum((1 - dot(qn[i], gn[i]) + e) ** 2 for i in range(5)) / 5
    off = [(i, j) for i in range(5) for j in range(5) if i != j]
    rel_qg = sum((dot(qn[i], gn[j]) - dot(gn[i], gn[j]) + e) ** 2 for i, j in off) / len(off)
    rel_qq = sum((dot(qn[i], qn[j]) - dot(gn[i], gn[j]) + e) ** 2 for i, j in off) / len(off)
    out = create_loss("raml", compat=compat)(batch(q, g))
    assert_same_loss_and_grads(out.total, 10.0 * (absolute + l1 * rel_qg + l2 * rel_qq), q, g)
    assert torch.isclose(out.parts["rel_qq"], l2 * rel_qq.detach(), **TOL)


def test_raml_compat_differs_from_the_paper_lambda2():
    q, g = pair(b=5, seed=4)
    paper = create_loss("raml")(batch(q, g)).total
    compat = create_loss("raml", compat=True)(batch(q, g)).total
    assert not torch.isclose(paper, compat)


def test_rop_rank_weights_by_hand():
    # softmax(0.2 · [1, 0.5, 0]) = e^{0.2}, e^{0.1}, e^0 over their sum; times ranks 1, 2, 3
    z = math.exp(0.2) + math.exp(0.1) + 1
    expected = torch.tensor([[math.exp(0.2) / z, 2 * math.exp(0.1) / z, 3 / z]])
    torch.testing.assert_close(rop_rank_weights(torch.tensor([[1.0, 0.5, 0.0]])), expected, **TOL)


def test_rop_small_case_by_hand():
    # one anchor, k = 2: gallery scores [1.0, 0.4] (ranked), query scores [0.9, 0.6] at those items
    sig = lambda x: 1 / (1 + math.exp(-x))
    i_g = [[0.5, 0.0], [1.0, 0.5]]  # σ((s^g_b − s^g_a)/1e-6): a step, ½ on the diagonal
    i_q = [[sig((0.9 - 1.0) / 0.1), sig((0.6 - 1.0) / 0.1)],
           [sig((0.9 - 0.4) / 0.1), sig((0.6 - 0.4) / 0.1)]]
    z = math.exp(0.2) + math.exp(0.08)
    w = [math.exp(0.2) / z * 1, math.exp(0.08) / z * 2]
    expected = sum(w[a] * (i_g[a][b] - i_q[a][b]) ** 2 for a in range(2) for b in range(2)) / 2
    got = rop_loss(torch.tensor([[1.0, 0.4]]), torch.tensor([[0.9, 0.6]]))
    assert math.isclose(got.item(), expected, rel_tol=1e-12)


def test_rop_with_acds_soft_gallery_indicator_by_hand():
    # ACD's ROP.py: I_g = σ((s^g_b − s^g_a)/0.1), the rest as D3still's
    sig = lambda x: 1 / (1 + math.exp(-x))
    s_g, s_q = [1.0, 0.4], [0.9, 0.6]
    z = math.exp(0.2) + math.exp(0.08)
    w = [math.exp(0.2) / z * 1, math.exp(0.08) / z * 2]
    expected = sum(w[a] * (sig((s_g[b] - s_g[a]) / 0.1) - sig((s_q[b] - s_g[a]) / 0.1)) ** 2
                   for a in range(2) for b in range(2)) / 2
    got = rop_loss(torch.tensor([s_g], dtype=torch.float64), torch.tensor([s_q], dtype=torch.float64), tau_g=0.1)
    assert math.isclose(got.item(), expected, rel_tol=1e-12)
    q, g = pair(b=6, seed=5)
    soft = create_loss("rop", tau_g=0.1)(batch(q, g)).total
    assert torch.isclose(soft, rop_loss(*ranked_similarities(q, g, None), tau_g=0.1))
    assert not torch.isclose(soft, create_loss("rop")(batch(q, g)).total)  # the default stays D3still's step
    with pytest.raises(Exception, match="positive temperatures"):
        create_loss("rop", tau_g=0.0)


@pytest.mark.parametrize("k, tau_g", [(None, 1e-6), (4, 1e-6), (None, 0.1), (4, 0.1)])
def test_rop_against_loops(k, tau_g):
    # tau_g 1e-6: D3still's ROP.py (a step); 0.1: ACD's ROP.py, whose soft gallery indicator passes gradient on
    q, g = pair(b=6, seed=5)
    rows, total = ranked(q, g, k), 0
    for s_g, s_q in rows:
        n = len(s_g)
        z = sum(torch.exp(0.2 * s) for s in s_g)
        for a in range(n):
            w_a = torch.exp(0.2 * s_g[a]) / z * (a + 1)
            for b in range(n):
                if tau_g == 1e-6:
                    gap = num(s_g[b] - s_g[a])
                    i_g = 0.5 if gap == 0 else float(gap > 0)  # σ(gap/1e-6) saturates for these gaps
                else:
                    i_g = 1 / (1 + torch.exp(-(s_g[b] - s_g[a]) / tau_g))
                i_q = 1 / (1 + torch.exp(-(s_q[b] - s_g[a]) / 0.1))
                total = total + w_a * (i_g - i_q) ** 2 / n
    ref = total / len(rows)
    out = create_loss("rop", k=k, tau_g=tau_g)(batch(q, g)).total
    assert_same_loss_and_grads(out, ref, q, g)


def test_d3still_masks_by_hand():
    # ranks 2..4 of one anchor: gallery [0.8, 0.5, 0.1], query [0.6, 0.7, 0.0]; D[a,b] = s_b − s_a
    t, s = torch.tensor([0.8, 0.5, 0.1]), torch.tensor([0.6, 0.7, 0.0])
    d_g, d_q = t[None, :] - t[:, None], s[None, :] - s[:, None]
    hard, simple = d3still_masks(d_q, d_g)
    # items 1 and 2 swap order in the query network; every other pair keeps the gallery's order
    assert hard.tolist() == [[False, True, False], [True, False, False], [False, False, False]]
    assert simple.tolist() == [[False, False, True], [False, False, True], [True, True, False]]


def test_d3still_small_case_by_hand():
    s_g = torch.tensor([[1.0, 0.8, 0.5, 0.1]])
    s_q = torch.tensor([[0.9, 0.6, 0.7, 0.0]])
    feature, hard, simple = d3still_loss(s_g, s_q, alpha=50, beta=2, gamma=1)
    # feature: α/B |1.0 − 0.9|; hard pairs (0,1),(1,0): E = ±(0.1 + 0.3)/(0.1 + 0.3) = ±1
    # simple pairs: (0,2),(2,0): ±0.1/0.8; (1,2),(2,1): ±0.3/0.5; norms over the pairs, / (K − 1) = 3
    assert math.isclose(feature.item(), 50 * 0.1, rel_tol=1e-12)
    assert math.isclose(hard.item(), 2 * math.sqrt(2) / 3, rel_tol=1e-12)
    assert math.isclose(simple.item(), math.sqrt(2 * 0.125 ** 2 + 2 * 0.6 ** 2) / 3, rel_tol=1e-12)


@pytest.mark.parametrize("k", [5, 10])  # 10: the default K
def test_d3still_against_loops_with_constant_masks(k):
    q, g = pair(b=12, seed=6)
    rows = ranked(q, g, k)
    feature = 50 * torch.sqrt(sum((s_g[0] - s_q[0]) ** 2 for s_g, s_q in rows)) / len(rows)
    hard_sum = simple_sum = 0
    for s_g, s_q in rows:
        hard_sq = simple_sq = 0
        for a in range(1, k):
            for b in range(1, k):
                d_g, d_q = s_g[b] - s_g[a], s_q[b] - s_q[a]
                e = (d_q - d_g) / (0.1 + abs(d_g))
                ratio = num(d_q) / num(d_g) if a != b else 0.0  # r, a constant
                hard_sq = hard_sq + (e ** 2 if ratio < 0 else 0)
                simple_sq = simple_sq + (e ** 2 if ratio > 0 else 0)
        hard_sum = hard_sum + torch.sqrt(torch.as_tensor(hard_sq))  # a row without hard pairs adds 0
        simple_sum = simple_sum + torch.sqrt(torch.as_tensor(simple_sq))
    ref = feature + 2 * hard_sum / len(rows) / (k - 1) + 1 * simple_sum / len(rows) / (k - 1)
    out = create_loss("d3still", k=k)(batch(q, g))
    assert_same_loss_and_grads(out.total, ref, q, g)
    assert set(out.parts) == {"feature", "hard", "simple"}


def test_d3still_is_zero_with_finite_gradient_when_query_equals_gallery():
    g = leaf(12, 4, seed=7)
    q = g.detach().clone().requires_grad_()
    out = create_loss("d3still")(batch(q, g)).total
    assert out.item() == 0
    assert all(torch.isfinite(t).all() for t in grads(out, q, g))


@pytest.mark.parametrize("temperature", [2.0, 4.0])
def test_vanilla_kd_against_loops_and_the_kd_code_form(temperature):
    z_q, z_g = leaf(5, 7, seed=30, scale=3), leaf(5, 7, seed=31, scale=3)
    T, total = temperature, 0
    for i in range(5):
        p_g = softmax([z_g[i, c] / T for c in range(7)])
        p_q = softmax([z_q[i, c] / T for c in range(7)])
        total = total + kl(p_g, p_q)
    ref = T ** 2 * total / 5
    out = create_loss("vanilla_kd", temperature=T)(LossBatch(query_logits=z_q, gallery_logits=z_g))
    assert_same_loss_and_grads(out.total, ref, z_q, z_g)
    # the D3still code's KD.py form: kl_div(log_softmax(z^q/T), softmax(z^g/T)) summed over classes, batch mean, ·T²
    code = T ** 2 * F.kl_div(F.log_softmax(z_q / T, 1), F.softmax(z_g / T, 1), reduction="none").sum(1).mean()
    assert torch.isclose(out.total, code, **TOL)
    with pytest.raises(InputError, match="num_classes"):
        create_loss("vanilla_kd")(LossBatch(query_logits=z_q, gallery_logits=z_g[:, :6]))


def test_pkt_against_loops_with_its_eps():
    q, g = pair(b=5, d=4, seed=32)
    eps = 1e-7

    def conditionals(x):
        rows = []
        for i in range(len(x)):
            norm = torch.sqrt(sum(x[i, d] ** 2 for d in range(x.shape[1])))
            rows.append([x[i, d] / (norm + eps) for d in range(x.shape[1])])
        kernel = [[(dot(a, b) + 1) / 2 for b in rows] for a in rows]
        return [[k / sum(row) for k in row] for row in kernel]

    p_q, p_g = conditionals(q), conditionals(g)
    ref = 30000.0 * sum(p_g[i][j] * torch.log((p_g[i][j] + eps) / (p_q[i][j] + eps))
                        for i in range(5) for j in range(5)) / 25
    out = create_loss("pkt")(batch(q, g))
    assert_same_loss_and_grads(out.total, ref, q, g)
    assert out.total.item() > 0
    # the same features give zero (up to eps), whatever their scale: PKT compares directions only
    assert create_loss("pkt")(batch(3 * g.detach(), g.detach())).total.abs().item() < 1e-9


def _bn_train(x, weight, bias, eps=1e-5):
    """BatchNorm1d in training mode written out: batch mean, biased variance."""
    mean = x.mean(0)
    var = ((x - mean) ** 2).mean(0)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def test_ugd_against_a_written_out_forward():
    b, c, d, classes = 3, 5, 4, 3
    query_raw, gallery_raw = pair(b=b, d=d, seed=33)
    stage3 = leaf(b, c, 4, 4, seed=34)  # the query network's stage-3 map: 4 × 4 cells pooled to P = 2 and 1
    stages = (None, None, stage3, None)
    g_local = (leaf(b, 4, d, seed=35).detach(), leaf(b, 1, d, seed=36).detach())
    labels = torch.tensor([0, 2, 1])
    g_logits = [leaf(b, 4, classes, seed=37, scale=3).detach(), leaf(b, 1, classes, seed=38, scale=3).detach()]
    g_logits[1][0, 0, :] = torch.tensor([5.0, 0.0, 0.0])  # image 0's whole-image cell: its identity, kept
    g_logits[1][1, 0, :] = torch.tensor([5.0, 0.0, 0.0])  # image 1's: another identity, dropped
    g_logits[1][2, 0, :] = torch.tensor([0.0, 0.0, 5.0])  # image 2's: dropped
    loss = create_loss("ugd", grid=2, in_dim=c, dim=d)
    for i, proj in enumerate(loss.projectors):  # non-trivial BN affines, so the test sees them
        proj[0].weight.data = torch.linspace(0.5, 1.5, c)
        proj[2].bias.data = torch.linspace(-0.2, 0.2, d) * (i + 1)

    def cells(grid):  # (b·grid², c): means of the grid × grid blocks of the 4 × 4 map, row-major per image
        step = 4 // grid
        return torch.stack([stage3[n, :, r * step:(r + 1) * step, s_ * step:(s_ + 1) * step].mean((1, 2))
                            for n in range(b) for r in range(grid) for s_ in range(grid)])

    def unit(v):
        return v / torch.sqrt((v ** 2).sum(-1, keepdim=True))

    local_terms = []
    for grid, proj, t_tok, z in zip((2, 1), loss.projectors, g_local, g_logits):
        x = _bn_train(cells(grid), proj[0].weight, proj[0].bias)
        x = _bn_train(x @ proj[1].weight.t(), proj[2].weight, proj[2].bias).reshape(b, grid * grid, d)
        dists = [torch.sqrt(((unit(t_tok[n, k]) - unit(x[n, k])) ** 2).sum())
                 for n in range(b) for k in range(grid * grid) if int(z[n, k].argmax()) == int(labels[n])]
        local_terms.append(sum(dists) / len(dists))
    glob = sum(torch.sqrt(((unit(gallery_raw[n]) - unit(query_raw[n])) ** 2).sum()) for n in range(b)) / b
    ref = 1.0 * (2.0 * glob + 2.0 * (local_terms[0] + local_terms[1]))
    out = loss(LossBatch(query_raw=query_raw, gallery_raw=gallery_raw, query_stages=stages, gallery_local=g_local,
                         gallery_local_logits=tuple(g_logits), labels=labels))
    assert_same_loss_and_grads(out.total, ref, query_raw, gallery_raw)
    torch.testing.assert_close(grads(out.total, stage3)[0], grads(ref, stage3)[0], **TOL)
    assert set(out.parts) == {"glob", "local", "local_half"}
    assert torch.isclose(out.parts["local_half"], local_terms[1].detach(), **TOL)  # image 0's cell alone


def test_ugd_without_unambiguous_cells_keeps_the_global_term_only():
    b, d = 2, 4
    q, g = pair(b=b, d=d, seed=39)
    loss = create_loss("ugd", grid=2, in_dim=3, dim=d)
    wrong = torch.zeros(b, 4, 2)
    wrong[..., 1] = 1.0  # every cell predicts identity 1; the labels are 0
    out = loss(LossBatch(query_raw=q, gallery_raw=g, query_stages=(None, None, leaf(b, 3, 4, 4, seed=40), None),
                         gallery_local=(torch.randn(b, 4, d), torch.randn(b, 1, d)),
                         gallery_local_logits=(wrong, wrong[:, :1]), labels=torch.zeros(b, dtype=torch.long)))
    glob = (F.normalize(g, dim=1) - F.normalize(q, dim=1)).norm(dim=1).mean()
    assert torch.isclose(out.total, 2.0 * glob, **TOL)
    assert out.parts["local"].item() == 0 and out.parts["local_half"].item() == 0


def test_ugd_defaults_and_setup_from_the_query_network():
    from asymret.retrieval.encoders import create_encoder

    loss = create_loss("ugd")
    assert (loss.weight, loss.alpha, loss.beta, loss.layer, loss.dim) == (1.0, 2.0, 2.0, 3, 512)
    with pytest.raises(ConfigError, match="grid"):
        _ = loss.local_grids
    with pytest.raises(ConfigError, match="setup"):
        loss(LossBatch(query_raw=torch.ones(2, 4), gallery_raw=torch.ones(2, 4), query_stages=(None,) * 4,
                       gallery_local=(), gallery_local_logits=(), labels=torch.zeros(2, dtype=torch.long)))
    query = create_encoder({"backbone": "resnet18", "head": "bnneck", "input": {"size": [128, 64]}})
    loss.setup(query, None)  # P = 128 // 16 (the D3still code: STUDENT_SIZE_TRAIN[0] // 16); layer3: 256 channels
    assert loss.local_grids == (8, 4) and loss.in_dim == 256 and len(loss.projectors) == 2
    assert loss.projectors[0][1].weight.shape == (512, 256)
    tiny = create_encoder({"backbone": "resnet18", "head": "bnneck", "input": {"size": [16, 16]}})
    with pytest.raises(ConfigError, match="P ≥ 2"):
        create_loss("ugd").setup(tiny, None)
    with pytest.raises(ConfigError, match="stage 1-4"):
        create_loss("ugd", layer=5)


@pytest.mark.parametrize("name", ["csd", "rop", "d3still", "raml", "pkt"])
def test_similarities_are_float64_under_bf16_autocast(name):
    """The D3still code computes CSD/ROP/D3still similarities in float64 (autocast leaves float64 alone); ours
    does so for every similarity-matrix loss: under bf16 autocast the loss equals its float64 value."""
    q64, g64 = pair(b=16, d=32, seed=41)
    q32, g32 = q64.detach().float(), g64.detach().float()
    reference = create_loss(name)(batch(q32.double(), g32.double())).total
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = create_loss(name)(batch(q32, g32)).total
    assert torch.isclose(got.double(), reference, rtol=1e-6, atol=0), (got.item(), reference.item())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = (F.normalize(q32, dim=1) @ F.normalize(g32, dim=1).t()).float()
    exact = F.normalize(q32.double(), dim=1) @ F.normalize(g32.double(), dim=1).t()
    assert (rounded.double() - exact).abs().max() > 1e-4  # what a bf16 product would have given instead


# ---- §4 ACD ------------------------------------------------------------------------------------------

def test_acd_gallery_distribution_first_and_query_frozen():
    z_q, z_g, z_c = leaf(4, 5, seed=8, scale=3), leaf(4, 5, seed=9, scale=3), leaf(4, 5, seed=10, scale=3)
    total = 0
    for t, weight, target in ((2.0, 3.0, z_g), (1.0, 2.0, z_c)):  # τ and τ/2
        for i in range(4):
            p = softmax([target[i, c] / t for c in range(5)])
            q = softmax([z_q[i, c].detach() / t for c in range(5)])
            total = total + weight * t ** 2 * kl(p, q) / 4
    out = create_loss("acd")(LossBatch(query_logits=z_q, gallery_logits=z_g, collab_logits=z_c))
    assert torch.isclose(out.total, total, **TOL)
    # the ACD code's own call: vanillakd_loss(z^q, z^g) = kl_div(log_softmax(z^q/τ), softmax(z^g/τ))
    code = 3 * 4 * F.kl_div(F.log_softmax(z_q / 2, 1), F.softmax(z_g / 2, 1), reduction="none").sum(1).mean()
    assert torch.isclose(out.parts["gallery_kl"], code.detach(), **TOL)
    g_q, g_g, g_c = grads(out.total, z_q, z_g, z_c)
    assert g_q is None
    torch.testing.assert_close(g_g, grads(total, z_g)[0], **TOL)
    torch.testing.assert_close(g_c, grads(total, z_c)[0], **TOL)


# ---- §5 ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("focal", [False, True])
def test_mqd_rows_and_columns_as_query_distributions(focal):
    q, g = pair(b=5, seed=11)
    qn, gn = unit_rows(q), unit_rows(g)
    s_qg, s_gg = sims(qn, gn), sims([[x.detach() for x in r] for r in gn], [[x.detach() for x in r] for r in gn])
    T, tau, total = 2.0, 0.1, 0
    transpose = lambda m: [list(col) for col in zip(*m)]
    for gg, qg in ((s_gg, s_qg), (transpose(s_gg), transpose(s_qg))):  # rows, then columns
        for i in range(5):
            p_g = softmax([gg[i][j] / (tau * T) for j in range(5)])
            p_q = softmax([qg[i][j] / (tau * T) for j in range(5)])
            conf = softmax([qg[i][j] / tau for j in range(5)])
            for j in range(5):
                w = 1.0
                if focal:
                    p_hat = conf[j] if i == j else 1 - conf[j]
                    w = 0.25 * (1 - p_hat) ** 2
                total = total + w * p_g[j] * (torch.log(p_g[j]) - torch.log(p_q[j]))
    ref = T ** 2 * total / 10
    assert_same_loss_and_grads(create_loss("mqd", focal=focal)(batch(q, g)).total, ref, q, g)


def test_simdistill_confidence_weighted_rows():
    q, g = pair(b=5, seed=12)
    w_q = (torch.rand(5, generator=torch.Generator().manual_seed(13)) + 0.5).requires_grad_()
    w_g = torch.rand(5, generator=torch.Generator().manual_seed(14)) + 0.5
    qn, gn = unit_rows(q), unit_rows(g)
    total = 0
    for i in range(5):
        s_qg = [(w_q[i] / 0.5) * dot(qn[i], gn[j]) * (w_g[j] / 0.5) for j in range(5)]
        s_gg = [((w_g[i] / 0.5) * dot(gn[i], gn[j]) * (w_g[j] / 0.5)).detach() for j in range(5)]
        total = total + kl(softmax(s_gg), softmax(s_qg)) / 5
    out = create_loss("simdistill")(batch(q, g, query_confidence=w_q, gallery_confidence=w_g))
    assert_same_loss_and_grads(out.total, 2.0 * total, q, g)
    torch.testing.assert_close(grads(out.total, w_q)[0], grads(2.0 * total, w_q)[0], **TOL)
    # no confidences means confidence 1 everywhere
    ones = torch.ones(5)
    torch.testing.assert_close(create_loss("simdistill")(batch(q, g)).total,
                               create_loss("simdistill")(batch(q, g, query_confidence=ones,
                                                               gallery_confidence=ones)).total, **TOL)


def test_attentive_weights_by_gallery_certainty_without_its_gradient():
    q, g = pair(b=4, seed=15)
    var = torch.tensor([0.5, 0.1, 0.0, 2.0], requires_grad=True)  # the 0 hits the eps floor
    ref = sum(sum((q[i, d] - g[i, d]) ** 2 for d in range(4)) / (2 * max(num(var[i]), 1e-3))
              for i in range(4)) / 4
    out = create_loss("attentive")(batch(q, g, uncertainty=var)).total
    assert torch.isclose(out, ref, **TOL)
    g_q, g_var = grads(out, q, var)
    torch.testing.assert_close(g_q, grads(ref, q)[0], **TOL)
    assert g_var is None


# ---- supervised re-ID --------------------------------------------------------------------------------

def test_ce_label_smoothing_against_soft_targets():
    logits, labels = leaf(6, 4, seed=16, scale=2), torch.tensor([0, 1, 2, 3, 1, 0])
    total = 0
    for i in range(6):
        log_p = [torch.log(p) for p in softmax([logits[i, c] for c in range(4)])]
        total = total - sum(((0.9 if c == labels[i] else 0) + 0.1 / 4) * log_p[c] for c in range(4))
    out = create_loss("ce_ls")(LossBatch(query_logits=logits, labels=labels))
    assert torch.isclose(out.total, total / 6, **TOL)


def triplet_loops(x, labels, margin=0.3):
    terms = []
    for a in range(len(x)):
        d = [torch.sqrt(sum((x[a, k] - x[j, k]) ** 2 for k in range(x.shape[1]))) for j in range(len(x))]
        pos = [d[j] for j in range(len(x)) if labels[j] == labels[a] and j != a]
        neg = [d[j] for j in range(len(x)) if labels[j] != labels[a]]
        if pos and neg:
            terms.append(torch.clamp(max(pos, key=num) - min(neg, key=num) + margin, min=0))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("normalize", [False, True])
def test_batch_hard_triplet_against_loops(normalize):
    x = leaf(9, 3, seed=17)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 5])  # label 5: no other positive, skipped
    ref = triplet_loops(F.normalize(x, dim=1) if normalize else x, labels)
    out = create_loss("triplet_bh", normalize=normalize)(LossBatch(query=x, labels=labels)).total
    assert torch.isclose(out, ref, **TOL)
    torch.testing.assert_close(grads(out, x)[0], grads(ref, x)[0], **TOL)


def test_batch_hard_triplet_matches_pytorch_metric_learning():
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.losses import TripletMarginLoss
    from pytorch_metric_learning.miners import BatchHardMiner
    from pytorch_metric_learning.reducers import MeanReducer

    x = leaf(16, 8, seed=18, scale=0.3)  # P×K = 4×4, small scale so that many triplets are active
    labels = torch.arange(4).repeat_interleave(4)
    raw = LpDistance(normalize_embeddings=False)
    pml = TripletMarginLoss(margin=0.3, distance=raw, reducer=MeanReducer())
    expected = pml(x, labels, BatchHardMiner(distance=raw)(x, labels))
    out = create_loss("triplet_bh")(LossBatch(query=x, labels=labels)).total
    assert torch.isclose(out, expected, rtol=1e-7)
    assert out.item() > 0


def test_reid_supervised_is_ce_plus_triplet():
    x, logits = leaf(8, 3, seed=19), leaf(8, 4, seed=20)
    labels = torch.arange(4).repeat_interleave(2)
    b = LossBatch(query=x, query_logits=logits, labels=labels)
    out = create_loss("reid_supervised")(b)
    expected = create_loss("ce_ls")(b).total + create_loss("triplet_bh")(b).total
    assert torch.isclose(out.total, expected, **TOL)
    assert set(out.parts) == {"ce", "triplet"}


# ---- registry and gradient sanity --------------------------------------------------------------------

PAIR_LOSSES = ["fitnet", "cc", "csd", "raml", "rop", "d3still", "pkt", "mqd", "simdistill"]


def test_registry_names_families_and_paper_defaults():
    info = {i.name: i for i in list_losses()}
    families = {"reid": ["fitnet", "cc", "csd", "raml", "rop", "d3still", "vanilla_kd", "pkt", "ugd", "ce_ls",
                         "triplet_bh", "reid_supervised"], "acd": ["acd"], "local": ["mqd", "simdistill", "attentive"]}
    for family, names in families.items():
        assert all(info[n].family == family for n in names)
    assert info["d3still"].defaults == {"weight": 1.0, "k": 10, "alpha": 50.0, "beta": 2.0, "gamma": 1.0}
    assert info["acd"].defaults == {"alpha": 3.0, "beta": 2.0, "tau": 2.0}
    assert {n: info[n].defaults["weight"] for n in ("fitnet", "cc", "csd", "raml", "rop", "mqd", "simdistill",
                                                    "vanilla_kd", "pkt", "ugd")} \
        == {"fitnet": 2.0, "cc": 5.0, "csd": 10.0, "raml": 10.0, "rop": 1.0, "mqd": 1.0, "simdistill": 2.0,
            "vanilla_kd": 1.0, "pkt": 30000.0, "ugd": 1.0}
    assert info["vanilla_kd"].defaults["temperature"] == 2.0 and info["pkt"].defaults["eps"] == 1e-7
    assert {k: info["ugd"].defaults[k] for k in ("alpha", "beta", "layer")} == {"alpha": 2.0, "beta": 2.0, "layer": 3}
    # the D3still distillers read the raw BN-neck features (D3still's retrieval_feat), not the L2-normalised ones
    for name in ("fitnet", "cc", "csd", "raml", "rop", "d3still", "pkt", "ugd"):
        assert {"query_raw", "gallery_raw"} <= set(info[name].needs) and "query" not in info[name].needs
    assert info["vanilla_kd"].needs == ("query_logits", "gallery_logits")
    assert info["raml"].defaults["lambda2"] == 0.6778 and info["triplet_bh"].defaults["margin"] == 0.3


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_gradient_reaches_query_against_a_frozen_gallery(name):
    q, g = pair(b=12, d=8, seed=21)
    out = create_loss(name)(batch(q, g.detach()))
    assert out.total.ndim == 0 and all(p.ndim == 0 for p in out.parts.values())
    (g_q,) = grads(out.total, q)
    assert torch.isfinite(g_q).all() and g_q.abs().sum() > 0


@pytest.mark.parametrize("name", PAIR_LOSSES + ["acd", "attentive", "ce_ls", "triplet_bh", "vanilla_kd"])
def test_missing_batch_field_is_a_config_error(name):
    with pytest.raises(ConfigError, match="needs batch field"):
        create_loss(name)(LossBatch())


def test_asymret_losses_lists_the_d3still_baselines(capsys):
    import json

    from asymret.api.cli import main

    assert main(["losses", "--json"]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {records[n]["family"] for n in ("vanilla_kd", "pkt", "ugd")} == {"reid"}
    assert records["pkt"]["defaults"] == {"weight": 30000.0, "eps": 1e-7}
    assert records["ugd"]["needs"] == ["query_raw", "gallery_raw", "query_stages", "gallery_local",
                                       "gallery_local_logits", "labels"]
    assert main(["losses", "ugd"]) == 0 and "Neural Networks 2025" in capsys.readouterr().out
