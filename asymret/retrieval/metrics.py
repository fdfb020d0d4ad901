"""Retrieval and re-ID metrics, identical to the official protocols (shared/reference/protocols.md).

Two steps, kept apart so every ranking source shares one scoring code (step 1 lives in
:mod:`asymret.retrieval.positions`):

1. **Positions.** For each query, the 0-based position in the descending ranking of each item the
   metric cares about (positives and junk), from a similarity matrix (exact, never a full argsort:
   one read of the row, and only the entries scoring at least the query's deepest positive are
   sorted, a cache-sized block at a time; junk below that depth is left unranked), from features
   (the same, in memory-bounded query chunks of one matrix product each), or from a truncated
   top-k ranking such as an index search returns (items outside it are ``MISSING``).
   Ties are broken by database order, as a stable sort would (``np.argsort(-s, kind="stable")``).
2. **Scores** from positions, vectorised over all queries: revisitop's trapezoidal AP and capped
   mP@k after junk removal; torchreid/fast-reid mAP (mean of precisions), the official VeRi
   trapezoidal mAP, CMC and mINP.

Metrics take rankings or similarities plus ground truth and return plain dicts of floats in [0, 1];
they never encode images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from asymret.errors import InputError
from asymret.retrieval.positions import (
    MISSING,
    average_precision,
    item_positions,
    junk_removed,
    members,
    positions_from_ranking,
    precision_at,
    sorted_unique,
)

REVISITED_PROTOCOLS = ("easy", "medium", "hard")
DEFAULT_KAPPAS = (1, 5, 10)


# ------------------------------------------------------------------------------------ revisited Ox/Pa


def revisited_groundtruth(gnd: Sequence[dict], protocol: str) -> tuple[list, list]:
    """(positives, ignored) per query for Easy / Medium / Hard (Radenović et al., CVPR 2018)."""
    def get(g, key):
        return np.asarray(g.get(key, []), dtype=np.int64)

    ok, junk = [], []
    for g in gnd:
        easy, hard, jk = get(g, "easy"), get(g, "hard"), get(g, "junk")
        if protocol == "easy":
            ok.append(easy), junk.append(np.concatenate([jk, hard]))
        elif protocol == "medium":
            ok.append(np.concatenate([easy, hard])), junk.append(jk)
        elif protocol == "hard":
            ok.append(hard), junk.append(np.concatenate([jk, easy]))
        else:
            raise InputError(f"unknown protocol {protocol!r}; use easy, medium or hard")
    return ok, junk


def evaluate_revisited(gnd: Sequence[dict], *, scores=None, ranking=None, queries=None, database=None,
                       kappas: Sequence[int] = DEFAULT_KAPPAS, protocols=REVISITED_PROTOCOLS,
                       per_query: bool = False) -> dict:
    """Revisited Oxford/Paris metrics, numbers identical to revisitop's ``compute_map``.

    One ranking source: ``scores`` (queries x database similarities), ``ranking`` (queries x k ids,
    best first, possibly truncated), or ``queries`` + ``database`` features. Distractors (R1M) are
    database rows after the ``imlist`` images: any index past the ground truth is a negative.
    Returns ``{protocol: {"mAP", "mP@1", "mP@5", "mP@10", "queries"}, "exact": bool}``; ``exact`` is
    False when a truncated ranking missed a positive (its AP is then a lower bound).
    """
    relevant = [sorted_unique(np.concatenate([np.asarray(g.get(k, []), dtype=np.int64)
                                               for k in ("easy", "hard", "junk")])) for g in gnd]
    # junk (of every protocol) only matters above a positive: below the query's deepest easy/hard
    # image it may stay unranked (MISSING, dropped by junk_removed)
    required = [members(r, np.concatenate([np.asarray(g.get(k, []), dtype=np.int64) for k in ("easy", "hard")]))
                for r, g in zip(relevant, gnd)]
    positions = item_positions(relevant, required, scores=scores, ranking=ranking, queries=queries, database=database)
    width = np.shape(ranking)[1] if ranking is not None else None  # a ranking may be truncated at this depth

    def lookup(q, ids):
        return positions[q][np.searchsorted(relevant[q], ids)]

    result: dict = {}
    exact = True
    for protocol in protocols:
        ok, junk = revisited_groundtruth(gnd, protocol)
        pos = [lookup(q, ids) for q, ids in enumerate(ok)]
        jpos = [lookup(q, ids) for q, ids in enumerate(junk)]
        n_pos = np.array([len(ids) for ids in ok], dtype=np.int64)
        exact &= all((p != MISSING).all() for p in pos)
        ranks, q = junk_removed(pos, jpos)
        ap = average_precision(ranks, q, n_pos, "trapezoid")
        beyond = None
        if width is not None:  # queries with an unretrieved positive: the junk-removed length of their list
            cut = np.array([(p == MISSING).any() for p in pos], dtype=bool)
            beyond = np.where(cut, width - np.array([(j != MISSING).sum() for j in jpos], dtype=np.int64), -1)
        prs = precision_at(ranks, q, len(gnd), kappas, beyond)
        valid = n_pos > 0  # a query without positives is left out of the means
        entry = {"mAP": float(ap[valid].mean()) if valid.any() else float("nan")}
        for c, k in enumerate(kappas):
            values = prs[valid, c]
            # None: some query's mP@k depends on positions past the truncated ranking (unknown, not a number)
            entry[f"mP@{k}"] = None if np.isnan(values).any() else float(values.mean()) if valid.any() else \
                float("nan")
        entry["queries"] = int(valid.sum())
        if per_query:
            entry["AP"] = ap.tolist()
        result[protocol] = entry
    result["exact"] = bool(exact)
    return result


# --------------------------------------------------------------------------------------------- re-ID


def evaluate_reid(positives: Sequence[np.ndarray], junk: Sequence[np.ndarray], *, scores=None,
                  ranking=None, queries=None, database=None, cmc_ranks: Sequence[int] = (1, 5, 10),
                  per_query: bool = False) -> dict:
    """Re-ID metrics over queries with at least one positive (others are skipped, as torchreid does).

    ``mAP``: torchreid / fast-reid ``eval_func`` (mean of precisions at each positive).
    ``mAP_official``: the official VeRi ``compute_AP.m`` (trapezoidal; slightly lower).
    ``R{k}``: CMC at rank k after junk removal. ``mINP``: fast-reid, ``n_pos / (rank of the hardest
    positive)``. Build ``positives``/``junk`` with :func:`reid_groundtruth`.
    """
    if len(positives) != len(junk):
        raise InputError("positives and junk need one entry per query")
    relevant = [sorted_unique(np.concatenate([np.asarray(p, np.int64), np.asarray(j, np.int64)]))
                for p, j in zip(positives, junk)]
    required = [members(r, np.asarray(p, np.int64)) for r, p in zip(relevant, positives)]  # junk below all: unranked
    positions = item_positions(relevant, required, scores=scores, ranking=ranking, queries=queries, database=database)
    pos = [positions[q][np.searchsorted(relevant[q], np.asarray(p, np.int64))] for q, p in enumerate(positives)]
    jpos = [positions[q][np.searchsorted(relevant[q], np.asarray(j, np.int64))] for q, j in enumerate(junk)]
    n_pos = np.array([len(p) for p in positives], dtype=np.int64)
    nq = len(positives)
    exact = all((p != MISSING).all() for p in pos)
    ranks, q = junk_removed(pos, jpos)
    ap = average_precision(ranks, q, n_pos, "precision")
    ap_official = average_precision(ranks, q, n_pos, "trapezoid")
    first = np.full(nq, MISSING, dtype=np.int64)
    np.minimum.at(first, q, ranks)
    last = np.full(nq, -1, dtype=np.int64)
    np.maximum.at(last, q, ranks)
    inp = np.divide(n_pos, last + 1, out=np.zeros(nq), where=(last >= 0) & exact)
    valid = n_pos > 0
    if not valid.any():
        raise InputError("no query has a positive in the gallery; check identities and the camera rule")
    result = {"mAP": float(ap[valid].mean()), "mAP_official": float(ap_official[valid].mean())}
    for k in cmc_ranks:
        result[f"R{k}"] = float((first[valid] < k).mean())
    result["mINP"] = float(inp[valid].mean()) if exact else float("nan")
    result["queries"] = int(valid.sum())
    result["exact"] = bool(exact)
    if per_query:
        result["AP"] = ap.tolist()
    return result


def reid_groundtruth(query_ids, query_cams, gallery_ids, gallery_cams=None, *, camera_rule: bool = True,
                     query_gallery_index=None):
    """Per query, the gallery positives and junk of the re-ID protocol (0-based gallery indices).

    With ``camera_rule`` (torchreid/fast-reid, official VeRi): same identity on the same camera is
    junk, same identity on another camera is positive. Without it, or when the gallery has no
    cameras, every same-identity image is positive (torchreid and fast-reid crash here instead).
    ``query_gallery_index[q]`` (-1 or None when absent) marks the query's own gallery entry, which is
    always junk. Returns two lists of sorted int64 arrays.
    """
    query_ids = np.asarray(query_ids)
    gallery_ids = np.asarray(gallery_ids)
    use_cams = camera_rule and gallery_cams is not None and query_cams is not None
    if use_cams:
        query_cams = np.asarray(query_cams)
        gallery_cams = np.asarray(gallery_cams)
    order = np.argsort(gallery_ids, kind="stable")
    sorted_ids = gallery_ids[order]
    lo = np.searchsorted(sorted_ids, query_ids, "left")
    hi = np.searchsorted(sorted_ids, query_ids, "right")
    positives, junk = [], []
    for q in range(len(query_ids)):
        same = np.sort(order[lo[q]:hi[q]])
        if use_cams:
            same_cam = gallery_cams[same] == query_cams[q]
            pos, jk = same[~same_cam], same[same_cam]
        else:
            pos, jk = same, same[:0]
        self_idx = None if query_gallery_index is None else query_gallery_index[q]
        if self_idx is not None and self_idx >= 0:
            pos = pos[pos != self_idx]
            jk = np.union1d(jk, [self_idx])
        positives.append(pos.astype(np.int64))
        junk.append(np.asarray(jk, dtype=np.int64))
    return positives, junk


# ----------------------------------------------------------------------- fine-grained retrieval: Recall@K


RECALL_KS = (1, 10, 20, 30, 100, 1000)  # In-Shop reports 1-30, SOP 1-1000 (Oh Song et al. 2016; Liu et al. 2016)


def evaluate_retrieval(positives: Sequence[np.ndarray], junk: Sequence[np.ndarray], *, scores=None,
                       ranking=None, queries=None, database=None, recall_ks: Sequence[int] = RECALL_KS,
                       cmc_ranks: Sequence[int] = (1, 5, 10), per_query: bool = False) -> dict:
    """The re-ID metrics of :func:`evaluate_reid` plus Recall@K, for In-Shop, SOP and CUB-200-2011.

    Recall@K (Oh Song et al., CVPR 2016; Liu et al., DeepFashion, CVPR 2016): a query is a hit at K when one
    of its K nearest gallery items, junk removed (in a leave-one-out split: the query itself), shares its
    class; Recall@K is the fraction of hits. That is the CMC at rank K after junk removal, so it is taken
    from :func:`evaluate_reid` (over the same queries: those with a positive). With a truncated ``ranking``
    a query's hit at K is unknown when its first positive was not retrieved and its junk-free list is
    shorter than K; Recall@K is then None (not a guess), like mP@k in :func:`evaluate_revisited`.
    Build ``positives``/``junk`` with :func:`reid_groundtruth` (``query_gallery_index`` for leave-one-out).
    """
    ks = [int(k) for k in recall_ks]
    if any(k < 1 for k in ks):
        raise InputError(f"Recall@K needs K of at least 1, got {ks}")
    ranks = sorted(set(cmc_ranks) | set(ks))
    result = evaluate_reid(positives, junk, scores=scores, ranking=ranking, queries=queries, database=database,
                           cmc_ranks=ranks, per_query=per_query)
    unknown_from = None  # the smallest K at which some query's hit is unknown
    if ranking is not None:
        ranking = np.asarray(ranking)
        pos = positions_from_ranking(ranking, positives)
        jpos = positions_from_ranking(ranking, junk)
        valid = np.array([len(p) > 0 for p in positives])
        found = np.array([(p != MISSING).any() for p in pos])
        retrieved = (ranking >= 0).sum(axis=1) - np.array([(j != MISSING).sum() for j in jpos])
        open_ = valid & ~found
        if open_.any():
            unknown_from = int(retrieved[open_].min()) + 1
    out = {k: v for k, v in result.items() if not (k.startswith("R") and k[1:].isdigit()
                                                    and int(k[1:]) not in cmc_ranks)}
    for k in ks:
        out[f"Recall@{k}"] = None if unknown_from is not None and k >= unknown_from else result[f"R{k}"]
    return out
