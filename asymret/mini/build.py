"""What every mini-benchmark builder shares: the process pool that renders images, the size check, and the
completion marker that tells a complete build from an interrupted one."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from asymret.errors import InputError


@contextlib.contextmanager
def process_pool(workers: int | None):
    """Yields ``run(fn, jobs)`` = ``[fn(job) for job in jobs]``, spread over ``workers`` processes
    (None: all cores, at most 8). Every image has its own Generator, so the files are the same for
    any number of workers."""
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    if workers <= 1:
        yield lambda fn, jobs: [fn(job) for job in jobs]
        return
    # spawn, not fork: the caller may hold BLAS or torch threads, which a forked child can deadlock on
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield lambda fn, jobs: list(pool.map(fn, jobs, chunksize=max(1, len(jobs) // (4 * workers))))



def size_spec(sizes: dict, size: str, seed: int):
    """``sizes[size]`` for a render of ``seed``, or the one-sentence error saying what to pass."""
    if size not in sizes:
        raise InputError(f"unknown mini benchmark size '{size}'; choose one of: {', '.join(sizes)}")
    if seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed}")
    return sizes[size]


def ensure_built(out: Path, marker: str, manifest_name: str, want: dict, build, finish) -> dict:
    """``finish(out, manifest)`` when ``out`` holds a complete build whose ``marker`` file records ``want`` (seed,
    size, format version) beside its ``manifest_name``; otherwise ``build()``, which renders it again."""
    try:
        done = json.loads((out / marker).read_text())
        manifest = json.loads((out / manifest_name).read_text())
    except (OSError, ValueError):
        return build()
    return finish(out, manifest) if done == want else build()
