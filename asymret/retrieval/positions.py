"""Where each item a metric cares about sits in a query's ranking, and the scores computed from those positions.

Step 1 of :mod:`asymret.retrieval.metrics` (which defines the protocols on top of it). For each query, the
0-based position in the descending ranking of each item the metric cares about (positives and junk), from a
similarity matrix (exact, never a full argsort: one read of the row, and only the entries scoring at least
the query's deepest positive are sorted, a cache-sized block at a time; junk below that depth is left
unranked), from features (the same, in memory-bounded query chunks of one matrix product each), or from a
truncated top-k ranking such as an index search returns (items outside it are ``MISSING``). Ties are broken
by database order, as a stable sort would (``np.argsort(-s, kind="stable")``). Then, vectorised over all
queries: junk removal, average precision (trapezoidal or mean of precisions) and capped precision at k.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from asymret.errors import InputError

MISSING = np.iinfo(np.int64).max  # position of an item outside a truncated ranking


# --------------------------------------------------------------------------------------------- input


def as_features(x, name: str, dim: int | None = None) -> np.ndarray:
    """2-D float32 rows, finite, L2-normalised (normalised with a warning when they are not)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise InputError(f"{name} must be a 2-D array (rows = images), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise InputError(f"{name} has dimension {x.shape[1]} but the other side has {dim}; "
                         "both sides must live in the same space")
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"{name} must hold floating-point features, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise InputError(f"{name} has {bad.size} row(s) with NaN or inf (first: row {bad[0]}); "
                         "re-extract those images")
    norms = np.linalg.norm(x, axis=1)
    if (norms == 0).any():
        raise InputError(f"{name} has {int((norms == 0).sum())} all-zero row(s) (first: row "
                         f"{int(np.flatnonzero(norms == 0)[0])}); they have no direction to compare")
    if np.abs(norms - 1).max() > 1e-3:
        warnings.warn(f"{name}: {int((np.abs(norms - 1) > 1e-3).sum())} of {len(x)} rows were not "
                      "L2-normalised; normalised them before scoring", stacklevel=2)
        x = x / norms[:, None]
    return x


# ----------------------------------------------------------------------------------------- positions


SORT_BLOCK = 1 << 16  # values sorted at a time: the block and its sort stay in a core's L2 cache


def _sorted_groups(values: np.ndarray, t):
    """The values ``>= t`` in database order, as sorted groups of about ``SORT_BLOCK`` values.

    Yields ``(start, group)``: the group holds values from index ``start`` up to the next group's
    start (NaN: compared false, left out). One read of ``values``, a block at a time: a block where
    at most 60 % of the values reach ``t`` is cut to them (``np.compress``; cuts are pooled up to a
    block), a fuller one is sorted whole, NaN and values below ``t`` included (cutting would cost
    more than it saves; :func:`_rank_counts` skips NaN, the values below ``t`` count for nothing).
    """
    n = values.size
    mask = np.empty(min(n, SORT_BLOCK), dtype=bool)
    buf = np.empty(min(n, SORT_BLOCK), dtype=values.dtype)
    pending, pending_size, pending_start = [], 0, 0
    for a in range(0, n, SORT_BLOCK):
        block = values[a:a + SORT_BLOCK]
        m = np.greater_equal(block, t, out=mask[:block.size])
        kept = int(np.count_nonzero(m))
        if kept > 0.6 * block.size:
            if pending:
                yield pending_start, _sorted_concatenation(pending)
                pending, pending_size = [], 0
            group = buf[:block.size]
            np.copyto(group, block)
            group.sort()
            yield a, group
            continue
        if not pending:
            pending_start = a
        pending.append(np.compress(m, block))
        pending_size += kept
        if pending_size >= SORT_BLOCK:
            yield pending_start, _sorted_concatenation(pending)
            pending, pending_size = [], 0
    if pending:
        yield pending_start, _sorted_concatenation(pending)


def _sorted_concatenation(parts: list) -> np.ndarray:
    group = np.concatenate(parts) if len(parts) > 1 else parts[0]  # compress made it: a fresh array
    group.sort()
    return group


