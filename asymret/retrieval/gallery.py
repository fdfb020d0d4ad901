"""Gallery building: images -> the gallery network -> embedding shards -> a searchable gallery.

The offline half of asymmetric retrieval (DESIGN.md): the gallery network encodes a database once,
into a :class:`~asymret.index.Gallery` (FAISS index + SQL metadata) that query networks search.

* **Inputs** (:func:`read_images`): a folder (labels = sub-folder names where there are any), a list
  file (one path per line, relative to the list's folder), a CSV ``path,label[,camera]``
  (:class:`~asymret.retrieval.datasets.CsvDataset`), or a revisited ground truth ``gnd_*.pkl`` (its
  ``imlist`` in order, so gallery ids are the benchmark's database indices). Each item's metadata
  row is its absolute path, label and camera.
* **Shards**: the records are cut into shards of ``shard_size`` images; each is encoded with
  :func:`~asymret.retrieval.encode.encode_records` (a DataLoader with workers) and written
  atomically to ``<root>/<name>/build/shard_00000.npy``. A shard file exists only once complete,
  which is the whole "done" record: ranks never contend for a shared list, and a killed build rerun
  with the same arguments encodes only the missing shards. ``build/plan.json`` fixes the job
  (images, network, factory, first id); a rerun of a different job is refused.
* **Processes**: under ``torchrun`` rank ``r`` of ``W`` encodes shards ``r, r + W, ...``; after a
  barrier rank 0 adds the shards in order under ids ``first_id + row`` (row = record order),
  skipping ids already present, so a merge killed half-way resumes too. Then ``build/`` goes.
* **Direct writes** (a store with ``shared_writes``: Milvus): no shard files and no merge; each rank
  adds each shard it encodes to the gallery at once, under the same ids, and a shard whose ids are all
  present is done: a rerun encodes only the others, and never adds an id twice. Rank 0 writes the plan
  (on its machine's ``--root``) and reserves the ids; the other ranks receive the plan from it, so
  machines need share no folder (``torchrun --nnodes``). With ``dba`` (which needs all vectors before
  any add) the build goes through shard files as above.
* **Database-side augmentation** (``dba``): once every shard is encoded, each vector is replaced by
  the α-weighted sum of its top ``k`` in the whole database (:func:`~asymret.retrieval.rerank.database_augmentation`)
  before it is added; the gallery records it (``Gallery.processing``). Items added later are not
  augmented (and do not change their neighbours): rebuild to augment them with the rest.
* **Sides**: a :class:`SideEncoder` is one side of a pair, its encoder followed by the gallery
  network's whitening, which AML applies to both sides. A gallery stores its gallery side's
  :meth:`SideEncoder.network_spec`; :func:`check_space` refuses a pair whose gallery side differs,
  as its query network was trained for another embedding space.
* **Adds** skip images already stored (same path and bytes) and, with ``skip_bad``, those that do not
  decode (:mod:`asymret.retrieval.dedupe`); the positions kept are in the plan (``keep``), so a rerun
  resumes the same job. :func:`abort_pending` drops an unfinished job (its items stay).

What one side of a pair is and records is in :mod:`asymret.retrieval.sides`; what a build reads, in
:mod:`asymret.retrieval.datasets.inputs`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from asymret import runtime
from asymret.errors import ConflictError, DataError, InputError
from asymret.files import atomic_write, read_json, write_json_atomic
from asymret.index.backend import GalleryBackend as Gallery
from asymret.index.backend import StoreBackend as GalleryStore
from asymret.retrieval.cache import records_fingerprint
from asymret.retrieval.dedupe import record_sha256, select_new
from asymret.retrieval.records import ImageRecord
from asymret.retrieval.sides import SideEncoder, check_space, embedding_space

log = logging.getLogger(__name__)

# Images per shard: what a killed build may encode again, and what one DataLoader streams (its
# workers start anew per shard, ~0.3 s: under 10 % of a shard even on a fast GPU).
SHARD_SIZE = 8192
ADD_BATCH = 65536  # vectors per acknowledged gallery add (one journal record, one transaction)
BUILD_DIR, PLAN, JOB_LOCK = "build", "plan.json", "job.lock"
# plan keys a rerun does not compare: where the ids start, and which records (and so how many) an
# add kept after skipping those already stored or undecodable
DERIVED = ("first_id", "keep", "count", "skipped_stored", "skipped_bad")
BARRIER_TIMEOUT = timedelta(hours=24)  # ranks wait at a barrier while the slowest encodes its shards


# -------------------------------------------------------------------------------------- building
def item_rows(records: Sequence[ImageRecord]) -> list[dict]:
    """The metadata row of each record: absolute path, label (the dataset's own), camera, and the
    SHA-256 of the file's bytes (what makes a rerun of an add skip it: :mod:`asymret.retrieval.dedupe`)."""
    return [{"path": os.path.abspath(r.path), "label": r.identity, "camera": r.camera,
             "sha256": record_sha256(r)} for r in records]


def dba_settings(dba, k: int | None = None, alpha: float | None = None) -> dict | None:
    """The database-side augmentation a build applies: ``{"k", "alpha"}`` (defaults of
    :mod:`asymret.retrieval.rerank`), or None without ``dba``; bad settings fail before any encoding."""
    from asymret.retrieval.rerank import DBA_ALPHA, DBA_K, RerankOptions

    if not dba:
        if k is not None or alpha is not None:
            raise InputError("--dba-k and --dba-alpha set database-side augmentation; add --dba to apply it")
        return None
    settings = {"k": DBA_K if k is None else k, "alpha": DBA_ALPHA if alpha is None else float(alpha)}
    RerankOptions(dba_k=settings["k"], dba_alpha=settings["alpha"])  # the one check of these numbers
    return settings


def build_gallery(store: GalleryStore, name: str, side: SideEncoder, records: Sequence[ImageRecord], *,
                  factory: str = "Flat", shard_size: int = SHARD_SIZE, progress: bool = True,
                  dba: dict | None = None, **encode) -> dict:
    """Create gallery ``name`` and fill it with ``records`` encoded by the gallery side ``side``.

    Resumable and torchrun-aware (module doc); ids are record positions. ``dba``: augment the
    database once, before adding (:func:`dba_settings`; module doc). ``encode``: keyword
    arguments of :func:`encode_records` (``batch_size``, ``num_workers``, ``device``, ``amp``).
    """
    spec = side.network_spec()
    plan = {"kind": "build", "factory": factory, **_images_plan(spec, side.dim, records, shard_size),
            **({"dba": dba} if dba else {})}
    return _encode_job(store, name, side, records, plan, progress, encode, network_spec=spec)


def add_images(store: GalleryStore, name: str, side: SideEncoder, records: Sequence[ImageRecord], *,
               shard_size: int = SHARD_SIZE, progress: bool = True, skip_bad: bool = False, **encode) -> dict:
    """Encode ``records`` into the existing gallery ``name`` under new ids (resumable, torchrun-aware).

    ``side`` must be the gallery network that built it (:func:`check_space`). Images the gallery
    already holds (same path and bytes) are skipped, so a rerun adds nothing twice; with
    ``skip_bad`` images that do not decode are logged and skipped (:mod:`asymret.retrieval.dedupe`).
    """
    plan = {"kind": "add", **_images_plan(side.network_spec(), side.dim, records, shard_size), "skip_bad": skip_bad}
    return _encode_job(store, name, side, records, plan, progress, encode, existing=side, skip_bad=skip_bad)


def abort_pending(store: GalleryStore, name: str) -> dict | None:
    """Drop the unfinished build or add of gallery ``name`` (its plan and encoded shards); returns
    its plan, or None when there was none. Items it already added are committed and stay (a rerun
    of the add skips them); refused while the job is running."""
    store.open(name, readonly=True).close()  # a clear error for an unknown gallery
    folder = store.folder(name) / BUILD_DIR
    if not folder.is_dir():
        return None
    plan = pending_build(store, name) if (folder / PLAN).is_file() else {"kind": "build"}
    with _job_lock(folder, name):
        shutil.rmtree(folder)
    return plan


@contextlib.contextmanager
def _job_lock(folder: Path, name: str):
    """Held by the process running a build or add (rank 0) and by an abort; the kernel drops it on a kill."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / JOB_LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConflictError(f"the build or add of gallery '{name}' is running in another process; "
                                "wait for it, or stop it first") from None
        yield


def build_from_embeddings(store: GalleryStore, name: str, vectors: np.ndarray, rows: Sequence[dict] | None = None,
                          *, factory: str = "Flat", network_spec: dict | None = None, progress: bool = True,
                          dba: dict | None = None) -> dict:
    """Create gallery ``name`` from precomputed ``(n, dim)`` vectors (a memory map is fine), ids
    ``0..n-1``, with one metadata row per vector. Rerun after a kill, it adds what is missing.
    ``dba``: augment them once before adding (:func:`dba_settings`)."""
    start = time.perf_counter()
    if runtime.processes().world > 1:
        raise InputError("building from embeddings encodes nothing to split; run it as one process, not under torchrun")
    if vectors.ndim != 2:
        raise InputError(f"embeddings must be a 2-D array (n, dim), got shape {vectors.shape}")
    if rows is not None and len(rows) != len(vectors):
        raise InputError(f"{len(vectors):,} embeddings but {len(rows):,} metadata rows; give one row per embedding")
    rows = list(rows) if rows is not None else [{}] * len(vectors)
    # a strided sample and the shape tell two embedding files apart without reading gigabytes
    sample = np.ascontiguousarray(vectors[::max(1, len(vectors) // 1024)])
    source = hashlib.sha256(sample.tobytes() + json.dumps(rows[:1024] + [len(rows)]).encode()).hexdigest()
    plan = {"kind": "embeddings", "factory": factory, "dim": int(vectors.shape[1]), "count": len(vectors),
            "first_id": 0, "source": source, "network": embedding_space(network_spec) if network_spec else None,
            **({"dba": dba} if dba else {})}
    _begin(store, name, plan, network_spec)
    with store.open(name) as gallery:
        added = _fill(gallery, _augmented(gallery, [vectors], dba), rows, 0, progress)
        count = len(gallery)
    shutil.rmtree(store.folder(name) / BUILD_DIR)
    return _summary(name, count, plan, encoded=0, added=added, start=start)


def pending_build(store: GalleryStore, name: str) -> dict | None:
    """The plan of a killed build or add into ``name`` with ``shards_done``, or None."""
    folder = store.folder(name) / BUILD_DIR
    if not (folder / PLAN).is_file():
        return None
    plan = read_json(folder / PLAN, "build plan")
    if "shard_size" in plan:
        plan["shards"] = _num_shards(plan)
        if _direct(store, plan) and store.exists(name):  # a shard is done once its ids are in the gallery
            with store.open(name, readonly=True) as gallery:
                plan["shards_done"] = sum(bool(gallery.contains(_shard_ids(plan, s)).all())
                                          for s in range(plan["shards"]))
        else:
            plan["shards_done"] = sum(_shard_done(folder, s, _shard_rows(plan, s), plan["dim"])
                                      for s in range(plan["shards"]))
    return plan


def _images_plan(network_spec: dict, dim: int, records: Sequence[ImageRecord], shard_size: int) -> dict:
    if shard_size < 1:
        raise InputError(f"shard size must be at least 1, got {shard_size}")
    if not records:
        raise InputError("no images to encode")
    return {"dim": dim, "count": len(records), "first_id": 0, "shard_size": shard_size,
            "records": records_fingerprint(records), "network": embedding_space(network_spec)}


def _begin(store: GalleryStore, name: str, plan: dict, network_spec: dict | None = None, *,
           existing: SideEncoder | None = None, records: Sequence[ImageRecord] = (), skip_bad: bool = False) -> dict:
    """Before any work (rank 0): resume the killed run of this same job; else create the gallery
    (a build), or check that ``existing`` built it and fix the first new id (an add).
    Returns the plan in force."""
    path = store.folder(name) / BUILD_DIR / PLAN
    exists = store.exists(name)
    if exists and path.is_file():
        old = read_json(path, "build plan")
        differ = sorted(k for k in plan if k not in DERIVED and old.get(k, False) != plan[k])
        if differ == ["skip_bad"] and plan["skip_bad"]:
            # the same add, stopped by an image that does not decode: plan it again without such
            # images; what it may have added is skipped as already stored, so nothing is added twice
            log.info("planning the unfinished add of gallery '%s' again, skipping undecodable images", name)
            with _job_lock(path.parent, name):  # not while that add still runs somewhere
                shutil.rmtree(path.parent)
            return _begin(store, name, plan, network_spec, existing=existing, records=records, skip_bad=skip_bad)
        if differ:
            raise ConflictError(f"gallery '{name}' has an unfinished {old.get('kind', 'build')} of another job "
                                f"(its {', '.join(differ)} differ); rerun that command to finish it, or drop "
                                f"it with 'asymret index abort {name}' (what it already added stays)")
        log.info("resuming the unfinished %s of gallery '%s'", old["kind"], name)
        return old
    if existing is None:
        if exists:
            raise ConflictError(f"gallery '{name}' already exists; add images with 'asymret index add', "
                                "or delete it first")
        store.create(name, plan["dim"], plan["factory"], network_spec=network_spec).close()
    else:
        with store.open(name, readonly=True) as gallery:
            check_space(gallery, existing)
            if "database_augmentation" in gallery.processing:
                log.warning("gallery '%s' was built with database-side augmentation; the images added now are "
                            "not augmented (rebuild it to augment them with the rest)", name)
            chosen = select_new(gallery, records, skip_bad=skip_bad)
            # first_id: never an id a removed item had
            plan = {**plan, "first_id": gallery.next_id, "keep": chosen.keep, "count": len(chosen.keep),
                    "skipped_stored": chosen.stored, "skipped_bad": len(chosen.bad)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, plan)
    return plan


def _direct(store: GalleryStore, plan: dict) -> bool:
    """Whether every rank writes its shards into the gallery itself (module doc)."""
    return bool(store.shared_writes) and not plan.get("dba")


def _encode_job(store, name, side, records, plan: dict, progress: bool, encode: dict, **begin) -> dict:
    start = time.perf_counter()
    folder = store.folder(name) / BUILD_DIR
    with distributed() as (rank, world), contextlib.ExitStack() as held:
        if rank == 0:
            plan = _begin(store, name, plan, records=records, **begin)
            held.enter_context(_job_lock(folder, name))
            if _direct(store, plan):  # ranks write at once: reserve the ids before any of them does
                with store.open(name) as gallery:
                    gallery.reserve_ids(plan["first_id"] + plan["count"])
        if _direct(store, plan):
            plan = runtime.broadcast(plan, world)  # the gallery exists, its ids reserved, before anyone writes
        else:
            runtime.barrier(world)  # the gallery folder and its plan exist before anyone writes shards into it
            if rank != 0:
                plan = read_json(folder / PLAN, "build plan")
        if "keep" in plan:  # an add: the records not yet stored (and, with skip_bad, that decode)
            records = [records[i] for i in plan["keep"]]
        if _direct(store, plan):
            encoded = _encode_into(store, name, side, records, plan, rank, world, progress and rank == 0, encode)
            runtime.barrier(world)
            if rank != 0:
                return {"rank": rank, "encoded": encoded}
            with store.open(name, readonly=True) as gallery:
                count = len(gallery)
            shutil.rmtree(folder, ignore_errors=True)
            return {**_summary(name, count, plan, encoded=encoded, added=encoded, start=start),
                    "skipped_stored": plan.get("skipped_stored", 0), "skipped_bad": plan.get("skipped_bad", 0)}
        encoded = _encode_shards(side, records, folder, plan, rank, world, progress and rank == 0, encode)
        runtime.barrier(world)
        if rank != 0:
            return {"rank": rank, "encoded": encoded}
        shards = [_load_shard(folder, s, _shard_rows(plan, s), plan["dim"]) for s in range(_num_shards(plan))]
        with store.open(name) as gallery:
            added = _fill(gallery, _augmented(gallery, shards, plan.get("dba")), item_rows(records),
                          plan["first_id"], progress) if records else 0
            count = len(gallery)
        shutil.rmtree(folder)
    return {**_summary(name, count, plan, encoded=encoded, added=added, start=start),
            "skipped_stored": plan.get("skipped_stored", 0), "skipped_bad": plan.get("skipped_bad", 0)}


def _summary(name: str, count: int, plan: dict, *, encoded: int, added: int, start: float) -> dict:
    return {"name": name, "count": count, "dim": plan["dim"], "factory": plan.get("factory"),
            "kind": plan["kind"], "encoded": encoded, "added": added, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------- shards
def _num_shards(plan: dict) -> int:
    return -(-plan["count"] // plan["shard_size"])


def _shard_rows(plan: dict, shard: int) -> int:
    return min(plan["shard_size"], plan["count"] - shard * plan["shard_size"])


def _shard_ids(plan: dict, shard: int) -> np.ndarray:
    return plan["first_id"] + shard * plan["shard_size"] + np.arange(_shard_rows(plan, shard), dtype=np.int64)


def _shard_path(folder: Path, shard: int) -> Path:
    return folder / f"shard_{shard:05d}.npy"


def _shard_done(folder: Path, shard: int, rows: int, dim: int) -> bool:
    try:
        return np.load(_shard_path(folder, shard), mmap_mode="r").shape == (rows, dim)
    except (OSError, ValueError):
        return False


def _load_shard(folder: Path, shard: int, rows: int, dim: int) -> np.ndarray:
    if not _shard_done(folder, shard, rows, dim):
        raise DataError(f"embedding shard {_shard_path(folder, shard)} is missing or incomplete; rerun "
                        "the same command to encode it")
    return np.load(_shard_path(folder, shard), mmap_mode="r")


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save(path) would append ".npy" to the temporary name
        np.save(f, array)


def _encode_shards(side: SideEncoder, records, folder: Path, plan: dict, rank: int, world: int,
                   progress: bool, encode: dict) -> int:
    """Encode this rank's missing shards (``rank, rank + world, ...``); returns the images encoded."""
    shard_size = plan["shard_size"]
    mine = range(rank, _num_shards(plan), world)
    todo = [s for s in mine if not _shard_done(folder, s, _shard_rows(plan, s), side.dim)]
    total = sum(_shard_rows(plan, s) for s in mine)
    remaining = sum(_shard_rows(plan, s) for s in todo)
    log.info("rank %d/%d: %d shard(s) of %d image(s) to encode, %d already done", rank, world, len(todo),
             remaining, len(mine) - len(todo))
    bar = tqdm(total=total, initial=total - remaining, unit="img", disable=not progress,
               desc=f"encoding ({side.encoder.spec.backbone})")
    with bar:
        for s in todo:
            start = s * shard_size
            x = side.encode_records(records[start:start + shard_size], progress=False, **encode)
            atomic_write(_shard_path(folder, s), lambda tmp, x=x: _save_npy(tmp, x))
            bar.update(len(x))
    return remaining


def _encode_into(store: GalleryStore, name: str, side: SideEncoder, records, plan: dict, rank: int, world: int,
                 progress: bool, encode: dict) -> int:
    """Direct writes: encode this rank's shards whose ids are not all in the gallery, add each at once
    (the ids it lacks); returns the images encoded."""
    shard_size, first = plan["shard_size"], plan["first_id"]
    rows = item_rows(records)
    with store.open(name) as gallery:
        mine = range(rank, _num_shards(plan), world)
        ids = {s: _shard_ids(plan, s) for s in mine}
        todo = [s for s in mine if not gallery.contains(ids[s]).all()]
        total = sum(_shard_rows(plan, s) for s in mine)
        remaining = sum(_shard_rows(plan, s) for s in todo)
        log.info("rank %d/%d: %d shard(s) of %d image(s) to encode into '%s', %d already there", rank, world,
                 len(todo), remaining, name, len(mine) - len(todo))
        with tqdm(total=total, initial=total - remaining, unit="img", disable=not progress,
                  desc=f"encoding ({side.encoder.spec.backbone}) into '{name}'") as bar:
            for s in todo:
                start = s * shard_size
                x = side.encode_records(records[start:start + shard_size], progress=False, **encode)
                new = ~gallery.contains(ids[s])  # a killed run may have added part of it
                if new.any():
                    gallery.add(x[new], [rows[i - first] for i in ids[s][new]], ids=ids[s][new])
                bar.update(len(x))
    return remaining


def _augmented(gallery: Gallery, chunks: Sequence[np.ndarray], dba: dict | None) -> Sequence[np.ndarray]:
    """``chunks`` as one augmented array when ``dba`` is set (the whole database in memory, as its
    neighbours come from all of it), recorded in the gallery; else unchanged."""
    if not dba:
        return chunks
    from asymret.retrieval.rerank import database_augmentation

    start = time.perf_counter()
    vectors = database_augmentation(np.concatenate([np.asarray(c) for c in chunks]), dba["k"], dba["alpha"])
    log.info("database-side augmentation of %d vectors (top %d, alpha %g) in %.1f s", len(vectors), dba["k"],
             dba["alpha"], time.perf_counter() - start)
    gallery.record_processing("database_augmentation", dba)
    return [vectors]


def _fill(gallery: Gallery, chunks: Sequence[np.ndarray], rows: Sequence[dict], first_id: int, progress: bool) -> int:
    """Add the rows of ``chunks`` (in order) under ids ``first_id + row``, skipping ids a killed run
    already added; an IVF/PQ index is first trained on a sample of all rows. Returns how many were added."""
    _train(gallery, chunks)
    offset = added = 0
    with tqdm(total=sum(map(len, chunks)), unit="vec", disable=not progress,
              desc=f"adding to '{gallery.name}'") as bar:
        for chunk in chunks:
            for s in range(0, len(chunk), ADD_BATCH):
                x = np.asarray(chunk[s:s + ADD_BATCH])
                ids = first_id + offset + s + np.arange(len(x), dtype=np.int64)
                new = ~gallery.contains(ids)
                if new.any():
                    gallery.add(x[new], [rows[i - first_id] for i in ids[new]], ids=ids[new])
                    added += int(new.sum())
                bar.update(len(x))
            offset += len(chunk)
    return added


def _train(gallery: Gallery, chunks: Sequence[np.ndarray], seed: int = 0) -> None:
    """Train on a random sample of all rows, not on the first batch (which may hold one class)."""
    if gallery.is_trained:
        return
    sizes = [len(c) for c in chunks]
    n = sum(sizes)
    rows = np.sort(np.random.default_rng(seed).choice(n, min(n, 2 * gallery.training_size()[1]), replace=False))
    bounds = np.cumsum([0, *sizes])
    gallery.train(np.concatenate([np.asarray(c[rows[(rows >= lo) & (rows < hi)] - lo])
                                  for c, lo, hi in zip(chunks, bounds[:-1], bounds[1:])]))


# ------------------------------------------------------------------------------------ processes
def distributed():
    """``(rank, world)`` (:func:`asymret.runtime.distributed`): torchrun's gloo group, waiting up to a day."""
    return runtime.distributed(timeout=BARRIER_TIMEOUT)
