"""Fixtures of the index tests: unit vectors, one FAISS thread, SQLite and PostgreSQL stores."""

from __future__ import annotations

import os
import uuid

import faiss
import numpy as np
import pytest
import sqlalchemy as sa

from asymret.index.store import GalleryStore

POSTGRES_URL = os.environ.get("ASYMRET_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


needs_cuda = pytest.mark.skipif(not _cuda(), reason="needs CUDA; no GPU on this machine")


def unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference: full scores, full stable argsort (fine at test sizes)."""
    scores = queries.astype(np.float64) @ database.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """OpenMP spin-waits badly on a shared 2-core machine; one thread is faster and deterministic."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    try:
        with sa.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3}).connect() as conn:
            conn.execute(sa.text("select 1"))
    except (sa.exc.SQLAlchemyError, ImportError, OSError) as exc:
        pytest.skip(f"no PostgreSQL server answers at {POSTGRES_URL} ({type(exc).__name__})")
    return POSTGRES_URL


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db(request, tmp_path):
    """``(db_url, schema)``: a SQLite file, or a fresh PostgreSQL schema dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'meta.db'}", None
        return
    url = request.getfixturevalue("postgres_url")
    schema = f"asymret_test_{uuid.uuid4().hex[:12]}"
    yield url, schema
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


@pytest.fixture
def store(db, tmp_path):
    url, schema = db
    with GalleryStore(tmp_path / "galleries", url, schema=schema) as s:
        yield s
