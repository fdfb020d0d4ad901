"""The protocols of ACD's other benchmarks against an independent per-query loop written out here.

mAP (mean of precisions and trapezoidal), CMC R1/R5/R10, mINP and Recall@K on random features, for the three
shapes of test split: leave-one-out (SOP, CUB-200-2011: the query itself is junk), query vs gallery by class
(In-Shop) and query vs gallery with the same-camera rule (MSMT17).
"""

from __future__ import annotations

import numpy as np
import pytest

from asymret.errors import InputError
from asymret.retrieval.metrics import RECALL_KS, evaluate_retrieval, reid_groundtruth

KS = RECALL_KS


def loop_metrics(scores, q_labels, g_labels, junk_of, ks=KS) -> dict:
    """Each query by itself: rank the gallery by descending score (ties: lower index first), drop its junk,
    then score the remaining list; queries without a positive are skipped."""
    ap, ap_trap, first, inp, n_valid = [], [], [], [], 0
    recall = {k: [] for k in ks}
    for q in range(len(scores)):
        order = np.argsort(-scores[q], kind="stable")
        kept = [i for i in order if i not in junk_of(q)]
        hits = [int(g_labels[i] == q_labels[q]) for i in kept]
        if not any(hits):
            continue
        n_valid += 1
        ranks = [r for r, h in enumerate(hits) if h]
        ap.append(np.mean([(j + 1) / (r + 1) for j, r in enumerate(ranks)]))
        ap_trap.append(sum(((j / r) if r > 0 else 1.0) + (j + 1) / (r + 1) for j, r in enumerate(ranks))
                       / (2 * len(ranks)))
        first.append(ranks[0])
        inp.append(len(ranks) / (ranks[-1] + 1))
        for k in ks:
            recall[k].append(float(any(hits[:k])))
    out = {"mAP": np.mean(ap), "mAP_official": np.mean(ap_trap), "mINP": np.mean(inp), "queries": n_valid}
    out.update({f"R{k}": np.mean([f < k for f in first]) for k in (1, 5, 10)})
    out.update({f"Recall@{k}": np.mean(recall[k]) for k in ks})
    return out


def features(rng, labels, dim=16, signal=0.8):
    """Random unit vectors pulled toward a random centre per class (so the metrics are not trivial)."""
    centres = rng.standard_normal((labels.max() + 1, dim))
    x = signal * centres[labels] + rng.standard_normal((len(labels), dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def assert_equal(got: dict, want: dict):
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9, rel=0), key


def test_leave_one_out_equals_the_loop():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(15), rng.integers(2, 14, 15)))
    x = features(rng, labels)
    scores = x @ x.T  # query set = gallery (SOP, CUB-200-2011)
    positives, junk = reid_groundtruth(labels, None, labels, None, camera_rule=False,
                                       query_gallery_index=np.arange(len(labels)))
    got = evaluate_retrieval(positives, junk, scores=scores)
    want = loop_metrics(scores, labels, labels, junk_of=lambda q: {q})
    assert_equal(got, want)
    assert want["queries"] == len(labels) and 0.2 < want["Recall@1"] < 0.95 and got["Recall@1000"] == 1.0
    assert got["R1"] == got["Recall@1"] and "R20" not in got and list(got).count("mAP") == 1
    # the same from the features, the memory-bounded path
    assert_equal(evaluate_retrieval(positives, junk, queries=x.astype(np.float32), database=x.astype(np.float32)),
                 want)


def test_query_gallery_by_class_equals_the_loop():
    rng = np.random.default_rng(1)
    g_labels = rng.integers(0, 20, 90)
    q_labels = np.r_[rng.choice(g_labels, 40), [20, 21]]  # two queries whose item has no gallery image
    x = features(rng, np.r_[q_labels, g_labels], 24)  # one draw of class centres for both sides
    scores = x[:42] @ x[42:].T
    positives, junk = reid_groundtruth(q_labels, None, g_labels, None)
    got = evaluate_retrieval(positives, junk, scores=scores)
    assert_equal(got, loop_metrics(scores, q_labels, g_labels, junk_of=lambda q: set()))
    assert got["queries"] == 40


