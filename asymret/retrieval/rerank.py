"""Post-processing of rankings: k-reciprocal re-ranking, query expansion (AQE, αQE) and database-side
augmentation (DBA), in bounded memory and aware of the two networks of asymmetric retrieval.

Every function takes L2-normalised rows (distances come from inner products: ``|a - b|² = 2 - 2 a·b``).

* :func:`re_ranking`: k-reciprocal re-ranking (Zhong et al., CVPR 2017) with the classic signature
  of the authors' Python code (zhunzhong07/person-re-ranking, also in fast-reid and torchreid): the
  three distance matrices in, the ``(Q, G)`` final distances out, numbers equal to that code. It
  holds ``(Q+G)²`` matrices: the reference.
* :func:`re_ranking_sparse`: the same numbers from features, never an ``(N × N)`` dense matrix
  (``N = Q + G``): each item's top ``k1 + 1`` neighbours come from a blocked top-k scan
  (:func:`asymret.index.topk.topk_inner_product`, exact), the k-reciprocal sets and their weights
  live in sparse rows (memory ``O(N · k1)``), the Jaccard distance is read through the sparse
  columns, and the output is the dense ``(Q, G)`` matrix or each query's top ``topk``.
* :func:`query_expansion` (AQE: Chum et al., ICCV 2007; αQE: Radenović et al., TPAMI 2018) and
  :func:`database_augmentation` (DBA: Arandjelović & Zisserman, CVPR 2012; Gordo et al., IJCV 2017;
  αDBA weights as Radenović et al., TPAMI 2018): one weighted sum, :func:`weighted_expansion`.

**Asymmetric retrieval.** The query network encodes the queries, the gallery network the database.
k-reciprocal re-ranking also needs query-query distances, a symmetric comparison the asymmetric
setting does not define. :data:`QQ_SPACES` names the two choices, both implemented
(``queries_qq`` of :func:`re_ranking_sparse`, :func:`queries_for_qq`):

* ``query`` (the default): the query network's own space, ``φq(q)·φq(q')``; with the query-gallery
  block ``φq(q)·φg(g)`` the whole ``(N × N)`` matrix is then the Gram matrix of the stacked rows
  ``[φq(Q); φg(G)]``, one space, as the query network was trained to share the gallery's;
* ``expanded``: each query first expanded with its gallery-side neighbours (αQE into ``φg``), and
  the query-query block taken between the expanded queries; the query-gallery block stays
  ``φq(q)·φg(g)``.

Query expansion itself is asymmetric by construction: ``φq(q)`` plus weighted ``φg`` neighbours
moves the query into the gallery network's space.

Over 450 lines: one job, post-processing a ranking; the dense reference and the sparse implementation share
the k-reciprocal sets, and query expansion's weighted sum is also DBA's, so they read best side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import scipy.sparse as sp

from asymret.errors import InputError
from asymret.index.topk import topk_inner_product

# Zhong et al. (CVPR 2017) and their code's defaults
K1, K2, LAMBDA = 20, 6, 0.3
# αQE (Radenović et al., TPAMI 2018): weights sim^α with α = 3, over the top n = 2; AQE is α = 0
QE_N, QE_ALPHA = 2, 3.0
# DBA: each database vector from its top 3 in the database (itself and its 2 nearest), αQE's weights
DBA_K, DBA_ALPHA = 3, 3.0
QQ_SPACES = ("query", "expanded")
METHODS = ("kreciprocal", "aqe", "alpha_qe")
ROWS_PER_BLOCK = 2048  # items whose k-reciprocal sets are built at a time (a few MB of comparisons)
SCORES_PER_BLOCK = 1 << 22  # query x gallery entries of the final distance computed at a time
PAIRS_PER_BLOCK = 1 << 16  # rows gathered at a time for pairwise inner products


# ------------------------------------------------------------------------------------- checks
def _params(k1, k2, lambda_value) -> tuple[int, int, float]:
    for name, value in (("k1", k1), ("k2", k2)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise InputError(f"{name} must be a positive integer (the paper's default is "
                             f"{K1 if name == 'k1' else K2}), got {value!r}")
    if not 0 <= float(lambda_value) <= 1:
        raise InputError(f"lambda_value weighs the original distance against the Jaccard distance and must lie "
                         f"in [0, 1] (default {LAMBDA}), got {lambda_value!r}")
    return int(k1), int(k2), float(lambda_value)


def _distances(x, name: str, shape: tuple[int | None, int | None]) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or any(want is not None and got != want for got, want in zip(x.shape, shape)):
        want = " x ".join("n" if s is None else str(s) for s in shape)
        raise InputError(f"{name} must be a {want} distance matrix, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        raise InputError(f"{name} must hold finite numbers; recompute the distances")
    return x


def _features(x, name: str, dim: int | None = None) -> np.ndarray:
    from asymret.retrieval.positions import as_features

    return as_features(x, name, dim=dim)


# ------------------------------------------------------------------ k-reciprocal sets (shared)
def half(k1: int) -> int:
    """The neighbourhood of a candidate in the expansion, ``round(k1 / 2)`` with NumPy's rounding
    (half to even), as the authors' code computes it."""
    return int(np.around(k1 / 2.0))


