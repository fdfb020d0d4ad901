"""Index types on synthetic R1M-scale embeddings: build time, memory, QPS, recall against exact search.

Baselines measured in the same run:

* exact search (``topk_inner_product``, what ``VectorIndex("Flat")`` runs for 20+ queries) against
  the plain matrix product of the same shapes (numpy GEMM of the queries with every database block):
  ``exact / GEMM`` is the share of the machine's matrix-product rate that exact search keeps;
  FAISS's own ``IndexFlatIP.search`` is timed beside it;
* each approximate index (``IVF,Flat``, ``IVF,PQ``, ``OPQ,IVF,PQ``, ``HNSW``), swept over
  ``nprobe`` / ``efSearch``, against exact search: recall@1/10/100 and the QPS ratio.

Data: ``asymret.index.synthetic`` (clustered, anisotropic, unit norm); queries are further rows of
the same collection. Memory per vector is the saved index file's size over n.

    python benchmarks/bench_index.py                         # 1M x 512: 20-40 min on 2 cores
    python benchmarks/bench_index.py --n 100000 --dim 2048
    python benchmarks/bench_index.py --quick                 # 20k x 64, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before faiss loads OpenMP: no spinning on shared cores

import faiss
import numpy as np

from asymret.index.synthetic import synthetic_embeddings
from asymret.index.topk import DEFAULT_BLOCK_SIZE, topk_inner_product
from asymret.index.vectors import VectorIndex

K = 100


def best_time(fn, repeats: int = 2) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gemm(queries: np.ndarray, database: np.ndarray) -> None:
    """The plain matrix products exact search is built from, same blocks, nothing else."""
    for start in range(0, len(database), DEFAULT_BLOCK_SIZE):
        queries @ database[start:start + DEFAULT_BLOCK_SIZE].T


def recalls(found: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    out = {}
    for k in (1, 10, 100):
        hits = [len(np.intersect1d(f[:k], t[:k], assume_unique=True)) for f, t in zip(found, truth)]
        out[f"R@{k}"] = float(np.mean(hits)) / k
    return out


def qps(search, queries: np.ndarray, batch: int, budget_s: float) -> float:
    """Queries per second in batches of ``batch``, over as many queries as ``budget_s`` allows."""
    done, start = 0, time.perf_counter()
    for s in range(0, len(queries), batch):
        search(queries[s:s + batch])
        done += len(queries[s:s + batch])
        if time.perf_counter() - start > budget_s:
            break
    return done / (time.perf_counter() - start)


def index_types(n: int, dim: int) -> list[tuple[str, str, list[int]]]:
    """(factory, swept parameter, values): the types docs/index.md compares, sized for n and dim."""
    nlist = max(16, min(2 ** round(math.log2(4 * math.sqrt(n))), n // 39))
    m = min(128, dim // 8)
    probes = [p for p in (8, 16, 32, 64, 128) if p <= nlist]
    return [(f"IVF{nlist},Flat", "nprobe", probes),
            ("HNSW32", "efSearch", [16, 32, 64, 128, 256]),
            (f"IVF{nlist},PQ{m}", "nprobe", probes),
            (f"OPQ{m},IVF{nlist},PQ{m}", "nprobe", probes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="20k x 64, 200 queries")
    parser.add_argument("--types", default="", help="comma-separated factory prefixes to keep, e.g. IVF,HNSW")
    parser.add_argument("--budget", type=float, default=10.0, help="seconds per batch-1 QPS measurement")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.n, args.dim, args.queries = 20_000, 64, 200
    n, dim, nq = args.n, args.dim, args.queries
    print(f"# {n:,} x {dim} database, {nq} queries, k={K}; {os.cpu_count()} CPUs, faiss threads "
          f"{faiss.omp_get_max_threads()}, load average {os.getloadavg()[0]:.1f}", flush=True)

    start = time.perf_counter()
    database = synthetic_embeddings(n, dim, seed=0)
    queries = synthetic_embeddings(nq, dim, seed=0, start=n)
    print(f"# data generated in {time.perf_counter() - start:.0f} s", flush=True)

    # ---------------------------------------------------------------- exact search against GEMM
    truth = topk_inner_product(queries, database, K)[1]
    t_gemm = best_time(lambda: gemm(queries, database))
    t_exact = best_time(lambda: topk_inner_product(queries, database, K))
    flat_faiss = faiss.IndexFlatIP(dim)
    flat_faiss.add(database)
    t_faiss = best_time(lambda: flat_faiss.search(queries, K), repeats=1)
    by_batch = {b: (qps(lambda q: topk_inner_product(q, database, K), queries, b, args.budget),
                    qps(lambda q: flat_faiss.search(q, K), queries, b, args.budget)) for b in (32, 128, 256)}
    flat_faiss.reset()  # frees its copy of the database
    def rate(seconds: float) -> str:  # million query-vector pairs per second
        return f"{nq * n / seconds / 1e6:.0f}"

    print(f"\nexact top-{K} of {nq} queries, million pairs/s: GEMM {rate(t_gemm)}, ours {rate(t_exact)} "
          f"(exact / GEMM = {t_gemm / t_exact:.2f}), FAISS IndexFlatIP {rate(t_faiss)} "
          f"(ours / FAISS = {t_faiss / t_exact:.2f})", flush=True)
    for batch, (ours, theirs) in by_batch.items():
        print(f"exact QPS at batch {batch}: ours {ours:.1f}, FAISS IndexFlatIP {theirs:.1f}", flush=True)

    rows = []

    def keep(row: dict) -> None:  # results so far survive an interrupted run
        rows.append(row)
        if args.out:
            args.out.write_text(json.dumps({"n": n, "dim": dim, "queries": nq, "gemm_s": t_gemm,
                                            "exact_s": t_exact, "faiss_flat_s": t_faiss,
                                            "exact_qps_by_batch": by_batch, "rows": rows}))

    with tempfile.TemporaryDirectory() as tmp:
        flat = VectorIndex(dim, "Flat")
        flat.add(database)
        keep(measure(flat, "Flat", "-", None, queries, truth, 0.0, file_bytes(flat, tmp), args.budget))
        exact_qps, exact_qps1 = rows[0]["QPS@64"], rows[0]["QPS@1"]  # ANN is compared batch for batch
        del flat
        print(header(), flush=True)
        print(line(rows[0], exact_qps, exact_qps1), flush=True)
        for factory, param, values in index_types(n, dim):
            if args.types and not any(factory.startswith(t) or t in factory for t in args.types.split(",")):
                continue
            index = VectorIndex(dim, factory)
            start = time.perf_counter()
            index.train(database, max_points=40 * index.training_size()[0] or None)
            index.add(database)
            build = time.perf_counter() - start
            size = file_bytes(index, tmp)
            for value in values:
                row = measure(index, factory, param, value, queries, truth, build, size, args.budget)
                keep(row)
                print(line(row, exact_qps, exact_qps1), flush=True)
            del index

    good = [r for r in rows[1:] if r["R@10"] >= 0.95]
    best = max(good, key=lambda r: r["QPS@64"], default=None)
    print(f"\nexact search keeps {t_gemm / t_exact:.0%} of the GEMM rate (goal >= 80%)")
    if best:
        print(f"fastest setting with recall@10 >= 0.95: {best['factory']} {best['param']}={best['value']}: "
              f"{best['QPS@64'] / exact_qps:.1f}x exact QPS at batch 64, "
              f"{best['QPS@1'] / exact_qps1:.1f}x at batch 1 (goal >= 20x)")


def file_bytes(index: VectorIndex, tmp: str) -> int:
    path = Path(tmp) / "index.faiss"
    index.save(path)
    size = path.stat().st_size
    path.unlink()
    return size


def measure(index: VectorIndex, factory, param, value, queries, truth, build_s, size, budget) -> dict:
    kwargs = {param: value} if value is not None else {}
    start = time.perf_counter()
    found = np.concatenate([index.search(queries[s:s + 64], K, **kwargs)[1]
                            for s in range(0, len(queries), 64)])
    qps64 = len(queries) / (time.perf_counter() - start)
    return {"factory": factory, "param": param, "value": value, "build_s": build_s,
            "bytes_per_vector": size / len(index), **recalls(found, truth), "QPS@64": qps64,
            "QPS@1": qps(lambda q: index.search(q, K, **kwargs), queries, 1, budget)}


def header() -> str:
    return ("\n| index | setting | build s | bytes/vec | R@1 | R@10 | R@100 | QPS b=64 | QPS b=1 "
            "| x exact b=64 | x exact b=1 |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def line(r: dict, exact_qps: float, exact_qps1: float) -> str:
    setting = f"{r['param']}={r['value']}" if r["value"] is not None else "exact"
    return (f"| {r['factory']} | {setting} | {r['build_s']:.0f} | {r['bytes_per_vector']:.0f} "
            f"| {r['R@1']:.3f} | {r['R@10']:.3f} | {r['R@100']:.3f} | {r['QPS@64']:.0f} | {r['QPS@1']:.1f} "
            f"| {r['QPS@64'] / exact_qps:.1f} | {r['QPS@1'] / exact_qps1:.0f} |")


if __name__ == "__main__":
    main()
