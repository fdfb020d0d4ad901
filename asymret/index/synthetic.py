"""Synthetic distractor embeddings: R1M-scale galleries for tests and benchmarks, without images.

Uniform random unit vectors are the worst case for approximate search (no structure to exploit), so
real embeddings are mimicked instead: each vector is a cluster centre plus anisotropic noise whose
variance decays with the dimension index (a power law, as in the PCA spectrum of CNN descriptors)
in a random rotated basis, then L2-normalised. ``clusters=0`` gives the uniform case.

Deterministic by seed: row ``i`` is the same whatever ``chunk_size`` or ``start`` the rows are drawn
with, since every block of ``BLOCK`` rows has its own random stream.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from asymret.errors import InputError

BLOCK = 8192


def _basis(dim: int, seed: int, decay: float) -> np.ndarray:
    """Random rotation scaled by a power-law spectrum: noise @ basis has decaying variance."""
    rng = np.random.default_rng([seed, 1])
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    scale = np.arange(1, dim + 1, dtype=np.float64) ** (-decay / 2)
    return (scale[:, None] * rotation.T / np.linalg.norm(scale)).astype(np.float32)


def _centres(clusters: int, dim: int, seed: int) -> np.ndarray:
    centres = np.random.default_rng([seed, 2]).standard_normal((clusters, dim)).astype(np.float32)
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)


def iter_synthetic_embeddings(n: int, dim: int = 512, *, seed: int = 0, clusters: int = 1024,
                              spread: float = 0.8, decay: float = 1.0, start: int = 0,
                              chunk_size: int = 65536) -> Iterator[np.ndarray]:
    """Rows ``start .. start+n`` of the synthetic collection, in float32 chunks of ``chunk_size``.

    ``spread`` is the noise norm relative to the (unit) centre: 0.8 gives clusters that overlap as
    real landmark or identity clusters do; cluster sizes follow a Zipf-like law.
    """
    if n < 0 or dim < 2 or chunk_size < 1 or clusters < 0 or start < 0:
        raise InputError("n, start >= 0, dim >= 2, chunk_size >= 1 and clusters >= 0 are required")
    basis = _basis(dim, seed, decay)
    centres = _centres(clusters, dim, seed) if clusters else None
    weights = 1 / np.arange(1, clusters + 1) if clusters else None
    for lo in range(start, start + n, chunk_size):
        hi = min(lo + chunk_size, start + n)
        first = lo // BLOCK
        blocks = [_block(b, seed, dim, basis, centres, weights, spread)
                  for b in range(first, (hi - 1) // BLOCK + 1)]
        yield np.concatenate(blocks)[lo - first * BLOCK:hi - first * BLOCK]


def _block(b: int, seed: int, dim: int, basis, centres, weights, spread) -> np.ndarray:
    rng = np.random.default_rng([seed, 0, b])
    if centres is None:
        x = rng.standard_normal((BLOCK, dim), dtype=np.float32)
    else:
        which = rng.choice(len(centres), BLOCK, p=weights / weights.sum())
        x = centres[which] + spread * (rng.standard_normal((BLOCK, dim), dtype=np.float32) @ basis)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic_embeddings(n: int, dim: int = 512, **kwargs) -> np.ndarray:
    """All ``n`` rows at once (``n x dim x 4`` bytes: 2 GB for 1M x 512); see
    :func:`iter_synthetic_embeddings`."""
    out = np.empty((n, dim), np.float32)
    pos = 0
    for chunk in iter_synthetic_embeddings(n, dim, **kwargs):
        out[pos:pos + len(chunk)] = chunk
        pos += len(chunk)
    return out
