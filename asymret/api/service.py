"""The search service behind the REST API: one or more pairs, one gallery store, one query-encoding
worker per query network.

Asymmetric retrieval at serve time: the GALLERY network encodes the items added through the API (as
it encoded the offline database), a small QUERY network encodes every query image, and both land
in one space, whitened by the pair's whitening when it has one (AML's asymmetric test setting).
Several pairs may be served together when they share the gallery network (the same
:func:`~asymret.retrieval.gallery.embedding_space`): each query network trained against it (a phone-size
one, a server-size one) searches the same galleries, and a request names the one it wants.
Query encodes are coalesced into batches by one :class:`~asymret.api.batcher.Batcher` per query
network, so a batch never mixes networks.
"""

from __future__ import annotations

import functools
import hmac
import io
import logging
import re
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, model_validator

from asymret.api.batcher import Batcher
from asymret.api.uploads import ImageLimits, decode_image, resolve_under_roots
from asymret.errors import AsymretError, ConfigError, ConflictError, ForbiddenError, NotFoundError

log = logging.getLogger("asymret.serve")
UPLOADS = "_uploads"  # under the galleries folder; gallery names cannot start with '_'
QUERY_NET_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"  # what NAME=PATH may name a query network


def pair_entry(entry: str | Path) -> tuple[str | None, Path]:
    """``(name, path)`` of a ``pair``/``pairs`` entry: ``PATH`` or ``NAME=PATH`` (an existing file
    whose own name holds '=' stays a path)."""
    text = str(entry)
    name, sep, path = text.partition("=")
    if sep and re.fullmatch(QUERY_NET_NAME, name) and not Path(text).expanduser().is_file():
        return name, Path(path)
    return None, Path(text)


class ServeConfig(BaseModel):
    """``asymret serve`` settings (a YAML file, flags on top)."""

    model_config = ConfigDict(extra="forbid")

    pair: Path | None = Field(None, description="pair.pt written by asymret train: both networks and the "
                                                "whitening; its query network is the default one ('NAME=PATH' "
                                                "names it)")
    pairs: list[Path] = Field(default_factory=list, description="more pairs whose query networks search the "
                                                                "same gallery network's galleries, after 'pair'")
    galleries: Path = Field(Path("galleries"), description="folder of the gallery store")
    db_url: str | None = Field(None, description="SQLAlchemy URL of the metadata; SQLite in the folder by default")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    api_keys: list[str] = Field(default_factory=list, description="keys accepted in the X-API-Key header")
    keys_for_reads: bool = Field(False, description="ask for a key on reads (search, get) too, not just writes")
    allowed_roots: list[Path] = Field(default_factory=list, description="folders items may be added from by path")
    max_request_mb: float = Field(32.0, gt=0, description="largest request body (all uploads together)")
    max_image_mb: float = Field(16.0, gt=0, description="largest single image file")
    max_image_pixels: int = Field(40_000_000, gt=0, description="width x height limit, checked from the header")
    image_formats: list[str] = Field(["JPEG", "PNG", "WEBP", "GIF", "BMP"], min_length=1)
    max_batch: int = Field(32, ge=1, description="most query images encoded in one forward pass (1: no coalescing)")
    max_wait_ms: float = Field(2.0, ge=0, description="longest a query waits for others to join its batch")
    thumbnail_px: int = Field(160, ge=16, le=1024)
    torch_threads: int = Field(0, ge=0, description="intra-op threads of the networks (0: torch's default, one "
                                                   "per core); 1 suits a CPU shared with other work")
    runtime: Literal["torch", "onnx"] = Field("torch", description="what encodes the queries: PyTorch, or ONNX "
                                               "Runtime on the query network exported at start-up "
                                               "(asymret export; needs the [onnx] extra)")
    search_threads: int = Field(1, ge=1, description="FAISS threads per search: concurrency comes from the "
                                                     "requests, and waking a thread team costs more than a "
                                                     "small search (raise it for large batch searches)")

    @model_validator(mode="after")
    def _some_pair(self):
        if self.pair is None and not self.pairs:
            raise ValueError("no pair file; give 'pair' (or 'pairs'), the pair.pt a training run wrote")
        return self

    def pair_entries(self) -> list[tuple[str | None, Path]]:
        """``(name or None, path)`` of every pair to serve, the default (first) one first."""
        return [pair_entry(e) for e in ([self.pair] if self.pair is not None else []) + list(self.pairs)]