def test_same_camera_rule_equals_the_loop():
    rng = np.random.default_rng(2)
    g_ids, g_cams = rng.integers(0, 12, 150), rng.integers(1, 6, 150)
    q_ids, q_cams = rng.integers(0, 12, 30), rng.integers(1, 6, 30)
    x = features(rng, np.r_[q_ids, g_ids])
    scores = x[:30] @ x[30:].T
    positives, junk = reid_groundtruth(q_ids, q_cams, g_ids, g_cams)
    got = evaluate_retrieval(positives, junk, scores=scores)

    def same_person_same_camera(q):
        return {i for i in range(150) if g_ids[i] == q_ids[q] and g_cams[i] == q_cams[q]}

    assert_equal(got, loop_metrics(scores, q_ids, g_ids, junk_of=same_person_same_camera))


def test_the_query_itself_never_counts():
    # A1, A2 of class A, B1 of class B; every item scores highest with itself
    scores = np.array([[1.0, 0.5, 0.9],
                       [0.6, 1.0, 0.2],
                       [0.3, 0.1, 1.0]])
    labels = np.array([0, 0, 1])
    positives, junk = reid_groundtruth(labels, None, labels, None, camera_rule=False, query_gallery_index=[0, 1, 2])
    assert [p.tolist() for p in positives] == [[1], [0], []] and [j.tolist() for j in junk] == [[0], [1], [2]]
    got = evaluate_retrieval(positives, junk, scores=scores, recall_ks=(1, 2))
    # A1: B1 comes first once A1 is gone (a miss at 1), A2 second; A2: A1 first; B1 has no match and is skipped
    assert got["queries"] == 2 and got["Recall@1"] == 0.5 and got["Recall@2"] == 1.0
    assert got["mAP"] == pytest.approx((1 / 2 + 1) / 2) and got["mINP"] == pytest.approx((1 / 2 + 1) / 2)
    # without the rule each item would find itself first
    alone = evaluate_retrieval([np.array([0, 1]), np.array([0, 1])], [np.array([], int)] * 2, scores=scores[:2],
                               recall_ks=(1,))
    assert alone["Recall@1"] == 1.0


def test_truncated_ranking_gives_recall_where_it_is_known():
    rng = np.random.default_rng(3)
    labels = rng.permutation(np.repeat(np.arange(30), 4))
    x = features(rng, labels, signal=0.3)
    scores = x @ x.T
    positives, junk = reid_groundtruth(labels, None, labels, None, camera_rule=False,
                                       query_gallery_index=np.arange(len(labels)))
    full = evaluate_retrieval(positives, junk, scores=scores, recall_ks=(1, 10, 20, 30, 100))
    ranking = np.argsort(-scores, axis=1, kind="stable")[:, :21]
    cut = evaluate_retrieval(positives, junk, ranking=ranking, recall_ks=(1, 10, 20, 30, 100))
    # every query's own entry is in its top 21, so 20 junk-free places are known: Recall@1-20 exact, beyond unknown
    assert all(cut[f"Recall@{k}"] == full[f"Recall@{k}"] for k in (1, 10, 20))
    assert full["Recall@30"] < 1 and cut["Recall@30"] is None and cut["Recall@100"] is None
    whole = evaluate_retrieval(positives, junk, ranking=np.argsort(-scores, axis=1, kind="stable"),
                               recall_ks=(1, 10, 20, 30, 100))
    assert all(whole[f"Recall@{k}"] == full[f"Recall@{k}"] for k in (1, 10, 20, 30, 100))


def test_recall_k_must_be_positive():
    with pytest.raises(InputError, match="Recall@K needs K of at least 1"):
        evaluate_retrieval([np.array([1])], [np.array([0])], scores=np.eye(2)[:1], recall_ks=(0,))
