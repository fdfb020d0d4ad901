"""REST snapshots (issue 14): keyed writes, a round trip equal to the original gallery, refusals of
another gallery network and of unknown snapshots; and the sweep of upload files no item points to."""

from __future__ import annotations

import json
import os
import time

import httpx
import numpy as np
import pytest

from asymret.api.settings import ServeConfig

from .servekit import encoded, files, make_pair, photo, serve

KEY = {"X-API-Key": "s3cret"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("snap")
    config = ServeConfig(pair=make_pair(root / "pair.pt"), galleries=root / "galleries", api_keys=[KEY["X-API-Key"]],
                         device="cpu")
    return {"root": root, "config": config}


def add(client, name: str, seeds) -> list[dict]:
    r = client.post(f"/v1/galleries/{name}/items", files=files(*[encoded(photo(s)) for s in seeds]), headers=KEY)
    assert r.status_code == 201, r.text
    return r.json()["items"]


def search(client, name: str) -> list:
    r = client.post(f"/v1/galleries/{name}/search", json={"queries": [{"vector": (np.ones(32) / np.sqrt(32)).tolist()}], "k": 10})
    assert r.status_code == 200, r.text
    return [(h["id"], h["path"], round(h["score"], 5)) for h in r.json()["results"][0]["hits"]]


def test_snapshot_round_trip_and_refusals(setup):
    with serve(setup["config"]) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.post("/v1/galleries", json={"name": "people"}, headers=KEY).status_code == 201
        add(client, "people", range(3))
        before = search(client, "people")
        assert client.post("/v1/galleries/people/snapshot").status_code in (401, 403)  # a write: keyed
        r = client.post("/v1/galleries/people/snapshot", headers=KEY)
        assert r.status_code == 201, r.text
        snap = r.json()
        assert snap["gallery"] == "people" and snap["count"] == 3 and snap["format_version"] == 1
        assert [s["snapshot"] for s in client.get("/v1/snapshots").json()["snapshots"]] == [snap["snapshot"]]

        add(client, "people", [7])
        restore = f"/v1/snapshots/{snap['snapshot']}/restore"
        assert client.post(restore, json={}).status_code in (401, 403)
        r = client.post(restore, json={}, headers=KEY)
        assert r.status_code == 409 and "already exists" in r.json()["error"]["message"]
        r = client.post(restore, json={"replace": True}, headers=KEY)
        assert r.status_code == 201 and r.json() == {"gallery": "people", "count": 3}
        assert search(client, "people") == before  # the item added after the snapshot is gone again
        r = client.post(restore, json={"name": "copy"}, headers=KEY)
        assert r.status_code == 201 and r.json()["count"] == 3
        assert search(client, "copy") == before
        assert add(client, "copy", [8])[0]["id"] == 3  # the snapshot's next id travels
        assert add(client, "people", [9])[0]["id"] == 4  # id 3 went to the item replaced away: not reused

        manifest_path = setup["config"].galleries / "_snapshots" / snap["snapshot"] / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["gallery"]["network_hash"] = "0" * 64
        manifest_path.write_text(json.dumps(manifest))
        r = client.post(restore, json={"name": "other"}, headers=KEY)
        assert r.status_code == 409 and "another gallery network" in r.json()["error"]["message"]
        r = client.post("/v1/snapshots/people-20260101T000000000000Z/restore", json={}, headers=KEY)
        assert r.status_code == 404
        names = [g["name"] for g in client.get("/v1/galleries").json()["galleries"]]
        assert names == ["copy", "people"]


def test_upload_files_no_item_points_to_are_swept_at_open(setup, tmp_path):
    config = setup["config"].model_copy(update={"galleries": tmp_path / "galleries"})
    with serve(config) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.post("/v1/galleries", json={"name": "g"}, headers=KEY).status_code == 201
        kept = [item["path"] for item in add(client, "g", range(2))]
    uploads = tmp_path / "galleries" / "_uploads" / "g"
    old_orphan, young_orphan = uploads / "dead.png", uploads / "fresh.png"
    old_orphan.write_bytes(encoded(photo(5)))
    young_orphan.write_bytes(encoded(photo(6)))
    an_hour_ago = time.time() - 3600
    for path in [old_orphan, *map(type(old_orphan), kept)]:
        os.utime(path, (an_hour_ago, an_hour_ago))
    with serve(config) as url:  # opening the gallery sweeps
        pass
    assert not old_orphan.exists()  # killed between saving the upload and committing its row
    assert young_orphan.exists()  # may belong to an add in progress
    assert all(os.path.exists(p) for p in kept)  # an item points to these: never deleted


def test_one_gallery_that_does_not_open_does_not_stop_the_others(setup, tmp_path):
    config = setup["config"].model_copy(update={"galleries": tmp_path / "galleries"})
    with serve(config) as url, httpx.Client(base_url=url, timeout=60) as client:
        for name in ("good", "bad"):
            assert client.post("/v1/galleries", json={"name": name}, headers=KEY).status_code == 201
        add(client, "bad", [1])
    (tmp_path / "galleries" / "bad" / "vectors.faiss.json").write_text("{not json")  # damaged on disk
    with serve(config) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/v1/galleries/good").status_code == 200
        r = client.get("/v1/galleries/bad")
        assert 400 <= r.status_code < 500 and "not valid JSON" in r.json()["error"]["message"]
