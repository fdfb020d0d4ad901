"""Issue 14, items 2 and 4 in the store: gallery names that would sit on the store's own files,
the folder made before the row commits, an old store with such a row still working, the
``items.sha256`` migration of old databases, and (path, sha256) lookups for idempotent adds."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

from asymret.errors import InputError, NotFoundError
from asymret.index import store as store_module
from asymret.index.rows import galleries, items
from asymret.index.store import GalleryStore

from .conftest import unit

DIM = 8


@pytest.mark.parametrize("name", ["galleries.db", "galleries.db-journal", "galleries.db-wal", "galleries.db-shm",
                                  "Galleries.DB-journal"])
def test_reserved_names_are_refused_and_the_store_keeps_working(tmp_path, name):
    with GalleryStore(tmp_path) as store:
        with pytest.raises(InputError, match="reserved for the store's own files"):
            store.create(name, DIM)
        assert not (tmp_path / name).is_dir()
        with store.create("ok", DIM) as gallery:  # the database still takes writes
            gallery.add(unit(3, DIM), [{"path": f"{i}.jpg"} for i in range(3)])
        assert [g["name"] for g in store.list()] == ["ok"]


def test_an_old_store_with_a_reserved_name_still_opens_lists_and_writes(tmp_path):
    """What an older asymret left: a row named galleries.db-journal and a folder of that name, on
    which SQLite cannot make its rollback journal, so every write failed."""
    with GalleryStore(tmp_path) as store, store.create("ok", DIM) as gallery:
        gallery.add(unit(2, DIM), [{"path": "a.jpg"}, {"path": "b.jpg"}])
    old = tmp_path / "galleries.db-journal"
    now = datetime.now(timezone.utc)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'galleries.db'}")
    with engine.begin() as conn:
        conn.execute(galleries.insert().values(name=old.name, dim=DIM, factory="Flat", metric="ip", last_seq=0,
                                               next_id=0, created_at=now, updated_at=now))
    engine.dispose()
    old.mkdir()
    with GalleryStore(tmp_path) as store:
        assert sorted(g["name"] for g in store.list()) == ["galleries.db-journal", "ok"]
        with store.open("ok") as gallery:
            gallery.add(unit(1, DIM, seed=3), [{"path": "c.jpg"}])
            assert len(gallery) == 3
        with store.open(old.name) as gallery:  # works from _reserved/
            gallery.add(unit(1, DIM), [{"path": "x.jpg"}])
            assert gallery.folder == tmp_path / "_reserved" / old.name
    assert not old.exists()
    with GalleryStore(tmp_path) as store, store.open(old.name, readonly=True) as gallery:
        assert len(gallery) == 1


def test_the_folder_exists_before_the_row_and_goes_if_the_commit_fails(tmp_path, monkeypatch):
    seen = []

    def failing_insert(engine, **values):
        seen.append((tmp_path / values["name"] / "vectors.faiss").is_file())
        raise sa.exc.OperationalError("INSERT", {}, Exception("disk full"))

    with GalleryStore(tmp_path) as store:
        monkeypatch.setattr(store_module, "_insert_gallery", failing_insert)
        with pytest.raises(sa.exc.OperationalError):
            store.create("g", DIM)
        assert seen == [True]  # the folder and its index were there before the commit
        assert not (tmp_path / "g").exists()
        assert store.list() == []
        monkeypatch.undo()
        store.create("g", DIM).close()
        assert [g["name"] for g in store.list()] == ["g"]


def test_read_only_use_creates_nothing(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(NotFoundError, match="no galleries folder"):
        GalleryStore(missing, create=False)
    assert not missing.exists()
    missing.mkdir()
    with pytest.raises(NotFoundError, match="no gallery database"):
        GalleryStore(missing, create=False)
    assert list(missing.iterdir()) == []


def test_old_databases_gain_the_sha256_column(db, tmp_path):
    url, schema = db
    with GalleryStore(tmp_path / "g", url, schema=schema) as store, store.create("old", DIM) as gallery:
        gallery.add(unit(2, DIM), [{"path": "a.jpg"}, {"path": "b.jpg"}])
    # make it the schema of an older asymret: no sha256 column, no path index
    engine = sa.create_engine(url)
    prefix = f'"{schema}".' if schema else ""
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP INDEX {prefix}ix_items_path"))
        conn.execute(sa.text(f"ALTER TABLE {prefix}items DROP COLUMN sha256"))
    assert "sha256" not in {c["name"] for c in sa.inspect(engine).get_columns("items", schema=schema)}
    engine.dispose()
    sha = hashlib.sha256(b"bytes").hexdigest()
    with GalleryStore(tmp_path / "g", url, schema=schema) as store, store.open("old") as gallery:
        assert [item.sha256 for item in gallery.get([0, 1])] == [None, None]  # old rows keep opening
        gallery.add(unit(1, DIM, seed=5), [{"path": "a.jpg", "sha256": sha}])
        assert gallery.get([2])[0].sha256 == sha
        # an old row has no hash: never taken for the same bytes
        assert gallery.stored(["a.jpg", "a.jpg", "b.jpg"], [sha, "0" * 64, sha]).tolist() == [True, False, False]


def test_stored_matches_path_and_bytes(store):
    sha = [hashlib.sha256(bytes([i])).hexdigest() for i in range(3)]
    with store.create("g", DIM) as gallery:
        gallery.add(unit(2, DIM), [{"path": "a.jpg", "sha256": sha[0]}, {"path": "b.jpg", "sha256": sha[1]}])
        found = gallery.stored(["a.jpg", "b.jpg", "a.jpg", "c.jpg"], [sha[0], sha[1], sha[2], sha[0]])
        assert found.tolist() == [True, True, False, False]  # same path, other bytes: a new version
        with pytest.raises(InputError, match="64 lower-case hex"):
            gallery.add(unit(1, DIM), [{"path": "d.jpg", "sha256": "xyz"}])
        rows = {r.id: r.sha256 for r in gallery.get([0, 1])}
        assert rows == {0: sha[0], 1: sha[1]}
    assert items.c.sha256.type.length == 64
