"""Exact top-k by inner product over numpy arrays: blocked matrix products, memory bounded.

The database is scanned in blocks of ``block_size`` rows; each block costs one GEMM. Selecting the
top-k of every block with ``argpartition`` would cost as much again, so only *candidates*, the
scores above each query's running k-th best, are extracted (one vectorised comparison) and merged
into the running top-k. On data in no adversarial order the running threshold rises fast and the
candidates are few (about k·ln(n/k) per query over the whole scan), so exact search runs at nearly
the GEMM rate. A small first block sets the thresholds with ``np.partition``, as does any later
block where a row's candidates fill a quarter of it (a database sorted by similarity). The same
scheme, with ``torch.topk``, runs on a CUDA device (:func:`topk_inner_product_torch`), the fallback
where faiss has no GPU build.
"""

from __future__ import annotations

import numpy as np

from asymret.errors import InputError

DEFAULT_BLOCK_SIZE = 16384
SCORES_BUDGET_BYTES = 256 << 20  # one block of scores (query chunk x database block, float32)


def _as_matrix(x, name: str, dim: int | None = None) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        want = f"(n, {dim})" if dim is not None else "(n, dim)"
        raise InputError(f"{name} must be a 2-D array of shape {want}, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def topk_inner_product(queries, database, k: int, block_size: int = DEFAULT_BLOCK_SIZE, *,
                       return_min: bool = False):
    """Exact top-``k`` database rows for each query by inner product.

    Returns ``(scores, ids)``, each of shape ``(n_queries, min(k, n_database))``, sorted by
    descending score; ``ids`` are row numbers of ``database``. Memory: one score block of at most
    ``SCORES_BUDGET_BYTES`` plus the running top-k, whatever the sizes. Ties at the k-th score may
    resolve to any of the tied rows. ``return_min``: also each query's smallest inner product over
    the whole database, read from the same score blocks (k-reciprocal re-ranking normalises by the
    farthest item; a second scan would cost as much again), as a third array.
    """
    queries = _as_matrix(queries, "queries")
    database = _as_matrix(database, "database", queries.shape[1])
    if k < 1 or block_size < 1:
        raise InputError(f"k and block_size must be positive, got k={k}, block_size={block_size}")
    k = min(k, len(database))
    chunk = max(1, SCORES_BUDGET_BYTES // (4 * block_size))
    scores = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    lowest = np.full(len(queries), np.inf, np.float32) if return_min else None
    for s in range(0, len(queries), chunk):
        scores[s:s + chunk], ids[s:s + chunk] = _topk_chunk(
            queries[s:s + chunk], database, k, block_size, None if lowest is None else lowest[s:s + chunk])
    return (scores, ids, lowest) if return_min else (scores, ids)


def _topk_chunk(queries: np.ndarray, database: np.ndarray, k: int, block_size: int, lowest=None):
    nq = len(queries)
    best_s = np.full((nq, k), -np.inf, np.float32)
    best_i = np.full((nq, k), -1, np.int64)
    # a small first block sets every query's threshold at little cost; later blocks only pass
    # their candidates above it
    first = min(len(database), block_size, max(8 * k, 2048))
    for start in [0, *range(first, len(database), block_size)]:
        block = queries @ database[start:first if start == 0 else start + block_size].T
        if lowest is not None:
            np.minimum(lowest, block.min(axis=1), out=lowest)
        kth = best_s[:, -1].copy()
        flat = None if start == 0 else np.flatnonzero(block >= kth[:, None])
        crowded = np.arange(nq) if flat is None else _crowded_rows(flat, block.shape, k)
        if crowded.size:
            # a partition costs less than sorting this many candidates: tighten their threshold
            kk = min(k, block.shape[1])
            kth[crowded] = np.maximum(kth[crowded], np.partition(block[crowded], -kk, axis=1)[:, -kk])
            flat = np.flatnonzero(block >= kth[:, None])
        if flat.size:
            best_s, best_i = _merge(best_s, best_i, block, flat, start)
    return best_s, best_i


def _crowded_rows(flat, shape, k):
    """Rows with candidates in more than a quarter of the block (the data is sorted, or k is large)."""
    limit = max(2 * k, shape[1] // 4)
    if flat.size <= limit:
        return flat[:0]
    return np.flatnonzero(np.bincount(flat // shape[1], minlength=shape[0]) > limit)


def _merge(best_s, best_i, block, flat, offset):
    """Per-row top-k of the running best (k per row) and the block's candidates (flat positions)."""
    rows, cols = np.divmod(flat, block.shape[1])
    counts = np.bincount(rows, minlength=len(block))
    slot = np.arange(flat.size) - np.repeat(np.cumsum(counts) - counts, counts)
    cand_s = np.full((len(block), max(counts.max(), 1)), -np.inf, np.float32)
    cand_i = np.full(cand_s.shape, -1, np.int64)
    cand_s[rows, slot] = block.ravel()[flat]
    cand_i[rows, slot] = cols + offset
    all_s = np.concatenate([best_s, cand_s], axis=1)
    top = np.argsort(-all_s, axis=1, kind="stable")[:, :best_s.shape[1]]
    return np.take_along_axis(all_s, top, 1), np.take_along_axis(np.concatenate([best_i, cand_i], 1), top, 1)


def topk_inner_product_torch(queries, database, k: int, block_size: int = 1 << 18):
    """:func:`topk_inner_product` on a CUDA device: blocked ``mm`` + ``torch.topk``, merged per block.

    ``database`` may be a CUDA tensor kept resident between calls (the index's replica) or an array.
    Returns numpy ``(scores, ids)`` like :func:`topk_inner_product`.
    """
    import torch  # lazily: the index layer needs torch only for this GPU fallback

    device = database.device if torch.is_tensor(database) else torch.device("cuda")
    db = torch.as_tensor(database, dtype=torch.float32, device=device)
    q = torch.as_tensor(_as_matrix(queries, "queries", db.shape[1]), device=device)
    k = min(k, db.shape[0])
    best_s = torch.full((q.shape[0], k), float("-inf"), device=device)
    best_i = torch.full((q.shape[0], k), -1, dtype=torch.int64, device=device)
    for start in range(0, db.shape[0], block_size):
        s, i = torch.topk(q @ db[start:start + block_size].T, min(k, db.shape[0] - start), dim=1)
        merged_s, pos = torch.topk(torch.cat([best_s, s], 1), k, dim=1)
        best_i = torch.gather(torch.cat([best_i, i + start], 1), 1, pos)
        best_s = merged_s
    return best_s.cpu().numpy(), best_i.cpu().numpy()
