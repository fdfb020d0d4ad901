"""Gallery snapshots: one folder that holds a gallery whole, to back it up or move it to another store.

Layout of a snapshot folder (format version ``FORMAT_VERSION``)::

    manifest.json        format, format_version, the gallery (name, dim, factory, metric, network_spec,
                         network_hash, next_id), count, and the SHA-256 and size of each file below
    vectors.faiss        the FAISS index, as ``VectorIndex.save`` writes it
    vectors.faiss.json   its sidecar (ids kind, processing such as database-side augmentation)
    items.jsonl          one JSON object per item row: id, path, label, camera, attributes,
                         created_at, sha256, sorted by id

A snapshot is taken from an open gallery under its lock, so the index and the rows are of the same
moment. :func:`restore_snapshot` verifies every hash first and refuses (saying why) a snapshot of
another format version, one whose gallery network differs from the gallery it would replace or from
the network the caller serves (``network_hash``), and an existing name without ``replace``. The
restore itself is one commit (:meth:`Gallery.replace_all`); the snapshot folder is only read.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime
from pathlib import Path

from asymret.errors import ConflictError, DataError, InputError, NotFoundError
from asymret.files import file_sha256, fsync_dir, read_json, write_json_atomic
from asymret.index.store import Gallery, GalleryStore
from asymret.index.vectors import VectorIndex, sidecar_path

FORMAT, FORMAT_VERSION = "asymret-gallery-snapshot", 1
MANIFEST, INDEX, ROWS = "manifest.json", "vectors.faiss", "items.jsonl"
GALLERY_KEYS = ("name", "dim", "factory", "metric", "network_spec", "network_hash", "next_id")


def write_snapshot(store: GalleryStore, name: str, out, gallery: Gallery | None = None) -> dict:
    """Write gallery ``name`` to the new folder ``out``; returns the manifest.

    ``gallery``: an open handle to snapshot from (a server's); else it is opened read-only here.
    """
    _faiss_only(store)
    out = Path(out)
    if out.exists():
        raise ConflictError(f"{out} already exists; give a new folder for the snapshot")
    own = gallery is None
    gallery = store.open(name, readonly=True) if own else gallery
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        with gallery.consistent() as (index, items, next_id):
            index.save(tmp / INDEX, extra=index.extra)
            with open(tmp / ROWS, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(item.to_dict(), sort_keys=True) + "\n" for item in items)
        files = {path: {"sha256": file_sha256(tmp / path), "bytes": (tmp / path).stat().st_size}
                 for path in (INDEX, sidecar_path(INDEX).name, ROWS)}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "count": len(items),
                    "gallery": {"name": name, "dim": gallery.dim, "factory": gallery.factory,
                                "metric": gallery.metric, "network_spec": gallery.network_spec,
                                "network_hash": gallery.network_hash, "next_id": next_id},
                    "files": files}
        write_json_atomic(tmp / MANIFEST, manifest)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if own:
            gallery.close()
    return manifest


def read_manifest(folder) -> dict:
    """The manifest of a snapshot folder, after checking its format version and every file's hash."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotFoundError(f"no snapshot folder {folder}; give the folder 'asymret index snapshot' wrote")
    manifest = read_json(folder / MANIFEST, "snapshot manifest")
    if manifest.get("format") != FORMAT:
        raise DataError(f"{folder / MANIFEST} is not an asymret gallery snapshot manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ConflictError(f"snapshot {folder} has format version {manifest.get('format_version')!r}; this "
                            f"asymret reads version {FORMAT_VERSION} (restore it with the asymret that wrote it)")
    gallery = manifest.get("gallery")
    if not isinstance(gallery, dict) or set(GALLERY_KEYS) - set(gallery):
        raise DataError(f"{folder / MANIFEST} lacks the gallery's {', '.join(GALLERY_KEYS)}")
    for path in (INDEX, sidecar_path(INDEX).name, ROWS):
        expected = manifest.get("files", {}).get(path, {}).get("sha256")
        if not (folder / path).is_file():
            raise DataError(f"snapshot {folder} lacks {path}; copy the whole snapshot folder")
        if file_sha256(folder / path) != expected:
            raise DataError(f"{folder / path} does not match its SHA-256 in the manifest (corrupt, truncated "
                            "or edited?); use an intact copy of the snapshot")
    return manifest


def restore_snapshot(store: GalleryStore, folder, *, name: str | None = None, replace: bool = False,
                     network_hash: str | None = None) -> tuple[str, int]:
    """Restore the snapshot in ``folder`` as gallery ``name`` (default: its own name); returns
    ``(name, count)``. ``network_hash``: the gallery network the caller serves, which the snapshot's
    must equal. With ``replace`` an existing gallery of the same gallery network is replaced."""
    _faiss_only(store)
    folder = Path(folder)
    manifest = read_manifest(folder)
    meta = manifest["gallery"]
    name = name or meta["name"]
    store.folder(name)  # a clear error for a bad name, before any work
    if network_hash is not None and meta["network_hash"] != network_hash:
        raise ConflictError(f"snapshot {folder.name} is of another gallery network ({_short(meta['network_hash'])}) "
                            f"than this server's ({_short(network_hash)}); restore it where that network serves")
    index = VectorIndex.load(folder / INDEX, dim=meta["dim"], metric=meta["metric"])
    ids, rows, created = read_rows(folder / ROWS)
    if len(ids) != len(index) or manifest.get("count") != len(ids):
        raise DataError(f"snapshot {folder}: {len(ids)} item rows but {len(index)} vectors; use an intact copy")
    existing = {g["name"]: g for g in store.list()}
    if name in existing:
        if not replace:
            raise ConflictError(f"gallery '{name}' already exists; restore under another name (--name NEW) or "
                                "replace it (--replace)")
        if existing[name]["network_hash"] != meta["network_hash"]:
            raise ConflictError(f"gallery '{name}' was built by another gallery network "
                                f"({_short(existing[name]['network_hash'])}) than the snapshot's "
                                f"({_short(meta['network_hash'])}); restore under another name (--name NEW)")
        gallery = store.open(name)
        if (gallery.dim, gallery.metric) != (meta["dim"], meta["metric"]):
            gallery.close()
            raise ConflictError(f"gallery '{name}' holds {gallery.dim}-d vectors, the snapshot {meta['dim']}-d; "
                                "restore under another name (--name NEW)")
    else:
        gallery = store.create(name, meta["dim"], meta["factory"], network_spec=meta["network_spec"],
                               metric=meta["metric"])
    with gallery:
        gallery.replace_all(index, rows, ids, created, next_id=int(meta["next_id"]))
        return name, len(gallery)


def read_rows(path: Path):
    """``(ids, rows, created_at)`` of a snapshot's ``items.jsonl``."""
    ids, rows, created = [], [], []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                ids.append(int(row["id"]))
                created.append(datetime.fromisoformat(row["created_at"]) if row.get("created_at") else None)
                rows.append({key: row.get(key) for key in ("path", "label", "camera", "attributes", "sha256")})
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is not a snapshot's item rows ({exc}); use an intact copy") from None
    return ids, rows, created


def _short(digest: str | None) -> str:
    return "no recorded network" if digest is None else f"network hash {digest[:12]}"


def _faiss_only(store) -> None:
    if getattr(store, "backend", "faiss") != "faiss":
        raise InputError(f"snapshots hold a FAISS gallery's files; a {store.backend} gallery is backed up with that "
                         "engine's own tools (for Milvus: milvus-backup), or rebuilt with 'asymret index build'")
