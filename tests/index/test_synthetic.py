"""Synthetic distractors: deterministic by seed whatever the chunking, unit norm, clustered."""

from __future__ import annotations

import numpy as np
import pytest

from asymret.errors import InputError
from asymret.index.synthetic import BLOCK, iter_synthetic_embeddings, synthetic_embeddings


def test_rows_do_not_depend_on_chunking_or_start():
    n = BLOCK + 1500
    whole = synthetic_embeddings(n, 16, seed=3, clusters=20)
    chunked = np.concatenate(list(iter_synthetic_embeddings(n, 16, seed=3, clusters=20, chunk_size=999)))
    np.testing.assert_array_equal(whole, chunked)
    np.testing.assert_array_equal(synthetic_embeddings(700, 16, seed=3, clusters=20, start=BLOCK - 300),
                                  whole[BLOCK - 300:BLOCK + 400])
    assert not np.array_equal(whole[:10], synthetic_embeddings(10, 16, seed=4, clusters=20))
    assert whole.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(whole, axis=1), 1, atol=1e-5)


def test_clusters_give_close_neighbours_uniform_does_not():
    def nearest(clusters):
        x = synthetic_embeddings(3000, 32, seed=1, clusters=clusters)
        q = synthetic_embeddings(50, 32, seed=1, clusters=clusters, start=3000)
        return np.sort(q @ x.T, axis=1)[:, -1].mean()

    # uniform unit vectors in 32-d: nearest of 3000 sits near cos 0.55; clustered data much closer
    assert nearest(16) > nearest(0) + 0.2


def test_bad_arguments():
    with pytest.raises(InputError):
        synthetic_embeddings(10, 1)