def _rank_counts(values: np.ndarray, s: np.ndarray, index: np.ndarray | None = None):
    """Exact ``#{v > s_i}``, ``#{v == s_i}`` and, when ``index`` (the position of each ``s_i`` in
    ``values``) is given, ``#{j < index_i: values[j] == s_i}`` (the equal values that a stable sort
    puts first). NaN values rank below everything, where ``np.argsort(-values)`` puts them.

    No sort of ``values``: only the values ``>= min(s)`` can count; they are sorted a block at a
    time, in cache (:func:`_sorted_groups`), and every ``s_i`` is located in each sorted group by
    binary search. For 1M values the cost is one read of them plus sorting those that reach the
    lowest ``s_i``.
    """
    if s.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    t = s.min()
    if np.isnan(t):
        raise InputError("an item's score is NaN; similarities must be finite numbers")
    if values.size <= SORT_BLOCK:  # one block: cut and sort (NaN compares false: left out)
        group = np.sort(np.compress(values >= t, values))
        right = group.searchsorted(s, side="right")
        greater, equal = group.size - right, right - group.searchsorted(s, side="left")
        if index is None:
            return greater, equal, None
        before = np.zeros(s.size, dtype=np.int64)
        for i in np.flatnonzero(equal > 1):
            before[i] = np.count_nonzero(values[:index[i]] == s[i])
        return greater, equal, before
    order = np.argsort(s)
    keys = s[order]  # sorted: the binary searches walk forward through the group
    # one search per group: #{v < key} and #{v < next float after key} = #{v <= key}
    probes = np.concatenate([keys, np.nextafter(keys, np.inf)])
    infinite = np.isposinf(keys)  # (no next float after +inf: #{v <= inf} = every value but NaN)
    greater = np.zeros(s.size, dtype=np.int64)
    equal = np.zeros(s.size, dtype=np.int64)
    starts, equal_in = [], []  # per group: first value index, #values equal to each key
    for start, group in _sorted_groups(values, t):
        end = group.size
        if end and np.isnan(group[-1]):  # NaN sorts last, after +inf
            end = int(np.searchsorted(group, np.inf, side="right"))
        found = group.searchsorted(probes)
        left, right = found[:s.size], found[s.size:]
        right[infinite] = end
        greater += end - right
        equal += right - left
        starts.append(start)
        equal_in.append(right - left)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    greater, equal = greater[inverse], equal[inverse]
    if index is None:
        return greater, equal, None
    before = np.zeros(s.size, dtype=np.int64)
    tied = np.flatnonzero(equal > 1)
    if tied.size:  # equal values in the groups before the item's, then earlier in its own group
        equal_in = np.stack(equal_in)[:, inverse[tied]]
        group_of = np.searchsorted(starts, index[tied], side="right") - 1
        for j, (i, g) in enumerate(zip(tied, group_of)):
            before[i] = equal_in[:g, j].sum() + np.count_nonzero(values[starts[g]:index[i]] == s[i])
    return greater, equal, before


