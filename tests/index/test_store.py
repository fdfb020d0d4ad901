"""GalleryStore and Gallery on SQLite and PostgreSQL: CRUD, search with metadata and filters,
persistence, locks, and recovery from each crash point of the add/remove protocol."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import sqlalchemy as sa
from pydantic import BaseModel

from asymret.errors import ConflictError, InputError, NotFoundError
from asymret.index import vectors as vectors_module
from asymret.index.journal import ADD
from asymret.index.rows import galleries, items

from .conftest import brute_force, unit

DIM = 16
N = 300


def rows(start: int, n: int) -> list[dict]:
    return [{"path": f"img/{i}.jpg", "label": i % 7, "camera": f"c{i % 3}",
             "attributes": {"color": ["red", "blue", "green", "grey"][i % 4], "n": i, "flag": i % 2 == 0}}
            for i in range(start, start + n)]


@pytest.fixture
def filled(store):
    gallery = store.create("oxford", DIM, "Flat", network_spec={"arch": "resnet101", "dim": DIM})
    x = unit(N, DIM, seed=1)
    ids = gallery.add(x[:200], rows(0, 200))
    ids = np.concatenate([ids, gallery.add(x[200:], rows(200, N - 200))])
    yield store, gallery, x
    gallery.close()


def test_create_list_open_delete(store):
    spec = {"arch": "resnet101", "pool": "gem", "dim": DIM}
    store.create("a", DIM, "Flat", network_spec=spec).close()
    with pytest.raises(ConflictError, match="already exists"):
        store.create("a", DIM)
    with pytest.raises(InputError, match="gallery name"):
        store.create("../escape", DIM)
    with pytest.raises(NotFoundError, match="no gallery named 'b'.*galleries: a"):
        store.open("b")

    class Spec(BaseModel):
        arch: str
        dim: int

    store.create("b", 8, "HNSW8", network_spec=Spec(arch="mobilenet", dim=8), metric="l2").close()
    listed = {g["name"]: g for g in store.list()}
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    expected_hash = hashlib.sha256(canonical.encode()).hexdigest()
    assert listed["a"]["network_hash"] == expected_hash and listed["a"]["count"] == 0
    assert (listed["b"]["dim"], listed["b"]["factory"], listed["b"]["metric"]) == (8, "HNSW8", "l2")
    with store.open("b") as b:
        assert b.network_spec == {"arch": "mobilenet", "dim": 8}
    store.delete("a")
    assert [g["name"] for g in store.list()] == ["b"]
    assert not (store.root / "a").exists()
    store.create("a", DIM).close()  # the name is free again


def test_search_returns_exact_hits_with_metadata(filled):
    _, gallery, x = filled
    q = unit(5, DIM, seed=2)
    hits = gallery.search(q, k=8)
    want_s, want_i = brute_force(q, x, 8)
    assert [[h.id for h in row] for row in hits] == want_i.tolist()
    np.testing.assert_allclose([[h.score for h in row] for row in hits], want_s, atol=1e-5)
    first = hits[0][0]
    assert first.item.path == f"img/{first.id}.jpg" and first.item.label == str(first.id % 7)
    assert first.to_dict()["attributes"]["n"] == first.id
    assert [item.id for item in gallery.get([7, 3])] == [7, 3]
    with pytest.raises(NotFoundError, match="no item"):
        gallery.get([3, 10_000])


FILTERS = [
    ({"label": 3}, lambda i: i % 7 == 3),
    ({"camera": ["c0", "c2"]}, lambda i: i % 3 != 1),
    ({"attributes": {"color": "blue"}}, lambda i: i % 4 == 1),
    ({"attributes": {"flag": True, "n": [5, 8, 9, 12, 200]}}, lambda i: i in (8, 12, 200)),
    ({"label": [1, 2], "attributes": {"color": ["red", "grey"]}},
     lambda i: i % 7 in (1, 2) and i % 4 in (0, 3)),
]


@pytest.mark.parametrize("selector_limit", [100_000, 0], ids=["id-selector", "over-fetch"])
@pytest.mark.parametrize("filters, keep", FILTERS)
def test_filters_match_brute_force_on_the_subset(filled, selector_limit, filters, keep):
    store, gallery, x = filled
    store.selector_limit = selector_limit
    q = unit(4, DIM, seed=3)
    subset = np.array([i for i in range(N) if keep(i)])
    k = 6
    _, want = brute_force(q, x[subset], k)
    hits = gallery.search(q, k=k, filters=filters)
    assert [[h.id for h in row] for row in hits] == subset[want].tolist()


def test_bad_filters_and_rows(filled):
    _, gallery, x = filled
    with pytest.raises(InputError, match="cannot filter on 'colour'"):
        gallery.search(x[:1], 3, filters={"colour": "red"})
    with pytest.raises(InputError, match="put anything else under 'attributes'"):
        gallery.add(unit(1, DIM, seed=9), [{"path": "x.jpg", "colour": "red"}])
    with pytest.raises(InputError, match="one row per vector"):
        gallery.add(unit(2, DIM, seed=9), [{}])
    assert len(gallery) == N


def test_remove_and_reopen(filled):
    store, gallery, _ = filled
    assert gallery.remove([0, 5, 299]) == 3
    with pytest.raises(NotFoundError, match=r"no item \[5\]"):
        gallery.remove([5, 6])
    assert len(gallery) == N - 3  # the failed call removed nothing, 6 included
    new_ids = gallery.add(unit(2, DIM, seed=4), rows(N, 2))
    assert new_ids.tolist() == [N, N + 1]  # ids keep growing past removed ones
    q = unit(3, DIM, seed=5)
    before = [[h.id for h in row] for row in gallery.search(q, 10)]
    gallery.close()
    with store.open("oxford") as again:
        assert [[h.id for h in row] for row in again.search(q, 10)] == before
        assert again.add(unit(1, DIM, seed=6)).tolist() == [N + 2]
        assert again.info()["count"] == N
    with store.engine.connect() as conn:
        count = conn.execute(sa.select(sa.func.count()).select_from(items)).scalar()
    assert count == N


def test_one_writer_many_readers(filled):
    store, gallery, _ = filled
    with pytest.raises(ConflictError, match="open for writing elsewhere"):
        store.open("oxford")
    with pytest.raises(ConflictError, match="open for writing elsewhere"):
        store.delete("oxford")
    with store.open("oxford", readonly=True, mmap=True) as reader:
        assert not reader.index.readonly  # journal records to replay: read, not mapped
    gallery.checkpoint()
    reader = store.open("oxford", readonly=True, mmap=True)
    assert reader.index.readonly
    q = unit(2, DIM, seed=7)
    def ranked(g):
        return [[h.id for h in row] for row in g.search(q, 5)]

    assert ranked(reader) == ranked(gallery)
    with pytest.raises(ConflictError, match="readonly"):
        reader.add(unit(1, DIM))
    gallery.add(unit(1, DIM, seed=8))  # the reader keeps its snapshot
    assert len(reader) == N and len(gallery) == N + 1
    reader.close()


def test_ivf_gallery_trains_first(store):
    gallery = store.create("ivf", DIM, "IVF16,Flat")
    with pytest.raises(InputError, match="at least 16 training vectors"):
        gallery.add(unit(5, DIM))
    assert gallery.info()["journal_bytes"] == 0 and len(gallery) == 0
    gallery.train(unit(400, DIM, seed=1))
    gallery.add(unit(5, DIM, seed=2))
    gallery.close()
    with store.open("ivf") as again:
        assert again.index.is_trained and len(again) == 5


# ------------------------------------------------------------------------ crash recovery
def crash(gallery) -> None:
    """Stop using a gallery as a killed process would: no checkpoint, lock released."""
    gallery._release()


def test_committed_but_not_checkpointed_is_replayed(filled):
    store, gallery, _ = filled
    gallery.remove([1, 2])
    extra = gallery.add(unit(3, DIM, seed=9), rows(N, 3))
    assert gallery.info()["journal_bytes"] > 0
    crash(gallery)
    with store.open("oxford") as again:
        np.testing.assert_array_equal(again.index.ids(), np.setdiff1d(np.arange(N + 3), [1, 2]))
        assert [h.id for h in again.search(unit(3, DIM, seed=9)[:1], 1)[0]] == [extra[0]]
        assert again.info()["journal_bytes"] == 0  # replayed, then checkpointed


def test_journaled_but_uncommitted_is_dropped(filled):
    store, gallery, _ = filled
    gallery._journal.append(gallery._seq + 1, ADD, np.array([777]), unit(1, DIM, seed=10))
    with open(gallery._journal.path, "ab") as f:
        f.write(b"AJR1\x00\x01")  # and a torn tail after it
    crash(gallery)
    with store.open("oxford") as again:
        assert len(again) == N and not again.index.contains([777])[0]
        assert again.info()["journal_bytes"] == 0


def test_crash_between_index_and_sidecar_replays_idempotently(filled, monkeypatch):
    store, gallery, _ = filled
    gallery.remove(np.arange(10))
    gallery.add(unit(2, DIM, seed=11), rows(N, 2))

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    # the new index file is in place, its sidecar (with the checkpoint number) is not
    monkeypatch.setattr(vectors_module, "write_json_atomic", die)
    with pytest.raises(KeyboardInterrupt):
        gallery.checkpoint()
    monkeypatch.undo()
    crash(gallery)
    with store.open("oxford") as again:  # replays all records over an index that has them
        np.testing.assert_array_equal(again.index.ids(), np.arange(10, N + 2))


def test_database_failure_rolls_the_journal_back(filled):
    store, gallery, _ = filled
    size = gallery._journal.size()
    with store.engine.begin() as conn:  # a row written behind asymret's back
        conn.execute(items.insert().values(gallery_id=gallery._gid, id=5000, created_at=sa.func.now()))
    with pytest.raises(ConflictError, match="already holds rows"):
        gallery.add(unit(1, DIM, seed=12), ids=[5000])
    assert gallery._journal.size() == size and len(gallery) == N
    crash(gallery)
    with pytest.raises(ConflictError, match="1 item row\\(s\\) without a vector"):
        store.open("oxford")


def test_index_newer_than_database_is_refused(filled):
    store, gallery, _ = filled
    gallery.close()
    with store.engine.begin() as conn:
        conn.execute(galleries.update().values(last_seq=0))
    with pytest.raises(ConflictError, match="newer than the database"):
        store.open("oxford")


def _open_fresh_store(root: str) -> str | None:
    from asymret.index.store import GalleryStore

    try:
        GalleryStore(root, f"sqlite:///{root}/galleries.db")
    except Exception as exc:  # noqa: BLE001  (reported back to the test)
        return repr(exc)
    return None


def test_processes_opening_one_fresh_store_at_once_all_succeed(tmp_path):
    """Torchrun ranks (or serve beside an index build) create the tables concurrently: create_all checks,
    then creates, so without a second look one of them failed with "table galleries already exists"
    (16 of 80 opens before the fix)."""
    import multiprocessing

    roots = [str(tmp_path / f"s{i}") for i in range(10)]
    for root in roots:
        (tmp_path / root).mkdir()
    with multiprocessing.get_context("fork").Pool(4) as pool:
        errors = pool.map(_open_fresh_store, [r for r in roots for _ in range(4)])
    assert errors == [None] * 40
