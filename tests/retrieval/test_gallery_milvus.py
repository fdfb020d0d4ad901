"""Gallery building into Milvus: torchrun ranks write their shards directly (no merge on rank 0) and
build what one FAISS process builds; a build killed half-way resumes without re-encoding, losing or
duplicating an item. A Milvus Lite server (``milvus-lite server``) plays the Milvus every rank reaches."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from asymret.index.backend import open_store
from asymret.retrieval import gallery as gb
from asymret.retrieval import sides
from asymret.retrieval.datasets import inputs

from .test_gallery import ENCODE, KILLED_BUILD, folder, pair_file, reference, side  # noqa: F401  (fixtures)

pytest.importorskip("milvus_lite", reason="milvus-lite has no wheel for this platform; the milvus backend is untested here")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``http://127.0.0.1:PORT`` of a Milvus Lite server in its own process, stopped afterwards."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = tmp_path_factory.mktemp("milvus-server")
    proc = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data / "lite.db"),
                             "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"milvus-lite server did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def store(server, tmp_path):
    with open_store("milvus", tmp_path / "scratch", uri=server) as s:
        yield s
        for g in s.list():
            s.delete(g["name"])


def stored(store, name):
    """All (ids, vectors, rows) of a gallery, by id, and the row count Milvus itself reports."""
    with store.open(name, readonly=True) as gallery:
        n = len(gallery)
        ids = np.sort([h for h in range(n + 8) if gallery.contains([h])[0]])
        items = gallery.get(ids)
        return ids, gallery.vectors(ids), [(i.path, i.label, i.camera) for i in items], n


def test_torchrun_ranks_write_directly_what_one_faiss_process_builds(server, store, side, folder, pair_file,  # noqa: F811
                                                                      reference, tmp_path):  # noqa: F811
    common = ["--pair", pair_file, "--images", folder, "--workers", 0, "--shard-size", 3]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "asymret", "index", "build", "--name", "two", "--backend", "milvus", "--uri", server,
                           "--root", tmp_path / "scratch", *map(str, common)],
                          check=False, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0/2: 2 shard(s) of 5 image(s) to encode into 'two'" in done.stderr  # shards 0, 2 (3 + 2)
    assert "rank 1/2: 1 shard(s) of 3 image(s) to encode into 'two'" in done.stderr
    assert "now 8 items" in done.stdout
    ids, vectors, rows, n = stored(store, "two")
    np.testing.assert_array_equal(ids, np.arange(8))
    assert n == 8
    np.testing.assert_allclose(vectors, reference, atol=1e-5)
    with open_store("faiss", tmp_path / "faiss") as faiss_store:
        gb.build_gallery(faiss_store, "one", side, inputs.read_images(folder), shard_size=3, **ENCODE)
        with faiss_store.open("one", readonly=True) as one:
            assert rows == [(i.path, i.label, i.camera) for i in one.get(np.arange(8))]
            np.testing.assert_allclose(one.vectors(np.arange(8)), vectors, atol=1e-6)
    with store.open("two", readonly=True) as gallery:
        assert gallery.next_id == 8 and sides.embedding_space(gallery.network_spec) == sides.embedding_space(
            side.network_spec())
    assert not (tmp_path / "scratch" / "two" / "build").exists()




def test_killed_build_resumes_without_duplicating_or_losing_an_item(server, store, side, folder, pair_file,  # noqa: F811
                                                                   reference, monkeypatch):  # noqa: F811
    killed = subprocess.run([sys.executable, "-c", KILLED_BUILD, "milvus", str(store.root), server, str(pair_file),
                             str(folder)],
                            check=False, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr[-3000:]
    pending = gb.pending_build(store, "g")
    assert (pending["shards"], pending["shards_done"], pending["kind"]) == (4, 2, "build")
    with store.open("g", readonly=True) as gallery:
        assert len(gallery) == 4 and gallery.next_id == 8  # two shards in, all eight ids reserved

    encoded = []
    real = sides.encode_records

    def recording(encoder, records, **kw):
        encoded.extend(r.path.name for r in records)
        return real(encoder, records, **kw)

    monkeypatch.setattr(sides, "encode_records", recording)
    summary = gb.build_gallery(store, "g", side, inputs.read_images(folder), shard_size=2, **ENCODE)
    assert encoded == [f"img{i}.png" for i in range(4, 8)]  # shards 0 and 1 were in Milvus already
    assert (summary["encoded"], summary["count"]) == (4, 8)
    ids, vectors, _, n = stored(store, "g")
    np.testing.assert_array_equal(ids, np.arange(8))
    assert n == 8  # Milvus's own row count: no id twice
    np.testing.assert_allclose(vectors, reference, atol=1e-5)
    assert gb.pending_build(store, "g") is None
