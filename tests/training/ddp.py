"""Run ``asymret train`` under torchrun with gloo workers, for the data-parallel equivalence tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_train(cfg: dict, cfg_path: Path, nproc: int = 2) -> None:
    """Write ``cfg`` to ``cfg_path`` and train it on ``nproc`` CPU processes (one thread each)."""
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_port", str(free_port()), "-m", "asymret", "train", str(cfg_path),
                           "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
