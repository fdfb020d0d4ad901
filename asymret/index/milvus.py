"""Galleries in Milvus: one collection per gallery, at a Milvus Lite file or a Milvus server/cluster.

The ``milvus`` implementation of :mod:`asymret.index.backend`, for galleries beyond one machine
(sharding, replicas, deletes and filtering are Milvus's). ``uri`` is a Milvus Lite file
(``galleries.milvus.db``: the same engine embedded in this process) or ``http://host:19530``
(``token`` for a server with authentication). Needs the extra: ``pip install -e ".[milvus]"``;
pymilvus is imported here only, when a store is opened.

* **Collection** ``asymret_<name>`` (``_`` ``-`` ``.`` of the gallery name escaped): ``id`` INT64
  primary key equal to our 64-bit ids, ``vector`` FLOAT_VECTOR of the gallery's dimension (L2-normalised,
  metric IP: scores are cosines, as with FAISS), ``path``/``label``/``camera`` VARCHAR and
  ``attributes`` JSON, ``sha256`` of the image file (all nullable), ``created_at`` (microseconds since the epoch).
* **Index** from the same FAISS factory string the other backend takes (so :func:`recommend_index`
  serves both): ``Flat`` -> FLAT (exact), ``IVF<n>,Flat`` -> IVF_FLAT, ``IVF<n>,SQ8`` -> IVF_SQ8,
  ``IVF<n>,PQ<m>`` -> IVF_PQ (``OPQ<m>,IVF<n>,PQ<m>`` too, without the rotation), ``HNSW<M>`` -> HNSW (efConstruction 40, FAISS's default); ``nprobe``
  and ``efSearch`` (at least ``k``) per search, with the FAISS backend's defaults.
* **Properties** of the collection: ``asymret`` (JSON: name, dim, factory, metric, network spec and
  hash, created_at; written once), ``asymret.next_id``, ``asymret.processing``, ``asymret.updated_at``.
  A query network whose gallery side differs from the stored spec is refused as with FAISS
  (:func:`~asymret.retrieval.sides.check_space` reads ``network_spec``).
* **Writes** are upserts keyed by id, refused (ConflictError) when an id is present; ids are reserved in
  ``asymret.next_id`` before the rows land, so none is reused. torchrun ranks add their shards directly
  (``shared_writes``, explicit ids); ids without ``ids`` come from one writer at a time.
* **Filters and exclusion** are one boolean expression (:mod:`asymret.index.milvus_expr`) per distinct
  (filters, exclusion) pair: exact whatever their selectivity. Lite is reloaded after writes (see close).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from asymret.errors import ConfigError, ConflictError, InputError, NotFoundError
from asymret.index.backend import exclusion_rules
from asymret.index.milvus_expr import exclusion_expression, filter_expression, in_expression
from asymret.index.recommend import milvus_index
from asymret.index.rows import NAME, Hit, Item, as_json, spec_hash, utc_now, validate_rows
from asymret.index.vectors import DEFAULT_EF_SEARCH, as_ids, default_nprobe, normalise

log = logging.getLogger(__name__)

PREFIX = "asymret_"
FORMAT = 1
CHUNK_IDS = 10_000  # ids per "id in [...]" expression
MAX_TOPK = 16_384  # Milvus's limit on hits per query
INSTALL = 'the milvus backend needs pymilvus and milvus-lite: pip install -e ".[milvus]"'


def _pymilvus():
    try:
        import pymilvus
    except ImportError:
        raise ConfigError(INSTALL) from None
    return pymilvus


def collection_name(name: str) -> str:
    """``asymret_<name>`` with ``_`` ``-`` ``.`` escaped (Milvus names take letters, digits and ``_``)."""
    return PREFIX + name.replace("_", "__").replace("-", "_m").replace(".", "_d")


def _micros(t: datetime) -> int:
    return int(t.timestamp() * 1_000_000)


# ----------------------------------------------------------------------------------------- store
class MilvusStore:
    """All galleries (collections ``asymret_*``) of one Milvus; ``root`` holds only build scratch."""

    backend, shared_writes = "milvus", True

    def __init__(self, root_dir: str | Path, uri: str, *, token: str | None = None, create: bool = True,
                 **_ignored):
        pymilvus = _pymilvus()
        self.root = Path(root_dir)
        self.uri = str(uri)
        self.lite = not re.match(r"^(https?|tcp|unix)://", self.uri)
        if self.lite:
            if not self.uri.endswith(".db"):
                raise ConfigError(f"--uri {self.uri!r} is neither a Milvus Lite file (ending in .db) nor a server "
                                  "address (http://host:19530); give one of them")
            if not create and not Path(self.uri).expanduser().exists():  # Lite keeps a folder of that name
                raise NotFoundError(f"no Milvus Lite file at {self.uri}; give the --uri that 'asymret index build' "
                                    "wrote to (nothing was created)")
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        if self.lite:
            Path(self.uri).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self.uri = str(Path(self.uri).expanduser().resolve())
        try:
            self.client = pymilvus.MilvusClient(uri=self.uri, token=token or "")
        except pymilvus.exceptions.MilvusException as exc:
            raise ConfigError(f"cannot reach Milvus at {self.uri} ({type(exc).__name__}: {exc}); start the server, "
                              "check --uri and --token, or close the other process using this Lite file") from None
        self._pymilvus = pymilvus

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def ping(self) -> None:
        """One cheap request to Milvus (readiness probes); raises if the server does not answer."""
        self.client.list_collections()

    def close(self) -> None:
        self.client.close()

    def folder(self, name: str) -> Path:
        if not isinstance(name, str) or not NAME.match(name):
            raise InputError(f"gallery name {name!r} must be 1-64 letters, digits, '_', '-' or '.', "
                             "starting with a letter or digit")
        return self.root / name

    def exists(self, name: str) -> bool:
        self.folder(name)
        return self.client.has_collection(collection_name(name))

    def _properties(self, name: str) -> dict:
        if not self.exists(name):
            known = ", ".join(g["name"] for g in self.list()) or "none yet"
            raise NotFoundError(f"no gallery named '{name}' (galleries: {known}); create it first")
        return self.client.describe_collection(collection_name(name)).get("properties", {})

    def create(self, name: str, dim: int, factory: str = "Flat", network_spec=None, *,
               metric: str = "ip") -> MilvusGallery:
        """A new, empty gallery (collection), open for writing."""
        self.folder(name)
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise InputError(f"dimension must be a positive integer, got {dim!r}")
        if metric != "ip":
            raise ConfigError(f"the milvus backend searches by inner product on unit vectors (metric 'ip'), not "
                              f"'{metric}'")
        index_type, params = milvus_index(factory)
        spec = as_json(network_spec, "network_spec")
        if self.exists(name):
            raise ConflictError(f"gallery '{name}' already exists; open it, or delete it first")
        DataType = self._pymilvus.DataType
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(dim))
        schema.add_field("path", DataType.VARCHAR, max_length=65_535, nullable=True)
        schema.add_field("label", DataType.VARCHAR, max_length=255, nullable=True)
        schema.add_field("camera", DataType.VARCHAR, max_length=64, nullable=True)
        schema.add_field("attributes", DataType.JSON, nullable=True)
        schema.add_field("sha256", DataType.VARCHAR, max_length=64, nullable=True)  # what makes a rerun idempotent
        schema.add_field("created_at", DataType.INT64)
        index = self.client.prepare_index_params()
        index.add_index("vector", index_type=index_type, metric_type="IP", params=params)
        now = utc_now().isoformat()
        meta = {"format": FORMAT, "name": name, "dim": int(dim), "factory": factory, "metric": metric,
                "network_spec": spec, "network_hash": spec_hash(spec), "created_at": now}
        self.client.create_collection(collection_name(name), schema=schema, index_params=index,
                                      consistency_level="Strong",
                                      properties={"asymret": json.dumps(meta), "asymret.next_id": "0",
                                                  "asymret.updated_at": now, "asymret.processing": "{}"})
        return self.open(name)

    def open(self, name: str, *, readonly: bool = False, mmap: bool = False) -> MilvusGallery:
        """Open a gallery (``mmap`` is the FAISS backend's; Milvus decides where vectors live)."""
        properties = self._properties(name)
        if "asymret" not in properties:
            raise ConflictError(f"collection '{collection_name(name)}' was not created by asymret (no 'asymret' "
                                "property); give the gallery another name")
        self.client.load_collection(collection_name(name))
        return MilvusGallery(self, name, properties, readonly=readonly)

    def list(self) -> list[dict]:
        """Every gallery's name, dimension, factory, metric, item count, network hash and times."""
        out = []
        for collection in sorted(self.client.list_collections()):
            if not collection.startswith(PREFIX):
                continue
            properties = self.client.describe_collection(collection).get("properties", {})
            if "asymret" in properties:
                out.append(_summary(properties, _count(self.client, collection)))
        return sorted(out, key=lambda g: g["name"])

    def delete(self, name: str) -> None:
        """Delete a gallery: its collection (items, vectors and properties)."""
        self._properties(name)
        self.client.drop_collection(collection_name(name))


def _count(client, collection: str) -> int:
    return int(client.query(collection, filter="", output_fields=["count(*)"])[0]["count(*)"])


def _summary(properties: Mapping, count: int) -> dict:
    meta = json.loads(properties["asymret"])
    return {**{key: meta[key] for key in ("name", "dim", "factory", "metric", "network_hash")}, "count": count,
            "created_at": meta["created_at"], "updated_at": properties.get("asymret.updated_at", meta["created_at"])}


# --------------------------------------------------------------------------------------- gallery
class MilvusGallery:
    """One gallery's collection; the methods of :class:`~asymret.index.backend.GalleryBackend`."""

    FIELDS = ("path", "label", "camera", "attributes", "sha256", "created_at")

    def __init__(self, store: MilvusStore, name: str, properties: Mapping, *, readonly: bool):
        meta = json.loads(properties["asymret"])
        self.store, self.name, self.readonly = store, name, readonly
        self.client, self.collection = store.client, collection_name(name)
        self.dim, self.factory, self.metric = int(meta["dim"]), meta["factory"], meta["metric"]
        self.network_spec, self.network_hash = meta.get("network_spec"), meta.get("network_hash")
        self.index_type, self.index_params = milvus_index(self.factory)
        self._closed = self._dirty = False

    # ------------------------------------------------------------------------------- properties
    def _property(self, key: str, default: str) -> str:
        return self.client.describe_collection(self.collection).get("properties", {}).get(key, default)

    @property
    def next_id(self) -> int:
        return int(self._property("asymret.next_id", "0"))

    @property
    def processing(self) -> dict:
        return json.loads(self._property("asymret.processing", "{}"))

    def _set(self, **properties) -> None:
        self.client.alter_collection_properties(self.collection, properties={
            **{f"asymret.{k}": v for k, v in properties.items()}, "asymret.updated_at": utc_now().isoformat()})

    def reserve_ids(self, upto: int) -> None:
        """Make ``asymret.next_id`` at least ``upto`` (a sharded build reserves its ids before ranks write)."""
        self._writable()
        if int(upto) > self.next_id:
            self._set(next_id=str(int(upto)))

    def record_processing(self, name: str, settings: dict) -> None:
        self._writable()
        self._set(processing=json.dumps({**self.processing, name: as_json(settings, "settings")}))

    # ----------------------------------------------------------------------------------- writes
    def _writable(self) -> None:
        if self._closed:
            raise ConflictError(f"gallery '{self.name}' is closed; open it again")
        if self.readonly:
            raise ConflictError(f"gallery '{self.name}' was opened readonly; open it with readonly=False "
                                "to change it")

    @property
    def is_trained(self) -> bool:
        return True  # Milvus trains its IVF quantiser itself when it builds the index

    def training_size(self) -> tuple[int, int]:
        return 0, 0

    def train(self, vectors) -> None:
        self._writable()

    def as_unit(self, vectors, name: str = "vectors") -> np.ndarray:
        return normalise(vectors, self.dim, name)[0]

    def add(self, vectors, rows: Sequence[Mapping] | None = None, *, ids=None) -> np.ndarray:
        """Add vectors with their metadata rows (keys path, label, camera, attributes); returns the ids."""
        self._writable()
        x = self.as_unit(vectors)
        rows = validate_rows(rows, len(x))
        if ids is None:
            start = self.next_id
            ids = np.arange(start, start + len(x), dtype=np.int64)
        ids = as_ids(ids)
        if len(ids) != len(x):
            raise InputError(f"got {len(x)} vectors but {len(ids)} ids; give one id per vector")
        if len(np.unique(ids)) != len(ids):
            raise InputError("ids repeat within the batch; give each vector its own id")
        if not len(ids):
            return ids
        present = ids[self.contains(ids)]
        if present.size:
            raise ConflictError(f"gallery '{self.name}' already holds ids {present[:5].tolist()}; nothing was added")
        self.reserve_ids(int(ids.max()) + 1)  # before the rows: a crash now skips these ids, never reuses them
        created = _micros(utc_now())
        self._dirty = True
        step = max(1, 4_000_000 // self.dim)  # ~16 MB per request, under gRPC's message limit
        for s in range(0, len(ids), step):
            self.client.upsert(self.collection, [
                {"id": int(i), "vector": v, "created_at": created, **row}
                for i, v, row in zip(ids[s:s + step], x[s:s + step], rows[s:s + step])])
        return ids

    def remove(self, ids) -> int:
        """Remove items by id (all of them must exist). Returns how many were removed."""
        self._writable()
        ids = np.unique(as_ids(ids))
        missing = ids[~self.contains(ids)]
        if missing.size:
            raise NotFoundError(f"gallery '{self.name}' has no item {missing[:5].tolist()}; nothing was removed")
        self._dirty = True
        for s in range(0, len(ids), CHUNK_IDS):
            self.client.delete(self.collection, ids=ids[s:s + CHUNK_IDS].tolist())
        if ids.size:
            self._set()
        return int(ids.size)

    # ------------------------------------------------------------------------------------ reads
    def _query(self, ids: np.ndarray, fields: list[str]) -> list[dict]:
        out = []
        for s in range(0, len(ids), CHUNK_IDS):
            chunk = ids[s:s + CHUNK_IDS]
            if chunk.size:
                out += self.client.query(self.collection, filter=f"id in {json.dumps(chunk.tolist())}",
                                         output_fields=fields, limit=len(chunk))
        return out

    def _paths(self, paths: Sequence[str], fields: list[str]) -> list[dict]:
        """The rows (``fields``) of the items whose path is one of ``paths``."""
        unique, out = sorted({str(p) for p in paths}), []
        for s in range(0, len(unique), CHUNK_IDS):
            out += self.client.query(self.collection, filter=in_expression("path", unique[s:s + CHUNK_IDS]),
                                     output_fields=fields)
        return out

    def stored(self, paths: Sequence[str], hashes: Sequence[str]) -> np.ndarray:
        """Whether each (path, sha256) pair is already an item (the FAISS store's :meth:`stored`)."""
        found = {(r["path"], r["sha256"]) for r in self._paths(paths, ["path", "sha256"]) if r.get("sha256")}
        return np.fromiter(((str(p), h) in found for p, h in zip(paths, hashes)), bool, len(paths))

    def referenced(self, paths: Sequence[str]) -> np.ndarray:
        """Whether some item has each of these paths (what an upload sweep keeps)."""
        found = {r["path"] for r in self._paths(paths, ["path"])}
        return np.fromiter((str(p) in found for p in paths), bool, len(paths))

    def contains(self, ids) -> np.ndarray:
        ids = as_ids(ids)
        found = {int(r["id"]) for r in self._query(np.unique(ids), ["id"])}
        return np.fromiter((int(i) in found for i in ids), bool, len(ids))

    def _items(self, ids: np.ndarray) -> dict[int, Item]:
        return {int(r["id"]): _item(r) for r in self._query(np.unique(ids), ["id", *self.FIELDS])}

    def get(self, ids) -> list[Item]:
        """The items with these ids, in this order; an unknown id is a NotFoundError."""
        ids = as_ids(ids)
        found = self._items(ids)
        missing = [int(i) for i in ids if int(i) not in found]
        if missing:
            raise NotFoundError(f"gallery '{self.name}' has no item {missing[:5]}")
        return [found[int(i)] for i in ids]

    def vectors(self, ids) -> np.ndarray:
        """The stored (unit) vectors of these items, in this order: Milvus keeps them whatever the index."""
        ids = as_ids(ids)
        found = {int(r["id"]): r["vector"] for r in self._query(np.unique(ids), ["id", "vector"])}
        missing = [int(i) for i in ids if int(i) not in found]
        if missing:
            raise NotFoundError(f"gallery '{self.name}' has no item {missing[:5]}")
        return np.asarray([found[int(i)] for i in ids], np.float32).reshape(len(ids), self.dim)

    def search(self, queries, k: int = 10, *, filters: Mapping | None = None, exclude=None,
               nprobe: int | None = None, efSearch: int | None = None) -> list[list[Hit]]:
        """The ``k`` best items per query, best first, with their metadata; filters and exclusion rules
        (:mod:`asymret.index.backend`) are one Milvus expression, so the answer is exact."""
        q = self.as_unit(queries, "queries")
        if not isinstance(k, (int, np.integer)) or k < 1 or k > MAX_TOPK:
            raise InputError(f"k must be 1 to {MAX_TOPK} (Milvus's limit), got {k!r}")
        rules = exclusion_rules(exclude, len(q)) or [[] for _ in range(len(q))]
        base = filter_expression(filters)
        groups: dict[str, list[int]] = {}
        for i, rule in enumerate(rules):
            expression = " and ".join(e for e in (base, exclusion_expression(rule)) if e)
            groups.setdefault(expression, []).append(i)
        params = self._search_params(k, nprobe, efSearch)
        out: list[list[Hit]] = [[] for _ in range(len(q))]
        for expression, rows in groups.items():
            answers = self.client.search(self.collection, data=[q[i] for i in rows], limit=int(k),
                                         filter=expression, search_params={"metric_type": "IP", "params": params},
                                         output_fields=list(self.FIELDS))
            for i, hits in zip(rows, answers):
                out[i] = [Hit(int(h["id"]), float(h["distance"]), _item({"id": h["id"], **h["entity"]}))
                          for h in hits]
        return out

    def _search_params(self, k: int, nprobe: int | None, efSearch: int | None) -> dict:
        if self.index_type.startswith("IVF"):
            nlist = self.index_params["nlist"]
            return {"nprobe": int(nprobe) if nprobe else default_nprobe(nlist)}
        if self.index_type == "HNSW":
            return {"ef": max(int(k), int(efSearch or DEFAULT_EF_SEARCH))}
        return {}

    def __len__(self) -> int:
        return _count(self.client, self.collection)

    def info(self) -> dict:
        properties = self.client.describe_collection(self.collection).get("properties", {})
        return {**_summary(properties, len(self)), "network_spec": self.network_spec, "readonly": self.readonly,
                "processing": json.loads(properties.get("asymret.processing", "{}")),
                "next_id": int(properties.get("asymret.next_id", "0")), "backend": "milvus",
                "index": {"type": self.index_type, "params": self.index_params, "metric": "IP",
                          "collection": self.collection, "uri": self.store.uri}}

    def close(self) -> None:
        """Flush what this object wrote (Milvus then seals it and builds its index: a search over unsealed
        rows scans them all, as an unsaved journal does in the FAISS backend). The client is the store's."""
        if self._dirty and not self._closed:
            self.client.flush(self.collection)
            if self.store.lite:
                self._reload_indexed()
        self._closed, self._dirty = True, False

    def _reload_indexed(self, timeout_s: float = 600.0) -> None:
        """Lite searches loaded segments raw until the collection is loaded again: wait for the index, reload
        (30k x 64 HNSW: 20 -> 83 QPS). One process, so nobody else is searching; a server hands over itself."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self.client.describe_index(self.collection, "vector") or {}
            if int(info.get("pending_index_rows", 0)) == 0:
                break
            time.sleep(0.2)
        self.client.release_collection(self.collection)
        self.client.load_collection(self.collection)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _item(row: Mapping) -> Item:
    created = datetime.fromtimestamp(int(row.get("created_at") or 0) / 1e6, timezone.utc)
    return Item(int(row["id"]), row.get("path"), row.get("label"), row.get("camera"), row.get("attributes") or {},
                created, row.get("sha256"))
