"""Crash-safe files for the index layer: :mod:`asymret.files` (top level, so that every layer writes them the
same way), re-exported here for the index's own modules and older imports."""

from asymret.files import atomic_write, fsync_dir, fsync_file, read_json, write_json_atomic

__all__ = ["atomic_write", "fsync_dir", "fsync_file", "read_json", "write_json_atomic"]
