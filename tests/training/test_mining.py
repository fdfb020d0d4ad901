"""AML tuple mining against a brute-force reading of the rule."""

from __future__ import annotations

import numpy as np
import pytest

from asymret.errors import DataError
from asymret.training.mining import mine_negatives, sample_pairs


def brute_force(anchor_emb, anchor_labels, pool, pool_emb, pool_labels, n):
    out = []
    for a, label in zip(anchor_emb, anchor_labels):
        scored = sorted(range(len(pool)), key=lambda j: (-float(a @ pool_emb[j]), j))
        picked, used = [], {label}
        for j in scored:
            if pool_labels[j] not in used:
                used.add(pool_labels[j])
                picked.append(pool[j])
            if len(picked) == n:
                break
        out.append(picked)
    return np.array(out)


def test_hardest_negatives_one_per_cluster_never_the_anchors():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 12, size=200)
    emb = rng.standard_normal((200, 8)).astype(np.float32)
    anchors = rng.choice(200, 20, replace=False)
    pool = rng.choice(200, 80, replace=False)
    got = mine_negatives(emb[anchors], labels[anchors], pool, emb[pool], labels[pool], 5)
    assert np.array_equal(got, brute_force(emb[anchors], labels[anchors], pool, emb[pool], labels[pool], 5))
    for a, row in zip(anchors, got):
        assert labels[a] not in labels[row] and len(set(labels[row])) == 5


def test_pairs_share_a_label_and_differ():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(10), 4)
    labels[-1] = 99  # a singleton can never be an anchor
    a, p = sample_pairs(labels, 30, rng)
    assert len(a) == 30 and len(set(a)) == 30 and 39 not in a
    assert (labels[a] == labels[p]).all() and (a != p).all()
    q, pp = sample_pairs(labels, 5, rng, qidxs=np.arange(8), pidxs=np.arange(8) + 1)
    assert ((pp - q) == 1).all()
    with pytest.raises(DataError, match="two images"):
        sample_pairs(np.arange(5), 3, rng)
