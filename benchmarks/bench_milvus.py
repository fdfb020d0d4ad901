"""The two gallery backends side by side: FAISS + SQLite (the baseline) against Milvus Lite.

Both are driven through the one interface (``open_store(...).create/add/search``), metadata rows
included, as the CLI and the service drive them. For each index type (``Flat``; ``IVF`` as
:func:`~asymret.index.vectors.recommend_index` picks it for this size; ``HNSW32``):

* build: create + add every vector with its row + close (FAISS saves its file, Milvus flushes and
  builds its index) + reopen + one search;
* QPS at batch 1 (queries one by one) and batch 64;
* recall@10 against exact search (``topk_inner_product``), default ``nprobe`` / ``efSearch``;
* and Milvus's figure over FAISS's, measured in the same run.

Data: ``asymret.index.synthetic`` (clustered unit vectors, so recall is meaningful); queries are
further rows of the same collection.

    python benchmarks/bench_milvus.py                  # 100k x 512 (docs/index.md): minutes on 2 cores
    python benchmarks/bench_milvus.py --quick          # 5k x 64, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before faiss loads OpenMP: no spinning on shared cores

import numpy as np

from asymret.index.backend import open_store
from asymret.index.synthetic import synthetic_embeddings
from asymret.index.topk import topk_inner_product
from asymret.index.recommend import recommend_index

K = 10
ADD = 10_000  # vectors per add call


def measure(backend: str, folder: Path, factory: str, x: np.ndarray, q: np.ndarray, exact: np.ndarray,
            single: int, batches: int) -> dict:
    uri = str(folder / "bench.milvus.db") if backend == "milvus" else None
    rows = [{"label": str(i % 1000), "camera": str(i % 8)} for i in range(len(x))]
    with open_store(backend, folder / backend, uri=uri) as store:
        name = f"bench-{factory.split(',')[0].lower()}"
        start = time.perf_counter()
        with store.create(name, x.shape[1], factory) as gallery:
            if not gallery.is_trained:
                gallery.train(x[np.random.default_rng(0).choice(len(x), min(len(x), 64 * 1024), replace=False)])
            for s in range(0, len(x), ADD):
                gallery.add(x[s:s + ADD], rows[s:s + ADD], ids=np.arange(s, min(s + ADD, len(x))))
        with store.open(name, readonly=True) as gallery:  # as served after a build: closing flushed it
            gallery.search(q[:1], K)
            build = time.perf_counter() - start
            start = time.perf_counter()
            for i in range(single):
                gallery.search(q[i:i + 1], K)
            qps1 = single / (time.perf_counter() - start)
            found, start = [], time.perf_counter()
            for b in range(batches):
                found += gallery.search(q[b * 64:(b + 1) * 64], K)
            qps64 = batches * 64 / (time.perf_counter() - start)
        store.delete(name)
    ids = [[h.id for h in row] for row in found]
    recall = float(np.mean([len(set(f) & set(e)) / K for f, e in zip(ids, exact[:len(ids)].tolist())]))
    return {"build_s": build, "qps_batch1": qps1, "qps_batch64": qps64, "recall@10": recall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--single", type=int, default=200, help="queries timed one by one")
    parser.add_argument("--batches", type=int, default=8, help="batches of 64 queries timed (and scored)")
    parser.add_argument("--quick", action="store_true", help="5k x 64")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.n, args.dim, args.single, args.batches = 5_000, 64, 50, 2
    import faiss

    faiss.omp_set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    data = synthetic_embeddings(args.n + args.batches * 64, args.dim, seed=0)
    x, q = data[:args.n], data[args.n:]
    exact = topk_inner_product(q, x, K)[1]
    ivf = recommend_index(args.n, args.dim, 64 << 30, exact_up_to=0).factory
    print(f"{args.n:,} x {args.dim}, {len(q)} queries, k={K}; FAISS threads {faiss.omp_get_max_threads()}")
    print(f"{'index':<14} {'backend':<8} {'build s':>8} {'QPS b=1':>9} {'QPS b=64':>9} {'R@10':>6}")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-milvus-") as tmp:
        for factory in ("Flat", ivf, "HNSW32"):
            pair = {}
            for backend in ("faiss", "milvus"):
                r = measure(backend, Path(tmp), factory, x, q, exact, args.single, args.batches)
                pair[backend] = r
                print(f"{factory:<14} {backend:<8} {r['build_s']:>8.1f} {r['qps_batch1']:>9.0f} "
                      f"{r['qps_batch64']:>9.0f} {r['recall@10']:>6.3f}", flush=True)
            ratio = {key: pair["milvus"][key] / pair["faiss"][key] for key in ("build_s", "qps_batch1", "qps_batch64")}
            print(f"{'':<14} {'ratio':<8} {ratio['build_s']:>7.2f}x {ratio['qps_batch1']:>8.2f}x "
                  f"{ratio['qps_batch64']:>8.2f}x   (Milvus Lite / FAISS)", flush=True)
            results.append({"factory": factory, **pair, "ratio": ratio})
    if args.json:
        Path(args.json).write_text(json.dumps({"n": args.n, "dim": args.dim, "results": results}, indent=1))


if __name__ == "__main__":
    main()
