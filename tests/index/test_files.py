"""Atomic writes: a crash before the rename leaves the old file whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from asymret import files
from asymret.errors import DataError
from asymret.files import atomic_write, read_json, write_json_atomic
from asymret.index.vectors import VectorIndex

from .conftest import unit


def test_failure_before_rename_keeps_the_old_index(tmp_path, monkeypatch):
    path = tmp_path / "v.faiss"
    old = VectorIndex(8, "Flat")
    old.add(unit(10, 8))
    old.save(path)
    new = VectorIndex(8, "Flat")
    new.add(unit(99, 8, seed=1))

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        new.save(path)
    assert len(VectorIndex.load(path)) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.faiss", "v.faiss.json"]  # no temp left


def test_killed_writer_leaves_the_old_file_and_a_temp_that_the_next_write_sweeps(tmp_path):
    path = tmp_path / "data.json"
    write_json_atomic(path, {"version": 1})
    # a process killed between writing its temporary file and renaming it
    script = (
        "import os, signal, sys\n"
        "from asymret import files\n"
        "files.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"files.write_json_atomic({str(path)!r}, {{'version': 2}})\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert read_json(path, "data") == {"version": 1}
    temps = [p for p in tmp_path.iterdir() if p.name.startswith(".data.json.tmp-")]
    assert len(temps) == 1 and '"version": 2' in temps[0].read_text()
    write_json_atomic(path, {"version": 3})
    assert read_json(path, "data") == {"version": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["data.json"]


def test_atomic_write_content_and_errors(tmp_path):
    path = tmp_path / "blob"
    atomic_write(path, lambda tmp: tmp.write_bytes(np.arange(5, dtype=np.int64).tobytes()))
    np.testing.assert_array_equal(np.frombuffer(path.read_bytes(), np.int64), np.arange(5))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_json(tmp_path / "bad.json", "sidecar")
    assert set(os.listdir(tmp_path)) == {"blob", "bad.json"}
