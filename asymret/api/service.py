"""The search service behind the REST API: one pair, one gallery store, one query-encoding worker.

Asymmetric retrieval at serve time: the GALLERY network encodes the items added through the API (as
it encoded the offline database), the small QUERY network encodes every query image, and both land
in one space, whitened by the pair's whitening when it has one (AML's asymmetric test setting).
Query encodes are coalesced into batches by a :class:`~asymret.api.batcher.Batcher`.
"""

from __future__ import annotations

import functools
import hmac
import io
import logging
import shutil
import threading
import uuid
from pathlib import Path
from typing import Literal

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field

from asymret.api.batcher import Batcher
from asymret.api.uploads import ImageLimits, decode_image, resolve_under_roots
from asymret.errors import AsymretError, ConflictError, ForbiddenError, NotFoundError

log = logging.getLogger("asymret.serve")
UPLOADS = "_uploads"  # under the galleries folder; gallery names cannot start with '_'


class ServeConfig(BaseModel):
    """``asymret serve`` settings (a YAML file, flags on top)."""

    model_config = ConfigDict(extra="forbid")

    pair: Path = Field(description="pair.pt written by asymret train: both networks and the whitening")
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
    search_threads: int = Field(1, ge=1, description="FAISS threads per search: concurrency comes from the "
                                                     "requests, and waking a thread team costs more than a "
                                                     "small search (raise it for large batch searches)")


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
        self.pair = self.store = self.batcher = None
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
        from asymret.retrieval.gallery import SideEncoder, embedding_space
        from asymret.retrieval.pair import load_pair

        self.device = torch_device(self.config.device)
        if self.config.torch_threads:
            import torch

            torch.set_num_threads(self.config.torch_threads)
        self.pair = load_pair(self.config.pair, device=self.device)
        self.dim = self.pair.whitening.dim if self.pair.whitening is not None else self.pair.gallery_net.dim
        self.network_spec = SideEncoder.gallery(self.pair).network_spec()  # hashes the weights: once
        self.space = embedding_space(self.network_spec)
        self.store = GalleryStore(self.config.galleries, self.config.db_url,
                                  device="auto" if self.device.type == "cuda" else "cpu")
        for summary in self.store.list():
            self._open(summary["name"])
        self._warm_up()
        self.batcher = Batcher(self._encode_queries, max_batch=self.config.max_batch,
                               max_wait_ms=self.config.max_wait_ms, on_batch=self.metrics.batch_size.observe,
                               name="query-encoder")
        self.ready.set()
        log.info("serving %d galleries; query network %s", len(self.galleries), self.query_net_name)

    def _warm_up(self) -> None:
        """One forward pass per network, so that the first request does not pay for lazy initialisation."""
        from PIL import Image

        blank = Image.new("RGB", (64, 64))
        for net in (self.pair.query_net, self.pair.gallery_net):
            self._embed(net, [net.transform(blank)])

    def close(self) -> None:
        """Finish queued queries, checkpoint and close every gallery."""
        self.ready.clear()
        if self.batcher is not None:
            self.batcher.close()
        with self._lock:
            for gallery in self.galleries.values():
                gallery.close()
            self.galleries.clear()
        if self.store is not None:
            self.store.close()

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
    def query_net_name(self) -> str:
        spec = self.pair.query_net.spec
        return f"{spec.backbone} ({self.pair.query_net.dim}-d, {spec.input.size} px)"

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

    def query_vectors(self, images) -> np.ndarray:
        """Query-network embeddings of PIL images, each request's images coalesced with others'."""
        transform = self.pair.query_net.transform
        futures = [self.batcher.submit(transform(image)) for image in images]
        return np.stack([future.result() for future in futures])

    def gallery_vectors(self, images) -> np.ndarray:
        """Gallery-network embeddings of PIL images (items being added)."""
        net = self.pair.gallery_net
        return self._embed(net, [net.transform(image) for image in images])

    def _encode_queries(self, tensors) -> np.ndarray:
        return self._embed(self.pair.query_net, tensors)

    def _embed(self, encoder, tensors) -> np.ndarray:
        import torch.nn.functional as F

        from asymret.retrieval.encode import encode_tensors, inference

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
