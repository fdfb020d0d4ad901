"""kill -9 of ``asymret index add`` at random moments, each followed by a rerun: every image ends up
exactly once and the FAISS ids equal the SQL ids (issue 14). The small version (3 kills) of
``benchmarks/kill_index_add.py``, whose 20-kill figures are in docs/gallery.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "kill_index_add.py"


def kill_rounds(tmp_path: Path, *extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--kills", "3", "--batch", "3", "--shard-size", "2",
                           "--workdir", str(tmp_path / "work"), *extra],
                          capture_output=True, text=True, env=env, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kill_9_of_index_add_then_rerun_leaves_each_image_once(tmp_path):
    summary = kill_rounds(tmp_path)
    assert summary["rounds_ok"] == summary["kills"] == 3 and summary["failures"] == 0
    assert summary["final_items"] == summary["images"] == 12


@pytest.mark.postgres
def test_kill_9_of_index_add_on_postgresql(tmp_path, postgres_url):
    summary = kill_rounds(tmp_path, "--db", postgres_url, "--gallery", f"kill_add_{uuid.uuid4().hex[:12]}")
    assert summary["rounds_ok"] == 3 and summary["final_items"] == 12
