"""The gallery-backend interface on both backends: FAISS + SQLite and Milvus (Milvus Lite, the real
engine embedded in the test process). Every check runs on both, against brute force: results,
filters, exclusion rules, removes, persistence across reopen, refusal of a mismatched pair."""

from __future__ import annotations

import builtins
import uuid

import numpy as np
import pytest

from asymret.errors import ConfigError, ConflictError, InputError, NotFoundError
from asymret.index.backend import GalleryBackend, StoreBackend, open_store
from asymret.index.recommend import milvus_index

from .conftest import brute_force, unit

pytest.importorskip("milvus_lite", reason="milvus-lite has no wheel for this platform; the milvus backend is untested here")
from asymret.index import milvus

N, DIM = 240, 16


def rows(n: int) -> list[dict]:
    """Labels 0..5, cameras c0..c2 with every 11th item on no camera, attributes of three JSON types."""
    return [{"path": f"/img/{i}.jpg", "label": str(i % 6), "camera": None if i % 11 == 0 else f"c{i % 3}",
             "attributes": {"color": ["red", "blue"][i % 2], "size": i % 4, "big": i % 5 == 0}} for i in range(n)]


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    """One Milvus Lite file (one in-process server) for the module: startup is paid once."""
    return tmp_path_factory.mktemp("milvus") / "galleries.milvus.db"


@pytest.fixture(params=["faiss", "milvus"])
def store(request, tmp_path, lite):
    uri = str(lite) if request.param == "milvus" else None
    with open_store(request.param, tmp_path / "galleries", uri=uri) as s:
        yield s
    if request.param == "milvus":  # one Lite file for the module: leave it empty for the next test
        with open_store("milvus", tmp_path / "galleries", uri=uri) as fresh:
            for g in fresh.list():
                fresh.delete(g["name"])


@pytest.fixture
def filled(store):
    x = unit(N, DIM, seed=1)
    gallery = store.create(f"g-{uuid.uuid4().hex[:6]}", DIM, "Flat", network_spec={"net": "a"})
    gallery.add(x, rows(N))
    yield gallery, x
    gallery.close()


def as_tuples(hits) -> list[list[tuple]]:
    return [[(h.id, round(h.score, 5)) for h in row] for row in hits]


def test_both_backends_implement_the_interface(store):
    assert isinstance(store, StoreBackend)
    gallery = store.create("iface", 4)
    assert isinstance(gallery, GalleryBackend) and store.exists("iface") and not store.exists("other")
    gallery.close()
    assert [g["name"] for g in store.list()] == ["iface"] and store.list()[0]["count"] == 0


def test_search_is_exact_with_metadata(filled):
    gallery, x = filled
    q = unit(5, DIM, seed=2)
    hits = gallery.search(q, k=7)
    scores, order = brute_force(q, x, 7)
    assert [[h.id for h in row] for row in hits] == order.tolist()
    np.testing.assert_allclose([[h.score for h in row] for row in hits], scores, atol=1e-5)
    first = hits[0][0]
    assert first.item.path == f"/img/{first.id}.jpg" and first.item.attributes["size"] == first.id % 4
    assert len(gallery) == N and gallery.contains([0, N - 1, N]).tolist() == [True, True, False]
    np.testing.assert_allclose(gallery.vectors([5, 3]), x[[5, 3]], atol=1e-6)


@pytest.mark.parametrize("filters, keep", [
    ({"label": ["1", "4"]}, lambda r: r["label"] in ("1", "4")),
    ({"camera": "c2"}, lambda r: r["camera"] == "c2"),
    ({"camera": []}, lambda r: False),
    ({"attributes": {"color": "red", "size": [1, 3]}}, lambda r: r["attributes"]["color"] == "red"
     and r["attributes"]["size"] in (1, 3)),
    ({"attributes": {"big": True}, "label": "0"}, lambda r: r["attributes"]["big"] and r["label"] == "0"),
])
def test_filters_match_brute_force_on_the_subset(filled, filters, keep):
    gallery, x = filled
    subset = np.array([i for i, r in enumerate(rows(N)) if keep(r)], np.int64)
    q = unit(3, DIM, seed=3)
    hits = gallery.search(q, k=5, filters=filters)
    if not subset.size:
        assert hits == [[], [], []]
        return
    _, order = brute_force(q, x[subset], 5)
    assert [[h.id for h in row] for row in hits] == subset[order].tolist()