def _reciprocal(ranked: np.ndarray, k: int) -> np.ndarray:
    """Mask over ``ranked[:, :k + 1]``: which of each item's top ``k + 1`` rank it in their own top ``k + 1``.

    ``ranked``: each item's neighbours, best first (itself first). R(i, k) of Eq. (3).
    """
    width = min(k + 1, ranked.shape[1])
    mask = np.empty((len(ranked), width), bool)
    for a in range(0, len(ranked), ROWS_PER_BLOCK):
        forward = ranked[a:a + ROWS_PER_BLOCK, :width]
        backward = ranked[forward, :width]  # (B, width, width)
        own = np.arange(a, a + len(forward))[:, None, None]
        mask[a:a + len(forward)] = (backward == own).any(axis=2)
    return mask


def k_reciprocal_expansion(ranked: np.ndarray, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """Each item's expanded k-reciprocal set R*(i, k1) (Zhong et al., Eq. 5), as CSR rows (indptr, indices).

    R*(i, k1) = R(i, k1) ∪ R(c, k1/2) for every candidate c ∈ R(i, k1) whose own set shares more
    than 2/3 of its items with R(i, k1). ``ranked``: ``(N, >= k1 + 1)`` neighbour ids, best first;
    row ``i`` is item ``i``. Indices come sorted within a row.
    """
    n = len(ranked)
    h = half(k1)
    recip = _reciprocal(ranked, k1)
    recip_h = _reciprocal(ranked, h)
    width, width_h = recip.shape[1], recip_h.shape[1]
    lengths, chunks = [], []
    for a in range(0, n, ROWS_PER_BLOCK):
        fwd = ranked[a:a + ROWS_PER_BLOCK, :width]  # candidates c, valid where in R(i, k1)
        ok = recip[a:a + ROWS_PER_BLOCK]
        cand_h = ranked[fwd, :width_h]  # R(c, k1/2) before its own reciprocity check
        ok_h = recip_h[fwd]  # (B, width, width_h)
        in_r = ((cand_h[..., None] == fwd[:, None, None, :]) & ok[:, None, None, :]).any(axis=3)
        shared = (in_r & ok_h).sum(axis=2)
        size = ok_h.sum(axis=2)
        take = ok & (shared > 2.0 / 3 * size)
        ids = np.concatenate([np.where(ok, fwd, n), np.where(take[..., None] & ok_h, cand_h, n).reshape(len(fwd), -1)],
                             axis=1)
        ids.sort(axis=1)
        keep = ids < n
        keep[:, 1:] &= ids[:, 1:] != ids[:, :-1]
        lengths.append(keep.sum(axis=1))
        chunks.append(ids[keep])
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return indptr, (np.concatenate(chunks) if chunks else np.zeros(0, np.int64)).astype(np.int64)


def _row_of(indptr: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))


