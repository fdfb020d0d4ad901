"""Galleries: a FAISS index (vectors) and SQL metadata (items), kept consistent through crashes.

Layout: ``<root_dir>/<name>/`` holds ``vectors.faiss`` (+ ``.json`` sidecar), ``journal.bin`` and two
lock files; the database (SQLite ``<root_dir>/galleries.db`` by default, any SQLAlchemy URL such as
PostgreSQL otherwise) holds the tables ``galleries`` and ``items``.

Protocol for an add or a remove (one writer per gallery, an exclusive ``flock``):

1. the batch (ids and normalised vectors) is appended to the journal under the next sequence
   number and fsynced: the write-ahead record;
2. one database transaction inserts (deletes) the item rows and sets ``galleries.last_seq`` to that
   number: the commit point;
3. the in-memory index applies the batch; the call returns (the batch is acknowledged).

A checkpoint (once the journal outgrows ``checkpoint_bytes`` and half the index file, so rewriting
the index costs O(1) per added vector; and on close) saves the index atomically with its sequence
number in the sidecar, then empties the journal. Opening a gallery replays the journal
records numbered after the checkpoint and up to ``last_seq`` (roll forward) and drops those after it
(roll back: never committed, never acknowledged). Replay is idempotent (an add skips ids present, a
remove ignores ids absent), so a crash between saving the index and emptying the journal is
harmless. A writable open then checks that index ids equal database ids, and refuses to go on
(``ConflictError``) if they do not rather than dropping anything.

Metadata filters (``label``, ``camera``, ``path``, ``attributes``) are applied in two ways: a filter
matching at most ``selector_limit`` items restricts the FAISS search itself to those ids (an
``IDSelectorBatch``: exact, however selective); a broader one over-fetches (4k, 16k, ... hits) and
keeps the first ``k`` that match.

Restores (:meth:`Gallery.replace_all`, used by :mod:`asymret.index.snapshot`) stage the new index as
``restore.faiss`` and count once the sequence number they commit is in the database. Migrations of
older databases are in :mod:`asymret.index.migrate`.

Over 450 lines on purpose: the journal protocol (append, commit, replay, checkpoint, replace) is one
invariant that every write and every open must keep, and it is checked by reading it in one place.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import threading
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from asymret.errors import ConfigError, ConflictError, InputError, NotFoundError
from asymret.files import fsync_dir, read_json
from asymret.index.backend import exclusion_rules, search_excluding
from asymret.index.journal import ADD, REMOVE, Journal
from asymret.index.migrate import upgrade
from asymret.index.rows import (
    NAME,
    Hit,
    Item,
    as_json,
    galleries,
    items,
    metadata,
    spec_hash,
    utc_now,
    validate_rows,
    where_clauses,
)
from asymret.index.vectors import VectorIndex, as_ids, sidecar_path

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

# Names that would put a gallery folder where the store keeps its own files: the SQLite database and
# its journal/WAL/shm sidecars (any ``galleries.db*``), the API's uploads and the folder that holds
# galleries an older asymret let take such a name (they keep working from there: GalleryStore.folder).
RESERVED_PREFIX = "galleries.db"
RESERVED = frozenset({"_uploads", "_reserved", "_snapshots"})
RESERVED_DIR = "_reserved"
SQL_CHUNK = 10_000  # ids per IN (...) list: under SQLite's and PostgreSQL's parameter limits


# ----------------------------------------------------------------------------------------- locks
def _lock_exclusive(path: Path, name: str) -> int:
    """A file descriptor holding an exclusive ``flock`` on ``path`` (the kernel drops it if we die)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConflictError(f"gallery '{name}' is open for writing elsewhere (another process or "
                            "object); close it there first, or open it with readonly=True") from None
    return fd


@contextmanager
def _flocked(path: Path, mode: int):
    """Held while a checkpoint rewrites the files (writer) or while a reader loads them."""
    with open(path, "a+") as handle:
        fcntl.flock(handle, mode)
        yield


