"""A FAISS index described by one factory string, with stable 64-bit ids, on CPU or GPU.

* One declarative string per index, as FAISS users write it: ``Flat``, ``IVF4096,Flat``,
  ``IVF4096,PQ64``, ``HNSW32``, ``OPQ64,IVF4096,PQ64`` (``faiss.index_factory``).
* Vectors are L2-normalised on add and search (a warning, once, when they were not), so scores are
  cosine similarities. Metric ``ip`` searches by inner product; ``l2`` by Euclidean distance, which on
  unit vectors ranks the same (``|a-b|^2 = 2 - 2 a.b``) and is converted back to a cosine score.
* Ids are any non-negative int64, unique. IVF indexes store them natively; the others are wrapped in
  ``IndexIDMap``. Types that cannot remove vectors (HNSW) mark them dead instead: the id map entry
  becomes -1, searches skip it through an ``IDSelector``, and :meth:`VectorIndex.compact` rebuilds
  the graph once a quarter of it is dead.
* Search parameters (``nprobe``, ``efSearch``) are set per call with FAISS ``SearchParameters``, so
  concurrent searches with different settings never race on shared index state.
* ``k`` larger than the number of vectors is cut to that number. An approximate index can still
  return fewer hits than asked (an IVF list probe with few vectors): those slots are id -1, score -inf.
* GPU: with faiss GPU the index is cloned to one GPU, or sharded over all of them
  (``index_cpu_to_all_gpus``), for search; the CPU index stays the one that is written and saved. Where
  faiss has no GPU build but torch sees CUDA, a ``Flat`` index is searched exactly with blocked torch
  matrix products. HNSW, filtered searches and ``k`` above FAISS-GPU's 2048 run on the CPU.
* Files: the FAISS index plus a JSON sidecar ``<file>.json`` (format version, dimension, metric,
  factory, count), both written atomically; loading can memory-map (``IO_FLAG_MMAP_IFC``), which
  makes the index read-only.

Over 450 lines: :class:`VectorIndex` and its GPU mirror (``_GpuSearch``) share the FAISS index's private parts
(the id map, the flat storage, the HNSW graph), so they stay in one module; choosing a factory string for a
collection lives in :mod:`asymret.index.recommend`.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np

from asymret.errors import ConfigError, ConflictError, DataError, InputError
from asymret.files import atomic_write, read_json, write_json_atomic
from asymret.index.topk import topk_inner_product, topk_inner_product_torch

log = logging.getLogger(__name__)

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
FORMAT = "asymret.vectors"
FORMAT_VERSION = 1
GPU_MAX_K = 2048  # FAISS GPU's k-selection limit
LIVE_IDS = faiss.IDSelectorRange(0, np.iinfo(np.int64).max)  # dead entries have id -1
COMPACT_DEAD_FRACTION = 0.25
DEFAULT_EF_SEARCH = 128
ADD_CHUNK = 65536
# Flat batches where our blocked top-k beats FAISS's own scan (about 4-6x on 1M x 512); FAISS wins
# from 256 queries on (docs/index.md, benchmarks/bench_index.py)
TOPK_BATCHES = range(20, 256)
EXAMPLES = "Flat, IVF4096,Flat, IVF4096,PQ64, HNSW32, OPQ64,IVF4096,PQ64"


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def normalise(vectors, dim: int, name: str = "vectors") -> tuple[np.ndarray, bool]:
    """``(rows as contiguous unit float32, whether they were unit already)``; NaN/zero rows are errors."""
    x = np.asarray(vectors)
    if x.ndim == 1 and x.size == dim:
        x = x[None]
    if x.ndim != 2 or x.shape[1] != dim:
        raise InputError(f"{name} must have shape (n, {dim}), got {x.shape}; the index holds {dim}-d vectors")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise InputError(f"{name} must be numbers, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    squares = np.einsum("ij,ij->i", x, x)  # no n x dim temporary; NaN or inf anywhere shows here
    if not np.isfinite(squares).all():
        row = int(np.flatnonzero(~np.isfinite(squares))[0])
        raise InputError(f"{name} row {row} holds NaN or inf; re-encode that item")
    if (squares == 0).any():
        row = int(np.flatnonzero(squares == 0)[0])
        raise InputError(f"{name} row {row} is all zeros; it has no direction")
    norms = np.sqrt(squares)
    unit = bool(np.abs(norms - 1).max(initial=0) <= 1e-3)
    return (x if unit else x / norms[:, None]), unit


def as_ids(ids, name: str = "ids") -> np.ndarray:
    """Ids as a 1-D int64 array of non-negative values (-1 is FAISS's "no result")."""
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise InputError(f"{name} must be a list of integers, got {arr.dtype} of shape {arr.shape}")
    arr = arr.astype(np.int64)
    if (arr < 0).any():
        raise InputError(f"{name} must be non-negative 64-bit integers, got {int(arr.min())}")
    return arr


def _faiss_reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0]
    return text.split("Error: ", 1)[-1] if "Error: " in text else text


