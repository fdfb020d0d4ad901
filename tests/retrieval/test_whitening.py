"""Whitening: checked by the properties that define it, not by re-running its formula.

Learned whitening makes the matching pairs' difference covariance the identity (so Pᵀ P = S⁻¹) and
orders its rows by decreasing variance of the data; PCA whitening makes the data covariance the
identity and its top rows span the top principal directions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asymret.errors import InputError
from asymret.retrieval.whitening import Whitening, learn_pca_whitening, learn_whitening

D = 8


@pytest.fixture(scope="module")
def pairs():
    """Correlated descriptors; positives are anisotropic perturbations of their queries."""
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(300, D)) @ rng.normal(size=(D, D)) + 2.0
    noise = rng.normal(size=(300, D)) * np.linspace(0.05, 1.0, D)
    X = np.concatenate([queries, queries + noise @ rng.normal(size=(D, D))])
    return X, np.arange(300), np.arange(300, 600)


def test_learned_whitening_makes_pair_differences_white(pairs):
    X, q, p = pairs
    m, P = learn_whitening(X, q, p)
    diff = X[q] - X[p]
    S = diff.T @ diff / len(diff)
    np.testing.assert_allclose(m, X[q].mean(axis=0))
    np.testing.assert_allclose(P @ S @ P.T, np.eye(D), atol=1e-8)
    np.testing.assert_allclose(P.T @ P, np.linalg.inv(S), rtol=1e-6, atol=1e-8)


def test_learned_whitening_rows_are_decorrelated_by_decreasing_variance(pairs):
    X, q, p = pairs
    m, P = learn_whitening(X, q, p)
    Y = (X - m) @ P.T
    second_moment = Y.T @ Y
    off_diagonal = second_moment - np.diag(np.diag(second_moment))
    assert np.abs(off_diagonal).max() < 1e-8 * np.abs(second_moment).max()
    assert np.all(np.diff(np.diag(second_moment)) <= 0)


def test_apply_is_l2n_of_projection_and_dim_keeps_the_top_rows(pairs):
    X, q, p = pairs
    m, P = learn_whitening(X, q, p)
    full, reduced = Whitening.learn(X, q, p), Whitening.learn(X, q, p, dim=3)
    assert reduced.dim == 3 and full.dim == D
    np.testing.assert_allclose(reduced.P.numpy(), P[:3], rtol=1e-5, atol=1e-6)
    expected = (X - m) @ P[:3].T
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    out = reduced(X)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(reduced(torch.from_numpy(X)).numpy(), out, atol=1e-6)


def test_pca_whitening_gives_identity_covariance_and_top_principal_directions():
    rng = np.random.default_rng(1)
    X = (
        rng.normal(size=(500, 6))
        * np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
        @ np.linalg.qr(rng.normal(size=(6, 6)))[0]
    )
    m, P = learn_pca_whitening(X)
    Y = (X - m) @ P.T
    np.testing.assert_allclose(Y.T @ Y / len(X), np.eye(6), atol=1e-8)
    _, _, Vt = np.linalg.svd(X - X.mean(axis=0))
    top = Whitening.learn_pca(X, dim=2).P.numpy().astype(np.float64)
    cosines = np.abs((top / np.linalg.norm(top, axis=1, keepdims=True)) @ Vt[:2].T)
    np.testing.assert_allclose(cosines, np.eye(2), atol=1e-5)


def test_fewer_pairs_than_dimensions_still_whitens_finitely():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(10, 32))
    m, P = learn_whitening(X, [0, 1, 2], [3, 4, 5])  # singular difference covariance: shrinkage
    assert np.isfinite(P).all() and np.isfinite(Whitening(m, P)(X)).all()


def test_state_dict_round_trip_through_a_weights_only_file(tmp_path, pairs):
    X, q, p = pairs
    w = Whitening.learn(X, q, p, dim=4)
    torch.save(w.state_dict(), tmp_path / "w.pt")
    back = Whitening.from_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    assert back.kind == "learned" and torch.equal(back.P, w.P) and torch.equal(back.m, w.m)


def test_bad_inputs_are_input_errors(pairs):
    X, q, p = pairs
    with pytest.raises(InputError):
        learn_whitening(X, q, p[:-1])
    with pytest.raises(InputError):
        learn_pca_whitening(np.full((4, 3), np.nan))
    with pytest.raises(InputError):
        Whitening(np.zeros(3), np.zeros((2, 4)))
