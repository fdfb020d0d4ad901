"""Sparse k-reciprocal re-ranking against the dense reference: time and peak memory, in one run.

The dense reference is :func:`asymret.retrieval.rerank.re_ranking` (the classic signature: three
distance matrices in, numbers equal to the authors' code): it holds ``(Q+G)²`` float32 matrices. The
sparse variant :func:`~asymret.retrieval.rerank.re_ranking_sparse` starts from the features and holds
``O((Q+G) · k1)`` beside its output. Cases:

* ``veri``: VeRi-776's test split shape, 1,678 queries x 11,579 gallery vectors: both, with the
  numbers compared (largest difference of the final distances; top-10 agreement);
* ``100k``: 1,678 x 100,000: the sparse variant; the dense reference needs several ``(Q+G)²``
  matrices (printed in GB) and is not run unless ``--dense-up-to`` allows it;
* ``--largest-dense G``: also both at 1,678 x G (the largest that fits this machine's memory).

Each measurement runs in a fresh process (``multiprocessing`` spawn) that makes its own features from
the seed, so its peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``) is that run's alone; the
process's size before the call (interpreter, numpy/scipy, the features) is printed beside it.

Features are synthetic but shaped like re-ID embeddings: identities of ~58 images each (VeRi's
gallery has 11,579 images of 200 vehicles), unit vectors around an identity centre, d = 128; the
queries come from a second "network" (their own noise around the same centres): the asymmetric case,
with the query-query block in the query network's own space.

    python benchmarks/bench_rerank.py                      # veri + 100k, about 10 minutes on 2 cores
    python benchmarks/bench_rerank.py --cases veri         # the comparison alone
    python benchmarks/bench_rerank.py --largest-dense 25000
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

QUERIES = 1678
DIM = 128
PER_IDENTITY = 58


def features(num_gallery: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    identities = max(1, num_gallery // PER_IDENTITY)
    centres = rng.normal(size=(identities, DIM)).astype(np.float32)

    def around(n, spread, gen):
        x = centres[gen.integers(identities, size=n)] + spread * gen.normal(size=(n, DIM)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    gallery = around(num_gallery, 0.9, rng)
    queries = around(QUERIES, 1.1, np.random.default_rng(seed + 1))  # the query network: noisier
    return queries, gallery


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _run(kind: str, num_gallery: int, out: str) -> dict:
    """In a fresh process: one re-ranking, its wall time and memory; the final distances go to ``out``."""
    from asymret.retrieval import rerank

    queries, gallery = features(num_gallery)
    before = _rss_mb()
    start = time.perf_counter()
    if kind == "dense":
        def dist(a, b):
            return np.sqrt(np.maximum(2 - 2 * a @ b.T, 0))
        q_g, q_q, g_g = dist(queries, gallery), dist(queries, queries), dist(gallery, gallery)
        inputs = time.perf_counter() - start
        final = rerank.re_ranking(q_g, q_q, g_g)
        del q_g, q_q, g_g
    else:
        inputs = 0.0
        final = rerank.re_ranking_sparse(queries, gallery)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    top = np.argsort(final, axis=1, kind="stable")[:, :10]
    np.save(out, final)
    np.save(out.replace(".npy", "_top.npy"), top)
    return {"seconds": seconds, "inputs": inputs, "peak_mb": peak, "before_mb": before}


def measure(kind: str, num_gallery: int, folder: Path) -> dict:
    out = str(folder / f"{kind}_{num_gallery}.npy")
    with mp.get_context("spawn").Pool(1) as pool:
        result = pool.apply(_run, (kind, num_gallery, out))
    return {**result, "file": out}


def dense_gb(num_gallery: int) -> float:
    """What the dense reference needs, estimated from above: two (N x N) float32 matrices at a time
    (distances and V, then V and its average, then the average and its transpose) and the (G x G)
    float32 input distances with their square (2.5 GB for 2.3 GB measured at VeRi scale)."""
    n = QUERIES + num_gallery
    return (2 * 4 * n * n + 2 * 4 * num_gallery * num_gallery) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="veri,100k", help="comma-separated: veri, 100k")
    parser.add_argument("--largest-dense", type=int, metavar="G", help="also compare both at 1,678 x G")
    parser.add_argument("--dense-up-to", type=float, default=16.0, metavar="GB",
                        help="run the dense reference only where it needs at most this much (default 16)")
    args = parser.parse_args()
    sizes = {"veri": 11579, "100k": 100_000}
    cases = [sizes[c.strip()] for c in args.cases.split(",") if c.strip()]
    if args.largest_dense:
        cases.append(args.largest_dense)
    print(f"k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3), {QUERIES} queries, d={DIM}, "
          f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"{'gallery':>9}{'variant':>9}{'seconds':>10}{'peak MB':>10}{'before MB':>11}   notes")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for g in sorted(set(cases)):
            sparse = measure("sparse", g, folder)
            print(f"{g:>9,}{'sparse':>9}{sparse['seconds']:>10.1f}{sparse['peak_mb']:>10.0f}{sparse['before_mb']:>11.0f}"
                  f"   peak RSS under 2 GB: {sparse['peak_mb'] < 2048}")
            if dense_gb(g) > args.dense_up_to:
                print(f"{g:>9,}{'dense':>9}{'-':>10}{'-':>10}{'-':>11}   not run: needs ~{dense_gb(g):.0f} GB "
                      f"(two {QUERIES + g:,}² and two {g:,}² float32 matrices), over --dense-up-to {args.dense_up_to:g}")
                continue
            dense = measure("dense", g, folder)
            a, b = np.load(sparse["file"], mmap_mode="r"), np.load(dense["file"], mmap_mode="r")
            diff = max(float(np.abs(a[s:s + 256] - b[s:s + 256]).max()) for s in range(0, len(a), 256))
            top_a = np.load(sparse["file"].replace(".npy", "_top.npy"))
            top_b = np.load(dense["file"].replace(".npy", "_top.npy"))
            print(f"{g:>9,}{'dense':>9}{dense['seconds']:>10.1f}{dense['peak_mb']:>10.0f}{dense['before_mb']:>11.0f}"
                  f"   of which its input distances {dense['inputs']:.1f} s")
            print(f"{'':>9}{'ratio':>9}{dense['seconds'] / sparse['seconds']:>9.2f}x"
                  f"{dense['peak_mb'] / sparse['peak_mb']:>9.2f}x{'':>11}   dense / sparse; max |difference| "
                  f"{diff:.2e}, top-10 equal {np.mean(top_a == top_b):.4%}")


if __name__ == "__main__":
    main()