class _Parts(NamedTuple):
    """The faiss objects a factory string builds, found once: where ids, parameters and storage live."""

    id_map: faiss.IndexIDMap | None
    ivf: faiss.IndexIVF | None
    hnsw: faiss.IndexHNSW | None
    flat: faiss.IndexFlat | None  # exact storage, searchable by matrix products
    clusters: int  # the largest k-means a training pass runs (IVF lists, PQ centroids); 0 if none


def _parts(index) -> _Parts:
    index = faiss.downcast_index(index)
    id_map = index if isinstance(index, faiss.IndexIDMap) else None
    inner = faiss.downcast_index(id_map.index) if id_map is not None else index
    core = faiss.downcast_index(inner.index) if isinstance(inner, faiss.IndexPreTransform) else inner
    ivf = faiss.try_extract_index_ivf(index)
    ivf = faiss.downcast_index(ivf) if ivf is not None else None
    pq = getattr(ivf if ivf is not None else core, "pq", None)
    clusters = max(ivf.nlist if ivf is not None else 0, pq.ksub if pq is not None else 0)
    return _Parts(id_map, ivf, core if isinstance(core, faiss.IndexHNSW) else None,
                  core if isinstance(core, faiss.IndexFlat) else None, clusters)


def _build(dim: int, factory: str, metric: str):
    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {sorted(METRICS)}, got '{metric}'")
    if not isinstance(dim, int) or dim < 1:
        raise ConfigError(f"dimension must be a positive integer, got {dim!r}")
    try:
        index = faiss.index_factory(dim, factory, METRICS[metric])
    except RuntimeError as exc:
        raise ConfigError(f"'{factory}' is not an index FAISS can build for {dim}-d vectors "
                          f"({_faiss_reason(exc)}); use a factory string such as {EXAMPLES}") from None
    if faiss.try_extract_index_ivf(index) is None and not isinstance(index, faiss.IndexIDMap):
        index = faiss.IndexIDMap(index)
    parts = _parts(index)
    if parts.ivf is not None:
        parts.ivf.nprobe = default_nprobe(parts.ivf.nlist)
        if isinstance(parts.ivf, faiss.IndexIVFPQ):
            parts.ivf.do_polysemous_training = False  # only for Hamming-filtered search; we never run it
    if parts.hnsw is not None:
        parts.hnsw.hnsw.efSearch = DEFAULT_EF_SEARCH
    return index


def default_nprobe(nlist: int) -> int:
    """IVF lists probed by default, ``sqrt(nlist) / 2``, at least 16: recall@10 ~0.98 on 1M x 512
    with 4096 lists (docs/index.md); set ``nprobe`` per search to trade recall for speed."""
    return min(nlist, max(16, round(math.sqrt(nlist) / 2)))