# ----------------------------------------------------------------------------------------- store
class GalleryStore:
    """All galleries under one folder and one database.

    >>> store = GalleryStore("galleries")                      # SQLite galleries/galleries.db
    >>> gallery = store.create("roxford", 512, "Flat", network_spec=spec)
    >>> ids = gallery.add(vectors, [{"path": p, "label": l} for p, l in zip(paths, labels)])
    >>> hits = gallery.search(queries, k=10, filters={"camera": [1, 2]})

    ``schema`` puts the tables in that PostgreSQL schema (created if missing). A gallery is written by
    one :class:`Gallery` at a time; others open it ``readonly`` (a snapshot as of opening). The
    ``faiss`` implementation of :class:`~asymret.index.backend.StoreBackend`.
    """

    backend, shared_writes = "faiss", False

    def __init__(self, root_dir: str | Path, db_url: str | None = None, *, schema: str | None = None,
                 device: str = "cpu", checkpoint_bytes: int = 64 << 20, selector_limit: int = 100_000,
                 create: bool = True):
        self.root = Path(root_dir)
        if not create:  # read-only commands (list, info, search) create nothing
            if not self.root.is_dir():
                raise NotFoundError(f"no galleries folder {self.root}; give --root the folder 'asymret index "
                                    "build' wrote to (nothing was created)")
            if db_url is None and not (self.root / "galleries.db").is_file():
                raise NotFoundError(f"no gallery database in {self.root} (no galleries.db); give --root the "
                                    "folder 'asymret index build' wrote to, or --db its URL")
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_url = db_url or f"sqlite:///{self.root.resolve() / 'galleries.db'}"
        self.device, self.checkpoint_bytes, self.selector_limit = device, checkpoint_bytes, selector_limit
        try:
            engine = sa.create_engine(self.db_url)
        except (sa.exc.ArgumentError, ImportError) as exc:
            raise ConfigError(f"cannot use database URL '{self.db_url}' ({exc}); give an SQLAlchemy URL "
                              "such as sqlite:///galleries.db or postgresql+psycopg://user@host/db") from None
        if schema is not None:
            if engine.dialect.name != "postgresql" or not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
                raise ConfigError("schema needs a PostgreSQL URL and a lower-case SQL name, e.g. asymret")
            with engine.begin() as conn:
                conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
            engine = engine.execution_options(schema_translate_map={None: schema})
        self.engine = engine
        self._set_aside_reserved()
        self._create_tables()
        done = upgrade(self.engine, items, schema)
        if done:
            log.info("store %s: upgraded its tables (%s)", self.db_url, ", ".join(done))

    def _set_aside_reserved(self) -> None:
        """Move the folder of a gallery an older asymret let take a reserved name (``galleries.db-journal``
        as a folder stops SQLite from ever writing again) to ``_reserved/``, where it keeps working."""
        for path in self.root.glob(f"{RESERVED_PREFIX}*"):
            if path.is_dir() and not path.is_symlink():
                target = self.root / RESERVED_DIR / path.name
                target.parent.mkdir(exist_ok=True)
                if target.exists():
                    raise ConflictError(f"both {path} and {target} exist; move {path} aside (it is not "
                                        "the store's) and open the store again")
                os.replace(path, target)
                log.warning("gallery folder %s had a name reserved for the store's database files; moved "
                            "it to %s (the gallery keeps working from there)", path, target)

    def _create_tables(self, attempts: int = 3) -> None:
        """``create_all`` checks, then creates: two processes opening a fresh store at once (torchrun ranks,
        serve beside an index build) can both see no table and one CREATE fails. Checking again settles it."""
        for attempt in range(attempts):
            try:
                metadata.create_all(self.engine)
                return
            except (sa.exc.OperationalError, sa.exc.ProgrammingError, sa.exc.IntegrityError) as exc:
                if "already exists" not in str(exc).lower() and "duplicate" not in str(exc).lower() \
                        or attempt == attempts - 1:
                    raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        """One cheap read of the store's own table (readiness probes); raises if the database fails."""
        with self.engine.connect() as conn:
            conn.execute(sa.select(galleries.c.name).limit(1)).all()

    def folder(self, name: str) -> Path:
        """The gallery's folder: ``<root>/<name>``, or ``<root>/_reserved/<name>`` for a reserved name
        that an older asymret accepted (:meth:`_set_aside_reserved`)."""
        if not isinstance(name, str) or not NAME.match(name):
            raise InputError(f"gallery name {name!r} must be 1-64 letters, digits, '_', '-' or '.', "
                             "starting with a letter or digit")
        return self.root / RESERVED_DIR / name if reserved_name(name) else self.root / name

    def _row(self, name: str):
        self.folder(name)
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(galleries).where(galleries.c.name == name)).first()
        if row is None:
            known = ", ".join(g["name"] for g in self.list()) or "none yet"
            raise NotFoundError(f"no gallery named '{name}' (galleries: {known}); create it first")
        return row

    def exists(self, name: str) -> bool:
        self.folder(name)
        with self.engine.connect() as conn:
            return conn.execute(sa.select(galleries.c.id).where(galleries.c.name == name)).first() is not None

    def create(self, name: str, dim: int, factory: str = "Flat", network_spec=None, *,
               metric: str = "ip") -> Gallery:
        """A new, empty gallery, open for writing."""
        folder = self.folder(name)
        if reserved_name(name):
            raise InputError(f"gallery name '{name}' is reserved for the store's own files (galleries.db*, "
                             "_uploads, _reserved, _snapshots); choose another name")
        index = VectorIndex(dim, factory, metric=metric)  # checks dim, factory and metric first
        spec = as_json(network_spec, "network_spec")
        now = utc_now()
        # The folder (with its empty index) exists before the row commits, so no row is ever without
        # its folder; the root's create lock keeps a concurrent create of the same name off it.
        with _flocked(self.root / ".create.lock", fcntl.LOCK_EX):
            exists = self._exists(name)
            if exists:
                raise ConflictError(f"gallery '{name}' already exists; open it, or delete it first")
            if folder.exists() or folder.is_symlink():  # left by a delete that crashed after its commit
                if not folder.is_dir() or folder.is_symlink():
                    raise ConflictError(f"{folder} exists and is not a gallery folder; move it away or "
                                        "choose another gallery name")
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            try:
                index.save(folder / Gallery.INDEX, extra={"checkpoint_seq": 0})
                _insert_gallery(self.engine, name=name, dim=dim, factory=factory, metric=metric,
                                network_spec=spec, network_hash=spec_hash(spec), last_seq=0, next_id=0,
                                created_at=now, updated_at=now)
            except BaseException as exc:
                shutil.rmtree(folder, ignore_errors=True)
                if isinstance(exc, IntegrityError):  # created through another root on a shared database
                    raise ConflictError(f"gallery '{name}' already exists; open it, or delete it first") from None
                raise
        return self.open(name)

    def _exists(self, name: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(galleries.c.id).where(galleries.c.name == name)).first() is not None

    def open(self, name: str, *, readonly: bool = False, mmap: bool = False) -> Gallery:
        """Open a gallery: replays or drops what a crash left in its journal (see module doc).

        ``readonly`` takes no lock and never writes; with ``mmap`` its index is memory-mapped.
        """
        return Gallery(self, self._row(name), readonly=readonly, mmap=mmap)

    def list(self) -> list[dict]:
        """Every gallery's name, dimension, factory, metric, item count, network hash and times."""
        count = sa.select(sa.func.count()).where(items.c.gallery_id == galleries.c.id).scalar_subquery()
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(galleries, count.label("count")).order_by(galleries.c.name))
            return [_summary(row._mapping) for row in rows]

    def delete(self, name: str) -> None:
        """Delete a gallery: its rows, then its files. Refused while it is open for writing."""
        row = self._row(name)
        folder = self.folder(name)
        lock = _lock_exclusive(folder / Gallery.LOCK, name) if folder.exists() else None
        try:
            with self.engine.begin() as conn:
                conn.execute(items.delete().where(items.c.gallery_id == row.id))
                conn.execute(galleries.delete().where(galleries.c.id == row.id))
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            if lock is not None:
                os.close(lock)


