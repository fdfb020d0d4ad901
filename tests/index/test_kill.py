"""Kill test: a process adding and removing in small acknowledged batches is SIGKILLed at random
moments; after each kill, reopening reconciles and nothing acknowledged is lost, nothing half-done
remains, and the index's ids equal the database's ids exactly."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from asymret.index.store import GalleryStore

# Prints "intent <op> <ids>" before each call and "ack" once it returned: the parent then knows
# what was acknowledged and which one operation, at most, was in flight when the kill came.
WORKER = """
import sys
import numpy as np
from asymret.index.store import GalleryStore

root, url, schema, seed = sys.argv[1], sys.argv[2], sys.argv[3] or None, int(sys.argv[4])
store = GalleryStore(root, url, schema=schema, checkpoint_bytes=16384)
gallery = store.open("bulk")
rng = np.random.default_rng(seed)
print("ready", flush=True)
while True:
    live = gallery.index.ids()
    if len(live) > 50 and rng.random() < 0.2:
        ids = rng.choice(live, 5, replace=False)
        print("intent remove", *ids, flush=True)
        gallery.remove(ids)
    else:
        x = rng.standard_normal((25, 16)).astype(np.float32)
        ids = np.arange(gallery._next_id, gallery._next_id + 25)
        print("intent add", *ids, flush=True)
        gallery.add(x, [{"path": f"img/{i}.jpg", "label": int(i) % 5} for i in ids])
    print("ack", flush=True)
"""


def replay_log(lines: list[str], live: set[int]) -> tuple[set[int], tuple[str, set[int]] | None]:
    """The acknowledged state after ``lines``, and the operation in flight at the kill (if any)."""
    in_flight = None
    for line in lines:
        words = line.split()
        if words[0] == "intent":
            in_flight = (words[1], {int(w) for w in words[2:]})
        elif words[0] == "ack":
            op, ids = in_flight
            live = live | ids if op == "add" else live - ids
            in_flight = None
    return live, in_flight


def kill_and_check(root, url, schema, kills: int, seed: int) -> int:
    chooser = random.Random(seed)
    live: set[int] = set()
    acknowledged = 0
    for round_ in range(kills):
        errors = root / f"worker{round_}.err"
        with open(errors, "w") as stderr:
            command = [sys.executable, "-c", WORKER, str(root), url, schema or "", str(round_)]
            worker = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        assert worker.stdout.readline() == "ready\n", errors.read_text()
        time.sleep(chooser.uniform(0.02, 0.5))
        worker.send_signal(signal.SIGKILL)
        out = worker.stdout.read()  # through the same buffer readline filled
        assert worker.wait() == -signal.SIGKILL, errors.read_text()
        lines = [line for line in out.splitlines(keepends=True) if line.endswith("\n")]
        live, in_flight = replay_log(lines, live)
        acknowledged += sum(line.startswith("ack") for line in lines)

        with GalleryStore(root, url, schema=schema) as store, store.open("bulk") as gallery:
            index_ids = set(gallery.index.ids().tolist())
            db_ids = set(gallery._db_ids().tolist())
        assert index_ids == db_ids  # no orphan vector, no orphan row
        if in_flight is not None:  # all of the interrupted operation, or none of it
            op, ids = in_flight
            done = live | ids if op == "add" else live - ids
            assert index_ids in (live, done)
            live = index_ids
        assert index_ids == live
    return acknowledged


@pytest.mark.slow
def test_sigkill_during_bulk_add_loses_nothing_acknowledged(store):
    store.create("bulk", 16, "Flat").close()
    url = store.db_url
    schema = store.engine.get_execution_options().get("schema_translate_map", {}).get(None)
    acknowledged = kill_and_check(store.root, url, schema, kills=8, seed=len(url))
    assert acknowledged > 8  # the kills did land among acknowledged batches
    with store.open("bulk") as gallery:
        assert len(gallery) > 0 and np.array_equal(gallery.index.ids(), gallery._db_ids())
