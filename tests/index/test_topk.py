"""Blocked exact top-k against a full argsort."""

from __future__ import annotations

import numpy as np
import pytest

from asymret.errors import InputError
from asymret.index import topk as topk_module
from asymret.index.topk import topk_inner_product, topk_inner_product_torch

from .conftest import brute_force, needs_cuda, unit


def assert_exact(scores, ids, queries, database, k):
    want_s, want_i = brute_force(queries, database, k)
    np.testing.assert_allclose(scores, want_s, atol=1e-5)
    # ids may differ only between equal scores
    got = np.take_along_axis(queries @ database.T, ids, 1)
    np.testing.assert_allclose(got, scores, atol=1e-5)
    assert (ids == want_i).mean() > 0.99
    assert all(len(set(row)) == len(row) for row in ids)


@pytest.mark.parametrize("n, nq, k, block", [(5000, 37, 10, 512), (3000, 5, 100, 64), (700, 1, 7, 100),
                                              (50, 4, 80, 16), (2000, 20, 1, 4096)])
def test_matches_full_argsort(n, nq, k, block):
    database, queries = unit(n, 24, seed=1), unit(nq, 24, seed=2)
    scores, ids = topk_inner_product(queries, database, k, block_size=block)
    assert scores.shape == ids.shape == (nq, min(k, n))
    assert_exact(scores, ids, queries, database, min(k, n))


def test_sorted_database_takes_the_crowded_path():
    # database in ascending order of similarity: every block beats the running threshold
    queries = unit(3, 16, seed=3)
    database = unit(4000, 16, seed=4)
    database = database[np.argsort(database @ queries[0])]
    scores, ids = topk_inner_product(queries, database, 25, block_size=256)
    assert_exact(scores, ids, queries, database, 25)


def test_ties_and_query_chunks(monkeypatch):
    monkeypatch.setattr(topk_module, "SCORES_BUDGET_BYTES", 4 * 128 * 3)  # 3 queries per chunk
    database = np.repeat(unit(40, 8, seed=5), 5, axis=0)  # every score appears 5 times
    queries = unit(10, 8, seed=6)
    scores, ids = topk_inner_product(queries, database, 12, block_size=128)
    assert_exact(scores, ids, queries, database, 12)


def test_return_min_reads_the_farthest_row_from_the_same_blocks(monkeypatch):
    monkeypatch.setattr(topk_module, "SCORES_BUDGET_BYTES", 4 * 64 * 4)  # 4 queries per chunk
    database, queries = unit(900, 12, seed=9), unit(11, 12, seed=10)
    scores, ids, lowest = topk_inner_product(queries, database, 5, block_size=64, return_min=True)
    np.testing.assert_allclose(lowest, (queries @ database.T).min(axis=1), atol=1e-6)
    plain = topk_inner_product(queries, database, 5, block_size=64)
    np.testing.assert_array_equal(scores, plain[0])
    np.testing.assert_array_equal(ids, plain[1])


def test_bad_input():
    with pytest.raises(InputError, match="shape"):
        topk_inner_product(unit(3, 8), unit(10, 9), 2)
    with pytest.raises(InputError, match="positive"):
        topk_inner_product(unit(3, 8), unit(10, 8), 0)


@pytest.mark.gpu
@needs_cuda
def test_torch_cuda_matches_numpy():
    import torch

    database, queries = unit(20000, 32, seed=7), unit(50, 32, seed=8)
    on_gpu = torch.from_numpy(database).cuda()
    scores, ids = topk_inner_product_torch(queries, on_gpu, 15, block_size=4096)
    assert_exact(scores, ids, queries, database, 15)
