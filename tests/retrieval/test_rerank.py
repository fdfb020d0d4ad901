"""Re-ranking and query expansion: k-reciprocal against a loop-by-loop transcription of the authors'
algorithm (zhunzhong07/person-re-ranking's ``re_ranking``), the sparse variant against the dense one,
αQE / AQE / DBA against their formulas written out here."""

from __future__ import annotations

import numpy as np
import pytest

from asymret.errors import InputError
from asymret.retrieval import rerank


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(rng, n, dim=16, centers=None, spread=0.6):
    """Unit rows around a few centres: neighbourhoods with real reciprocal structure."""
    centers = rng.normal(size=(8, dim)) if centers is None else centers
    return unit(centers[rng.integers(len(centers), size=n)] + spread * rng.normal(size=(n, dim)))


def euclidean(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sqrt(np.maximum(2 - 2 * a @ b.T, 0))


def authors_re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    """The authors' algorithm step by step, as their Python code runs it (dense loops, float32)."""
    top = np.concatenate([q_q_dist, q_g_dist], axis=1)
    bottom = np.concatenate([q_g_dist.T, g_g_dist], axis=1)
    d = np.power(np.concatenate([top, bottom], axis=0), 2).astype(np.float32)
    d = np.transpose(d / np.max(d, axis=0))
    n, nq = len(d), len(q_q_dist)
    order = np.argsort(d).astype(np.int32)
    weights = np.zeros_like(d)
    h = int(np.around(k1 / 2.0))

    def reciprocal(i, k):
        forward = order[i, :k + 1]
        back = order[forward, :k + 1]
        return forward[np.where(back == i)[0]]

    for i in range(n):
        r = reciprocal(i, k1)
        expanded = r
        for c in r:
            rc = reciprocal(c, h)
            if len(np.intersect1d(rc, r)) > 2.0 / 3 * len(rc):
                expanded = np.append(expanded, rc)
        expanded = np.unique(expanded)
        w = np.exp(-d[i, expanded])
        weights[i, expanded] = w / np.sum(w)
    d = d[:nq]
    if k2 != 1:
        averaged = np.zeros_like(weights)
        for i in range(n):
            averaged[i] = np.mean(weights[order[i, :k2]], axis=0)
        weights = averaged
    columns = [np.where(weights[:, j] != 0)[0] for j in range(n)]
    jaccard = np.zeros_like(d)
    for i in range(nq):
        acc = np.zeros((1, n), np.float32)
        nonzero = np.where(weights[i] != 0)[0]
        for j in nonzero:
            acc[0, columns[j]] = acc[0, columns[j]] + np.minimum(weights[i, j], weights[columns[j], j])
        jaccard[i] = 1 - acc / (2.0 - acc)
    return (jaccard * (1 - lambda_value) + d * lambda_value)[:, nq:]


@pytest.fixture(scope="module")
def asym():
    """An asymmetric setting: queries from a 'query network' (the gallery's rows, perturbed), a gallery."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(8, 16))
    gallery = clustered(rng, 150, centers=centers)
    queries = clustered(rng, 30, centers=centers, spread=0.8)
    return queries, gallery


@pytest.mark.parametrize("k1,k2,lam", [(20, 6, 0.3), (7, 1, 0.5), (5, 3, 0.0)])
def test_dense_equals_the_authors_code_on_random_features(asym, k1, k2, lam):
    queries, gallery = asym
    q_g, q_q, g_g = euclidean(queries, gallery), euclidean(queries, queries), euclidean(gallery, gallery)
    ours = rerank.re_ranking(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lam)
    theirs = authors_re_ranking(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lam)
    assert ours.shape == (30, 150) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    # the Jaccard term moved the ranking (else the test would check only lambda * d)
    assert lam == 0 or (np.argsort(ours, axis=1)[:, :10] != np.argsort(q_g, axis=1)[:, :10]).any()


def test_dense_equals_the_authors_code_on_isotropic_features_and_asymmetric_qq():
    """Unclustered features, and a query-query block from another space (the 'expanded' choice)."""
    rng = np.random.default_rng(1)
    queries, gallery, other = unit(rng.normal(size=(25, 12))), unit(rng.normal(size=(120, 12))), \
        unit(rng.normal(size=(25, 12)))
    q_g, q_q, g_g = euclidean(queries, gallery), euclidean(other, other), euclidean(gallery, gallery)
    np.testing.assert_allclose(rerank.re_ranking(q_g, q_q, g_g), authors_re_ranking(q_g, q_q, g_g), rtol=0, atol=1e-6)


@pytest.mark.parametrize("qq_space", rerank.QQ_SPACES)
@pytest.mark.parametrize("k1,k2", [(20, 6), (6, 1), (9, 4)])
def test_sparse_equals_dense(asym, qq_space, k1, k2):
    queries, gallery = asym
    qq = rerank.queries_for_qq(queries, gallery, qq_space)
    dense = rerank.re_ranking(euclidean(queries, gallery), euclidean(qq, qq), euclidean(gallery, gallery), k1=k1, k2=k2)
    sparse = rerank.re_ranking_sparse(queries, gallery, qq, k1=k1, k2=k2)
    np.testing.assert_allclose(sparse, dense, rtol=0, atol=2e-6)
    # top-k output: the dense ranking's first 25, and their distances
    dist, ids = rerank.re_ranking_sparse(queries, gallery, qq, k1=k1, k2=k2, topk=25)
    np.testing.assert_array_equal(ids, np.argsort(dense, axis=1, kind="stable")[:, :25])
    np.testing.assert_allclose(dist, np.take_along_axis(dense, ids, 1), rtol=0, atol=2e-6)


def test_sparse_in_small_blocks_and_tiny_sizes(asym, monkeypatch):
    queries, gallery = asym
    whole = rerank.re_ranking_sparse(queries, gallery)
    monkeypatch.setattr(rerank, "ROWS_PER_BLOCK", 7)
    monkeypatch.setattr(rerank, "SCORES_PER_BLOCK", 400)
    monkeypatch.setattr(rerank, "PAIRS_PER_BLOCK", 50)
    np.testing.assert_allclose(rerank.re_ranking_sparse(queries, gallery), whole, rtol=0, atol=1e-6)  # GEMM rounding
    # fewer items than k1 + 1: every item is a neighbour (the authors' code slices the same way)
    q, g = queries[:3], gallery[:8]
    dense = rerank.re_ranking(euclidean(q, g), euclidean(q, q), euclidean(g, g))
    np.testing.assert_allclose(dense, authors_re_ranking(euclidean(q, g), euclidean(q, q), euclidean(g, g)), atol=1e-6)
    np.testing.assert_allclose(rerank.re_ranking_sparse(q, g), dense, atol=2e-6)


def test_expanded_qq_space_is_alpha_qe_into_the_gallery(asym):
    queries, gallery = asym
    assert rerank.queries_for_qq(queries, gallery, "query") is queries
    np.testing.assert_array_equal(rerank.queries_for_qq(queries, gallery, "expanded"),
                                  rerank.query_expansion(queries, gallery, n=2, alpha=3.0))
    with pytest.raises(InputError, match="query-query space"):
        rerank.queries_for_qq(queries, gallery, "gallery")


def direct_expansion(own, database, n, alpha, include_own):
    """For each row: its n most similar database rows by a full sort, then the weighted sum, normalised."""
    out = []
    for x in np.asarray(own, np.float64):
        sims = database.astype(np.float64) @ x
        top = np.argsort(-sims, kind="stable")[:n]
        acc = x.copy() if include_own else np.zeros_like(x)
        for j in top:
            acc += max(sims[j], 0.0) ** alpha * database[j]
        out.append(acc / np.linalg.norm(acc))
    return np.array(out)


def test_alpha_qe_and_aqe_equal_the_formula(asym):
    queries, gallery = asym
    np.testing.assert_allclose(rerank.query_expansion(queries, gallery), direct_expansion(queries, gallery, 2, 3.0, True),
                               atol=1e-6)
    np.testing.assert_allclose(rerank.query_expansion(queries, gallery, n=5, alpha=1.5),
                               direct_expansion(queries, gallery, 5, 1.5, True), atol=1e-6)
    aqe = rerank.average_query_expansion(queries, gallery, n=3)
    top = np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :3]
    mean = queries + gallery[top].sum(axis=1)  # the plain average of the query and its top 3
    np.testing.assert_allclose(aqe, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-6)
    # a known ranking gives the same result as the search
    np.testing.assert_array_equal(rerank.query_expansion(queries, gallery, ranking=top), rerank.query_expansion(
        queries, gallery, ranking=np.argsort(-(queries @ gallery.T), axis=1)[:, :2]))


def test_dba_equals_the_formula(asym):
    _, gallery = asym
    ours = rerank.database_augmentation(gallery)
    np.testing.assert_allclose(ours, direct_expansion(gallery, gallery, 3, 3.0, False), atol=1e-6)
    np.testing.assert_allclose(rerank.database_augmentation(gallery, k=1), gallery, atol=1e-6)  # itself alone
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-6)


def test_rerank_dispatch(asym):
    queries, gallery = asym
    opts = rerank.RerankOptions(qe_n=3)
    out = rerank.rerank("alpha_qe", queries, gallery, opts)
    np.testing.assert_array_equal(out["queries"], rerank.query_expansion(queries, gallery, 3, 3.0))
    assert out["database"] is gallery
    np.testing.assert_array_equal(rerank.rerank("aqe", queries, gallery, opts)["queries"],
                                  rerank.query_expansion(queries, gallery, 3, 0.0))
    kr = rerank.rerank("kreciprocal", queries, gallery, opts, qq_space="expanded")
    np.testing.assert_array_equal(kr["scores"], -rerank.re_ranking_sparse(
        queries, gallery, rerank.query_expansion(queries, gallery, 3, 3.0)))
    top = rerank.rerank("kreciprocal", queries, gallery, opts, topk=10)["ranking"]
    full = rerank.re_ranking_sparse(queries, gallery)  # qq_space "query": the queries themselves
    np.testing.assert_array_equal(top, np.argsort(full, axis=1, kind="stable")[:, :10])


def test_evaluation_rows_score_each_method_on_the_same_features(asym):
    """evaluate's post-processed rows: each one's metrics from the direct computation of its method."""
    from asymret.api.tables import format_pair_table
    from asymret.retrieval import metrics
    from asymret.retrieval.evaluate import Postprocessing, postprocessed, row_title

    queries, gallery = asym
    labels_g = np.argmax(gallery @ np.random.default_rng(0).normal(size=(8, 16)).T, axis=1)  # the centre ids
    labels_q = np.argmax(queries @ np.random.default_rng(0).normal(size=(8, 16)).T, axis=1)
    pos = [np.flatnonzero(labels_g == c) for c in labels_q]
    junk = [np.zeros(0, np.int64)] * len(pos)
    post = Postprocessing(methods=("kreciprocal", "aqe", "alpha_qe"), dba=True)
    got = {name: metrics.evaluate_reid(pos, junk, **source)
           for name, source in postprocessed("asymmetric", queries, gallery, post)}
    dba = rerank.database_augmentation(gallery)
    expanded = direct_expansion(queries, gallery, 2, 3.0, True).astype(np.float32)
    want = {
        "asymmetric+kreciprocal": {"scores": -rerank.re_ranking(euclidean(queries, gallery), euclidean(queries, queries),
                                                                euclidean(gallery, gallery))},
        "asymmetric+kreciprocal_expanded": {"scores": -rerank.re_ranking(
            euclidean(queries, gallery), euclidean(expanded, expanded), euclidean(gallery, gallery))},
        "asymmetric+aqe": {"queries": rerank.average_query_expansion(queries, gallery), "database": gallery},
        "asymmetric+alpha_qe": {"queries": expanded, "database": gallery},
        "asymmetric+dba": {"queries": queries, "database": dba},
        "asymmetric+dba+alpha_qe": {"queries": rerank.query_expansion(queries, dba), "database": dba},
    }
    assert {"asymmetric+dba+kreciprocal", "asymmetric+dba+kreciprocal_expanded", "asymmetric+dba+aqe"} < set(got)
    assert len(got) == 9  # 4 methods and spaces, then DBA alone and the same 4 on it
    for name, source in want.items():
        assert got[name] == pytest.approx(metrics.evaluate_reid(pos, junk, **source), abs=1e-6), name
    plain = metrics.evaluate_reid(pos, junk, queries=queries, database=gallery)
    assert got["asymmetric+alpha_qe"]["mAP"] != plain["mAP"] and got["asymmetric+kreciprocal"]["mAP"] != plain["mAP"]
    # other rows compare one network with itself: one k-reciprocal row
    assert [n for n, _ in postprocessed("gallery", gallery[:30], gallery, Postprocessing(("kreciprocal",)))] == \
        ["gallery+kreciprocal"]
    assert row_title("asymmetric+dba+kreciprocal_expanded") == "asymmetric (φq / φg) + DBA + k-reciprocal, q-q αQE"
    assert row_title("asymmetric+kreciprocal").endswith("k-reciprocal, q-q φq")
    table = format_pair_table({"asymmetric": plain, **got}, "veri776")
    assert all(row_title(name) in table for name in got)
    with pytest.raises(InputError, match="unknown re-ranking method"):
        Postprocessing(methods=("qe",))
    # through a top-k ranking (R1M scale): each query's top 30, the same order as the full scores
    deep = dict(postprocessed("asymmetric", queries, gallery, post, topk=30))
    for name in ("asymmetric+kreciprocal", "asymmetric+alpha_qe", "asymmetric+dba+kreciprocal_expanded"):
        full = dict(postprocessed("asymmetric", queries, gallery, post))[name]
        scores = full["scores"] if "scores" in full else full["queries"] @ full["database"].T
        np.testing.assert_array_equal(deep[name]["ranking"], np.argsort(-scores, axis=1, kind="stable")[:, :30])
    with pytest.raises(InputError, match="--topk 5 is shallower than mP@10"):
        dict(postprocessed("asymmetric", queries, gallery, Postprocessing(("kreciprocal",)), topk=5))


@pytest.mark.parametrize("call,message", [
    (lambda q, g: rerank.re_ranking_sparse(q, g, k1=0), "k1 must be a positive integer"),
    (lambda q, g: rerank.re_ranking_sparse(q, g, lambda_value=1.5), "must lie in \\[0, 1\\]"),
    (lambda q, g: rerank.re_ranking_sparse(q, g[:, :5]), "dimension"),
    (lambda q, g: rerank.re_ranking_sparse(q, g, q[:3]), "one row per query"),
    (lambda q, g: rerank.re_ranking_sparse(q, g, topk=0), "topk must be a positive integer"),
    (lambda q, g: rerank.re_ranking(euclidean(q, g), euclidean(q, q)[:2], euclidean(g, g)), "q_q_dist must be"),
    (lambda q, g: rerank.query_expansion(q, g, n=0), "positive integer"),
    (lambda q, g: rerank.query_expansion(q, g, alpha=-1), "alpha must be"),
    (lambda q, g: rerank.rerank("diffusion", q, g), "unknown re-ranking method"),
])
def test_bad_input_is_one_sentence(asym, call, message):
    with pytest.raises(InputError, match=message):
        call(*asym)
