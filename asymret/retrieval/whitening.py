"""Descriptor whitening as post-processing: learned from matching pairs, or PCA as the fallback.

Learned (supervised) whitening, Radenović et al. (ECCV 2016 / TPAMI 2019), cirtorch ``whitenlearn``
(methods.md §1): ``m = mean(x_q)``, ``S = cov(x_q - x_p)``, ``P0 = chol(S)^-1``, eigenvectors ``E``
of the covariance of ``P0 (X - m)``, ``P = E^T P0``; applied as ``x -> l2n(P (x - m))``, keeping
the top d' rows to reduce dimensions. In asymmetric testing the gallery network's whitening is
applied to both sides (AML).

Descriptors are rows here (``X`` is ``(N, D)``); cirtorch stores them as columns. Learning runs in
float64 numpy; applying runs in torch so it works on the GPU as well as on numpy arrays.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from asymret.errors import InputError


def _check_descriptors(X) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or len(X) < 2 or not np.isfinite(X).all():
        raise InputError(
            f"whitening needs an (N, D) array of finite descriptors with N >= 2, got shape {X.shape}"
        )
    return X


def _descending_eigh(C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a symmetric matrix, largest eigenvalue first."""
    eigval, eigvec = np.linalg.eigh((C + C.T) / 2)
    return eigval[::-1], eigvec[:, ::-1]


def cholesky_shrunk(S: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of ``S``, adding ``alpha I`` (1e-10, 1e-9, ...) until it is positive definite.

    Fewer pairs than dimensions leave ``S`` singular; cirtorch's ``cholesky`` shrinks the same way.
    """
    eye = np.eye(len(S))
    for alpha in (0.0, *(10.0**k for k in range(-10, 3))):
        try:
            return np.linalg.cholesky(S + alpha * eye)
        except np.linalg.LinAlgError:
            continue
    raise InputError("pair differences have no usable covariance; check the descriptors and the pair indices")


def learn_whitening(X, qidxs, pidxs) -> tuple[np.ndarray, np.ndarray]:
    """Supervised whitening ``(m, P)`` from descriptors ``X`` (N, D) and matching pairs ``X[qidxs[i]], X[pidxs[i]]``.

    ``m`` (D,) is the mean of the query descriptors; ``P`` (D, D) makes the pair differences'
    covariance the identity, and its rows are ordered by decreasing variance of ``P (X - m)``.
    """
    X = _check_descriptors(X)
    qidxs, pidxs = np.asarray(qidxs, dtype=np.int64), np.asarray(pidxs, dtype=np.int64)
    if qidxs.ndim != 1 or qidxs.shape != pidxs.shape or not len(qidxs):
        raise InputError(
            "learned whitening needs equally long, non-empty lists of query and positive indices"
        )
    m = X[qidxs].mean(axis=0)
    diff = X[qidxs] - X[pidxs]
    S = diff.T @ diff / len(diff)
    P0 = np.linalg.inv(cholesky_shrunk(S))
    Y = (X - m) @ P0.T
    _, E = _descending_eigh(Y.T @ Y)
    return m, E.T @ P0


def learn_pca_whitening(X) -> tuple[np.ndarray, np.ndarray]:
    """Unsupervised PCA whitening ``(m, P)``: ``P = diag(λ)^-1/2 E^T`` (cirtorch ``pcawhitenlearn``).

    Eigenvalues are floored at 1e-12 of the largest so that, with fewer vectors than dimensions,
    the null directions do not divide by zero; keep fewer rows (``dim``) in that case.
    """
    X = _check_descriptors(X)
    m = X.mean(axis=0)
    Xc = X - m
    eigval, E = _descending_eigh(Xc.T @ Xc / len(X))
    eigval = np.maximum(eigval, eigval[0] * 1e-12)
    return m, E.T / np.sqrt(eigval)[:, None]


def apply_whitening(x: Tensor, m: Tensor, P: Tensor) -> Tensor:
    """``l2n(P (x - m))`` for a ``(..., D)`` batch of descriptors."""
    return F.normalize((x - m) @ P.T, dim=-1)


class Whitening:
    """A learned (``"learned"``) or PCA (``"pca"``) whitening: ``m`` (D,), ``P`` (D', D), float32 tensors."""

    def __init__(self, m, P, kind: Literal["learned", "pca"] = "learned"):
        self.m = torch.as_tensor(m, dtype=torch.float32)
        self.P = torch.as_tensor(P, dtype=torch.float32)
        self.kind = kind
        if self.m.ndim != 1 or self.P.ndim != 2 or self.P.shape[1] != self.m.shape[0]:
            raise InputError(
                f"whitening needs m (D,) and P (D', D), got {tuple(self.m.shape)} and {tuple(self.P.shape)}"
            )

    @classmethod
    def learn(cls, X, qidxs, pidxs, dim: int | None = None) -> Whitening:
        """Learned whitening from matching pairs, keeping the top ``dim`` directions."""
        m, P = learn_whitening(X, qidxs, pidxs)
        return cls(m, P[:dim], "learned")

    @classmethod
    def learn_pca(cls, X, dim: int | None = None) -> Whitening:
        """PCA whitening (no pairs needed), keeping the top ``dim`` directions."""
        m, P = learn_pca_whitening(X)
        return cls(m, P[:dim], "pca")

    @property
    def dim(self) -> int:
        """Output dimension D'."""
        return self.P.shape[0]

    def to(self, device) -> Whitening:
        self.m, self.P = self.m.to(device), self.P.to(device)
        return self

    def __call__(self, x):
        """Whiten a ``(N, D)`` numpy array (returns float32 numpy) or tensor (on the tensor's device)."""
        if isinstance(x, Tensor):
            return apply_whitening(x.float(), self.m.to(x.device), self.P.to(x.device))
        return apply_whitening(
            torch.as_tensor(np.asarray(x, dtype=np.float32)), self.m.cpu(), self.P.cpu()
        ).numpy()

    def state_dict(self) -> dict:
        return {"kind": self.kind, "m": self.m.cpu(), "P": self.P.cpu()}

    @classmethod
    def from_state_dict(cls, state: dict) -> Whitening:
        return cls(state["m"], state["P"], state["kind"])

    def __repr__(self) -> str:
        return f"Whitening(kind={self.kind!r}, {self.P.shape[1]} -> {self.dim})"
