"""The gallery's write-ahead journal: vector adds and removes since the index file was last saved.

Saving a whole FAISS index per acknowledged batch would cost O(gallery) per batch, so each batch is
appended here (and fsynced) before its metadata commits, and the index file is rewritten only at a
checkpoint, after which the journal is emptied. Each record carries the operation's sequence number;
on open, the gallery replays the records whose number the database committed and drops the others.

Record layout (little-endian): magic ``AJR1``, header ``seq u64, kind u8, n u32, dim u32``, payload
(``n`` int64 ids, then for adds ``n x dim`` float32 vectors), then CRC32 of header + payload. A torn
or corrupt tail (a crash mid-append) ends the journal: everything after it is discarded.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asymret.files import fsync_dir

MAGIC = b"AJR1"
HEADER = struct.Struct("<QBII")
CRC = struct.Struct("<I")
ADD, REMOVE = 1, 2


@dataclass(frozen=True)
class Record:
    seq: int
    kind: int  # ADD or REMOVE
    ids: np.ndarray
    vectors: np.ndarray | None  # (n, dim) for ADD


class Journal:
    """Append-only, fsynced file of :class:`Record`; :meth:`read` returns its valid prefix."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def append(self, seq: int, kind: int, ids: np.ndarray, vectors: np.ndarray | None = None) -> int:
        """Write one record durably; returns the offset it starts at (for :meth:`truncate`)."""
        ids = np.ascontiguousarray(ids, np.int64)
        dim = 0 if vectors is None else vectors.shape[1]
        body = HEADER.pack(seq, kind, len(ids), dim) + ids.tobytes()
        if vectors is not None:
            body += np.ascontiguousarray(vectors, np.float32).tobytes()
        created = not self.path.exists()
        with open(self.path, "ab") as f:
            offset = f.tell()
            f.write(MAGIC + body + CRC.pack(zlib.crc32(body)))
            f.flush()
            os.fsync(f.fileno())
        if created:
            fsync_dir(self.path.parent)
        return offset

    def read(self) -> tuple[list[Record], int]:
        """``(records, valid_bytes)``: every whole record up to the first torn or corrupt one."""
        data = self.path.read_bytes() if self.path.exists() else b""
        records, pos = [], 0
        while pos + len(MAGIC) + HEADER.size <= len(data) and data[pos:pos + 4] == MAGIC:
            seq, kind, n, dim = HEADER.unpack_from(data, pos + 4)
            end = pos + 4 + HEADER.size + 8 * n + 4 * n * dim
            if end + CRC.size > len(data) or kind not in (ADD, REMOVE):
                break
            body = data[pos + 4:end]
            if CRC.unpack_from(data, end)[0] != zlib.crc32(body):
                break
            ids = np.frombuffer(body, np.int64, n, HEADER.size)
            vectors = np.frombuffer(body, np.float32, n * dim, HEADER.size + 8 * n).reshape(n, dim)
            records.append(Record(seq, kind, ids, vectors if kind == ADD else None))
            pos = end + CRC.size
        return records, pos

    def truncate(self, size: int = 0) -> None:
        """Cut the journal to ``size`` bytes, durably (0 after a checkpoint; an offset to undo an append)."""
        if not self.path.exists():
            return
        with open(self.path, "r+b") as f:
            f.truncate(size)
            os.fsync(f.fileno())
