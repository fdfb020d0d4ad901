"""Embeddings computed once per (network weights, images, input spec) and memory-mapped from disk.

A frozen gallery network never runs twice on the same image (DESIGN.md performance rules): the
trainer mines and computes losses against these rows, and evaluation reuses them for the database.
The key covers the weights (content hash), the input spec (resolution, normalisation, scales) and
the image list (paths and query boxes); change any of them and a new entry is computed. Entries are
written to a temporary name and renamed when complete, so an interrupted run never leaves a
half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from asymret.retrieval.encode import encode_records
from asymret.retrieval.encoders import Encoder
from asymret.retrieval.pair import weights_hash
from asymret.retrieval.records import ImageRecord

log = logging.getLogger(__name__)
# 2: VGG maps end at conv5 (pool5 dropped, as cirtorch) and fc heads normalise before the layer: same weights,
# other embeddings, so older entries must not be reused.
CACHE_VERSION = 2


def records_fingerprint(records: Sequence[ImageRecord]) -> str:
    digest = hashlib.sha256()
    for r in records:
        digest.update(f"{r.path}|{r.bbx}\n".encode())
    return digest.hexdigest()


def cache_key(encoder: Encoder, records: Sequence[ImageRecord]) -> str:
    parts = {
        "version": CACHE_VERSION,
        "weights": weights_hash(encoder),
        "input": encoder.spec.input.model_dump(mode="json"),
        "records": records_fingerprint(records),
        "count": len(records),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


class EmbeddingCache:
    """``cache.get(encoder, records)`` -> read-only ``(N, dim)`` float32 memmap, computed at most once.

    An entry is a folder of named ``.npy`` arrays plus ``meta.json``: ``embeddings.npy`` for :meth:`get`, any
    names for :meth:`get_arrays` (e.g. the re-ID recipe's raw and local head features of a frozen gallery).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def path(self, key: str) -> Path:
        return self.root / key / "embeddings.npy"

    def peek(self, encoder: Encoder, records: Sequence[ImageRecord]) -> np.ndarray | None:
        """The entry for ``encoder`` on ``records`` if one was computed before, else None (nothing is encoded)."""
        path = self.path(cache_key(encoder, records))
        return np.load(path, mmap_mode="r") if path.is_file() else None

    def get(self, encoder: Encoder, records: Sequence[ImageRecord], *, batch_size: int = 32,
            num_workers: int = 2, device=None, progress: bool = True, key: str | None = None,
            amp: bool = False) -> np.ndarray:
        key = (key or cache_key(encoder, records)) + ("-bf16" if amp else "")  # bf16 rows are other rows
        path = self.path(key)
        if path.is_file():
            log.debug("embedding cache hit %s", path)
            return np.load(path, mmap_mode="r")

        def compute(folder: Path) -> dict:
            embeddings = encode_records(encoder, records, batch_size=batch_size, num_workers=num_workers,
                                        device=device, progress=progress, amp=amp)
            np.save(folder / path.name, embeddings)
            return {"backbone": encoder.spec.backbone, "count": len(records), "dim": int(embeddings.shape[1])}

        self._commit(path.parent, compute)
        return np.load(path, mmap_mode="r")

    def get_arrays(self, key: str, names: Sequence[str], compute: Callable[[Path], dict]) -> dict[str, np.ndarray]:
        """The arrays ``names`` of entry ``key`` as read-only memmaps; when the entry is missing,
        ``compute(folder)`` first writes ``<name>.npy`` for each name into a fresh folder (e.g. with
        ``np.lib.format.open_memmap``, so nothing large is held in memory) and returns the entry's metadata."""
        folder = self.root / key
        if not all((folder / f"{n}.npy").is_file() for n in names):
            self._commit(folder, compute)
        return {n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in names}

    @staticmethod
    def _commit(folder: Path, compute: Callable[[Path], dict]) -> None:
        """Run ``compute`` into a temporary folder, fsync its arrays and rename it to ``folder``."""
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            meta = compute(tmp)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            for array in tmp.glob("*.npy"):
                with open(array, "rb") as f:
                    os.fsync(f.fileno())
            try:
                os.rename(tmp, folder)
            except OSError:  # another process finished the same entry first: keep theirs
                if not folder.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