def test_exclusion_rules_drop_exactly_the_matching_items(filled):
    gallery, x = filled
    q = x[[0, 7, 13]]  # item 0 has no camera: a rule naming a camera never drops it
    exclude = [[{"label": "0", "camera": "c0"}], [{"id": 7}, {"label": "1", "camera": "c1"}], None]
    hits = gallery.search(q, k=10, exclude=exclude)
    meta = rows(N)
    expected = []
    for qi, rules in zip(q, exclude):
        scores = x @ qi
        drop = [any(all((i if key == "id" else meta[i][key]) == v for key, v in rule.items()) for rule in rules or [])
                for i in range(N)]
        expected.append([i for i in np.argsort(-scores, kind="stable") if not drop[i]][:10])
    assert [[h.id for h in row] for row in hits] == [list(map(int, e)) for e in expected]
    assert hits[0][0].id == 0 and 7 not in [h.id for h in hits[1]]
    # a rule dropping almost everything still leaves k hits (FAISS fetches again, Milvus filters)
    many = gallery.search(q[:1], k=3, exclude=[[{"label": str(v)} for v in range(5)]])
    assert [h.item.label for h in many[0]] == ["5"] * 3
    with pytest.raises(InputError, match="one per query"):
        gallery.search(q, k=3, exclude=[None])
    with pytest.raises(InputError, match="exclusion rule"):
        gallery.search(q[:1], k=3, exclude=[{"colour": "red"}])


def test_bad_filters_and_rows(filled):
    gallery, x = filled
    with pytest.raises(InputError, match="cannot filter on 'colour'"):
        gallery.search(x[:1], k=3, filters={"colour": "red"})
    with pytest.raises(InputError, match="one row per vector"):
        gallery.add(x[:2], rows(1))
    with pytest.raises(ConflictError, match="already"):
        gallery.add(x[:1], rows(1), ids=[3])
    assert len(gallery) == N  # nothing was added, no duplicate row either


def test_remove_then_reopen_keeps_everything(store, filled, lite):
    gallery, x = filled
    assert gallery.remove([3, 4, 5]) == 3
    with pytest.raises(NotFoundError, match="no item"):
        gallery.remove([4, 6])
    assert gallery.contains([6]).all()  # a failed remove removes nothing
    with pytest.raises(NotFoundError):
        gallery.get([3])
    new = gallery.add(unit(2, DIM, seed=9), [{"label": "new"}] * 2)
    assert new.tolist() == [N, N + 1]  # a removed id is never given again
    name, before = gallery.name, as_tuples(gallery.search(x[:4], k=6))
    assert all(3 not in [i for i, _ in row] for row in before)
    gallery.close()
    root = store.root
    store.close()
    if store.backend == "milvus":  # stop the Lite server: the reopen reads the file again
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(str(lite))
    uri = str(lite) if store.backend == "milvus" else None
    with open_store(store.backend, root, uri=uri) as again, again.open(name, readonly=True) as reopened:
        assert len(reopened) == N - 1 and reopened.next_id == N + 2
        assert as_tuples(reopened.search(x[:4], k=6)) == before
        assert reopened.get([N])[0].label == "new" and reopened.network_spec == {"net": "a"}
        with pytest.raises(ConflictError, match="readonly"):
            reopened.add(x[:1])


def test_backends_agree_on_every_result(tmp_path, lite):
    x, q = unit(N, DIM, seed=4), unit(6, DIM, seed=5)
    answers = []
    for backend in ("faiss", "milvus"):
        with open_store(backend, tmp_path / backend, uri=str(lite) if backend == "milvus" else None) as s:
            with s.create("same", DIM) as g:
                g.add(x, rows(N))
                g.remove([10, 20])
                answers.append([as_tuples(g.search(q, k=8)),
                                as_tuples(g.search(q, k=8, filters={"camera": ["c0", "c1"]})),
                                as_tuples(g.search(q, k=8, exclude=[{"label": "2", "camera": "c2"}] * 6))])
            s.delete("same")
    assert answers[0] == answers[1]


def test_mismatched_pair_is_refused_on_both(store):
    import torch

    from asymret.retrieval import sides
    from asymret.retrieval.encoders import create_encoder

    spec = {"backbone": "mobilenetv2_035", "dim": 8, "input": {"size": 32}}
    torch.manual_seed(0)
    ours, other = sides.SideEncoder(create_encoder(spec)), sides.SideEncoder(create_encoder(spec))
    with store.create("net", 8, network_spec=ours.network_spec()) as gallery:
        sides.check_space(gallery, ours)
        with pytest.raises(ConflictError, match="rebuild it"):
            sides.check_space(gallery, other)


