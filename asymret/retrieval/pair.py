"""The pair file (``pair.pt``): everything ``asymret serve --pair`` needs, in one file.

It holds both encoders' full specs and weights, the optional whitening (the gallery network's,
applied to both sides in asymmetric testing) and metadata (created, asymret version, run name).
``format_version`` is an int; each version keeps its own loader so old files keep loading, and a
file from a newer asymret is refused with a clear message.

Layout of format 2 (a ``torch.save`` dict of plain data and tensors, read with ``weights_only``)::

    {"format": "asymret.pair", "format_version": 1,
     "query_net": {"spec": {...}, "state_dict": {...}}, "gallery_net": {...},
     "whitening": None | {"kind", "m", "P"}, "meta": {"created", "asymret_version", ...},
     "reference_gallery_net": None | {"spec", "state_dict"}}

``reference_gallery_net`` (new in format 2) is the gallery network as it was before ACD co-training:
the gallery-alone row of ``asymret evaluate``, next to SIR (the co-trained gallery with itself).
Format 1 is format 2 without that key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn

from asymret import __version__
from asymret.errors import DataError, InputError, NotFoundError
from asymret.index.files import atomic_write
from asymret.retrieval.encoders import (
    UNREADABLE_CHECKPOINT,
    Encoder,
    create_encoder,
    encoder_checkpoint,
    key_mismatch,
)
from asymret.retrieval.whitening import Whitening

FORMAT = "asymret.pair"
FORMAT_VERSION = 2


@dataclass
class Pair:
    """A query network and the gallery network whose space it searches."""

    query_net: Encoder
    gallery_net: Encoder
    whitening: Whitening | None = None
    meta: dict = field(default_factory=dict)
    reference_gallery: Encoder | None = None  # the gallery before co-training (ACD), else None

    @property
    def co_trained(self) -> bool:
        return self.reference_gallery is not None


def weights_hash(module: nn.Module) -> str:
    """SHA-256 over a module's state dict (names, dtypes, shapes, bytes): a cache key for its weights.

    Independent of device and of save/load. It covers weights only; key caches on the encoder's
    input spec too when the same weights run at several resolutions.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_pair(
    path: str | Path,
    query_net: Encoder,
    gallery_net: Encoder,
    whitening: Whitening | None = None,
    meta: dict | None = None,
    reference_gallery: Encoder | None = None,
) -> Path:
    """Write a pair file atomically (temporary file, then rename). ``meta``: JSON-like extras, e.g. ``{"run": name}``."""
    meta = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "asymret_version": __version__,
        **(meta or {}),
    }
    try:
        meta = json.loads(json.dumps(meta))
    except (TypeError, ValueError) as exc:
        raise InputError(f"pair metadata must be JSON-like (str, numbers, lists, dicts): {exc}") from None
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "query_net": encoder_checkpoint(query_net),
        "gallery_net": encoder_checkpoint(gallery_net),
        "whitening": whitening.state_dict() if whitening is not None else None,
        "meta": meta,
        "reference_gallery_net": encoder_checkpoint(reference_gallery) if reference_gallery is not None else None,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path


def load_pair(path: str | Path, device="cpu") -> Pair:
    """Read a pair file of any known format version; encoders come back in eval mode on ``device``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise NotFoundError(f"pair file not found: {path}; pass the pair.pt a training run wrote")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except UNREADABLE_CHECKPOINT as exc:
        raise DataError(f"{path} is not a readable pair file ({type(exc).__name__}); re-export it") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DataError(f"{path} is not an asymret pair file; pass the pair.pt a training run wrote")
    version = payload.get("format_version")
    if version not in LOADERS:
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise DataError(
                f"{path} has pair format {version}, newer than this asymret ({__version__}) reads "
                f"(up to {FORMAT_VERSION}); upgrade asymret"
            )
        raise DataError(f"{path} has an unknown pair format version {version!r}; re-export it")
    pair = LOADERS[version](payload, path)
    pair.query_net.to(device).eval()
    pair.gallery_net.to(device).eval()
    if pair.reference_gallery is not None:
        pair.reference_gallery.to(device).eval()
    if pair.whitening is not None:
        pair.whitening.to(device)
    return pair


def _encoder_v1(entry: dict, path: Path, side: str) -> Encoder:
    try:
        encoder = create_encoder(entry["spec"], load_weights=False)
    except ValidationError as exc:
        raise DataError(
            f"{side} in {path} has a spec this asymret cannot read ({exc.errors()[0]['msg']})"
        ) from None
    if problem := key_mismatch(encoder, entry["state_dict"]):
        raise DataError(
            f"{side} weights in {path} do not fit its own spec: {problem}; re-export the pair file"
        )
    encoder.load_state_dict(entry["state_dict"], strict=True)
    return encoder


def _load_v1(payload: dict, path: Path) -> Pair:
    whitening = payload["whitening"]
    return Pair(
        query_net=_encoder_v1(payload["query_net"], path, "query_net"),
        gallery_net=_encoder_v1(payload["gallery_net"], path, "gallery_net"),
        whitening=Whitening.from_state_dict(whitening) if whitening is not None else None,
        meta=payload["meta"],
    )


def _load_v2(payload: dict, path: Path) -> Pair:
    pair = _load_v1(payload, path)
    reference = payload.get("reference_gallery_net")
    if reference is not None:
        pair.reference_gallery = _encoder_v1(reference, path, "reference_gallery_net")
    return pair


# One loader per format version ever written; add one (never edit an old one) when the layout changes.
LOADERS = {1: _load_v1, 2: _load_v2}
