"""Shared fixtures. ``shared/`` (real ground-truth files) sits beside the repository root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ASYMRET_SHARED", ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = SHARED / "data"
    if not path.is_dir():
        pytest.fail(f"shared data not found at {path}; set ASYMRET_SHARED to the shared/ folder")
    return path


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA; no GPU on this machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
