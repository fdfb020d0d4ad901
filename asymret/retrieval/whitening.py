"""Descriptor whitening as post-processing: learned from matching pairs, or PCA as the fallback.

Learned (supervised) whitening ``Lw``, Radenović, Tolias & Chum, "Fine-tuning CNN image retrieval with
no human annotation" (TPAMI 2018, Sec. 3.4; ECCV 2016), cirtorch ``whitenlearn`` (methods.md §1):
``m = mean(x_q)`` over the pairs' queries, ``S = (1/n) Σ (x_q - x_p)(x_q - x_p)^T``, ``P0 = chol(S)^-1``
(the matching pairs' differences become white), eigenvectors ``E`` of ``Σ P0 (x - m)(x - m)^T P0^T``
over all the descriptors (PCA of the inter-class spread in the whitened space), ``P = E^T P0``; applied
as ``x -> l2n(P (x - m))`` (``whitenapply``), keeping the top d' rows to reduce dimensions.

Checked against cirtorch's ``cirtorch/utils/whiten.py``: the same estimates. Differences that change
nothing asymret reports: ``eigh`` of the symmetrised matrix instead of ``eig`` (the same eigenvectors
of a symmetric matrix, real by construction); the Cholesky shrinkage stops at ``alpha = 100`` with an
error instead of looping forever; the final L2 divides by ``max(||y||, 1e-12)`` instead of
``||y|| + 1e-6``. Sums run over row blocks in float64, so SfM-120k-sized sets (90k x 2048) never
make an ``(N, D)`` float64 copy.

Which network's whitening a test setting uses (AML, Budnik & Avrithis CVPR 2021, its test code):
asymmetric testing applies the **gallery network's** whitening to both sides; symmetric testing
applies each network's own (docs/whitening.md).

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

BLOCK = 8192  # rows per float64 block of the sums below


def _check_descriptors(X) -> np.ndarray:
    X = np.asarray(X)
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float64)
    if X.ndim != 2 or len(X) < 2 or not np.isfinite(X).all():
        raise InputError(
            f"whitening needs an (N, D) array of finite descriptors with N >= 2, got shape {X.shape}"
        )
    return X


def _rows(X: np.ndarray, index: np.ndarray | None, start: int) -> np.ndarray:
    """Block ``start`` of ``X`` (or of ``X[index]``) in float64."""
    rows = slice(start, start + BLOCK)
    return np.asarray(X[rows] if index is None else X[index[rows]], dtype=np.float64)


def _second_moment(X: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``Σ_i (x_i - m)(x_i - m)^T`` over the rows of ``X``, block by block."""
    total = np.zeros((X.shape[1], X.shape[1]))
    for start in range(0, len(X), BLOCK):
        centred = _rows(X, None, start) - m
        total += centred.T @ centred
    return total


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
    if qidxs.min() < 0 or max(qidxs.max(), pidxs.max()) >= len(X) or pidxs.min() < 0:
        raise InputError(f"pair indices must be rows 0..{len(X) - 1} of the descriptors")
    n, D = len(qidxs), X.shape[1]
    m = sum(_rows(X, qidxs, s).sum(axis=0) for s in range(0, n, BLOCK)) / n
    S = np.zeros((D, D))
    for start in range(0, n, BLOCK):
        diff = _rows(X, qidxs, start) - _rows(X, pidxs, start)
        S += diff.T @ diff
    P0 = np.linalg.inv(cholesky_shrunk(S / n))
    # E: eigenvectors of sum (P0 (x - m))(P0 (x - m))^T = P0 [sum (x - m)(x - m)^T] P0^T
    _, E = _descending_eigh(P0 @ _second_moment(X, m) @ P0.T)
    return m, E.T @ P0


def learn_pca_whitening(X) -> tuple[np.ndarray, np.ndarray]:
    """Unsupervised PCA whitening ``(m, P)``: ``P = diag(λ)^-1/2 E^T`` (cirtorch ``pcawhitenlearn``).

    Eigenvalues are floored at 1e-12 of the largest so that, with fewer vectors than dimensions,
    the null directions do not divide by zero; keep fewer rows (``dim``) in that case.
    """
    X = _check_descriptors(X)
    m = sum(_rows(X, None, s).sum(axis=0) for s in range(0, len(X), BLOCK)) / len(X)
    eigval, E = _descending_eigh(_second_moment(X, m) / len(X))
    eigval = np.maximum(eigval, eigval[0] * 1e-12)
    return m, E.T / np.sqrt(eigval)[:, None]


def apply_whitening(x: Tensor, m: Tensor, P: Tensor) -> Tensor:
    """``l2n(P (x - m))`` for a ``(..., D)`` batch of descriptors."""
    return F.normalize((x - m) @ P.T, dim=-1)


