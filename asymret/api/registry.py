"""The galleries one server serves: one store, the pair's gallery network, every gallery opened once and
kept open (opened on first use when another process created it since start-up), created, deleted,
snapshotted and restored under one lock, and checked against the pair before it is written or searched
by image."""

from __future__ import annotations

import logging
import re
import threading
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np

from asymret.errors import ConflictError, NotFoundError
from asymret.index.rows import spec_hash
from asymret.index.snapshot import read_manifest, restore_snapshot, write_snapshot
from asymret.retrieval.sides import describe_network, embedding_space

log = logging.getLogger("asymret.serve")
SNAPSHOTS = "_snapshots"  # REST snapshots, under the galleries folder
SNAPSHOT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}-\d{8}T\d{12}Z$")


class GalleryRegistry:
    """The open galleries of ``store`` for one gallery network (``network_spec``, its ``space`` and ``dim``)."""

    def __init__(self, store, *, dim: int, network_spec: dict, space, uploads, snapshots: Path,
                 search_threads: int = 1):
        self.store, self.dim, self.network_spec, self.space = store, dim, network_spec, space
        self.uploads, self.snapshots, self.search_threads = uploads, snapshots, search_threads
        self.galleries: dict = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.galleries)

    def open_galleries(self) -> list:
        """``(name, gallery)`` of every open gallery, at this moment."""
        return list(self.galleries.items())

    def close(self) -> None:
        with self._lock:
            for gallery in self.galleries.values():
                gallery.close()
            self.galleries.clear()
        self.store.close()

    def open(self, name: str):
        try:
            gallery = self.store.open(name)
        except ConflictError as exc:  # e.g. another process writes it: search a snapshot, refuse writes
            log.warning("%s; serving gallery '%s' read-only", exc, name)
            gallery = self.store.open(name, readonly=True)
        self.galleries[name] = gallery
        if not gallery.readonly:
            self.uploads.sweep(name, gallery, force=True)
        return gallery

    def get(self, name: str):
        """The open gallery ``name`` (opened now if another process created it since start-up)."""
        gallery = self.galleries.get(name)
        if gallery is None:
            with self._lock:
                gallery = self.galleries.get(name) or self.open(name)
        return gallery

    def create(self, name: str, factory: str):
        """An empty gallery for the pair's gallery network (its spec, weights and whitening hashes, as
        ``asymret index build`` records them)."""
        with self._lock:
            gallery = self.store.create(name, self.dim, factory, network_spec=self.network_spec)
            self.galleries[name] = gallery
            return gallery

    def delete(self, name: str) -> None:
        with self._lock:
            gallery = self.galleries.pop(name, None)
            if gallery is not None:
                gallery.close()
            self.store.delete(name)
            self.uploads.remove(name)

    def snapshot(self, name: str) -> tuple[str, dict]:
        """Write gallery ``name`` to a new snapshot under ``<galleries>/_snapshots``: ``(id, manifest)``."""
        gallery = self.get(name)
        snapshot = f"{name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}"
        return snapshot, write_snapshot(self.store, name, self.snapshots / snapshot, gallery=gallery)

    def restore(self, snapshot: str, name: str | None, replace: bool) -> tuple[str, int]:
        """Restore a snapshot of ``<galleries>/_snapshots`` (of this server's gallery network only)."""
        folder = self.snapshots / snapshot
        if not SNAPSHOT_ID.match(snapshot) or not folder.is_dir():
            raise NotFoundError(f"no snapshot '{snapshot[:80]}' on this server (see GET /v1/snapshots)")
        target = name or read_manifest(folder)["gallery"]["name"]
        with self._lock:
            held = self.galleries.pop(target, None)
            if held is not None:
                held.close()  # the restore writes it: this process's writer lock must go first
            try:
                name, count = restore_snapshot(self.store, folder, name=target, replace=replace,
                                               network_hash=spec_hash(self.network_spec))
            finally:
                if any(g["name"] == target for g in self.store.list()):
                    self.open(target)  # restored, or the old one back after a refusal
        return name, count

    def compatible(self, gallery) -> bool:
        """Whether this pair's gallery side encodes into ``gallery``'s space (architecture, input, weights,
        whitening: :func:`~asymret.retrieval.sides.embedding_space`); a gallery built from bare vectors
        records no network, and only its dimension can be checked."""
        spec = gallery.network_spec
        if gallery.dim != self.dim:
            return False
        if not isinstance(spec, dict) or "gallery_net" not in spec:
            return True
        try:
            return embedding_space(spec) == self.space
        except (KeyError, TypeError, AttributeError):
            return False

    def require_compatible(self, gallery) -> None:
        if not self.compatible(gallery):
            raise ConflictError(f"gallery '{gallery.name}' holds {gallery.dim}-d embeddings of "
                                f"{describe_network(gallery.network_spec)}, but this server's pair encodes "
                                f"{self.dim}-d with {describe_network(self.network_spec)}; serve the pair the "
                                "gallery was built with, or search it by vector")

    def search(self, gallery, vectors: np.ndarray, k: int, filters: dict | None, exclude=None):
        """``gallery.search`` on ``search_threads`` FAISS threads (OpenMP's setting is per calling thread);
        ``exclude``: one list of exclusion rules per query (:mod:`asymret.index.backend`)."""
        faiss.omp_set_num_threads(self.search_threads)
        return gallery.search(vectors, k, filters=filters, exclude=exclude)
