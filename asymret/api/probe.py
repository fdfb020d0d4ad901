"""Readiness: whether the metadata database answers now, asked with a time limit.

``/readyz`` must say when every query would fail (a database gone, locked, unreadable), not only
whether start-up finished. One probe runs at a time on a thread of its own, so a database that hangs
costs one waiting thread however often the probe is asked, and the answer comes within the limit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout


class DatabaseProbe:
    """``check(ping, timeout)``: None when ``ping()`` returns within ``timeout`` seconds, else why not."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asymret-ready-probe")
        self._lock = threading.Lock()
        self._running: Future | None = None

    def check(self, ping: Callable[[], object], timeout: float) -> str | None:
        with self._lock:  # a probe still waiting on a hung database is waited on again, not joined by another
            if self._running is None or self._running.done():
                self._running = self._pool.submit(ping)
            running = self._running
        try:
            running.result(timeout)
        except FutureTimeout:
            return f"the metadata database did not answer within {timeout:g} s"
        except Exception as exc:  # noqa: BLE001 - whatever the driver raises is the answer: 503 and why
            return f"the metadata database fails: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        return None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
