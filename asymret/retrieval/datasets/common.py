"""What every reader shares: the folder and list-file checks, plain-data pickles, contiguous labels and
:class:`LabelledSet`, the records a sampler or miner trains on.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from asymret.errors import DataError
from asymret.retrieval.records import ImageRecord

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def existing_dir(root, expected: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset root not found: {root}; expected a folder holding {expected}")
    return root


def read_lines(path: Path, what: str) -> list[str]:
    """Stripped lines of a text list (CRLF tolerated); blank lines stay so line numbers stay true."""
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (FileNotFoundError, IsADirectoryError):
        raise DataError(f"{what} not found: expected the file {path}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a UTF-8 text list; expected {what}") from None


class _PlainUnpickler(pickle.Unpickler):
    """Ground-truth pickles hold lists, dicts, numbers and at most numpy arrays; any other global
    would run code while loading, so it is refused."""

    _ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
                for n in ("_reconstruct", "scalar")} | {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it references {module}.{name}, not plain data")


def load_pickle(path: Path, what: str):
    try:
        with open(path, "rb") as f:
            return _PlainUnpickler(f, encoding="latin1").load()  # latin1: Python 2 era pickles too
    except (FileNotFoundError, IsADirectoryError):
        raise DataError(f"{what} not found: expected the file {path}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as exc:
        raise DataError(f"{path} is not a readable {what} ({exc}); replace it with the original file") from None


def require_keys(obj, keys, where: str) -> None:
    if not isinstance(obj, dict):
        raise DataError(f"{where} must be a dict with keys {', '.join(keys)}, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DataError(f"{where} lacks the key(s) {', '.join(missing)}")


def valid_indices(values, n: int) -> bool:
    """A 1-D collection of integers in ``0..n-1`` (empty is fine)."""
    try:
        arr = np.asarray(values)
    except ValueError:  # ragged nesting
        return False
    return arr.ndim == 1 and (arr.size == 0 or (arr.dtype.kind in "iu" and arr.min() >= 0 and arr.max() < n))


def require_files(paths, source: str, hint: str) -> None:
    """One error for all missing images: their count and the first few paths."""
    paths = list(paths)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        first = ", ".join(str(p) for p in missing[:3])
        raise DataError(f"{len(missing)} of {len(paths)} images named in {source} are missing "
                        f"(first: {first}); {hint}")


def contiguous(raw) -> np.ndarray:
    """Labels 0..C-1 in sorted order of the raw values (identities, clusters, folder names)."""
    return np.unique(np.asarray(raw), return_inverse=True)[1].astype(np.int64)


class LabelledSet(Sequence):
    """Records with contiguous labels: what every trainable reader offers a sampler or miner.

    Positives for training are "same label" (the metric-learning convention of
    pytorch-metric-learning's miners): :meth:`positives` gives them for one record.
    """

    def __init__(self, records: list[ImageRecord]):
        self.records = records
        self.labels = np.array([r.label for r in records], dtype=np.int64)
        self._groups: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def positives(self, index: int) -> np.ndarray:
        """Indices of the other records with the label of record ``index``, ascending."""
        if self._groups is None:
            order = np.argsort(self.labels, kind="stable")
            bounds = np.flatnonzero(np.diff(self.labels[order])) + 1
            self._groups = np.split(order, bounds)
        group = self._groups[self.labels[index]]
        return group[group != index]
