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


# --------------------------------------------------------------- against cirtorch's whitenlearn, written out


def cirtorch_lw(X_rows, qidxs, pidxs):
    """cirtorch's ``whitenlearn`` (cirtorch/utils/whiten.py) written out here in its own layout: descriptors are
    COLUMNS, ``eig`` (not ``eigh``), the Cholesky shrinkage loop; returns ``(m (D, 1), P (D, D))``."""
    X = np.asarray(X_rows, dtype=np.float64).T
    m = X[:, qidxs].mean(axis=1, keepdims=True)
    df = X[:, qidxs] - X[:, pidxs]
    S = df @ df.T / df.shape[1]
    alpha = 0.0
    while True:
        try:
            L = np.linalg.cholesky(S + alpha * np.eye(len(S)))
            break
        except np.linalg.LinAlgError:
            alpha = 1e-10 if alpha == 0 else alpha * 10
    P = np.linalg.inv(L)
    df = P @ (X - m)
    eigval, eigvec = np.linalg.eig(df @ df.T)
    order = eigval.argsort()[::-1]
    return m, np.real(eigvec[:, order]).T @ P


def cirtorch_apply(X_rows, m, P, dims=None):
    """cirtorch's ``whitenapply``: ``P[:dims] (X - m)``, each column divided by its norm + 1e-6; back to rows."""
    Y = P[:dims] @ (np.asarray(X_rows, dtype=np.float64).T - m)
    return (Y / (np.linalg.norm(Y, axis=0, keepdims=True) + 1e-6)).T


@pytest.mark.parametrize("dim", [None, 3])
def test_learned_whitening_equals_cirtorch_whitenlearn_on_the_same_pairs(pairs, dim):
    """Same m; the same P up to the sign of each row (eigenvectors have no sign); hence the same whitened
    descriptors up to a per-dimension sign flip, and the same similarities, with and without reduction."""
    X, q, p = pairs
    rng = np.random.default_rng(5)
    q, p = np.concatenate([q, rng.choice(600, 40)]), np.concatenate([p, rng.choice(600, 40)])  # some noise pairs
    m_ref, P_ref = cirtorch_lw(X, q, p)
    m, P = learn_whitening(X, q, p)
    np.testing.assert_allclose(m, m_ref.ravel(), rtol=1e-12)
    signs = np.sign(np.sum(P * P_ref, axis=1))
    np.testing.assert_allclose(P * signs[:, None], P_ref, rtol=1e-6, atol=1e-9 * np.abs(P_ref).max())
    ours = Whitening.learn(X, q, p, dim=dim)(X)
    ref = cirtorch_apply(X, m_ref, P_ref, dim)
    np.testing.assert_allclose(ours * signs[:dim], ref, atol=2e-5)
    np.testing.assert_allclose(ours @ ours.T, ref @ ref.T, atol=5e-5)


def test_learned_whitening_equals_cirtorch_with_fewer_pairs_than_dimensions():
    """A singular pair covariance: both shrink with the same alpha sequence (1e-10, 1e-9, ...)."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(40, 12)) @ rng.normal(size=(12, 12))
    q, p = np.arange(0, 16, 2), np.arange(1, 17, 2)  # 8 pairs, 12 dimensions
    m_ref, P_ref = cirtorch_lw(X, q, p)
    ours = Whitening.learn(X, q, p, dim=6)(X)
    ref = cirtorch_apply(X, m_ref, P_ref, 6)
    np.testing.assert_allclose(ours @ ours.T, ref @ ref.T, atol=1e-3)


def test_learning_in_blocks_equals_one_block(pairs, monkeypatch):
    import asymret.retrieval.whitening as W

    X, q, p = pairs
    whole = learn_whitening(X, q, p)
    monkeypatch.setattr(W, "BLOCK", 7)
    blocked = learn_whitening(X.astype(np.float32), q, p)
    ref = Whitening(*whole)(X)
    out = Whitening(*blocked)(X)
    np.testing.assert_allclose(np.abs(ref @ ref.T - out @ out.T).max(), 0, atol=1e-4)


class _Spec:
    class input:
        scales = (1.0,)


class _Net:
    """Just what learn_encoder_whitening reads of an encoder when the embeddings are given."""
    dim, spec = D, _Spec


def test_learn_encoder_whitening_uses_each_pair_image_once_in_place_of_the_full_set(pairs):
    """The descriptors are the images the pairs name (each once); the result is cirtorch's Lw on those images."""
    from asymret.retrieval.whitening import learn_encoder_whitening

    X, q, p = pairs
    q, p = np.concatenate([q[:200], q[:50]]), np.concatenate([p[:200], p[50:100]])  # repeated queries
    white = learn_encoder_whitening(_Net(), None, q, p, embeddings=X, info={"learned_on": "test"})
    used = np.unique(np.concatenate([q, p]))
    where = {int(i): k for k, i in enumerate(used)}
    m_ref, P_ref = cirtorch_lw(X[used], [where[i] for i in q], [where[i] for i in p])
    out, ref = white(X[:20]), cirtorch_apply(X[:20], m_ref, P_ref)
    np.testing.assert_allclose(out @ out.T, ref @ ref.T, atol=5e-5)
    assert white.info == {"learned_on": "test", "images": len(used), "scales": [1.0], "pairs": len(q)}
    assert white.describe()["input_dim"] == D == white.dim


def test_dimensions_outside_the_descriptor_size_are_refused(pairs):
    X, q, p = pairs
    with pytest.raises(InputError, match="keeps 1 to 8 dimensions"):
        Whitening.learn(X, q, p, dim=9)