class VectorIndex:
    """Vectors with stable 64-bit ids in one FAISS index: add, remove, search, save, load.

    >>> index = VectorIndex(512, "IVF1024,Flat")
    >>> index.add(vectors, ids)          # trains on this batch first if it must
    >>> scores, ids = index.search(queries, k=10, nprobe=32)

    Not thread-safe for writes during searches (neither is FAISS); :class:`Gallery` holds a lock.
    """

    def __init__(self, dim: int, factory: str = "Flat", *, metric: str = "ip", device: str = "cpu"):
        self._setup(_build(dim, factory, metric), factory, metric, device, readonly=False)

    def _setup(self, index, factory: str, metric: str, device: str, readonly: bool, extra=None):
        if device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"device must be 'cpu', 'cuda' or 'auto', got '{device}'")
        self._index, self.factory, self.metric, self.readonly = index, factory, metric, readonly
        self.dim = index.d
        self.extra = dict(extra or {})
        self._parts = _parts(index)
        self._ids = np.sort(self._stored_ids())
        self._dead = self._index.ntotal - len(self._ids)
        self._warned = False
        self._gpu = _GpuSearch(self, device)

    # ------------------------------------------------------------------------------------- state
    def __len__(self) -> int:
        return len(self._ids)

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    def ids(self) -> np.ndarray:
        """All live ids, sorted."""
        return self._ids.copy()

    def contains(self, ids) -> np.ndarray:
        """Boolean mask: which of ``ids`` are in the index."""
        ids = as_ids(ids)
        if not len(self._ids):
            return np.zeros(len(ids), bool)
        pos = np.minimum(np.searchsorted(self._ids, ids), len(self._ids) - 1)
        return self._ids[pos] == ids

    def _stored_ids(self) -> np.ndarray:
        if self._parts.id_map is not None:
            ids = faiss.vector_to_array(self._parts.id_map.id_map)
            return ids[ids >= 0]
        invlists = self._parts.ivf.invlists
        chunks = [faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
                  for i in range(invlists.nlist) if invlists.list_size(i)]
        return np.concatenate(chunks) if chunks else np.empty(0, np.int64)

    def training_size(self) -> tuple[int, int]:
        """(minimum, recommended) number of training vectors: one per k-means centroid, FAISS's 39."""
        clusters = self._parts.clusters
        return (clusters, 39 * clusters) if not self.is_trained else (0, 0)

    def info(self) -> dict:
        return {"dim": self.dim, "metric": self.metric, "factory": self.factory, "count": len(self),
                "dead": self._dead, "is_trained": self.is_trained, "readonly": self.readonly,
                "device": self._gpu.kind or "cpu"}

    def _writable(self) -> None:
        if self.readonly:
            raise ConflictError("this index was loaded memory-mapped, which is read-only; load it with "
                                "mmap=False to add or remove vectors")

    def as_unit(self, vectors, name: str = "vectors") -> np.ndarray:
        """Checked, L2-normalised float32 rows (a warning, once per index, if they were not unit)."""
        x, unit = normalise(vectors, self.dim, name)
        if not unit and not self._warned:
            self._warned = True
            warnings.warn(f"{name} were not L2-normalised; normalising them (scores are cosine "
                          "similarities)", stacklevel=3)
        return x

    # -------------------------------------------------------------------------------- train, add
    def train(self, vectors, *, max_points: int | None = None, seed: int = 0) -> None:
        """Train the coarse quantizer / PQ codebooks on a sample of at most ``max_points`` vectors.

        The default, 64 per centroid, is above FAISS's 39 and keeps k-means time bounded.
        """
        self._writable()
        if self.is_trained:
            return
        x = self.as_unit(vectors, "training vectors")
        minimum, recommended = self.training_size()
        if len(x) < minimum:
            smaller = f"IVF{len(x) // 39},Flat" if len(x) >= 39 * 16 else "Flat"
            raise InputError(f"{self.factory} needs at least {minimum} training vectors ({recommended} "
                             f"recommended), got {len(x)}; train on a larger sample or use a smaller "
                             f"index, e.g. {smaller}")
        if len(x) < recommended:
            log.warning("%s: training on %d vectors, fewer than the %d FAISS recommends",
                        self.factory, len(x), recommended)
        limit = max_points or 64 * max(self._parts.clusters, 1)
        if len(x) > limit:
            x = x[np.sort(np.random.default_rng(seed).choice(len(x), limit, replace=False))]
        self._index.train(x)

    def add(self, vectors, ids=None) -> np.ndarray:
        """Add vectors under ``ids`` (default: after the largest id). Returns the ids.

        An untrained index is first trained on this batch. An id already present is a ConflictError.
        """
        self._writable()
        x = self.as_unit(vectors, "vectors")
        if ids is None:
            start = int(self._ids[-1]) + 1 if len(self._ids) else 0
            ids = np.arange(start, start + len(x), dtype=np.int64)
        ids = as_ids(ids)
        if len(ids) != len(x):
            raise InputError(f"got {len(x)} vectors but {len(ids)} ids; give one id per vector")
        self.check_new_ids(ids)
        if not self.is_trained:
            self.train(x)
        for start in range(0, len(x), ADD_CHUNK):  # bounds FAISS's temporaries (OPQ, residuals)
            self._index.add_with_ids(x[start:start + ADD_CHUNK], ids[start:start + ADD_CHUNK])
        self._ids = np.insert(self._ids, np.searchsorted(self._ids, np.sort(ids)), np.sort(ids))
        self._gpu.stale()
        return ids

    def check_new_ids(self, ids: np.ndarray) -> None:
        """ConflictError unless ``ids`` are unique and none is in the index yet."""
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            twice = int(uniq[counts > 1][0])
            raise ConflictError(f"id {twice} appears twice in this batch; ids must be unique")
        present = ids[self.contains(ids)]
        if present.size:
            shown = ", ".join(str(i) for i in present[:5])
            raise ConflictError(f"{present.size} id(s) already in the index ({shown}); remove them first "
                                "or add under new ids")

    # ------------------------------------------------------------------------------------ remove
    def remove(self, ids) -> int:
        """Remove ``ids`` (ids not present are ignored). Returns how many were removed."""
        self._writable()
        ids = np.unique(as_ids(ids))
        ids = ids[self.contains(ids)]
        if not ids.size:
            return 0
        try:
            removed = self._index.remove_ids(faiss.IDSelectorBatch(ids))
        except RuntimeError:  # the type cannot remove (HNSW): mark the entries dead
            removed = self._mark_dead(ids)
        self._ids = self._ids[~np.isin(self._ids, ids)]
        self._gpu.stale()
        if self._dead > COMPACT_DEAD_FRACTION * max(self._index.ntotal, 1):
            self.compact()
        return int(removed)

    def _mark_dead(self, ids: np.ndarray) -> int:
        id_map = self._parts.id_map
        entries = faiss.vector_to_array(id_map.id_map)
        dead = np.isin(entries, ids)
        entries[dead] = -1
        faiss.copy_array_to_vector(entries, id_map.id_map)
        self._dead += int(dead.sum())
        return int(dead.sum())

    def compact(self) -> None:
        """Rebuild without dead entries (HNSW cannot delete in place): frees their memory and speed."""
        self._writable()
        if not self._dead:
            return
        id_map = self._parts.id_map
        entries = faiss.vector_to_array(id_map.id_map)
        live = np.flatnonzero(entries >= 0)
        vectors = id_map.index.reconstruct_n(0, id_map.ntotal)[live] if live.size else None
        fresh = VectorIndex(self.dim, self.factory, metric=self.metric)
        if vectors is not None:
            fresh._index.add_with_ids(vectors, entries[live])
        self._index, self._parts, self._dead = fresh._index, fresh._parts, 0
        self._gpu.stale()

    # ------------------------------------------------------------------------------------ search
    def search(self, queries, k: int, *, nprobe: int | None = None, efSearch: int | None = None,
               allowed_ids=None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` per query: ``(scores, ids)``, each ``(n_queries, min(k, len(self)))``, best first.

        ``nprobe`` (IVF lists to visit) and ``efSearch`` (HNSW beam width) apply to this call only;
        ``allowed_ids`` restricts the search to those ids (a FAISS ``IDSelectorBatch``).
        Scores are cosine similarities; empty slots are id -1 with score -inf.
        """
        x = self.as_unit(queries, "queries")
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        params = self._search_params(nprobe, efSearch, allowed_ids)
        k = min(int(k), len(self))
        if k == 0:
            return np.empty((len(x), 0), np.float32), np.empty((len(x), 0), np.int64)
        found = None if allowed_ids is not None else self._gpu.search(x, k, params)
        if found is None and self._parts.flat is not None and allowed_ids is None and len(x) in TOPK_BATCHES:
            vectors, ids = self.flat_storage()
            scores, rows = topk_inner_product(x, vectors, k)
            found = scores, ids[rows]
        return found if found is not None else self.similarity(*self._index.search(x, k, params=params))

    def _search_params(self, nprobe, efSearch, allowed_ids):
        sel = LIVE_IDS if self._dead else None
        if allowed_ids is not None:
            sel = faiss.IDSelectorBatch(as_ids(allowed_ids, "allowed_ids"))
        given = (("nprobe", nprobe, self._parts.ivf), ("efSearch", efSearch, self._parts.hnsw))
        for name, value, part in given:
            if value is not None and (part is None or not isinstance(value, (int, np.integer)) or value < 1):
                kind = "IVF" if name == "nprobe" else "HNSW"
                raise InputError(f"{name} must be a positive integer and applies to {kind} indexes only; "
                                 f"this index is {self.factory}")
        if self._parts.ivf is not None:
            params = faiss.SearchParametersIVF(nprobe=int(nprobe or self._parts.ivf.nprobe))
        elif self._parts.hnsw is not None:
            params = faiss.SearchParametersHNSW(efSearch=int(efSearch or self._parts.hnsw.hnsw.efSearch))
        elif sel is not None:
            params = faiss.SearchParameters()
        else:
            return None
        if sel is not None:
            params.sel = sel
            params.referenced_objects = [sel]  # keep the selector alive as long as the parameters
        return params

    def flat_storage(self) -> tuple[np.ndarray, np.ndarray]:
        """A ``Flat`` index's stored vectors (a read-only view, no copy) and their ids."""
        flat = self._parts.flat
        if flat is None:
            raise InputError(f"only a Flat index stores raw vectors; this one is {self.factory}")
        n = flat.ntotal
        vectors = faiss.rev_swig_ptr(flat.get_xb(), n * self.dim).reshape(n, self.dim)
        vectors.flags.writeable = False
        return vectors, faiss.vector_to_array(self._parts.id_map.id_map)

    def similarity(self, scores: np.ndarray, ids: np.ndarray):
        """FAISS's output (inner products or squared distances, -1 ids) as cosine scores, -inf if empty."""
        scores = np.asarray(scores, np.float32)
        if self.metric == "l2":
            scores = 1 - scores / 2
        scores[ids < 0] = -np.inf
        return scores, ids.astype(np.int64, copy=False)

    # ----------------------------------------------------------------------------- persistence
    def save(self, path: str | Path, *, extra: dict | None = None) -> None:
        """Write the index and its sidecar ``<path>.json``, each atomically (index first).

        ``extra`` (JSON) travels in the sidecar, e.g. the gallery's checkpoint sequence number.
        """
        path = Path(path)
        atomic_write(path, lambda tmp: faiss.write_index(self._index, str(tmp)))
        if extra is not None:
            self.extra = dict(extra)
        write_json_atomic(sidecar_path(path), {
            "format": FORMAT, "format_version": FORMAT_VERSION, "dim": self.dim, "metric": self.metric,
            "factory": self.factory, "count": len(self), "faiss_version": faiss.__version__,
            "extra": self.extra})

    @classmethod
    def load(cls, path: str | Path, *, dim: int | None = None, metric: str | None = None,
             mmap: bool = False, device: str = "cpu") -> VectorIndex:
        """Read an index saved by :meth:`save`; ``dim``/``metric``, when given, must match the file.

        ``mmap=True`` maps the file instead of reading it (for the types FAISS can map; others are
        read): memory stays with the page cache, and the index is read-only.
        """
        path = Path(path)
        meta = read_json(sidecar_path(path), "index sidecar")
        if meta.get("format") != FORMAT or not isinstance(meta.get("format_version"), int):
            raise DataError(f"{sidecar_path(path)} is not an asymret index sidecar")
        if meta["format_version"] > FORMAT_VERSION:
            raise DataError(f"{path} was written by a newer asymret (format {meta['format_version']}); "
                            "upgrade asymret to read it")
        for key, want in (("dim", dim), ("metric", metric)):
            if want is not None and meta[key] != want:
                raise ConflictError(f"{path} holds an index with {key} {meta[key]}, not {want}; "
                                    f"open it with {key}={meta[key]!r} or rebuild it")
        if not path.is_file():
            raise DataError(f"index file {path} is missing (its sidecar exists); restore it or rebuild")
        index, mapped = _read_index(path, mmap)
        if index.d != meta["dim"]:
            raise DataError(f"{path} holds {index.d}-d vectors but its sidecar says {meta['dim']}; "
                            "the two files come from different saves, restore them together")
        self = cls.__new__(cls)
        self._setup(index, meta["factory"], meta["metric"], device, readonly=mapped, extra=meta.get("extra"))
        return self


def _read_index(path: Path, mmap: bool):
    if mmap:
        try:
            return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY), True
        except RuntimeError as exc:
            log.info("%s cannot be memory-mapped (%s); reading it", path, _faiss_reason(exc))
    try:
        return faiss.read_index(str(path)), False
    except RuntimeError as exc:
        raise DataError(f"{path} is not a readable FAISS index ({_faiss_reason(exc)}); restore it "
                        "from a backup or rebuild it") from None


# ------------------------------------------------------------------------------------------ GPU
class _GpuSearch:
    """Searches on GPU when there is one: a FAISS GPU replica, or torch for Flat (see module doc).

    The replica is made on first search and dropped when the CPU index changes.
    """

    def __init__(self, index: VectorIndex, device: str):
        self._owner = index
        self.kind = None if device == "cpu" else _gpu_kind(index)
        if device == "cuda" and self.kind is None:
            raise ConfigError(f"device 'cuda' asked for, but neither faiss GPU nor (for Flat) torch CUDA "
                              f"can search {index.factory} here; use device 'cpu' or 'auto'")
        self._replica = None

    def stale(self) -> None:
        self._replica = None

    def search(self, x: np.ndarray, k: int, params):
        if self.kind is None or k > GPU_MAX_K:
            return None
        if self.kind == "torch":
            if self._replica is None:
                import torch

                vectors, ids = self._owner.flat_storage()
                self._replica = (torch.from_numpy(np.array(vectors)).cuda(), ids)
            scores, rows = topk_inner_product_torch(x, self._replica[0], k)
            return scores, self._replica[1][rows]
        if self._replica is None:
            self._replica = _to_gpus(self._owner._index)
        return self._owner.similarity(*self._replica.search(x, k, params=params))


def _gpu_kind(index: VectorIndex) -> str | None:
    if getattr(faiss, "get_num_gpus", lambda: 0)() > 0 and index._parts.hnsw is None:
        return "faiss"
    if index._parts.flat is not None:
        try:
            import torch
        except ImportError:
            return None
        return "torch" if torch.cuda.is_available() else None
    return None


def _to_gpus(cpu_index):
    """Clone to the GPU, or shard over all of them (each holds 1/n of the vectors, results merged)."""
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    return faiss.index_cpu_to_all_gpus(cpu_index, co=options)