class Whitening:
    """A learned (``"learned"``) or PCA (``"pca"``) whitening: ``m`` (D,), ``P`` (D', D), float32 tensors.

    ``info``: JSON-like provenance (where it was learned: data, pairs, images, the network's scales),
    carried in the pair file and reported beside the rows that use it; it is not part of the hash a
    gallery records (that covers ``m`` and ``P``).
    """

    def __init__(self, m, P, kind: Literal["learned", "pca"] = "learned", info: dict | None = None):
        contiguous = (lambda a: np.ascontiguousarray(a) if isinstance(a, np.ndarray) else a)  # torch: no negative strides
        self.m = torch.as_tensor(contiguous(m), dtype=torch.float32)
        self.P = torch.as_tensor(contiguous(P), dtype=torch.float32)
        self.kind = kind
        self.info = dict(info or {})
        if self.m.ndim != 1 or self.P.ndim != 2 or self.P.shape[1] != self.m.shape[0]:
            raise InputError(
                f"whitening needs m (D,) and P (D', D), got {tuple(self.m.shape)} and {tuple(self.P.shape)}"
            )

    @staticmethod
    def _top(P: np.ndarray, dim: int | None) -> np.ndarray:
        if dim is not None and not 1 <= dim <= P.shape[1]:
            raise InputError(f"a whitening of {P.shape[1]}-d descriptors keeps 1 to {P.shape[1]} dimensions, "
                             f"not {dim}; set the whitening dim within that range (or leave it unset: all)")
        return P[:dim]

    @classmethod
    def learn(cls, X, qidxs, pidxs, dim: int | None = None, info: dict | None = None) -> Whitening:
        """Learned whitening from matching pairs, keeping the top ``dim`` directions."""
        m, P = learn_whitening(X, qidxs, pidxs)
        return cls(m, cls._top(P, dim), "learned", info)

    @classmethod
    def learn_pca(cls, X, dim: int | None = None, info: dict | None = None) -> Whitening:
        """PCA whitening (no pairs needed), keeping the top ``dim`` directions."""
        m, P = learn_pca_whitening(X)
        return cls(m, cls._top(P, dim), "pca", info)

    @property
    def dim(self) -> int:
        """Output dimension D'."""
        return self.P.shape[0]

    @property
    def input_dim(self) -> int:
        """Input dimension D (the network's embedding size)."""
        return self.P.shape[1]

    def to(self, device) -> Whitening:
        self.m, self.P = self.m.to(device), self.P.to(device)
        return self

    def __call__(self, x):
        """Whiten a ``(N, D)`` numpy array (returns float32 numpy) or tensor (on the tensor's device)."""
        if isinstance(x, Tensor):
            return apply_whitening(x.float(), self.m.to(x.device), self.P.to(x.device))
        x = np.asarray(x)
        if x.ndim != 2:
            raise InputError(f"whitening applies to an (N, D) array of descriptors, got shape {x.shape}")
        m, P = self.m.cpu(), self.P.cpu()
        out = np.empty((len(x), self.dim), dtype=np.float32)
        for start in range(0, len(x), BLOCK):  # blocks: a memory-mapped (read-only) database is read, never copied whole
            block = torch.from_numpy(np.array(x[start:start + BLOCK], dtype=np.float32))
            out[start:start + BLOCK] = apply_whitening(block, m, P).numpy()
        return out

    def describe(self) -> dict:
        """What a report says about this whitening: kind, ``D -> D'`` and its provenance."""
        return {"kind": self.kind, "input_dim": self.input_dim, "dim": self.dim, **self.info}

    def state_dict(self) -> dict:
        state = {"kind": self.kind, "m": self.m.cpu(), "P": self.P.cpu()}
        if self.info:
            state["info"] = self.info
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> Whitening:
        return cls(state["m"], state["P"], state["kind"], state.get("info"))

    def __repr__(self) -> str:
        return f"Whitening(kind={self.kind!r}, {self.P.shape[1]} -> {self.dim})"


def learn_encoder_whitening(encoder, records, qidxs, pidxs=None, *, kind: Literal["learned", "pca"] = "learned",
                            dim: int | None = None, embeddings=None, info: dict | None = None,
                            **encode_kw) -> Whitening:
    """``encoder``'s whitening from the images of the matching pairs ``records[qidxs[i]], records[pidxs[i]]``.

    Only the images the pairs use are encoded (each once), and they are the descriptors ``X`` of both
    estimates (cirtorch encodes every image of its whitening set; with SfM-120k's pairs the two sets
    nearly coincide). ``kind="pca"`` learns PCA whitening on the same images, ignoring who pairs with
    whom (``pidxs`` may then be None). ``embeddings``: the encoder's embeddings of all of ``records``
    when they are at hand (a frozen gallery network's cache), so nothing is encoded again.
    ``encode_kw``: :func:`~asymret.retrieval.encode.encode_records` options (batch size, workers, device).
    """
    qidxs = np.asarray(qidxs, dtype=np.int64)
    pidxs = qidxs[:0] if pidxs is None else np.asarray(pidxs, dtype=np.int64)
    images = np.unique(np.concatenate([qidxs, pidxs]))
    if not len(images):
        raise InputError("no images to learn a whitening from; the training set gave no matching pairs")
    if embeddings is not None:
        X = np.asarray(embeddings[images], dtype=np.float32)
    else:
        from asymret.retrieval.encode import encode_records

        X = encode_records(encoder, [records[int(i)] for i in images], **encode_kw)
    if X.shape[1] != encoder.dim:
        raise InputError(f"the embeddings given are {X.shape[1]}-d but the network gives {encoder.dim}-d")
    info = {**(info or {}), "images": len(images), "scales": list(encoder.spec.input.scales)}
    if kind == "pca":
        return Whitening.learn_pca(X, dim, info=info)
    if kind != "learned":
        raise InputError(f"unknown whitening kind {kind!r}; choose learned or pca")
    info["pairs"] = len(qidxs)
    return Whitening.learn(X, np.searchsorted(images, qidxs), np.searchsorted(images, pidxs), dim, info=info)