class NotReadyError(AsymretError):
    """The pair and galleries are still loading (or failed to load: see /readyz)."""

    code = "not_ready"
    http_status = 503


def torch_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise NotReadyError("device 'cuda' asked for but CUDA is not available; serve with --device cpu")
    return torch.device(name)


@dataclass
class QueryNet:
    """A served query network: the pair it comes from (whose gallery network all pairs share), its
    coalescing worker and what it costs per image."""

    name: str
    path: Path
    pair: object  # asymret.retrieval.pair.Pair
    batcher: Batcher | None = None
    cost: dict = field(default_factory=dict)
    onnx: object | None = None  # asymret.retrieval.export.OnnxEncoder with runtime: onnx

    @property
    def description(self) -> str:
        spec = self.pair.query_net.spec
        return f"{spec.backbone} ({self.pair.query_net.dim}-d, {spec.input.size} px)"


def space_difference(ours: dict, theirs: dict) -> str:
    """What differs between two gallery sides' network specs (:meth:`SideEncoder.network_spec`), in words."""
    from asymret.retrieval.gallery import PROVENANCE

    a = {k: v for k, v in ours["gallery_net"].items() if k not in PROVENANCE}
    b = {k: v for k, v in theirs["gallery_net"].items() if k not in PROVENANCE}
    if a != b:
        keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        return (f"the gallery network's spec ({', '.join(keys)}: {', '.join(repr(b.get(k)) for k in keys)} "
                f"instead of {', '.join(repr(a.get(k)) for k in keys)})")
    if ours["weights_sha256"] != theirs["weights_sha256"]:
        return (f"the gallery weights' hash ({theirs['weights_sha256'][:12]} instead of "
                f"{ours['weights_sha256'][:12]})")

    def whitening(w: dict | None) -> str:
        return f"{w['kind']} to {w['dim']}-d, hash {w['sha256'][:12]}" if w else "none"

    return f"the whitening ({whitening(theirs['whitening'])} instead of {whitening(ours['whitening'])})"


class Metrics:
    """Prometheus metrics in a registry of their own (several apps may live in one process)."""

    def __init__(self, service: Service):
        self.registry = CollectorRegistry()
        self.requests = Counter("asymret_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("asymret_http_request_seconds", "HTTP request latency", ["method", "route"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10),
                                 registry=self.registry)
        self.batch_size = Histogram("asymret_query_batch_size", "query images per query-network forward pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.registry.register(_IndexSizes(service))

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)


class _IndexSizes:
    """``asymret_gallery_items{gallery}``, read from the open galleries at scrape time."""

    def __init__(self, service: Service):
        self.service = service

    def collect(self):
        family = GaugeMetricFamily("asymret_gallery_items", "items in each open gallery", labels=["gallery"])
        for name, gallery in list(self.service.galleries.items()):
            family.add_metric([name], len(gallery))
        yield family


