"""AML training tuples: (anchor, positive, N hard negatives), re-mined every epoch.

Budnik & Avrithis (CVPR 2021), following cirtorch's ``TuplesDataset.create_epoch_tuples``: pick
``tuples_per_epoch`` (anchor, positive) pairs at random; embed the anchors with the **current**
query network and a random pool of ``pool_size`` images with the gallery side (cached gallery
embeddings when asymmetric, the query network when symmetric); for each anchor walk the pool by
descending similarity, skipping the anchor's own cluster and any cluster already used, until N
negatives are found.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from asymret.errors import DataError


@dataclass
class Tuples:
    anchors: np.ndarray  # (T,)
    positives: np.ndarray  # (T,)
    negatives: np.ndarray  # (T, N)

    def __len__(self) -> int:
        return len(self.anchors)

    def images(self) -> np.ndarray:
        """Every image index the tuples use, anchors first (for encoding in one pass)."""
        return np.unique(np.concatenate([self.anchors, self.positives, self.negatives.ravel()]))


def sample_pairs(labels: np.ndarray, count: int, rng: np.random.Generator,
                 qidxs: np.ndarray | None = None, pidxs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``count`` (anchor, positive) pairs: from SfM-120k's ``qidxs``/``pidxs`` or any two images of a label."""
    if qidxs is not None:
        pick = rng.choice(len(qidxs), size=min(count, len(qidxs)), replace=False)
        return np.asarray(qidxs)[pick], np.asarray(pidxs)[pick]
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, labels, "left")
    sizes = np.searchsorted(sorted_labels, labels, "right") - starts
    candidates = np.flatnonzero(sizes > 1)
    if candidates.size == 0:
        raise DataError("no label has two images, so no (anchor, positive) pair exists; "
                        "each class needs at least two images")
    anchors = rng.choice(candidates, size=min(count, candidates.size), replace=False)
    # a random other member of the anchor's label: shift its place within the label by 1..size-1
    place = np.empty(labels.size, dtype=np.int64)
    place[order] = np.arange(labels.size)
    shift = rng.integers(1, sizes[anchors])
    positives = order[starts[anchors] + (place[anchors] - starts[anchors] + shift) % sizes[anchors]]
    return anchors, positives


def mine_negatives(anchor_emb: np.ndarray, anchor_labels: np.ndarray, pool: np.ndarray, pool_emb: np.ndarray,
                   pool_labels: np.ndarray, num_negatives: int) -> np.ndarray:
    """For each anchor, the ``num_negatives`` most similar pool images of distinct other clusters.

    Returns (T, N) pool image indices; an anchor short of candidates is padded with its last pick
    (or a random pool image), which only happens with fewer than N + 1 clusters in the pool.
    """
    if num_negatives == 0:
        return np.empty((len(anchor_emb), 0), dtype=np.int64)
    scores = anchor_emb @ pool_emb.T
    order = np.argsort(-scores, axis=1, kind="stable")
    out = np.empty((len(anchor_emb), num_negatives), dtype=np.int64)
    for t in range(len(anchor_emb)):
        used = {anchor_labels[t]}
        picked: list[int] = []
        for j in order[t]:
            c = pool_labels[j]
            if c in used:
                continue
            used.add(c)
            picked.append(pool[j])
            if len(picked) == num_negatives:
                break
        if not picked:
            picked = [pool[order[t, 0]]]
        out[t] = (picked + [picked[-1]] * num_negatives)[:num_negatives]
    return out
