"""One side of a pair as it encodes into a gallery: its encoder and the pair's whitening, and what a gallery
records of that network (spec and content hashes) so that a query network of another space is refused.

:func:`embedding_space` hashes what fixes the space (architecture, input spec, weights, whitening), not where
the weights were read from; :func:`check_space` compares a gallery's record with a pair's gallery side.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asymret.config import load_tree, validate
from asymret.errors import ConflictError
from asymret.index.backend import GalleryBackend
from asymret.retrieval.encode import encode_images, encode_records
from asymret.retrieval.encoders import Encoder, create_encoder
from asymret.retrieval.pair import Pair, weights_hash
from asymret.retrieval.records import ImageRecord
from asymret.retrieval.specs import EncoderSpec
from asymret.retrieval.whitening import Whitening

log = logging.getLogger(__name__)
PROVENANCE = ("weights", "pretrained")  # where an encoder's weights came from, not what it computes


@dataclass
class SideEncoder:
    """One side of a pair: its encoder, then the gallery network's whitening when the pair has one."""

    encoder: Encoder
    whitening: Whitening | None = None

    @classmethod
    def gallery(cls, pair: Pair) -> SideEncoder:
        return cls(pair.gallery_net, pair.whitening)

    @classmethod
    def query(cls, pair: Pair) -> SideEncoder:
        return cls(pair.query_net, pair.whitening)

    @property
    def dim(self) -> int:
        return self.whitening.dim if self.whitening is not None else self.encoder.dim

    def whiten(self, x: np.ndarray) -> np.ndarray:
        return self.whitening(x) if self.whitening is not None else x

    def encode_records(self, records: Sequence[ImageRecord], **kw) -> np.ndarray:
        return self.whiten(encode_records(self.encoder, records, **kw))

    def encode_images(self, images, device=None) -> np.ndarray:
        return self.whiten(encode_images(self.encoder, images, device=device))

    def network_spec(self) -> dict:
        """What a gallery stores about the network that encoded it: spec and content hashes."""
        w = self.whitening
        whitening = None
        if w is not None:
            digest = hashlib.sha256(w.m.cpu().numpy().tobytes() + w.P.cpu().numpy().tobytes()).hexdigest()
            whitening = {"kind": w.kind, "dim": w.dim, "sha256": digest}
        return {"gallery_net": self.encoder.spec.model_dump(mode="json"),
                "weights_sha256": weights_hash(self.encoder), "whitening": whitening}


def embedding_space(network_spec: dict) -> str:
    """A hash of what fixes the embedding space (architecture, input spec, weights, whitening), not
    of where the weights were read from: equal hashes, interchangeable embeddings."""
    spec = {k: v for k, v in network_spec["gallery_net"].items() if k not in PROVENANCE}
    return hashlib.sha256(json.dumps({**network_spec, "gallery_net": spec}, sort_keys=True).encode()).hexdigest()


def recorded_by_us(network_spec: dict | None) -> bool:
    """Whether ``network_spec`` was written by :meth:`SideEncoder.network_spec` (not by another tool)."""
    return isinstance(network_spec, dict) and {"gallery_net", "weights_sha256", "whitening"} <= set(network_spec)


def describe_network(network_spec: dict | None) -> str:
    if not recorded_by_us(network_spec):
        return f"unknown network ({json.dumps(network_spec)[:80] if network_spec else 'built from precomputed embeddings'})"
    net, white = network_spec["gallery_net"], network_spec["whitening"]
    return (f"{net['backbone']} at {net['input']['size']} px, weights {network_spec['weights_sha256'][:12]}"
            + (f", {white['kind']} whitening to {white['dim']}-d" if white else ""))


def check_space(gallery: GalleryBackend, side: SideEncoder) -> None:
    """ConflictError unless ``side`` (a pair's gallery side) encodes into the space ``gallery`` holds."""
    if not recorded_by_us(gallery.network_spec):
        log.warning("gallery '%s' records no gallery network; cannot check that the pair fits it", gallery.name)
        return
    ours = side.network_spec()
    if embedding_space(gallery.network_spec) != embedding_space(ours):
        raise ConflictError(f"gallery '{gallery.name}' was encoded by {describe_network(gallery.network_spec)}, "
                            f"but this pair's gallery network is {describe_network(ours)}; use the pair "
                            "whose gallery network built the gallery, or rebuild it")


def gallery_encoder(spec_path, weights=None) -> Encoder:
    """An encoder from a YAML spec (an encoder spec, or any config with a ``gallery_net`` section);
    ``weights`` (a local checkpoint) overrides the spec's ``weights``."""
    tree, _ = load_tree(spec_path)
    tree = tree.get("gallery_net", tree)
    if weights is not None:
        tree = {**tree, "weights": str(Path(weights).expanduser())}
    return create_encoder(validate(tree, EncoderSpec, source=str(spec_path))).eval()