def count_above(values: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``#{v > s_i}`` and ``#{v == s_i}`` over the 1-D ``values`` for each ``s_i``, without a
    full sort (:func:`_rank_counts`). ``s`` is compared in the dtype of ``values``."""
    values = np.asarray(values).ravel()
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(np.float64)
    greater, equal, _ = _rank_counts(values, np.asarray(s, dtype=values.dtype).ravel())
    return greater, equal


def _row_positions(row: np.ndarray, idx, required=None) -> np.ndarray:
    idx = np.asarray(idx, dtype=np.int64)
    pos = np.full(idx.size, MISSING, dtype=np.int64)
    if idx.size == 0 or (required is not None and not np.any(required)):
        return pos
    s = row[idx]
    lowest = s.min() if required is None else s[required].min()  # NaN if a counted item scores NaN
    if np.isnan(lowest):
        raise InputError(f"the score of item {idx[np.isnan(s)][0]} is NaN; similarities must be finite numbers")
    keep = np.flatnonzero(s >= lowest)  # (an optional item scoring NaN ranks last: MISSING)
    greater, _, before = _rank_counts(row, s[keep], idx[keep])
    pos[keep] = greater + before  # ties: entries earlier in the database rank first (a stable sort)
    return pos


def positions_from_scores(scores: np.ndarray, items: Sequence[np.ndarray], required: Sequence | None = None,
                          threads: int | None = None) -> list[np.ndarray]:
    """0-based positions of ``items[q]`` in row ``q``'s descending ranking (ties: lower index first).

    ``required[q]`` (boolean mask over ``items[q]``; default all) marks the items whose position is
    always needed; any other item that scores below all of them gets ``MISSING`` instead (it ranks
    after every required item: for junk, which only matters above a positive, that is all a
    metric needs). Only database entries scoring at least the lowest remaining item are sorted,
    in cache-sized blocks (:func:`_rank_counts`): no sort of the row. NaN scores rank last (as in
    ``np.argsort``); an item scoring NaN is an error. Rows run in ``threads`` threads (default:
    one per core; numpy releases the GIL in every step that matters).
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or len(items) != scores.shape[0]:
        raise InputError(f"scores must be (queries x database) with one item list per query; got "
                         f"shape {scores.shape} and {len(items)} item lists")
    if required is not None and len(required) != len(items):
        raise InputError(f"required needs one mask per query; got {len(required)} for {len(items)} queries")
    if scores.dtype not in (np.float32, np.float64):
        scores = scores.astype(np.float64)  # exact for integers below 2**53 and for float16
    required = [None] * len(items) if required is None else [np.asarray(r, dtype=bool) for r in required]
    threads = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) or 1
    if threads == 1 or scores.shape[0] == 1 or scores.size < 1 << 20:
        return [_row_positions(row, idx, r) for row, idx, r in zip(scores, items, required)]
    step = 1 if scores.shape[1] > SORT_BLOCK else max(1, len(items) // (8 * threads))  # short rows: a few per task

    def rows(start):
        return [_row_positions(scores[q], items[q], required[q]) for q in range(start, min(len(items), start + step))]

    with ThreadPoolExecutor(threads) as pool:
        return [pos for chunk in pool.map(rows, range(0, len(items), step)) for pos in chunk]


def sorted_unique(ids: np.ndarray) -> np.ndarray:
    """``np.unique`` for a small 1-D int array, without its per-call overhead (and its import of numpy.ma)."""
    ids = np.sort(ids)
    return ids[np.concatenate([[True], ids[1:] != ids[:-1]])] if ids.size else ids


def members(universe: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Boolean mask over the sorted unique ``universe`` of the entries in ``ids`` (a subset of it)."""
    mask = np.zeros(universe.size, dtype=bool)
    mask[np.searchsorted(universe, ids)] = True
    return mask


def positions_from_ranking(ranking: np.ndarray, items: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Positions of ``items[q]`` in the id list ``ranking[q]`` (best first); absent items are MISSING.

    ``ranking`` may be truncated (top-k from an index) and may pad with -1.
    """
    ranking = np.asarray(ranking)
    if ranking.ndim != 2 or len(items) != ranking.shape[0]:
        raise InputError(f"ranking must be (queries x k) with one item list per query; got shape "
                         f"{ranking.shape} and {len(items)} item lists")
    out = []
    for row, idx in zip(ranking, items):
        idx = np.asarray(idx, dtype=np.int64)
        order = np.argsort(row, kind="stable")
        where = np.searchsorted(row, idx, sorter=order)
        where = np.minimum(where, row.size - 1) if row.size else where
        found = (row[order[where]] == idx) if row.size else np.zeros(idx.size, bool)
        pos = np.full(idx.size, MISSING, dtype=np.int64)
        pos[found] = order[where[found]]
        out.append(pos)
    return out


def positions_from_features(queries: np.ndarray, database: np.ndarray, items: Sequence[np.ndarray],
                            required: Sequence | None = None, max_block_bytes: int = 256 << 20) -> list[np.ndarray]:
    """Exact positions from features: inner products in query chunks of bounded memory.

    ``required`` as in :func:`positions_from_scores`.
    """
    rows = max(1, int(max_block_bytes // (4 * max(1, database.shape[0]))))
    out: list[np.ndarray] = []
    for start in range(0, len(queries), rows):
        scores = queries[start:start + rows] @ database.T
        out.extend(positions_from_scores(scores, items[start:start + rows],
                                         None if required is None else required[start:start + rows]))
    return out


def item_positions(items, required=None, *, scores=None, ranking=None, queries=None, database=None):
    given = [x is not None for x in (scores, ranking, queries)]
    if sum(given) != 1 or (queries is None) != (database is None):
        raise InputError("give exactly one ranking source: scores=, ranking=, or queries= with database=")
    if scores is not None:
        return positions_from_scores(scores, items, required)
    if ranking is not None:
        return positions_from_ranking(ranking, items)
    return positions_from_features(queries, database, items, required)


# ------------------------------------------------------------------------------ scoring from positions


def _flatten(groups: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate per-query arrays; returns (values, query index of each value)."""
    sizes = np.fromiter((len(g) for g in groups), dtype=np.int64, count=len(groups))
    values = np.concatenate([np.asarray(g, dtype=np.int64) for g in groups]) if sizes.sum() else \
        np.empty(0, dtype=np.int64)
    return values, np.repeat(np.arange(len(groups)), sizes)


def junk_removed(pos: Sequence[np.ndarray], junk: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Positives' positions after deleting junk from the ranking, flattened and sorted per query.

    Each positive moves up by the number of junk items ranked above it (revisitop ``compute_map``;
    torchreid's ``keep`` mask). Positives outside a truncated ranking are dropped: they add nothing.
    Returns (positions, query index), sorted by (query, position).
    """
    p, pq = _flatten(pos)
    j, jq = _flatten(junk)
    keep = p != MISSING
    p, pq = p[keep], pq[keep]
    keep = j != MISSING
    j, jq = j[keep], jq[keep]
    stride = int(max(p.max(initial=0), j.max(initial=0))) + 2
    pkey = pq * stride + p
    order = np.argsort(pkey, kind="stable")
    pkey, pq, p = pkey[order], pq[order], p[order]
    jkey = np.sort(jq * stride + j)
    junk_above = np.searchsorted(jkey, pkey) - np.searchsorted(jkey, pq * stride)
    return p - junk_above, pq


def _rank_in_query(q: np.ndarray, n_queries: int) -> np.ndarray:
    """0-based index of each element within its query's run (``q`` sorted)."""
    starts = np.searchsorted(q, np.arange(n_queries))
    return np.arange(q.size) - starts[q]


def average_precision(ranks: np.ndarray, q: np.ndarray, n_pos: np.ndarray, rule: str) -> np.ndarray:
    """AP per query from the junk-free 0-based ranks ``r_j`` of its retrieved positives.

    ``trapezoid`` (revisitop ``compute_ap``; official VeRi ``compute_AP.m``):
        AP = Σ_j (P0_j + P1_j) / (2n), P0_j = j / r_j (1 when r_j = 0), P1_j = (j + 1) / (r_j + 1).
    ``precision`` (torchreid / fast-reid): AP = Σ_j (j + 1) / (r_j + 1) / n.
    ``n`` is the number of positives in the ground truth, retrieved or not.
    """
    nq = len(n_pos)
    j = _rank_in_query(q, nq).astype(np.float64)
    r = ranks.astype(np.float64)
    p1 = (j + 1) / (r + 1)
    if rule == "trapezoid":
        p0 = np.divide(j, r, out=np.ones_like(r), where=r > 0)
        total, denominator = np.bincount(q, p0 + p1, minlength=nq), 2.0 * n_pos
    elif rule == "precision":
        total, denominator = np.bincount(q, p1, minlength=nq), 1.0 * n_pos
    else:
        raise ValueError(f"unknown AP rule {rule!r}")
    return np.divide(total, denominator, out=np.full(nq, np.nan), where=n_pos > 0)


def precision_at(ranks: np.ndarray, q: np.ndarray, n_queries: int, kappas: Iterable[int],
                 beyond: np.ndarray | None = None) -> np.ndarray:
    """revisitop's mP@k per query: ``kq = min(max(pos), k)``, ``|{pos <= kq}| / kq`` (1-based pos).

    A query with fewer than k positives, all ranked first, scores 1. ``beyond`` (truncated rankings): per
    query, -1 when every positive was retrieved, else the junk-removed length L of its retrieved list, below
    which its unretrieved positives lie. Its deepest positive is then past L, so ``kq = k`` for k <= L and
    mP@k is exact (0 when no positive was retrieved); for k > L it is unknown: NaN, never a guess.
    """
    pos1 = ranks + 1
    last = np.zeros(n_queries, dtype=np.int64)
    np.maximum.at(last, q, pos1)
    if beyond is not None:
        cut = beyond >= 0
        last[cut] = beyond[cut] + 1
    out = np.zeros((n_queries, len(kappas)))
    for c, k in enumerate(kappas):
        kq = np.minimum(last, k)
        hits = np.bincount(q, pos1 <= kq[q], minlength=n_queries)
        out[:, c] = np.divide(hits, kq, out=np.zeros(n_queries), where=kq > 0)
        if beyond is not None:
            out[(beyond >= 0) & (beyond < k), c] = np.nan
    return out
