"""Crash-safe files: write to a temporary file in the same folder, fsync, rename, fsync the folder.

A reader sees the old file or the new one, never a torn one: ``os.replace`` is atomic within one
file system, and the two fsyncs make the content, then the new name, durable before the write is
acknowledged. Temporary files left by a crash are named ``.<name>.tmp-*`` and swept at the next write.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from asymret.errors import DataError


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or unlink in ``folder`` durable (POSIX: the directory entry is data too)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Create or replace ``path`` atomically; ``write(tmp_path)`` writes the full content to ``tmp_path``."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        stale.unlink(missing_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: str | Path, data: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def read_json(path: str | Path, what: str) -> dict:
    """A JSON object from ``path``; ``what`` names the file in the error."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{what} {path} is not valid JSON ({exc}); restore it from a backup") from None
    if not isinstance(data, dict):
        raise DataError(f"{what} {path} must hold a JSON object; restore it from a backup")
    return data


def file_sha256(path: str | Path) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB blocks (OSError when it cannot be read)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
