"""One gallery-backend interface, two implementations: the embedded default and Milvus.

* ``faiss`` (:mod:`asymret.index.store`): a FAISS file per gallery and SQL metadata (SQLite in the
  root folder by default, any SQLAlchemy URL such as PostgreSQL), one writer per gallery.
* ``milvus`` (:mod:`asymret.index.milvus`): one Milvus collection per gallery, at a Milvus Lite file
  (``--uri galleries.milvus.db``) or a standalone server / cluster (``--uri http://host:19530``);
  several processes may write one gallery (torchrun ranks write their shards directly).

A *store* (:class:`StoreBackend`) creates, opens, lists and deletes galleries; a *gallery*
(:class:`GalleryBackend`) adds, removes, searches, gets and counts items. Callers (the CLI, the
service, gallery building) go through :func:`open_store` and these methods only.

**Exclusion** (the re-ID rule "drop the gallery items of the query's identity on the query's camera",
and "leave the query item out of its own hits"): ``search(..., exclude=rules)`` takes one entry per
query, None or a mapping or a list of mappings over ``id``, ``label``, ``camera``; a hit is dropped
when it equals every key of any one mapping (labels and cameras compare as text). The backend
applies it exactly: ``k`` hits survive whenever the gallery holds ``k`` that pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from asymret.errors import InputError

BACKENDS = ("faiss", "milvus")
EXCLUDE_KEYS = ("id", "label", "camera")


@runtime_checkable
class GalleryBackend(Protocol):
    """One gallery: vectors (unit length, inner product = cosine) with ids and metadata rows."""

    name: str
    dim: int
    factory: str
    metric: str
    network_spec: dict | None
    network_hash: str | None
    readonly: bool

    def add(self, vectors, rows: Sequence[Mapping] | None = None, *, ids=None) -> np.ndarray: ...
    def remove(self, ids) -> int: ...
    def search(self, queries, k: int = 10, *, filters: Mapping | None = None, exclude=None,
               nprobe: int | None = None, efSearch: int | None = None) -> list[list]: ...
    def get(self, ids) -> list: ...
    def contains(self, ids) -> np.ndarray: ...
    def vectors(self, ids) -> np.ndarray: ...
    def stored(self, paths: Sequence[str], hashes: Sequence[str]) -> np.ndarray: ...  # (path, sha256) already items
    def referenced(self, paths: Sequence[str]) -> np.ndarray: ...  # some item has this path
    def as_unit(self, vectors, name: str = "vectors") -> np.ndarray: ...
    def train(self, vectors) -> None: ...
    def training_size(self) -> tuple[int, int]: ...
    def record_processing(self, name: str, settings: dict) -> None: ...
    def info(self) -> dict: ...
    def close(self) -> None: ...
    def __len__(self) -> int: ...

    @property
    def is_trained(self) -> bool: ...
    @property
    def next_id(self) -> int: ...
    @property
    def processing(self) -> dict: ...


@runtime_checkable
class StoreBackend(Protocol):
    """All galleries of one place. ``shared_writes``: whether several processes may add to one gallery
    at once (Milvus), so a sharded build writes from every rank instead of merging on rank 0."""

    backend: str
    root: Path
    shared_writes: bool

    def create(self, name: str, dim: int, factory: str = "Flat", network_spec=None, *,
               metric: str = "ip") -> GalleryBackend: ...
    def open(self, name: str, *, readonly: bool = False, mmap: bool = False) -> GalleryBackend: ...
    def list(self) -> list[dict]: ...
    def delete(self, name: str) -> None: ...
    def exists(self, name: str) -> bool: ...
    def folder(self, name: str) -> Path: ...
    def ping(self) -> None: ...  # one cheap read; raises when the database or server fails (readiness)
    def close(self) -> None: ...


def open_store(backend: str = "faiss", root: str | Path = "galleries", *, uri: str | None = None,
               token: str | None = None, db_url: str | None = None, **options) -> StoreBackend:
    """The store of ``backend``: ``faiss`` (files under ``root`` + the database ``db_url``) or ``milvus``
    (the Milvus at ``uri``; ``root`` holds only build scratch such as embedding shards).

    ``options`` go to the implementation (``device``, ``schema``, ``selector_limit``, ...).
    """
    if backend == "faiss":
        if uri is not None or token is not None:
            raise InputError("--uri and --token address a Milvus server; add --backend milvus, or drop them")
        from asymret.index.store import GalleryStore

        return GalleryStore(root, db_url, **options)
    if backend == "milvus":
        if db_url is not None:
            raise InputError("--db is the FAISS backend's metadata database; Milvus keeps the metadata in its "
                             "collections: drop --db")
        from asymret.index.milvus import MilvusStore

        options.pop("device", None)  # Milvus decides where it searches
        options.pop("schema", None)
        return MilvusStore(root, uri or str(Path(root) / "galleries.milvus.db"), token=token, **options)
    raise InputError(f"unknown gallery backend '{backend}'; use one of {', '.join(BACKENDS)}")


# ------------------------------------------------------------------------------------ exclusion
def exclusion_rules(exclude, n: int) -> list[list[dict]] | None:
    """``exclude`` (module doc) as one list of rules per query, values as stored (ids int, others text);
    None when nothing is excluded."""
    if exclude is None:
        return None
    exclude = list(exclude)
    if len(exclude) != n:
        raise InputError(f"exclude holds {len(exclude)} entries for {n} queries; give one per query (None for none)")
    out, any_rule = [], False
    for entry in exclude:
        rules = [] if entry is None else [entry] if isinstance(entry, Mapping) else list(entry)
        clean = []
        for rule in rules:
            if not isinstance(rule, Mapping) or not rule or set(rule) - set(EXCLUDE_KEYS):
                raise InputError(f"an exclusion rule is a mapping over {', '.join(EXCLUDE_KEYS)}, got {rule!r}")
            clean.append({key: (int(v) if key == "id" else None if v is None else str(v)) for key, v in rule.items()})
        any_rule = any_rule or bool(clean)
        out.append(clean)
    return out if any_rule else None


def excluded(hit, rules: Sequence[Mapping]) -> bool:
    """Whether ``hit`` (a :class:`~asymret.index.store.Hit`) matches every key of one of ``rules``."""
    values = {"id": hit.id, "label": hit.item.label, "camera": hit.item.camera}
    return any(all(values[key] == want for key, want in rule.items()) for rule in rules)


def search_excluding(search, n_queries: int, k: int, rules: list[list[dict]] | None, total: int) -> list[list]:
    """Hits of ``search(fetch)`` (all queries at once) without the excluded ones: fetch k, 4k, 16k, ...
    until every query keeps ``k`` or its row is exhausted (fewer hits than fetched, or the whole gallery)."""
    if rules is None:
        return search(k)
    fetch = k + max(len(r) for r in rules)
    while True:
        rows = search(fetch)
        kept = [[h for h in row if not excluded(h, r)] for row, r in zip(rows, rules)]
        if fetch >= total or all(len(hits) >= k or len(row) < fetch for hits, row in zip(kept, rows)):
            return [hits[:k] for hits in kept]
        fetch *= 4