def test_approximate_indexes_map_and_find_the_neighbours(tmp_path, lite):
    assert milvus_index("IVF64,Flat") == ("IVF_FLAT", {"nlist": 64})
    assert milvus_index("HNSW32") == ("HNSW", {"M": 32, "efConstruction": 40})
    assert milvus_index("IVF8,PQ4") == ("IVF_PQ", {"nlist": 8, "m": 4, "nbits": 8})
    assert milvus_index("OPQ8,IVF16,PQ8") == ("IVF_PQ", {"nlist": 16, "m": 8, "nbits": 8})  # no rotation
    with pytest.raises(ConfigError, match="Milvus has no index like FAISS 'PCA64,Flat'"):
        milvus_index("PCA64,Flat")
    assert milvus.collection_name("a_b-c.d") == "asymret_a__b_mc_dd" != milvus.collection_name("a__b-c.d")
    x, q = unit(1000, DIM, seed=6), unit(20, DIM, seed=7)
    _, exact = brute_force(q, x, 10)
    with open_store("milvus", tmp_path, uri=str(lite)) as s:
        for factory, params in (("HNSW16", {"efSearch": 64}), ("IVF16,Flat", {"nprobe": 16})):
            with s.create(f"approx-{factory[:4].lower()}", DIM, factory) as g:
                g.add(x)
                found = [[h.id for h in row] for row in g.search(q, k=10, **params)]
                recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact.tolist())])
                assert recall >= 0.95, (factory, recall)
                assert g.info()["index"]["type"] == milvus_index(factory)[0]
            s.delete(g.name)


def test_store_errors(tmp_path, lite, monkeypatch):
    with pytest.raises(InputError, match="unknown gallery backend 'redis'"):
        open_store("redis", tmp_path)
    with pytest.raises(InputError, match="add --backend milvus"):
        open_store("faiss", tmp_path, uri=str(lite))
    with pytest.raises(InputError, match="drop --db"):
        open_store("milvus", tmp_path, uri=str(lite), db_url="sqlite:///x.db")
    with pytest.raises(ConfigError, match="neither a Milvus Lite file"):
        open_store("milvus", tmp_path, uri=str(tmp_path / "x.txt"))
    with open_store("milvus", tmp_path, uri=str(lite)) as s:
        with pytest.raises(NotFoundError, match="no gallery named 'nope'"):
            s.open("nope")
        with pytest.raises(InputError, match="gallery name"):
            s.create("_bad", 4)
        with pytest.raises(ConfigError, match="metric 'ip'"):
            s.create("l2", 4, metric="l2")
        s.create("twice", 4).close()
        with pytest.raises(ConflictError, match="already exists"):
            s.create("twice", 4)
        s.delete("twice")
    real_import = builtins.__import__

    def no_pymilvus(name, *args, **kw):
        if name == "pymilvus":
            raise ImportError("no pymilvus")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_pymilvus)
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[milvus\]"'):
        open_store("milvus", tmp_path, uri=str(lite))


def test_quotes_in_values_cannot_change_the_filter(store):
    sneaky = 'x" or id >= 0 or label == "'
    with store.create("quotes", 4) as gallery:
        gallery.add(unit(3, 4, seed=8), [{"label": sneaky, "camera": "c"}, {"label": "y"}, {"label": "x"}])
        q = unit(1, 4, seed=9)
        assert [h.id for h in gallery.search(q, k=3, filters={"label": sneaky})[0]] == [0]
        assert [h.id for h in gallery.search(q, k=3, filters={"attributes": {'a"]': 1}})[0]] == []
        kept = gallery.search(q, k=3, exclude=[{"label": sneaky, "camera": "c"}])[0]
        assert sorted(h.id for h in kept) == [1, 2]


def test_stored_and_referenced_agree_on_both_backends(store):
    """What makes an add idempotent and an upload sweep safe: (path, sha256) pairs already stored, and paths
    some item points to, answered the same by both backends."""
    gallery = store.create(f"h-{uuid.uuid4().hex[:6]}", DIM, "Flat")
    sha = [f"{i:064x}" for i in range(4)]
    gallery.add(unit(4, DIM, seed=3), [{"path": f"/img/{i}.jpg", "sha256": sha[i] if i < 3 else None}
                                       for i in range(4)])
    paths = ["/img/0.jpg", "/img/1.jpg", "/img/3.jpg", "/img/9.jpg", '/img/"quoted".jpg']
    hashes = [sha[0], sha[2], sha[3], sha[0], sha[0]]
    assert gallery.stored(paths, hashes).tolist() == [True, False, False, False, False]  # same path, other bytes: new
    assert gallery.referenced(paths).tolist() == [True, True, True, False, False]
    assert [item.sha256 for item in gallery.get([0, 3])] == [sha[0], None]
    gallery.close()


def test_snapshots_refuse_a_milvus_gallery_with_the_reason(tmp_path, lite):
    from asymret.errors import InputError
    from asymret.index.snapshot import write_snapshot

    with open_store("milvus", tmp_path / "galleries", uri=str(lite)) as s:
        s.create("snap", DIM, "Flat").close()
        try:
            with pytest.raises(InputError, match="milvus-backup"):
                write_snapshot(s, "snap", tmp_path / "out")
        finally:
            s.delete("snap")