def reserved_name(name: str) -> bool:
    """Whether a gallery of this name would sit on the store's own files (see ``RESERVED``)."""
    return name.lower().startswith(RESERVED_PREFIX) or name in RESERVED


def _insert_gallery(engine, **values) -> None:
    """The commit point of a create (a function of its own so tests can make it fail)."""
    with engine.begin() as conn:
        conn.execute(galleries.insert().values(**values))


def _summary(row: Mapping) -> dict:
    keys = ("name", "dim", "factory", "metric", "count", "network_hash")
    return {**{key: row[key] for key in keys}, "created_at": row["created_at"].isoformat(),
            "updated_at": row["updated_at"].isoformat()}


# --------------------------------------------------------------------------------------- gallery
class Gallery:
    """One gallery: vectors in a :class:`VectorIndex`, item rows in the database, one journal."""

    INDEX, JOURNAL, LOCK, CHECKPOINT_LOCK = "vectors.faiss", "journal.bin", "writer.lock", "checkpoint.lock"
    STAGED = "restore.faiss"  # a replace_all's index until its rows commit

    def __init__(self, store: GalleryStore, row, *, readonly: bool, mmap: bool):
        self.store, self.name, self.readonly = store, row.name, readonly
        self._gid = row.id
        self.dim, self.factory, self.metric = row.dim, row.factory, row.metric
        self.network_spec, self.network_hash = row.network_spec, row.network_hash
        self.folder = store.folder(row.name)
        self._lock = threading.RLock()
        self._journal = None
        if not readonly:
            self.folder.mkdir(parents=True, exist_ok=True)
        self._writer = None if readonly else _lock_exclusive(self.folder / self.LOCK, self.name)
        try:
            self._recover(mmap)
        except BaseException:
            self._release()
            raise

    # ---------------------------------------------------------------------------------- recovery
    def _recover(self, mmap: bool) -> None:
        index_path = self.folder / self.INDEX
        mode = fcntl.LOCK_SH if self.readonly else fcntl.LOCK_EX
        with _flocked(self.folder / self.CHECKPOINT_LOCK, mode):
            row = self.store._row(self.name)  # before the journal: all it committed is in there
            index_path = self._settle_replace(row.last_seq, index_path)
            self._journal = Journal(self.folder / self.JOURNAL)
            records, valid = self._journal.read()
            checkpoint = 0
            if index_path.exists():
                meta = read_json(sidecar_path(index_path), "index sidecar")
                checkpoint = meta.get("extra", {}).get("checkpoint_seq", 0)
            if checkpoint > row.last_seq:
                raise ConflictError(f"gallery '{self.name}': its index file is newer than the database "
                                    f"(checkpoint {checkpoint} > committed {row.last_seq}); was the "
                                    "database restored from an older backup? Restore both together")
            replay = [r for r in records if checkpoint < r.seq <= row.last_seq]
            if index_path.exists():
                self.index = VectorIndex.load(index_path, dim=self.dim, metric=self.metric,
                                              mmap=mmap and not replay, device=self.store.device)
            else:  # created, then crashed before the first save
                self.index = VectorIndex(self.dim, self.factory, metric=self.metric, device=self.store.device)
        for record in replay:
            if record.kind == ADD:
                new = ~self.index.contains(record.ids)
                self.index.add(record.vectors[new], record.ids[new])
            else:
                self.index.remove(record.ids)
        self._seq, self._next_id = row.last_seq, row.next_id
        dropped = [r.seq for r in records if r.seq > row.last_seq]
        if replay or dropped or valid < self._journal.size():  # after a crash, or a reader beside a writer
            log.log(logging.INFO if self.readonly else logging.WARNING,
                    "gallery '%s': replayed %d journal record(s), dropped %d uncommitted (%s), "
                    "%d torn byte(s)",
                    self.name, len(replay), len(dropped), dropped, self._journal.size() - valid)
        if not self.readonly:
            self._verify()
            if records or valid < self._journal.size():
                self.checkpoint()

    def _settle_replace(self, committed: int, index_path: Path) -> Path:
        """Finish or drop what a :meth:`replace_all` killed half-way left: its staged index counts once
        its sequence number is committed. Returns the index file to load (a reader may load the staged one)."""
        staged = self.folder / self.STAGED
        meta_path = sidecar_path(staged)
        if not meta_path.exists():
            return index_path
        seq = read_json(meta_path, "staged index sidecar").get("extra", {}).get("checkpoint_seq", 0)
        if seq > committed:  # never committed: roll back
            if not self.readonly:
                staged.unlink(missing_ok=True)
                meta_path.unlink(missing_ok=True)
            return index_path
        if self.readonly:
            return staged if staged.exists() else index_path
        if staged.exists():
            os.replace(staged, index_path)
        os.replace(meta_path, sidecar_path(index_path))
        fsync_dir(self.folder)
        (self.folder / self.JOURNAL).unlink(missing_ok=True)  # its records are all before the replace
        return index_path

    def replace_all(self, index: VectorIndex, rows: Sequence[Mapping], ids, created_at, *, next_id: int) -> None:
        """Make this gallery hold exactly ``index`` and these item rows (a restore): one commit, crash-safe.

        The index is staged beside the current one under the next sequence number, then one transaction
        replaces every item row and commits that number, then the staged file takes the index's place
        (:meth:`_settle_replace` finishes that after a kill). ``ids`` must be the index's ids.
        """
        with self._lock:
            self._writable()
            ids = as_ids(ids)
            if index.dim != self.dim or index.metric != self.metric:
                raise InputError(f"gallery '{self.name}' holds {self.dim}-d {self.metric} vectors; the new "
                                 f"index has {index.dim}-d {index.metric}")
            if not np.array_equal(np.sort(ids), index.ids()):
                raise InputError("the item rows' ids differ from the index's ids; give one row per vector")
            rows = validate_rows(rows, len(ids))
            self.checkpoint()  # the journal is empty: nothing to replay across the replace
            seq = self._seq + 1
            index.save(self.folder / self.STAGED, extra={**index.extra, "checkpoint_seq": seq})
            records = [{"gallery_id": self._gid, "id": int(i), "created_at": c or utc_now(), **row}
                       for i, c, row in zip(ids, created_at, rows)]
            # never below this gallery's own: an id it gave out (then replaced away) is not given again
            next_id = max(next_id, self._next_id, int(ids.max()) + 1 if len(ids) else 0)
            with self.store.engine.begin() as conn:
                conn.execute(items.delete().where(items.c.gallery_id == self._gid))
                for start in range(0, len(records), SQL_CHUNK):
                    conn.execute(items.insert(), records[start:start + SQL_CHUNK])
                conn.execute(galleries.update().where(galleries.c.id == self._gid)
                             .values(last_seq=seq, next_id=next_id, updated_at=utc_now()))
            self._seq, self._next_id = seq, next_id
            with _flocked(self.folder / self.CHECKPOINT_LOCK, fcntl.LOCK_EX):
                self._settle_replace(seq, self.folder / self.INDEX)
            self.index = VectorIndex.load(self.folder / self.INDEX, dim=self.dim, metric=self.metric,
                                          device=self.store.device)

    def _verify(self) -> None:
        db_ids = self._db_ids()
        index_ids = self.index.ids()
        if not np.array_equal(db_ids, index_ids):
            rows_only = np.setdiff1d(db_ids, index_ids)
            vectors_only = np.setdiff1d(index_ids, db_ids)
            raise ConflictError(
                f"gallery '{self.name}' is inconsistent: {rows_only.size} item row(s) without a vector "
                f"(e.g. {rows_only[:3].tolist()}), {vectors_only.size} vector(s) without a row (e.g. "
                f"{vectors_only[:3].tolist()}); its files or database were changed outside asymret. "
                "Restore both from the same backup, or rebuild the gallery")

    def _db_ids(self) -> np.ndarray:
        with self.store.engine.connect() as conn:
            ids = conn.execute(sa.select(items.c.id).where(items.c.gallery_id == self._gid)
                               .order_by(items.c.id)).scalars().all()
        return np.asarray(ids, np.int64)

    # ------------------------------------------------------------------------------------ writes
    def _writable(self) -> None:
        if self._journal is None:
            raise ConflictError(f"gallery '{self.name}' is closed; open it again")
        if self.readonly:
            raise ConflictError(f"gallery '{self.name}' was opened readonly; open it with readonly=False "
                                "to change it")

    def train(self, vectors) -> None:
        """Train the index (IVF/PQ types) on a sample; saved at once, before any vector is added."""
        with self._lock:
            self._writable()
            self.index.train(vectors)
            self.checkpoint()

    def add(self, vectors, rows: Sequence[Mapping] | None = None, *, ids=None) -> np.ndarray:
        """Add vectors with their metadata rows (keys path, label, camera, attributes).

        Returns the ids (``ids`` given, or the next free ones), once both the journal record and the
        rows are durable. An untrained IVF/PQ index is first trained on this batch.
        """
        with self._lock:
            self._writable()
            x = self.index.as_unit(vectors)
            rows = validate_rows(rows, len(x))
            if ids is None:
                ids = np.arange(self._next_id, self._next_id + len(x), dtype=np.int64)
            ids = as_ids(ids)
            if len(ids) != len(x):
                raise InputError(f"got {len(x)} vectors but {len(ids)} ids; give one id per vector")
            self.index.check_new_ids(ids)
            if not len(ids):
                return ids
            if not self.index.is_trained:
                self.train(x)
            next_id = max(self._next_id, int(ids.max()) + 1)
            now = utc_now()
            records = [{"gallery_id": self._gid, "id": int(i), "created_at": now, **row}
                       for i, row in zip(ids, rows)]
            self._commit(ADD, ids, x, lambda conn: conn.execute(items.insert(), records), next_id=next_id)
            self._next_id = next_id
            self.index.add(x, ids)
            self._maybe_checkpoint()
            return ids

    def remove(self, ids) -> int:
        """Remove items by id (all of them must exist). Returns how many were removed."""
        with self._lock:
            self._writable()
            ids = np.unique(as_ids(ids))
            missing = ids[~self.index.contains(ids)]
            if missing.size:
                raise NotFoundError(f"gallery '{self.name}' has no item {missing[:5].tolist()}; "
                                    "nothing was removed")
            if not ids.size:
                return 0

            def delete(conn):
                for chunk in np.array_split(ids, -(-len(ids) // SQL_CHUNK)):
                    conn.execute(items.delete().where(items.c.gallery_id == self._gid,
                                                      items.c.id.in_(chunk.tolist())))

            self._commit(REMOVE, ids, None, delete, next_id=self._next_id)
            self.index.remove(ids)
            self._maybe_checkpoint()
            return int(ids.size)

    def _commit(self, kind: int, ids: np.ndarray, vectors, write_rows, *, next_id: int) -> None:
        """Steps 1 and 2 of the protocol: journal record, then one transaction with ``last_seq``."""
        seq = self._seq + 1
        offset = self._journal.append(seq, kind, ids, vectors)
        try:
            with self.store.engine.begin() as conn:
                write_rows(conn)
                conn.execute(galleries.update().where(galleries.c.id == self._gid)
                             .values(last_seq=seq, next_id=next_id, updated_at=utc_now()))
        except BaseException as exc:
            self._journal.truncate(offset)  # never committed: the record must not be replayed
            if isinstance(exc, IntegrityError):
                raise ConflictError(f"gallery '{self.name}': the database already holds rows with these "
                                    "ids (written outside asymret?); nothing was added") from None
            raise
        self._seq = seq

    def _maybe_checkpoint(self) -> None:
        index_file = self.folder / self.INDEX
        index_bytes = index_file.stat().st_size if index_file.exists() else 0
        threshold = max(self.store.checkpoint_bytes, index_bytes // 2)
        if self._journal.size() >= threshold:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Save the index with the last sequence number, then empty the journal."""
        with self._lock:
            self._writable()
            with _flocked(self.folder / self.CHECKPOINT_LOCK, fcntl.LOCK_EX):
                self.index.save(self.folder / self.INDEX, extra={**self.index.extra, "checkpoint_seq": self._seq})
                self._journal.truncate(0)

    @property
    def processing(self) -> dict:
        """What was applied to the stored vectors before they were added (e.g. database-side
        augmentation), as the builder recorded it: name -> settings."""
        return dict(self.index.extra.get("processing", {}))

    def record_processing(self, name: str, settings: dict) -> None:
        """Record (in the index's sidecar, saved now) that the vectors were ``name``-processed with ``settings``."""
        with self._lock:
            self._writable()
            self.index.extra["processing"] = {**self.processing, name: as_json(settings, "settings")}
            self.checkpoint()

    # ------------------------------------------------------------------------------------- reads
    def search(self, queries, k: int = 10, *, filters: Mapping | None = None, exclude=None,
               nprobe: int | None = None, efSearch: int | None = None) -> list[list[Hit]]:
        """The ``k`` best items per query, best first, with their metadata; see module doc for filters,
        :mod:`asymret.index.backend` for ``exclude`` (one rule list per query, e.g. the re-ID rule)."""
        queries = self.index.as_unit(queries, "queries")
        rules = exclusion_rules(exclude, len(queries))
        return search_excluding(lambda fetch: self._search(queries, fetch, filters, nprobe, efSearch),
                                len(queries), k, rules, len(self.index))

    def _search(self, queries, k: int, filters, nprobe, efSearch) -> list[list[Hit]]:
        with self._lock:
            params = {"nprobe": nprobe, "efSearch": efSearch}
            if not filters:
                scores, ids = self.index.search(queries, k, **params)
            else:
                where = where_clauses(filters)
                allowed = self._matching(where, limit=self.store.selector_limit + 1)
                if len(allowed) <= self.store.selector_limit:
                    scores, ids = self.index.search(queries, k, allowed_ids=allowed, **params)
                else:
                    scores, ids = self._overfetch(queries, k, where, params)
            found = self._items(np.unique(ids[ids >= 0]))
        return [[Hit(int(i), float(s), found[i]) for s, i in zip(row_s, row_i) if i in found]
                for row_s, row_i in zip(scores, ids)]

    def _overfetch(self, queries, k: int, where, params):
        """Search 4k, 16k, ... until every query has ``k`` hits that pass ``where`` (or all were seen)."""
        fetch = 4 * k
        while True:
            scores, ids = self.index.search(queries, fetch, **params)
            keep = np.isin(ids, self._matching(where, among=np.unique(ids[ids >= 0])))
            if (keep.sum(axis=1) >= k).all() or fetch >= len(self.index):
                break
            fetch *= 4
        # stable sort moves each row's passing hits to the front, in score order
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
        kept = np.take_along_axis(keep, order, 1)
        return (np.where(kept, np.take_along_axis(scores, order, 1), -np.inf),
                np.where(kept, np.take_along_axis(ids, order, 1), -1))

    def _matching(self, where, *, among=None, limit=None) -> np.ndarray:
        base = sa.select(items.c.id).where(items.c.gallery_id == self._gid, *where)
        chunks = [None] if among is None else np.array_split(among, max(1, -(-len(among) // SQL_CHUNK)))
        found = []
        with self.store.engine.connect() as conn:
            for chunk in chunks:
                query = base if chunk is None else base.where(items.c.id.in_(chunk.tolist()))
                found += conn.execute(query.limit(limit) if limit else query).scalars().all()
        return np.asarray(found, np.int64)

    def _items(self, ids: np.ndarray) -> dict[int, Item]:
        found = {}
        with self.store.engine.connect() as conn:
            for chunk in np.array_split(ids, max(1, -(-len(ids) // SQL_CHUNK))):
                if chunk.size:
                    for row in conn.execute(sa.select(items).where(items.c.gallery_id == self._gid,
                                                                   items.c.id.in_(chunk.tolist()))):
                        found[row.id] = Item(row.id, row.path, row.label, row.camera, row.attributes or {},
                                             row.created_at, row.sha256)
        return found

    def stored(self, paths: Sequence[str], hashes: Sequence[str]) -> np.ndarray:
        """Whether each (path, sha256) pair is already an item of this gallery: an idempotent add skips
        those. The same path with other bytes is a new version, added as a new item (docs/gallery.md)."""
        paths = [str(p) for p in paths]
        found: set[tuple[str, str]] = set()
        unique = sorted(set(paths))
        with self.store.engine.connect() as conn:
            for start in range(0, len(unique), SQL_CHUNK):
                found.update((path, sha) for path, sha in conn.execute(sa.select(items.c.path, items.c.sha256).where(
                    items.c.gallery_id == self._gid, items.c.path.in_(unique[start:start + SQL_CHUNK]),
                    items.c.sha256.is_not(None))))
        return np.fromiter(((p, h) in found for p, h in zip(paths, hashes)), bool, len(paths))

    def referenced(self, paths: Sequence[str]) -> np.ndarray:
        """Whether some item of this gallery has each of these paths (what an upload sweep keeps)."""
        paths = [str(p) for p in paths]
        unique, found = sorted(set(paths)), set()
        with self.store.engine.connect() as conn:
            for start in range(0, len(unique), SQL_CHUNK):
                found.update(conn.execute(sa.select(items.c.path).where(
                    items.c.gallery_id == self._gid, items.c.path.in_(unique[start:start + SQL_CHUNK]))).scalars())
        return np.fromiter((p in found for p in paths), bool, len(paths))

    @contextmanager
    def consistent(self):
        """``(index, items sorted by id, next_id)`` of one moment, held still while in the block (a snapshot).

        A read-only handle beside a writer may see rows the writer committed since it opened: then
        this refuses rather than pairing vectors and rows of two moments."""
        with self._lock:
            ids = self.index.ids()
            if not np.array_equal(self._db_ids(), ids):
                raise ConflictError(f"gallery '{self.name}' changed since it was opened (another process writes "
                                    "it); take the snapshot through that process (the server's snapshot "
                                    "endpoint) or when it is done")
            found = self._items(ids)
            yield self.index, [found[int(i)] for i in ids], self._next_id

    def get(self, ids) -> list[Item]:
        """The items with these ids, in this order; an unknown id is a NotFoundError."""
        ids = as_ids(ids)
        found = self._items(np.unique(ids))
        missing = [int(i) for i in ids if int(i) not in found]
        if missing:
            raise NotFoundError(f"gallery '{self.name}' has no item {missing[:5]}")
        return [found[int(i)] for i in ids]

    def __len__(self) -> int:
        return len(self.index)

    # the rest of the backend interface (asymret.index.backend), over the index
    def contains(self, ids) -> np.ndarray:
        return self.index.contains(as_ids(ids))

    def vectors(self, ids) -> np.ndarray:
        """The stored vectors of these items, in this order (a Flat index keeps them exactly; InputError else)."""
        vectors, stored = self.index.flat_storage()
        wanted = as_ids(ids)
        rows = np.flatnonzero(np.isin(stored, wanted))  # one pass over the ids, whatever the number wanted
        where = dict(zip(stored[rows].tolist(), rows.tolist()))  # the last entry of an id wins
        missing = [int(i) for i in wanted if int(i) not in where]
        if missing:
            raise NotFoundError(f"gallery '{self.name}' has no item {missing[:5]}")
        return vectors[[where[int(i)] for i in wanted]].reshape(len(wanted), vectors.shape[1])

    def as_unit(self, vectors, name: str = "vectors") -> np.ndarray:
        return self.index.as_unit(vectors, name)

    @property
    def is_trained(self) -> bool:
        return self.index.is_trained

    def training_size(self) -> tuple[int, int]:
        return self.index.training_size()

    @property
    def next_id(self) -> int:
        """The next id an add without ids gives (never one a removed item had)."""
        return self._next_id

    def info(self) -> dict:
        row = self.store._row(self.name)
        index_file = self.folder / self.INDEX
        return {**_summary({**row._mapping, "count": len(self.index)}), "network_spec": self.network_spec,
                "index": self.index.info(), "readonly": self.readonly, "last_seq": self._seq,
                "checkpoint_seq": self.index.extra.get("checkpoint_seq", 0), "processing": self.processing,
                "index_bytes": index_file.stat().st_size if index_file.exists() else 0,
                "journal_bytes": self._journal.size() if self._journal is not None else 0}

    # ------------------------------------------------------------------------------------- close
    def close(self) -> None:
        """Checkpoint (when written to since the last one) and release the writer lock."""
        with self._lock:
            if self._journal is not None and not self.readonly and self._journal.size():
                self.checkpoint()
            self._release()

    def _release(self) -> None:
        self._journal = None
        if self._writer is not None:
            os.close(self._writer)
            self._writer = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

