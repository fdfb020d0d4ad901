"""Request coalescing: concurrent queries share one forward pass of the query network.

One worker thread owns the encoder. It takes the first waiting item and everything queued behind it
(up to ``max_batch``), and runs the whole batch at once. Under load the queue fills while a batch runs,
so the next batch forms by itself, with no waiting. Only when the previous batch held more than one
item (requests are arriving together) does it also wait up to ``max_wait_ms`` after the first item for
more to join (the dynamic batching of inference servers such as Triton); a lone request on a quiet server
is never held back, so one client sees no added latency. ``max_batch=1`` switches coalescing off (one
forward per request).

The rule this replaces held every lone request for the whole ``max_wait_ms`` (2 ms by default).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)
_STOP = object()


class Batcher(Generic[T, R]):
    """Runs ``fn(items) -> results`` (one result per item, same order) on coalesced batches.

    ``on_batch(size)`` is called with every batch size (for metrics). A batch that raises is retried
    item by item, so one bad input fails only its own request.
    """

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], *, max_batch: int = 32, max_wait_ms: float = 2.0,
                 on_batch: Callable[[int], None] | None = None, name: str = "batcher"):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_ms >= 0")
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1000
        self.on_batch = on_batch or (lambda size: None)
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: T) -> Future:
        """A future for ``fn``'s result on ``item``."""
        if not self._thread.is_alive():
            raise RuntimeError("the batcher is closed")
        future: Future = Future()
        self._queue.put((item, future))
        return future

    def __call__(self, item: T, timeout: float | None = None) -> R:
        """``fn``'s result on ``item``, waiting for its batch."""
        return self.submit(item).result(timeout)

    def close(self) -> None:
        """Finish the waiting requests, then stop the worker."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    def _collect(self, first, wait: bool) -> tuple[list, bool]:
        """``first`` and what is queued behind it; with ``wait``, also what arrives within ``max_wait``."""
        batch, deadline = [first], time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if not wait or remaining <= 0:
                    break
                try:
                    entry = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if entry is _STOP:
                return batch, True
            batch.append(entry)
        return batch, False

    def _run(self) -> None:
        stop, last_size = False, 1
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                break
            batch, stop = self._collect(first, wait=last_size > 1 and self.max_wait > 0)
            last_size = len(batch)
            self.on_batch(len(batch))
            self._answer(batch)

    def _answer(self, batch: list) -> None:
        try:
            results, error = self.fn([item for item, _ in batch]), None
        except Exception as exc:  # noqa: BLE001 - handed to the waiting callers, who re-raise it
            if len(batch) > 1:  # find the item at fault: the others still get their answers
                for entry in batch:
                    self._answer([entry])
                return
            results, error = None, exc
        for i, (_, future) in enumerate(batch):
            if not future.set_running_or_notify_cancel():
                continue  # its client went away
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(results[i])
