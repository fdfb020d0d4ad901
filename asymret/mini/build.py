"""What every mini-benchmark builder shares: the process pool that renders images, the size check, and the
completion marker that tells a complete build from an interrupted one."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Completion:
    """How a builder marks a complete build: ``manifest`` (its JSON record), then ``marker`` written last, which
    records seed, size and ``format_version``; a folder without the marker holds an interrupted build."""

    marker: str
    manifest: str
    format_version: int

    def record(self, seed: int, size: str) -> dict:
        return {"seed": seed, "size": size, "format_version": self.format_version}

    def finish(self, out: Path, manifest: dict, result) -> dict:
        """Write the manifest, then the marker; return ``result(out, manifest)``."""
        (out / self.manifest).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        (out / self.marker).write_text(json.dumps(self.record(manifest["seed"], manifest["size"])))
        return result(out, manifest)

    def ensure(self, out_dir, seed: int, size: str, build, result) -> dict:
        """``result(out, manifest)`` when ``out_dir`` holds a complete build of this seed, size and format;
        otherwise ``build(out)``, which renders it again."""
        out = Path(out_dir).expanduser()
        try:
            done = json.loads((out / self.marker).read_text())
            manifest = json.loads((out / self.manifest).read_text())
        except (OSError, ValueError):
            return build(out)
        return result(out, manifest) if done == self.record(seed, size) else build(out)
