"""The search service behind the REST API: one or more pairs, one gallery store, one query-encoding
worker per query network.

Asymmetric retrieval at serve time: the GALLERY network encodes the items added through the API (as
it encoded the offline database), a small QUERY network encodes every query image, and both land
in one space, whitened by the pair's whitening when it has one (AML's asymmetric test setting).
Several pairs may be served together when they share the gallery network (the same
:func:`~asymret.retrieval.sides.embedding_space`): each query network trained against it (a phone-size
one, a server-size one) searches the same galleries, and a request names the one it wants.
Query encodes are coalesced into batches by one :class:`~asymret.api.batcher.Batcher` per query
network, so a batch never mixes networks.

The service owns the life cycle (load in the background, ready, close) and the encoding; beside it, each
job in its module: settings (:mod:`~asymret.api.settings`), API keys (:mod:`~asymret.api.auth`), metrics
(:mod:`~asymret.api.metrics`), the open galleries (:mod:`~asymret.api.registry`), images taken in and kept
(:mod:`~asymret.api.uploads`), the readiness probe (:mod:`~asymret.api.probe`) and coalescing
(:mod:`~asymret.api.batcher`).
"""

from __future__ import annotations

import functools
import logging
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from PIL import Image

from asymret.api.auth import ApiKeys
from asymret.api.batcher import Batcher
from asymret.api.metrics import Metrics
from asymret.api.probe import DatabaseProbe
from asymret.api.registry import SNAPSHOTS, GalleryRegistry
from asymret.api.settings import ServeConfig
from asymret.api.uploads import UPLOADS, ImageLimits, Uploads
from asymret.errors import AsymretError, ConfigError, NotFoundError, NotReadyError
from asymret.index.backend import open_store
from asymret.retrieval.cost import encoder_cost
from asymret.retrieval.encode import encode_tensors, inference, shape_groups
from asymret.retrieval.export import OnnxEncoder, export_onnx
from asymret.retrieval.pair import load_pair
from asymret.retrieval.sides import PROVENANCE, SideEncoder, embedding_space
from asymret.runtime import resolve_device, set_threads

log = logging.getLogger("asymret.serve")


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


class Service:
    """Loads the pair and opens every gallery (:meth:`start`, in the background), then serves them."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.limits = ImageLimits(int(config.max_image_mb * 2**20), config.max_image_pixels,
                                  tuple(f.upper() for f in config.image_formats))
        self.uploads = Uploads(config.galleries / UPLOADS, self.limits, config.allowed_roots,
                               thumbnail_px=config.thumbnail_px)
        self.keys = ApiKeys(config.api_keys, for_reads=config.keys_for_reads)
        self.probe, self.ready_timeout_s = DatabaseProbe(), config.ready_timeout_s
        self.metrics = Metrics(self)
        self.registry: GalleryRegistry | None = None  # once loaded
        self.query_nets: dict[str, QueryNet] = {}  # by name, the default first
        self.pair = self.store = None
        self.gallery_cost: dict = {}
        self.ready = threading.Event()
        self.error: str | None = None

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
        self.device = resolve_device(self.config.device, fix="serve with --device cpu", error=NotReadyError)
        set_threads(self.config.torch_threads)
        self._load_pairs()
        self.dim = self.pair.whitening.dim if self.pair.whitening is not None else self.pair.gallery_net.dim
        self.store = open_store(self.config.backend, self.config.galleries, uri=self.config.uri,
                                token=self.config.token, db_url=self.config.db_url,
                                device="auto" if self.device.type == "cuda" else "cpu")
        self.registry = GalleryRegistry(self.store, dim=self.dim, network_spec=self.network_spec, space=self.space,
                                        uploads=self.uploads, snapshots=self.config.galleries / SNAPSHOTS,
                                        search_threads=self.config.search_threads)
        for summary in self.store.list():
            try:
                self.registry.open(summary["name"])
            except AsymretError as exc:  # one broken gallery must not keep the others from serving
                log.error("gallery '%s' is not served: %s", summary["name"], exc)
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
        log.info("serving %d galleries; query network(s) %s", len(self.registry),
                 ", ".join(f"{n.name}: {n.description}" for n in self.query_nets.values()))

    def _load_pairs(self) -> None:
        """Every pair of the config; all must share the first one's gallery side (spec, weights, whitening)."""
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
        self._onnx_dir = tempfile.TemporaryDirectory(prefix="asymret-serve-onnx-")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device.type == "cuda" else None
        for i, net in enumerate(self.query_nets.values()):
            path = export_onnx(net.pair.query_net, Path(self._onnx_dir.name) / f"query_{i}.onnx",
                               whitening=self.pair.whitening)
            net.onnx = OnnxEncoder(path, providers=providers, threads=self.config.torch_threads or None)

    def _warm_up(self) -> None:
        """One forward pass per network, so that the first request does not pay for lazy initialisation."""
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
        if self.registry is not None:
            self.registry.close()
        elif self.store is not None:
            self.store.close()
        self.probe.close()
        if getattr(self, "_onnx_dir", None) is not None:
            self._onnx_dir.cleanup()

    def database_problem(self) -> str | None:
        """None when the loaded store's database answers a probe within ``ready_timeout_s``, else why not."""
        return self.probe.check(self.store.ping, self.ready_timeout_s)

    def check_ready(self) -> Service:
        if not self.ready.is_set():
            why = f"failed to load: {self.error}" if self.error else "still loading the pair and galleries"
            raise NotReadyError(f"the service is {why}; watch /readyz")
        return self

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

    # --------------------------------------------------------------------------------- encoding
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
        out = np.empty((len(tensors), net.onnx.dim), dtype=np.float32)
        for rows in shape_groups(tensors):  # one ONNX Runtime call per image shape (longer-side specs keep aspect)
            out[rows] = net.onnx.encode(np.stack([tensors[i].numpy() for i in rows]))  # whitened and L2 inside
        return out

    def _embed(self, encoder, tensors) -> np.ndarray:
        # one whitening for all: the pairs share the gallery side, whitening included (its hash is in the space)
        with inference(self.device, None):
            x = encode_tensors(encoder, tensors, self.device)
            if self.pair.whitening is not None:
                x = self.pair.whitening(x)
            return F.normalize(x.float(), dim=-1).cpu().numpy()

