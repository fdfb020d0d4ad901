"""The files ``asymret evaluate features`` and ``asymret index build --embeddings`` read: descriptor arrays
(``.npy``), name lists (one image name per line) and re-ID metadata CSVs (``identity[,camera][,path]``)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from asymret.errors import DataError


def load_features(path: str | Path, what: str) -> np.ndarray:
    """A ``.npy`` file of features (memory-mapped; rows = images in list order)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{what} file {path} is not a .npy array ({exc}); save features with numpy.save") from None


def read_names(path, what: str) -> list[str]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_meta(path) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """A re-ID metadata CSV with header ``identity,camera`` (camera optional; ``path`` optional)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"metadata CSV not found: {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        if "identity" not in fields:
            raise DataError(f"{path}: needs a header with an 'identity' column (and optionally 'camera', "
                            f"'path'); found {fields or 'no header'}")
        rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    ids = np.array([r["identity"] for r in rows])
    cams = None
    if "camera" in fields and all(r["camera"] for r in rows):
        try:
            cams = np.array([int(r["camera"]) for r in rows])
        except ValueError:
            cams = np.array([r["camera"] for r in rows])
    paths = [r["path"] for r in rows] if "path" in fields else None
    return ids, cams, paths
