"""The pair file (``pair.pt``): everything ``asymret serve --pair`` needs, in one file.

It holds both encoders' full specs and weights, each network's optional learned whitening and
metadata (created, asymret version, run name). ``format_version`` is an int; each version keeps its
own loader so old files keep loading, and a file from a newer asymret is refused with a clear message.

Layout of format 3 (a ``torch.save`` dict of plain data and tensors, read with ``weights_only``)::

    {"format": "asymret.pair", "format_version": 3,
     "query_net": {"spec": {...}, "state_dict": {...}}, "gallery_net": {...},
     "whitening": None | {"kind", "m", "P", ["info"]}, "meta": {"created", "asymret_version", ...},
     "reference_gallery_net": None | {"spec", "state_dict"},
     "query_whitening": None | {...}, "reference_gallery_whitening": None | {...}}

``whitening`` is the **gallery network's**: asymmetric testing, ``asymret index build`` and ``serve``
apply it to both sides (AML). ``query_whitening`` (new in format 3) is the query network's own, for
the symmetric rows; ``reference_gallery_whitening`` the pre-co-training gallery's, for an ACD pair's
gallery-alone row (docs/whitening.md). ``reference_gallery_net`` (new in format 2) is the gallery
network as it was before ACD co-training: the gallery-alone row of ``asymret evaluate``, next to SIR
(the co-trained gallery with itself). Format 2 is format 3 without the two ``*_whitening`` keys,
format 1 is format 2 without ``reference_gallery_net``.
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
from asymret.files import atomic_write
from asymret.retrieval.checkpoints import load_torch_file
from asymret.retrieval.encoders import (
    UNREADABLE_CHECKPOINT,
    Encoder,
    create_encoder,
    encoder_checkpoint,
    key_mismatch,
)
from asymret.retrieval.whitening import Whitening

FORMAT = "asymret.pair"
FORMAT_VERSION = 3


@dataclass
class Pair:
    """A query network and the gallery network whose space it searches."""

    query_net: Encoder
    gallery_net: Encoder
    whitening: Whitening | None = None  # the gallery network's: both sides of asymmetric search
    meta: dict = field(default_factory=dict)
    reference_gallery: Encoder | None = None  # the gallery before co-training (ACD), else None
    query_whitening: Whitening | None = None  # the query network's own: symmetric rows
    reference_whitening: Whitening | None = None  # the reference gallery's own (ACD): its gallery-alone row

    @property
    def co_trained(self) -> bool:
        return self.reference_gallery is not None

    def whitenings(self) -> dict[str, Whitening | None]:
        """Each network's whitening by the pair-file key of its network (what ``evaluate_pair`` takes)."""
        return {"query_net": self.query_whitening, "gallery_net": self.whitening,
                "reference_gallery_net": self.reference_whitening}


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
    query_whitening: Whitening | None = None,
    reference_whitening: Whitening | None = None,
) -> Path:
    """Write a pair file atomically (temporary file, then rename). ``meta``: JSON-like extras, e.g. ``{"run": name}``.

    ``whitening`` is the gallery network's, ``query_whitening`` the query network's and
    ``reference_whitening`` the reference gallery's; each must take its network's embedding size.
    """
    for name, net, white in (("gallery_net", gallery_net, whitening), ("query_net", query_net, query_whitening),
                             ("reference_gallery_net", reference_gallery, reference_whitening)):
        if white is not None and (net is None or white.input_dim != net.dim):
            raise InputError(f"the {name} whitening takes {white.input_dim}-d descriptors but the {name} "
                             f"{'is absent' if net is None else f'gives {net.dim}-d'}; learn it on that network")
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
        "query_whitening": query_whitening.state_dict() if query_whitening is not None else None,
        "reference_gallery_whitening": reference_whitening.state_dict() if reference_whitening is not None else None,
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
        payload = load_torch_file(path)
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
    for white in (pair.whitening, pair.query_whitening, pair.reference_whitening):
        if white is not None:
            white.to(device)
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


def _whitening_v3(entry, path: Path, name: str, net: Encoder | None) -> Whitening | None:
    if entry is None:
        return None
    white = Whitening.from_state_dict(entry)
    if net is None or white.input_dim != net.dim:
        raise DataError(f"{path}: the {name} takes {white.input_dim}-d descriptors but its network gives "
                        f"{'none' if net is None else f'{net.dim}-d'}; learn it again with asymret whiten")
    return white


def _load_v3(payload: dict, path: Path) -> Pair:
    pair = _load_v2(payload, path)
    pair.query_whitening = _whitening_v3(payload.get("query_whitening"), path, "query_whitening", pair.query_net)
    pair.reference_whitening = _whitening_v3(payload.get("reference_gallery_whitening"), path,
                                             "reference_gallery_whitening", pair.reference_gallery)
    return pair


# One loader per format version ever written; add one (never edit an old one) when the layout changes.
LOADERS = {1: _load_v1, 2: _load_v2, 3: _load_v3}