def _gaussian_weights(indptr: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """V of Eq. (7): ``exp(-d(i, j))`` over R*(i, k1), normalised to sum 1 per row (float32 as the
    authors' code)."""
    w = np.exp(-dist.astype(np.float32))
    starts = indptr[:-1]
    nonempty = np.diff(indptr) > 0
    sums = np.zeros(len(starts), np.float32)
    sums[nonempty] = np.add.reduceat(w, starts[nonempty])
    return w / np.repeat(sums, np.diff(indptr))


def _jaccard(m):
    """Eq. (11)'s Jaccard distance from ``m = Σ_k min(V_ik, V_jk)`` (weights summing to 1 per row)."""
    return 1 - m / (2.0 - m)


# ------------------------------------------------------------------------------------ dense
def re_ranking(q_g_dist, q_q_dist, g_g_dist, k1: int = K1, k2: int = K2, lambda_value: float = LAMBDA):
    """k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
    Encoding", CVPR 2017): final ``(Q, G)`` distances, equal to the authors' ``re_ranking``.

    ``d*(q, g) = (1 - λ) d_J(q, g) + λ d(q, g)`` (Eq. 13), with ``d`` the squared input distance over
    its row's largest over all ``N = Q + G`` items, and the Jaccard distance ``d_J`` (Eq. 11) between
    the items' Gaussian-weighted (Eq. 7) expanded k-reciprocal sets (Eq. 5), averaged over the ``k2``
    nearest neighbours (local query expansion, Eq. 12). Inputs are plain (not squared) distances,
    e.g. Euclidean between L2-normalised features; in asymmetric retrieval ``q_q_dist`` is one of
    :data:`QQ_SPACES` (module doc). Memory: a few ``N × N`` float32 matrices;
    :func:`re_ranking_sparse` gives the same numbers in ``O(N · k1)``.
    """
    k1, k2, lambda_value = _params(k1, k2, lambda_value)
    q_g = _distances(q_g_dist, "q_g_dist", (None, None))
    nq, ng = q_g.shape
    q_q = _distances(q_q_dist, "q_q_dist", (nq, nq))
    g_g = _distances(g_g_dist, "g_g_dist", (ng, ng))
    n = nq + ng
    # The authors' code normalises each column of the squared block matrix D by its maximum and
    # transposes; built from D's transpose, that is a division of each row by the row's maximum.
    dist = np.empty((n, n), np.float32)
    dist[:nq, :nq] = np.square(q_q.T)
    dist[:nq, nq:] = np.square(q_g)
    dist[nq:, :nq] = np.square(q_g.T)
    dist[nq:, nq:] = np.square(g_g.T)
    dist /= dist.max(axis=1, keepdims=True)
    ranked = _dense_ranking(dist, max(k1 + 1, k2))
    indptr, indices = k_reciprocal_expansion(ranked, k1)
    rows = _row_of(indptr)
    v = np.zeros((n, n), np.float32)
    v[rows, indices] = _gaussian_weights(indptr, dist[rows, indices])
    original = dist[:nq, nq:].copy()
    del dist
    if k2 != 1:
        v_qe = np.empty_like(v)
        for a in range(0, n, 256):
            v_qe[a:a + 256] = v[ranked[a:a + 256, :k2]].mean(axis=1)
        v = v_qe
        del v_qe
    gallery_t = np.ascontiguousarray(v[nq:].T)  # gallery_t[k] = V[Q:, k], the inverted index
    jaccard = np.empty((nq, ng), np.float32)
    for i in range(nq):
        support = np.flatnonzero(v[i])
        m = np.minimum(gallery_t[support], v[i, support][:, None]).sum(axis=0)
        jaccard[i] = _jaccard(m)
    return jaccard * (1 - lambda_value) + original * lambda_value


def _dense_ranking(dist: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` smallest entries' columns, ascending (ties: lower column first)."""
    k = min(k, dist.shape[1])
    ranked = np.empty((len(dist), k), np.int64)
    for a in range(0, len(dist), 256):
        block = dist[a:a + 256]
        part = np.argpartition(block, k - 1, axis=1)[:, :k] if k < block.shape[1] else \
            np.broadcast_to(np.arange(block.shape[1]), block.shape).copy()
        part.sort(axis=1)
        order = np.argsort(np.take_along_axis(block, part, 1), axis=1, kind="stable")
        ranked[a:a + 256] = np.take_along_axis(part, order, 1)
    return ranked


# ----------------------------------------------------------------------------------- sparse
@dataclass
class _Items:
    """The N = Q + G items of re-ranking: queries first, then the gallery, and how to compare them.

    Query-gallery pairs use ``queries · gallery``; query-query pairs ``queries_qq · queries_qq``;
    gallery-gallery pairs ``gallery · gallery``.
    """

    queries: np.ndarray
    gallery: np.ndarray
    queries_qq: np.ndarray

    @property
    def nq(self) -> int:
        return len(self.queries)

    def __len__(self) -> int:
        return len(self.queries) + len(self.gallery)

    def neighbours(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Every item's ``k`` nearest items (best first; ties: lower id first) and its farthest
        squared distance over all ``N``: per side, one blocked top-k scan against the queries and
        one against the gallery, merged."""
        nq = self.nq
        ranked, farthest = [], []
        sides = (((self.queries_qq, self.queries_qq), (self.queries, self.gallery)),  # query rows
                 ((self.gallery, self.queries), (self.gallery, self.gallery)))  # gallery rows
        for to_queries, to_gallery in sides:
            s1, i1, low1 = topk_inner_product(*to_queries, k, return_min=True)
            s2, i2, low2 = topk_inner_product(*to_gallery, k, return_min=True)
            s = np.concatenate([s1, s2], axis=1)
            ids = np.concatenate([i1, i2 + nq], axis=1)
            order = np.lexsort((ids, -s), axis=1)[:, :k]
            ranked.append(np.take_along_axis(ids, order, 1))
            farthest.append(_squared(np.minimum(low1, low2)))
        return np.concatenate(ranked), np.concatenate(farthest)

    def pair_squared(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Squared distances of the item pairs ``(rows[t], cols[t])``."""
        nq = self.nq
        out = np.empty(len(rows), np.float32)
        for a in range(0, len(rows), PAIRS_PER_BLOCK):
            r, c = rows[a:a + PAIRS_PER_BLOCK], cols[a:a + PAIRS_PER_BLOCK]
            s = np.empty(len(r), np.float32)
            for r_query, c_query in ((True, True), (True, False), (False, True), (False, False)):
                sel = np.flatnonzero(((r < nq) == r_query) & ((c < nq) == c_query))
                if not sel.size:
                    continue
                if r_query and c_query:
                    x, y = self.queries_qq[r[sel]], self.queries_qq[c[sel]]
                else:
                    x = self.queries[r[sel]] if r_query else self.gallery[r[sel] - nq]
                    y = self.queries[c[sel]] if c_query else self.gallery[c[sel] - nq]
                s[sel] = np.einsum("ij,ij->i", x, y)
            out[a:a + len(r)] = _squared(s)
        return out


def _squared(similarity: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance of unit vectors from their inner product, never below 0."""
    return np.maximum(2 - 2 * similarity.astype(np.float32), 0)


def queries_for_qq(queries, gallery, qq_space: str = "query", *, n: int = QE_N, alpha: float = QE_ALPHA):
    """The rows whose inner products are the query-query block in asymmetric k-reciprocal re-ranking.

    ``query``: the queries themselves (the query network's own space); ``expanded``: the queries
    expanded with their top ``n`` gallery neighbours (αQE, :func:`query_expansion`), in the gallery
    network's space. See the module doc.
    """
    if qq_space not in QQ_SPACES:
        raise InputError(f"the query-query space must be one of {', '.join(QQ_SPACES)}, got {qq_space!r}")
    if qq_space == "query":
        return queries
    return query_expansion(queries, gallery, n=n, alpha=alpha)


def re_ranking_sparse(queries, gallery, queries_qq=None, *, k1: int = K1, k2: int = K2,
                      lambda_value: float = LAMBDA, topk: int | None = None):
    """:func:`re_ranking` from features, in memory ``O(N · k1)`` (plus the ``(Q, G)`` output when asked).

    ``queries`` ``(Q, d)`` and ``gallery`` ``(G, d)``: L2-normalised rows; the query-gallery distance
    is ``|q - g|``. ``queries_qq`` ``(Q, d')``: the rows the query-query distances are taken between
    (default ``queries``; :func:`queries_for_qq`). Returns the ``(Q, G)`` float32 final distances
    (``topk=None``), or each query's ``topk`` smallest as ``(distances, gallery ids)``, ascending.
    The numbers equal :func:`re_ranking` given the Euclidean distances of the same rows.
    """
    k1, k2, lambda_value = _params(k1, k2, lambda_value)
    q = _features(queries, "queries")
    g = _features(gallery, "gallery", dim=q.shape[1])
    qq = q if queries_qq is None else _features(queries_qq, "queries_qq")
    if len(qq) != len(q):
        raise InputError(f"queries_qq has {len(qq)} rows but there are {len(q)} queries; give one row per query")
    if topk is not None and (not isinstance(topk, (int, np.integer)) or topk < 1):
        raise InputError(f"topk must be a positive integer (or None for every gallery item), got {topk!r}")
    items = _Items(q, g, qq)
    nq, n = items.nq, len(items)
    ranked, farthest = items.neighbours(max(k1 + 1, k2))
    indptr, indices = k_reciprocal_expansion(ranked, k1)
    rows = _row_of(indptr)
    weights = _gaussian_weights(indptr, items.pair_squared(rows, indices) / farthest[rows])
    v = sp.csr_matrix((weights, indices, indptr), shape=(n, n))
    if k2 != 1:  # V averaged over each item's k2 nearest (Eq. 12)
        k2 = min(k2, ranked.shape[1])
        mean = sp.csr_matrix((np.ones(n * k2, np.float32), ranked[:, :k2].ravel(), np.arange(0, n * k2 + 1, k2)),
                             shape=(n, n))
        v = (mean @ v).tocsr()
        v.data /= np.float32(k2)
    v.sort_indices()
    query_v = v[:nq]
    gallery_columns = v[nq:].tocsc()  # column k: the gallery items whose V has k (the inverted index)
    gallery_columns.sort_indices()
    del v
    return _final(items, query_v, gallery_columns, farthest[:nq], lambda_value, topk)


def _final(items: _Items, query_v, gallery_columns, farthest: np.ndarray, lambda_value: float, topk):
    nq, ng = items.nq, len(items.gallery)
    k = None if topk is None else min(int(topk), ng)
    out = np.empty((nq, ng), np.float32) if k is None else None
    top_d = np.empty((nq, k or 0), np.float32)
    top_i = np.empty((nq, k or 0), np.int64)
    step = max(1, SCORES_PER_BLOCK // max(ng, 1))
    col_ptr, col_rows, col_vals = gallery_columns.indptr, gallery_columns.indices, gallery_columns.data
    for a in range(0, nq, step):
        b = min(nq, a + step)
        block = query_v[a:b]
        # every (query, k, gallery item with V[., k] > 0) triple of this block, in one gather
        qrow = _row_of(block.indptr)
        lengths = col_ptr[block.indices + 1] - col_ptr[block.indices]
        starts = np.repeat(col_ptr[block.indices] - np.cumsum(lengths) + lengths, lengths)
        flat = starts + np.arange(lengths.sum())
        mins = np.minimum(col_vals[flat], np.repeat(block.data, lengths))
        m = np.bincount(np.repeat(qrow, lengths) * ng + col_rows[flat], weights=mins,
                        minlength=(b - a) * ng).reshape(b - a, ng)
        original = _squared(items.queries[a:b] @ items.gallery.T) / farthest[a:b, None]
        final = (_jaccard(m) * (1 - lambda_value) + original * lambda_value).astype(np.float32)
        if k is None:
            out[a:b] = final
        else:
            part = np.argpartition(final, k - 1, axis=1)[:, :k] if k < ng else np.tile(np.arange(ng), (b - a, 1))
            part.sort(axis=1)
            order = np.argsort(np.take_along_axis(final, part, 1), axis=1, kind="stable")
            top_i[a:b] = np.take_along_axis(part, order, 1)
            top_d[a:b] = np.take_along_axis(final, top_i[a:b], 1)
    return out if k is None else (top_d, top_i)


# ---------------------------------------------------------------------- QE and DBA (shared)
def weighted_expansion(own: np.ndarray, neighbours: np.ndarray, sims: np.ndarray, alpha: float,
                       include_own: bool = True) -> np.ndarray:
    """``normalise([own +] Σ_i max(sim_i, 0)^α x_i)`` per row: the weighted average of αQE and αDBA
    (the row itself weighs ``1 = (own·own)^α``). ``alpha = 0`` averages (AQE).

    ``own`` ``(n, d)``, ``neighbours`` ``(n, m, d)`` and their similarities to ``own`` ``(n, m)``: a
    caller that already searched (the search API) expands without searching again."""
    w = np.power(np.maximum(sims, 0), alpha, dtype=np.float64)
    acc = np.einsum("qn,qnd->qd", w, neighbours.astype(np.float64))
    if include_own:
        acc += own
    norms = np.linalg.norm(acc, axis=1, keepdims=True)
    # a row whose neighbours all weigh 0 (negative similarities) and has no own term keeps itself
    return np.where(norms > 0, acc / np.where(norms > 0, norms, 1), own).astype(np.float32)


def _check_expansion(n: int, alpha: float, what: str) -> tuple[int, float]:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise InputError(f"{what} must be a positive integer, got {n!r}")
    if not np.isfinite(alpha) or alpha < 0:
        raise InputError(f"the weight exponent alpha must be a finite number >= 0 (0: a plain average), got {alpha!r}")
    return int(n), float(alpha)


def query_expansion(queries, database, n: int = QE_N, alpha: float = QE_ALPHA, *, ranking=None) -> np.ndarray:
    """αQE: each query replaced by ``normalise(q + Σ_{i ≤ n} max(q·x_i, 0)^α x_i)`` over its top ``n``
    database rows ``x_i`` (Radenović, Tolias & Chum, "Fine-tuning CNN Image Retrieval with No Human
    Annotation", TPAMI 2018, Sec. 5: α-weighted query expansion, α = 3). ``alpha = 0`` is average query
    expansion (AQE: Chum et al., "Total Recall", ICCV 2007): the mean of the query and its top ``n``.

    In asymmetric retrieval the query comes from the query network and the ``x_i`` from the gallery
    network: the expanded query moves into the gallery's space. ``ranking``: the top-``n`` database
    ids per query when already known (e.g. from an index); found by an exact blocked scan otherwise.
    """
    n, alpha = _check_expansion(n, alpha, "the number of neighbours n of query expansion")
    q = _features(queries, "queries")
    db = _features(database, "database", dim=q.shape[1])
    n = min(n, len(db))
    if ranking is None:
        sims, ids = topk_inner_product(q, db, n)
    else:
        ids = np.asarray(ranking)[:, :n]
        if ids.shape != (len(q), n) or ids.min(initial=0) < 0 or ids.max(initial=0) >= len(db):
            raise InputError(f"ranking must hold each query's top {n} database row numbers, got shape {ids.shape}")
        sims = np.einsum("qd,qnd->qn", q, db[ids])
    return weighted_expansion(q, db[ids], sims, alpha, include_own=True)


def average_query_expansion(queries, database, n: int = QE_N, **kw) -> np.ndarray:
    """AQE (Chum et al., ICCV 2007): :func:`query_expansion` with ``alpha = 0``."""
    return query_expansion(queries, database, n=n, alpha=0.0, **kw)


def database_augmentation(database, k: int = DBA_K, alpha: float = DBA_ALPHA) -> np.ndarray:
    """DBA: each database row replaced by ``normalise(Σ_{i ≤ k} max(x·x_i, 0)^α x_i)`` over its top ``k``
    rows of the database, itself first (Arandjelović & Zisserman, "Three things everyone should know
    to improve object retrieval", CVPR 2012; Gordo et al., "End-to-end Learning of Deep Visual
    Representations for Image Retrieval", IJCV 2017; α-weighted as Radenović et al., TPAMI 2018).

    Applied once to the database (a gallery's index), before any query; queries are unchanged. An
    exact blocked scan finds the neighbours: memory ``O(N · k)`` beside the database.
    """
    k, alpha = _check_expansion(k, alpha, "the number of neighbours k of database-side augmentation")
    db = _features(database, "database")
    out = np.empty_like(db)
    for a in range(0, len(db), PAIRS_PER_BLOCK):
        rows = db[a:a + PAIRS_PER_BLOCK]
        sims, ids = topk_inner_product(rows, db, min(k, len(db)))
        out[a:a + len(rows)] = weighted_expansion(rows, db[ids], sims, alpha, include_own=False)
    return out


# ---------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class RerankOptions:
    """The settings of every post-processing method, with the papers' defaults."""

    k1: int = K1
    k2: int = K2
    lambda_value: float = LAMBDA
    qe_n: int = QE_N
    qe_alpha: float = QE_ALPHA
    dba_k: int = DBA_K
    dba_alpha: float = DBA_ALPHA

    def __post_init__(self):
        _params(self.k1, self.k2, self.lambda_value)
        _check_expansion(self.qe_n, self.qe_alpha, "qe_n")
        _check_expansion(self.dba_k, self.dba_alpha, "dba_k")

    def describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


def rerank(method: str, queries, database, options: RerankOptions | None = None, *,
           qq_space: str = "query", topk: int | None = None) -> dict:
    """One post-processing method on an asymmetric (or symmetric) ranking, as metric keyword arguments.

    ``aqe`` / ``alpha_qe``: ``{"queries": expanded, "database": database}`` (rank by inner product);
    ``kreciprocal``: ``{"scores": -final distances}`` (``topk=None``) or ``{"ranking": top ids}``,
    with the query-query block in ``qq_space`` (:data:`QQ_SPACES`).
    """
    if method not in METHODS:
        raise InputError(f"unknown re-ranking method {method!r}; choose one of {', '.join(METHODS)}")
    options = options or RerankOptions()
    if method in ("aqe", "alpha_qe"):
        alpha = 0.0 if method == "aqe" else options.qe_alpha
        return {"queries": query_expansion(queries, database, options.qe_n, alpha), "database": database}
    qq = queries_for_qq(queries, database, qq_space, n=options.qe_n, alpha=options.qe_alpha)
    result = re_ranking_sparse(queries, database, qq, k1=options.k1, k2=options.k2,
                               lambda_value=options.lambda_value, topk=topk)
    return {"scores": -result} if topk is None else {"ranking": result[1]}
