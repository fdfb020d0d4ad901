"""Gallery snapshots (issue 14): a round trip keeps vectors, ids, rows and next_id on SQLite and
PostgreSQL; restore verifies hashes and refuses another format version or gallery network; a
restore killed between its commit and its file move finishes on the next open."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from asymret.errors import ConflictError, DataError
from asymret.index.snapshot import INDEX, MANIFEST, ROWS, read_rows, restore_snapshot, write_snapshot
from asymret.index.store import Gallery
from asymret.index.vectors import VectorIndex

from .conftest import unit

DIM = 8
SPEC = {"arch": "resnet10t", "dim": DIM}


def filled(store, name="g", spec=SPEC):
    gallery = store.create(name, DIM, "Flat", network_spec=spec)
    x = unit(20, DIM, seed=1)
    gallery.add(x, [{"path": f"{i}.jpg", "label": i % 3, "camera": f"c{i % 2}", "attributes": {"n": i},
                     "sha256": hashlib.sha256(bytes([i])).hexdigest()} for i in range(20)])
    gallery.remove([3, 7])
    return gallery, x


def state(gallery):
    scores, ids = gallery.index.search(unit(4, DIM, seed=9), 5)
    rows = [{k: v for k, v in item.to_dict().items()} for item in gallery.get(gallery.index.ids())]
    return gallery.index.ids().tolist(), rows, ids.tolist(), np.round(scores, 5).tolist()


def test_round_trip_keeps_everything(store, tmp_path):
    gallery, _ = filled(store)
    before = state(gallery)
    manifest = write_snapshot(store, "g", tmp_path / "snap", gallery=gallery)
    assert manifest["count"] == 18 and manifest["gallery"]["next_id"] == 20
    for path, entry in manifest["files"].items():  # hashes, computed independently
        assert hashlib.sha256((tmp_path / "snap" / path).read_bytes()).hexdigest() == entry["sha256"]
    gallery.close()
    name, count = restore_snapshot(store, tmp_path / "snap", name="copy")
    assert (name, count) == ("copy", 18)
    with store.open("copy") as copy:
        assert state(copy) == before
        assert copy.add(unit(1, DIM, seed=4)).tolist() == [20]  # next_id travels: no id reused
        assert copy.network_hash == manifest["gallery"]["network_hash"]


def test_restore_refuses_what_does_not_fit(store, tmp_path):
    gallery, _ = filled(store)
    write_snapshot(store, "g", tmp_path / "snap", gallery=gallery)
    gallery.close()
    with pytest.raises(ConflictError, match="already exists"):
        restore_snapshot(store, tmp_path / "snap")
    with pytest.raises(ConflictError, match="another gallery network"):
        restore_snapshot(store, tmp_path / "snap", name="x", network_hash="0" * 64)
    filled(store, "other", spec={"arch": "resnet50", "dim": DIM})[0].close()
    with pytest.raises(ConflictError, match="another gallery network"):
        restore_snapshot(store, tmp_path / "snap", name="other", replace=True)
    with pytest.raises(ConflictError, match="exists"):
        write_snapshot(store, "g", tmp_path / "snap")

    manifest = json.loads((tmp_path / "snap" / MANIFEST).read_text())
    (tmp_path / "snap" / MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ConflictError, match="format version 99"):
        restore_snapshot(store, tmp_path / "snap", name="y")
    (tmp_path / "snap" / MANIFEST).write_text(json.dumps(manifest))
    with open(tmp_path / "snap" / ROWS, "a") as f:
        f.write("{}\n")
    with pytest.raises(DataError, match="does not match its SHA-256"):
        restore_snapshot(store, tmp_path / "snap", name="y")
    assert sorted(g["name"] for g in store.list()) == ["g", "other"]  # nothing made, nothing lost


def test_replace_restores_the_older_state_over_the_same_network(store, tmp_path):
    gallery, _ = filled(store)
    before = state(gallery)
    write_snapshot(store, "g", tmp_path / "snap", gallery=gallery)
    gallery.add(unit(5, DIM, seed=2))
    gallery.close()
    restore_snapshot(store, tmp_path / "snap", replace=True)
    with store.open("g") as gallery:
        assert state(gallery) == before


def test_a_restore_killed_after_its_commit_finishes_on_open(store, tmp_path, monkeypatch):
    gallery, _ = filled(store)
    before = state(gallery)
    write_snapshot(store, "g", tmp_path / "snap", gallery=gallery)
    gallery.close()

    def killed(self, committed, index_path):  # the kill: the rows are committed, the file not moved
        raise SystemExit("killed")

    ids, rows, created = read_rows(tmp_path / "snap" / ROWS)
    with store.create("copy", DIM, "Flat", network_spec=SPEC) as copy:
        copy.add(unit(2, DIM, seed=3))
        monkeypatch.setattr(Gallery, "_settle_replace", killed)
        with pytest.raises(SystemExit):
            copy.replace_all(VectorIndex.load(tmp_path / "snap" / INDEX), rows, ids, created, next_id=20)
    monkeypatch.undo()
    assert (store.folder("copy") / Gallery.STAGED).exists()
    with store.open("copy") as copy:
        assert state(copy) == before
    assert not (store.folder("copy") / Gallery.STAGED).exists()
