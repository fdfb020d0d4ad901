"""Shared fixtures. ``shared/`` (real ground-truth files) sits beside the repository root.

A test reads the real ground truth only through ``groundtruth_data`` (runs twice: on a generated twin of
shared/data, always, and on the real files) or ``shared_data`` (the real files alone); both get the
``needs_shared`` marker here, and a test marked by hand without either fixture is a usage error.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ASYMRET_SHARED", ROOT.parent / "shared"))
NO_SHARED = (f"needs the real ground-truth files in {SHARED / 'data'}: put the project's shared/ folder beside the "
             "repository, or set ASYMRET_SHARED to it (the same test ran on generated files)")


CI = os.environ.get("CI", "").lower() == "true"


def skip_or_fail(reason: str) -> None:
    """Skip on a developer's machine; under CI=true fail instead, so that CI never passes by skipping what
    it is meant to run (the real ground truth, the browser test)."""
    if CI:
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real ground-truth files. A user's clone has no shared/: the test skips with one line saying where
    the files go. CI always has it beside the clone, so there (CI=true) a missing copy fails instead."""
    path = SHARED / "data"
    if not path.is_dir():
        skip_or_fail(NO_SHARED)
    return path


@pytest.fixture(scope="session")
def generated_data(tmp_path_factory) -> Path:
    """A generated twin of shared/data: the same file names, formats and sizes (tests/gendata.py)."""
    from tests.gendata import write_shared_twin

    return write_shared_twin(tmp_path_factory.mktemp("shared-twin") / "data")


@pytest.fixture(scope="session", params=["generated", "shared"])
def groundtruth_data(request) -> Path:
    """shared/data's layout, for every test that reads the real ground truth: once with the generated twin
    (always runs), once with the real files (skips in a clone without ../shared, see ``shared_data``)."""
    return request.getfixturevalue("generated_data" if request.param == "generated" else "shared_data")


def _reads_shared(item) -> bool:
    if "shared_data" in getattr(item, "fixturenames", ()):
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("groundtruth_data") == "shared"


def pytest_collection_modifyitems(config, items):
    import torch

    for item in items:
        reads = _reads_shared(item)
        if "needs_shared" in item.keywords and not reads:
            raise pytest.UsageError(f"{item.nodeid} is marked needs_shared but takes neither the shared_data nor "
                                    "the groundtruth_data fixture: read the real files through one of them")
        if reads:
            item.add_marker(pytest.mark.needs_shared)  # `-m "not needs_shared"` deselects them
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA; no GPU on this machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
