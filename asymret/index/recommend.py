"""Which FAISS factory string fits a collection: its size, dimension and a memory budget (as autofaiss picks);
and the Milvus index each factory string becomes.

Used by ``asymret index build --memory-budget`` and by every gallery backend that takes a factory string.
"""

from __future__ import annotations

import logging
import math
import re
from typing import NamedTuple

from asymret.errors import ConfigError, InputError
from asymret.index.vectors import default_nprobe

log = logging.getLogger(__name__)


class IndexRecommendation(NamedTuple):
    factory: str
    reason: str


def index_memory(n: int, dim: int, factory: str) -> int:
    """Approximate resident bytes of ``n`` vectors in ``factory`` (codes, ids, graph, centroids)."""
    ivf = re.search(r"IVF(\d+)", factory)
    pq = re.search(r"PQ(\d+)", factory)
    hnsw = re.search(r"HNSW(\d+)", factory)
    per_vector = 8 + (int(pq.group(1)) if pq else 4 * dim)  # id + code
    if hnsw:
        per_vector += 2 * int(hnsw.group(1)) * 4 * 1.1  # level-0 links (2M int32) + upper levels
    fixed = ((int(ivf.group(1)) * dim * 4 if ivf else 0) + (256 * dim * 4 if pq else 0)  # centroids
             + (dim * dim * 4 if factory.startswith("OPQ") else 0))  # rotation
    return int(n * per_vector + fixed)


def recommend_index(n: int, dim: int, memory_budget_bytes: int, *, exact_up_to: int = 200_000,
                    ) -> IndexRecommendation:
    """Pick a factory string from the collection size and a memory budget, as autofaiss does.

    Exact ``Flat`` while ``n <= exact_up_to`` (exact search is fast enough there); then the most
    accurate type that fits: ``IVF,Flat`` (full vectors), else ``IVF,PQ`` with the largest code that
    fits, rotated by OPQ when each sub-quantizer covers 8 or more dimensions (up to 1024 dimensions).
    HNSW is never picked: on 1M x 512 it built 4.5x slower than IVF,Flat for no gain (docs/index.md).
    ``nlist`` is a power of two near ``4 sqrt(n)``, with 39+ training points per list.
    """
    if n < 1 or dim < 1 or memory_budget_bytes < 1:
        raise InputError("n, dim and memory_budget_bytes must be positive")
    budget = _size(memory_budget_bytes)
    flat = index_memory(n, dim, "Flat")
    if n <= exact_up_to and flat <= memory_budget_bytes:
        return IndexRecommendation("Flat", f"{n:,} vectors: exact search is fast enough up to "
                                           f"{exact_up_to:,}, and needs {_size(flat)} of the {budget}")
    nlist = max(1, min(2 ** round(math.log2(4 * math.sqrt(n))), n // 39))
    train = f"train on {39 * nlist:,}+ vectors"
    factory = f"IVF{nlist},Flat"
    if index_memory(n, dim, factory) <= memory_budget_bytes:
        return IndexRecommendation(factory, (
            f"{n:,} vectors: full vectors fit ({_size(index_memory(n, dim, factory))} of the {budget}); "
            f"{nlist} lists of ~{n // nlist} vectors, nprobe {default_nprobe(nlist)} by default; {train}"))
    for m in (256, 128, 96, 64, 48, 32, 24, 16, 12, 8, 4):
        if m >= dim or dim % m:
            continue
        rotate = dim // m >= 8 and dim <= 1024  # OPQ training grows with dim^2: 2048-d took 40+ min
        factory = f"OPQ{m},IVF{nlist},PQ{m}" if rotate else f"IVF{nlist},PQ{m}"
        need = index_memory(n, dim, factory)
        if need <= memory_budget_bytes:
            opq = f", rotated by OPQ as each code byte covers {dim // m} dims" if rotate else ""
            return IndexRecommendation(factory, (
                f"{n:,} vectors: full vectors need {_size(flat)}, over the {budget}; {m}-byte PQ codes "
                f"need {_size(need)}{opq} (compression costs recall: re-rank if it matters); {train}"))
    smallest = _size(index_memory(n, dim, f"IVF{nlist},PQ4"))
    raise InputError(f"{n:,} vectors of {dim} dims do not fit in {budget} even as 4-byte PQ codes "
                     f"(need {smallest}); raise the memory budget")


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def milvus_index(factory: str) -> tuple[str, dict]:
    """The Milvus index type and build parameters of a FAISS factory string, so that one recommendation (and one
    ``--factory``) serves both backends (:mod:`asymret.index.milvus`)."""
    f = factory.replace(" ", "")
    if f == "Flat":
        return "FLAT", {}
    if m := re.fullmatch(r"IVF(\d+),Flat", f):
        return "IVF_FLAT", {"nlist": int(m[1])}
    if m := re.fullmatch(r"IVF(\d+),SQ8", f):
        return "IVF_SQ8", {"nlist": int(m[1])}
    if m := re.fullmatch(r"IVF(\d+),PQ(\d+)(x8)?", f):
        return "IVF_PQ", {"nlist": int(m[1]), "m": int(m[2]), "nbits": 8}
    if m := re.fullmatch(r"OPQ(\d+)(_\d+)?,IVF(\d+),PQ(\d+)(x8)?", f):  # what recommend_index picks when memory is short
        log.warning("Milvus has no OPQ rotation; '%s' becomes IVF_PQ without it (expect lower recall)", factory)
        return "IVF_PQ", {"nlist": int(m[3]), "m": int(m[4]), "nbits": 8}
    if m := re.fullmatch(r"HNSW(\d+)(,Flat)?", f):
        return "HNSW", {"M": int(m[1]), "efConstruction": 40}
    raise ConfigError(f"Milvus has no index like FAISS '{factory}'; use Flat, IVF<n>,Flat, IVF<n>,SQ8, "
                      "IVF<n>,PQ<m> or HNSW<M> with --backend milvus")
