"""Shared fixtures. ``shared/`` (real ground-truth files) sits beside the repository root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ASYMRET_SHARED", ROOT.parent / "shared"))
NO_SHARED = (f"needs the real ground-truth files in {SHARED / 'data'}: put the project's shared/ folder beside the "
             "repository, or set ASYMRET_SHARED to it")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = SHARED / "data"
    if not path.is_dir():
        pytest.fail(f"shared data not found at {path}; set ASYMRET_SHARED to the shared/ folder")
    return path


def pytest_collection_modifyitems(config, items):
    import torch

    # A user's clone has no shared/: its tests skip, the rest pass. CI always has it beside the clone, so
    # there (CI=true) a missing copy fails instead of skipping silently.
    if not (SHARED / "data").is_dir() and os.environ.get("CI", "").lower() != "true":
        skip = pytest.mark.skip(reason=NO_SHARED)
        for item in items:
            if "needs_shared" in item.keywords or "shared_data" in getattr(item, "fixturenames", ()):
                item.add_marker(skip)
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA; no GPU on this machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