class Service:
    """Loads the pair and opens every gallery (:meth:`start`, in the background), then serves them."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.limits = ImageLimits(int(config.max_image_mb * 2**20), config.max_image_pixels,
                                  tuple(f.upper() for f in config.image_formats))
        self.uploads = config.galleries / UPLOADS
        self.metrics = Metrics(self)
        self.galleries: dict = {}
        self.query_nets: dict[str, QueryNet] = {}  # by name, the default first
        self.pair = self.store = None
        self.gallery_cost: dict = {}
        self.ready = threading.Event()
        self.error: str | None = None
        self._lock = threading.Lock()
        self.thumbnail = functools.lru_cache(maxsize=4096)(self._thumbnail)
        if not config.api_keys:
            log.warning("no API keys configured: anyone who can reach this server may add and delete")

    # ------------------------------------------------------------------------------- life cycle
    def start(self) -> threading.Thread:
        """Load in a background thread: /healthz answers at once, /readyz once everything is loaded."""
        thread = threading.Thread(target=self._load_logged, name="asymret-load", daemon=True)
        thread.start()
        return thread

    def _load_logged(self) -> None:
        try:
            self.load()
        except Exception as exc:
            self.error = str(exc) if isinstance(exc, AsymretError) else f"{type(exc).__name__}: {exc}"
            log.exception("could not load the pair and galleries")

    def load(self) -> None:
        from asymret.index import GalleryStore
        from asymret.retrieval.cost import encoder_cost

        self.device = torch_device(self.config.device)
        if self.config.torch_threads:
            import torch

            torch.set_num_threads(self.config.torch_threads)
        self._load_pairs()
        self.dim = self.pair.whitening.dim if self.pair.whitening is not None else self.pair.gallery_net.dim
        self.store = GalleryStore(self.config.galleries, self.config.db_url,
                                  device="auto" if self.device.type == "cuda" else "cpu")
        for summary in self.store.list():
            self._open(summary["name"])
        if self.config.runtime == "onnx":
            self._export_query_nets()
        self._warm_up()
        self.gallery_cost = encoder_cost(self.pair.gallery_net)
        for net in self.query_nets.values():  # before the workers start: the FLOP counter runs a forward pass
            net.cost = encoder_cost(net.pair.query_net)
            net.batcher = Batcher(functools.partial(self._encode_queries, net), max_batch=self.config.max_batch,
                                  max_wait_ms=self.config.max_wait_ms, on_batch=self.metrics.batch_size.observe,
                                  name=f"query-encoder-{net.name}")
        self.ready.set()
        log.info("serving %d galleries; query network(s) %s", len(self.galleries),
                 ", ".join(f"{n.name}: {n.description}" for n in self.query_nets.values()))

    def _load_pairs(self) -> None:
        """Every pair of the config; all must share the first one's gallery side (spec, weights, whitening)."""
        from asymret.retrieval.gallery import SideEncoder, embedding_space
        from asymret.retrieval.pair import load_pair

        nets: dict[str, QueryNet] = {}
        for name, path in self.config.pair_entries():
            pair = load_pair(path, device=self.device)
            name = name or str(pair.meta.get("run") or "") or path.stem
            if name in nets:
                raise ConfigError(f"pairs {nets[name].path} and {path} are both named '{name}'; name each query "
                                  "network with --pair NAME=PATH")
            spec = SideEncoder.gallery(pair).network_spec()  # hashes the weights: once per pair
            if not nets:
                self.pair, self.network_spec, self.space = pair, spec, embedding_space(spec)
            elif embedding_space(spec) != self.space:
                first = next(iter(nets.values()))
                raise ConfigError(f"pair '{name}' ({path}) has another gallery network than the first pair "
                                  f"'{first.name}' ({first.path}): {space_difference(self.network_spec, spec)}; "
                                  "serve together only pairs whose query networks were trained against the "
                                  "same gallery network, or run one server per gallery network")
            else:
                pair.gallery_net = self.pair.gallery_net  # the same network: keep one copy in memory
            nets[name] = QueryNet(name, path, pair)
        self.query_nets = nets

    def _export_query_nets(self) -> None:
        """runtime: onnx. Each query network (with the shared whitening and L2) as an ONNX graph in a folder that
        lives as long as the service, run by ONNX Runtime with the configured threads."""
        import tempfile

        from asymret.retrieval.export import OnnxEncoder, export_onnx

        self._onnx_dir = tempfile.TemporaryDirectory(prefix="asymret-serve-onnx-")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device.type == "cuda" else None
        for i, net in enumerate(self.query_nets.values()):
            path = export_onnx(net.pair.query_net, Path(self._onnx_dir.name) / f"query_{i}.onnx",
                               whitening=self.pair.whitening)
            net.onnx = OnnxEncoder(path, providers=providers, threads=self.config.torch_threads or None)

    def _warm_up(self) -> None:
        """One forward pass per network, so that the first request does not pay for lazy initialisation."""
        from PIL import Image

        blank = Image.new("RGB", (64, 64))
        for net in self.query_nets.values():
            self._encode_queries(net, [net.pair.query_net.transform(blank)])
        self._embed(self.pair.gallery_net, [self.pair.gallery_net.transform(blank)])

    def close(self) -> None:
        """Finish queued queries, checkpoint and close every gallery."""
        self.ready.clear()
        for net in self.query_nets.values():
            if net.batcher is not None:
                net.batcher.close()
        with self._lock:
            for gallery in self.galleries.values():
                gallery.close()
            self.galleries.clear()
        if self.store is not None:
            self.store.close()
        if getattr(self, "_onnx_dir", None) is not None:
            self._onnx_dir.cleanup()

    def check_ready(self) -> Service:
        if not self.ready.is_set():
            why = f"failed to load: {self.error}" if self.error else "still loading the pair and galleries"
            raise NotReadyError(f"the service is {why}; watch /readyz")
        return self

    def authorize(self, key: str | None, *, write: bool) -> None:
        """Writes need a configured key when keys are configured; reads only with ``keys_for_reads``."""
        keys = self.config.api_keys
        if not keys or not (write or self.config.keys_for_reads):
            return
        if key is None:
            raise ForbiddenError("this request needs an API key; send it in the X-API-Key header")
        if not any(hmac.compare_digest(key.encode(), k.encode()) for k in keys):
            raise ForbiddenError("the X-API-Key header holds no valid key; check the key")

    @property
    def default_query_net(self) -> QueryNet:
        return next(iter(self.query_nets.values()))

    @property
    def query_net_name(self) -> str:
        """The default query network's description (backbone, dimension, input size)."""
        return self.default_query_net.description

    def query_net(self, name: str | None = None) -> QueryNet:
        """The query network called ``name`` (the default one, the first pair's, for None or '')."""
        if not name:
            return self.default_query_net
        net = self.query_nets.get(name)
        if net is None:
            raise NotFoundError(f"no query network '{name[:64]}' on this server; it serves "
                                f"{', '.join(repr(n) for n in self.query_nets)} (see /v1/info)")
        return net

    # -------------------------------------------------------------------------------- galleries
    def _open(self, name: str):
        try:
            gallery = self.store.open(name)
        except ConflictError as exc:  # e.g. another process writes it: search a snapshot, refuse writes
            log.warning("%s; serving gallery '%s' read-only", exc, name)
            gallery = self.store.open(name, readonly=True)
        self.galleries[name] = gallery
        return gallery

    def gallery(self, name: str):
        """The open gallery ``name`` (opened now if another process created it since start-up)."""
        gallery = self.galleries.get(name)
        if gallery is None:
            with self._lock:
                gallery = self.galleries.get(name) or self._open(name)
        return gallery

    def create_gallery(self, name: str, factory: str):
        """An empty gallery for the pair's gallery network (its spec, weights and whitening hashes, as
        ``asymret index build`` records them)."""
        with self._lock:
            gallery = self.store.create(name, self.dim, factory, network_spec=self.network_spec)
            self.galleries[name] = gallery
            return gallery

    def delete_gallery(self, name: str) -> None:
        with self._lock:
            gallery = self.galleries.pop(name, None)
            if gallery is not None:
                gallery.close()
            self.store.delete(name)
            shutil.rmtree(self.uploads / name, ignore_errors=True)

    def compatible(self, gallery) -> bool:
        """Whether this pair's gallery side encodes into ``gallery``'s space (architecture, input, weights,
        whitening: :func:`~asymret.retrieval.gallery.embedding_space`); a gallery built from bare vectors
        records no network, and only its dimension can be checked."""
        from asymret.retrieval.gallery import embedding_space

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
        from asymret.retrieval.gallery import describe_network

        if not self.compatible(gallery):
            raise ConflictError(f"gallery '{gallery.name}' holds {gallery.dim}-d embeddings of "
                                f"{describe_network(gallery.network_spec)}, but this server's pair encodes "
                                f"{self.dim}-d with {describe_network(self.network_spec)}; serve the pair the "
                                "gallery was built with, or search it by vector")

    def search(self, gallery, vectors: np.ndarray, k: int, filters: dict | None):
        """``gallery.search`` on ``search_threads`` FAISS threads (OpenMP's setting is per calling thread)."""
        import faiss

        faiss.omp_set_num_threads(self.config.search_threads)
        return gallery.search(vectors, k, filters=filters)

    # --------------------------------------------------------------------------------- encoding
    def decode(self, data: bytes, name: str = "upload"):
        return decode_image(data, self.limits, name)

    def query_vectors(self, images, query_net: QueryNet | None = None) -> np.ndarray:
        """Embeddings of PIL images by ``query_net`` (the default one if None), each request's images
        coalesced with others' for the same network."""
        net = query_net or self.default_query_net
        transform = net.pair.query_net.transform
        futures = [net.batcher.submit(transform(image)) for image in images]
        return np.stack([future.result() for future in futures])

    def gallery_vectors(self, images) -> np.ndarray:
        """Gallery-network embeddings of PIL images (items being added)."""
        net = self.pair.gallery_net
        return self._embed(net, [net.transform(image) for image in images])

    def _encode_queries(self, net: QueryNet, tensors) -> np.ndarray:
        if net.onnx is None:
            return self._embed(net.pair.query_net, tensors)
        from asymret.retrieval.encode import shape_groups

        out = np.empty((len(tensors), net.onnx.dim), dtype=np.float32)
        for rows in shape_groups(tensors):  # one ONNX Runtime call per image shape (longer-side specs keep aspect)
            out[rows] = net.onnx.encode(np.stack([tensors[i].numpy() for i in rows]))  # whitened and L2 inside
        return out

    def _embed(self, encoder, tensors) -> np.ndarray:
        import torch.nn.functional as F

        from asymret.retrieval.encode import encode_tensors, inference

        # one whitening for all: the pairs share the gallery side, whitening included (its hash is in the space)
        with inference(self.device, None):
            x = encode_tensors(encoder, tensors, self.device)
            if self.pair.whitening is not None:
                x = self.pair.whitening(x)
            return F.normalize(x.float(), dim=-1).cpu().numpy()

    # ---------------------------------------------------------------------------- image files
    def image_from_path(self, path: str):
        """``(RGB image, real path)`` of a server file under the allowed roots."""
        real = resolve_under_roots(path, self.config.allowed_roots)
        return decode_image(real.read_bytes(), self.limits, f"file {path!r}"), real

    def save_upload(self, gallery: str, data: bytes) -> Path:
        """Keep an uploaded (already validated) gallery image: its thumbnail is served from it."""
        from PIL import Image

        folder = self.uploads / gallery
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{uuid.uuid4().hex}.{Image.open(io.BytesIO(data)).format.lower()}"
        path.write_bytes(data)
        return path.resolve()

    def forget_upload(self, path: str | None) -> None:
        if path and self.uploads.resolve() in Path(path).parents:
            Path(path).unlink(missing_ok=True)

    def item_image(self, path: str | None) -> Path:
        """The image file of an item, if it lies where this server may read (roots or uploads)."""
        if path:
            try:
                return resolve_under_roots(path, [*self.config.allowed_roots, self.uploads])
            except (ForbiddenError, NotFoundError):
                pass
        raise NotFoundError("this item has no image the server may show (added by path outside the "
                            "allowed roots, or the file is gone); add its folder with --allow-root")

    def _thumbnail(self, path: Path, mtime_ns: int) -> bytes:
        image = decode_image(path.read_bytes(), self.limits, f"item image {path.name}")
        image.thumbnail((self.config.thumbnail_px, self.config.thumbnail_px))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        return out.getvalue()
