"""Hardening of the REST service (issue 14, items 1, 3, 5, 6 and the offline /docs): over real HTTP, each
test a regression test of one failure found by attacking the service."""

from __future__ import annotations

import logging
import os
import re
import threading

import httpx
import numpy as np
import pytest

from asymret.api.service import Service
from asymret.api.settings import ServeConfig
from tests.api.servekit import encoded, files, make_pair, photo, serve

KEY = {"X-API-Key": "s3cret"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    images = root / "images"
    images.mkdir()
    photo(0).save(images / "ok.png")
    config = ServeConfig(pair=make_pair(root / "pair.pt"), galleries=root / "galleries", device="cpu",
                         api_keys=[KEY["X-API-Key"]], allowed_roots=[images], max_request_mb=1)
    return {"root": root, "images": images, "config": config}


@pytest.fixture(scope="module")
def live(setup):
    """A live server and its Service object (same process: a test may break the service under it)."""
    service = Service(setup["config"])
    with serve(service) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/v1/galleries", json={"name": "g"}, headers=KEY).status_code == 201
        yield {"url": url, "client": client, "service": service}


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    return body["error"]


def local_port(response) -> int:
    """The client side's port of the connection that carried ``response``: equal ports, one connection."""
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


# ------------------------------------------------------------------------ item 1: no 500, no drop
def test_a_too_long_file_name_is_a_400_that_says_why(live):
    client = live["client"]
    before = client.get("/v1/galleries")
    name = "a" * 300 + ".png"
    r = client.post("/v1/galleries/g/items/paths", json={"items": [{"path": name}]}, headers=KEY)
    error = error_of(r, 400)
    assert error["code"] == "invalid_input"
    assert "name too long" in error["message"].lower() and name[:40] in error["message"]
    after = client.get("/v1/galleries")
    assert after.status_code == 200 and local_port(before) == local_port(r) == local_port(after)


@pytest.mark.parametrize("path", ["b" * 300 + "/x.png", "c" * 5000, "ok.png/" + "d" * 300])
def test_every_os_error_of_a_user_path_is_a_4xx(live, path):
    r = live["client"].post("/v1/galleries/g/items/paths", json={"items": [{"path": path}]}, headers=KEY)
    assert 400 <= r.status_code < 500, r.text
    assert set(r.json()) == {"error"}


def test_an_unexpected_error_is_a_json_500_logged_and_the_connection_stays(live, monkeypatch, caplog):
    client, service = live["client"], live["service"]

    def broken():
        raise RuntimeError("a bug deep inside")

    first = client.get("/v1/galleries")
    monkeypatch.setattr(service.store, "list", broken)
    with caplog.at_level(logging.ERROR, logger="asymret.serve"):
        r = client.get("/v1/galleries")
    error = error_of(r, 500)
    assert error["code"] == "internal_error" and "bug deep inside" not in error["message"]  # no internals out
    assert r.headers.get("connection") != "close"
    logged = [rec for rec in caplog.records if rec.name == "asymret.serve" and rec.exc_info]
    assert logged and "a bug deep inside" in str(logged[0].exc_info[1])  # with its traceback, on the server
    monkeypatch.undo()
    again = client.get("/v1/galleries")
    assert again.status_code == 200 and local_port(first) == local_port(r) == local_port(again)


# ------------------------------------------------------------------ item 3: deletes stay in uploads
def test_deleting_an_item_deletes_only_its_own_upload(live, setup):
    client, service = live["client"], live["service"]
    root, uploads = setup["root"], setup["config"].galleries / "_uploads"
    victim = root / "victim.txt"
    victim.write_text("keep me")
    (uploads / "g").mkdir(parents=True, exist_ok=True)
    outside_link = uploads / "g" / "link.png"
    outside_link.symlink_to(victim)
    client.post("/v1/galleries", json={"name": "other"}, headers=KEY)
    theirs = client.post("/v1/galleries/other/items", files=files(encoded(photo(3))), headers=KEY).json()
    theirs = theirs["items"][0]
    evil_paths = [f"{setup['config'].galleries}/_uploads/../../victim.txt",  # as text it is under _uploads
                  str(outside_link),  # a link in the uploads folder to a file outside it
                  theirs["path"],  # another gallery's upload
                  str(uploads / "g")]  # a folder
    gallery = service.registry.get("g")
    vectors = np.random.default_rng(0).standard_normal((len(evil_paths), 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = gallery.add(vectors, [{"path": p} for p in evil_paths])
    for item_id in ids.tolist():
        assert client.delete(f"/v1/galleries/g/items/{item_id}", headers=KEY).status_code == 200
    assert victim.read_text() == "keep me"
    assert outside_link.is_symlink()
    assert (uploads / "other").is_dir() and os.path.isfile(theirs["path"])
    # a real upload still goes with its item
    mine = client.post("/v1/galleries/g/items", files=files(encoded(photo(4))), headers=KEY).json()
    mine = mine["items"][0]
    assert os.path.isfile(mine["path"])
    assert client.delete(f"/v1/galleries/g/items/{mine['id']}", headers=KEY).status_code == 200
    assert not os.path.exists(mine["path"])


# ------------------------------------------------------------------------- item 5: the spec is true
@pytest.mark.parametrize("method, path, allowed", [
    ("PUT", "/v1/galleries", {"GET", "POST"}),
    ("PATCH", "/v1/galleries/g", {"GET", "DELETE"}),
    ("GET", "/v1/galleries/g/search", {"POST"}),
    ("PUT", "/v1/galleries/g/items/1", {"GET", "DELETE"}), ("HEAD", "/v1/galleries", {"GET", "POST"}),
    ("POST", "/static/app.js", {"GET", "HEAD"}), ("PUT", "/static-offline-docs/swagger-ui.css", {"GET", "HEAD"}),
    ("DELETE", "/healthz", {"GET"})])
def test_405_names_the_allowed_methods(live, method, path, allowed):
    r = live["client"].request(method, path, headers=KEY)
    assert r.status_code == 405 and (method == "HEAD" or error_of(r, 405)["code"] == "method_not_allowed")
    assert {m.strip() for m in r.headers["allow"].split(",")} == allowed


def operations(spec: dict):
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            yield method.upper(), path, operation


WRITES = {("POST", "/v1/galleries"), ("DELETE", "/v1/galleries/{name}"),
          ("POST", "/v1/galleries/{name}/items"), ("POST", "/v1/galleries/{name}/items/paths"),
          ("POST", "/v1/galleries/{name}/snapshot"), ("POST", "/v1/snapshots/{snapshot}/restore"),
          ("DELETE", "/v1/galleries/{name}/items/{item_id}")}


def test_the_spec_asks_for_a_key_on_writes_only(live, setup):
    from asymret.api.app import create_app

    spec = live["client"].get("/openapi.json").json()
    scheme = spec["components"]["securitySchemes"]
    assert [s["name"] for s in scheme.values()] == ["X-API-Key"]
    keyed = {(m, p) for m, p, op in operations(spec) if op.get("security")}
    assert keyed == WRITES
    for method, path, op in operations(spec):
        if (method, path) in WRITES:
            assert set(op["responses"]) >= {"401", "403"}
    with_reads = create_app(setup["config"].model_copy(update={"keys_for_reads": True})).openapi()
    keyed = {(m, p) for m, p, op in operations(with_reads) if op.get("security")}
    assert WRITES < keyed and ("POST", "/v1/galleries/{name}/search") in keyed
    assert ("GET", "/healthz") not in keyed
    no_keys = create_app(setup["config"].model_copy(update={"api_keys": []})).openapi()
    assert not any(op.get("security") for _, _, op in operations(no_keys))  # nothing is asked for


@pytest.mark.parametrize("body", [{"name": 0}, {"name": 12.5}, {"name": True}, {"name": "ok", "factory": 1},
                                  {"name": ["x"]}])
def test_a_number_is_not_a_name(live, body):
    r = live["client"].post("/v1/galleries", json=body, headers=KEY)
    assert error_of(r, 422)["code"] == "invalid_request"
    assert live["client"].get("/v1/galleries/0").status_code == 404


def test_a_number_is_not_a_path_but_labels_stay_text(live):
    client = live["client"]
    r = client.post("/v1/galleries/g/items/paths", json={"items": [{"path": 7}]}, headers=KEY)
    assert error_of(r, 422)["code"] == "invalid_request"
    body = {"items": [{"path": "ok.png", "label": 7}]}
    r = client.post("/v1/galleries/g/items/paths", json=body, headers=KEY)
    assert r.status_code == 201 and r.json()["items"][0]["label"] == "7"  # documented: labels are text
    schemas = client.get("/openapi.json").json()["components"]["schemas"]  # and the spec says both
    for model, field in [("PathItem", "label"), ("PathItem", "camera"), ("Query", "label"), ("Filters", "camera")]:
        assert {"type": "number"} in schemas[model]["properties"][field]["anyOf"], (model, field)
    assert schemas["PathItem"]["properties"]["path"]["type"] == "string"
    assert schemas["GalleryCreate"]["properties"]["name"]["type"] == "string"


def test_a_missing_key_is_401_with_a_challenge_and_a_wrong_one_403(live, setup):
    client = live["client"]
    for r in (client.post("/v1/galleries", json={"name": "k"}),
              client.delete("/v1/galleries/g"),
              client.post("/v1/galleries/g/items", files=files(encoded(photo(1))))):
        assert error_of(r, 401)["code"] == "unauthorized"
        assert r.headers["www-authenticate"].startswith("APIKey")
        assert "X-API-Key" in r.json()["error"]["message"]
    r = client.post("/v1/galleries", json={"name": "k"}, headers={"X-API-Key": "wrong"})
    assert error_of(r, 403)["code"] == "forbidden" and "www-authenticate" not in r.headers
    assert client.get("/v1/galleries/g").status_code == 200  # the gallery is still there


# ----------------------------------------------------------------------- item 6: readiness is true
def test_readyz_probes_the_database(live, setup):
    client, service = live["client"], live["service"]
    db = setup["config"].galleries / "galleries.db"
    aside = db.with_name("aside.db")
    assert client.get("/readyz").status_code == 200
    db.rename(aside)  # the database is gone: a new connection finds an empty file with no tables
    service.store.engine.dispose()  # pooled connections would still read the renamed file
    try:
        r = client.get("/readyz")
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["ready"] is False and "database" in body["error"] and "galleries" in body["error"]
        assert client.get("/healthz").status_code == 200  # alive, just not ready
    finally:
        db.unlink(missing_ok=True)
        aside.rename(db)
        service.store.engine.dispose()
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["ready"] is True and r.json()["error"] is None


def test_readyz_gives_up_on_a_database_that_hangs(live, monkeypatch):
    client, service = live["client"], live["service"]
    release = threading.Event()
    monkeypatch.setattr(service.store, "ping", lambda: release.wait(30))
    monkeypatch.setattr(service, "ready_timeout_s", 0.2)
    try:
        r = client.get("/readyz", timeout=10)
        assert r.status_code == 503 and "did not answer within 0.2 s" in r.json()["error"]
        assert client.get("/readyz", timeout=10).status_code == 503  # one probe in flight, not a pile of them
    finally:
        release.set()
    monkeypatch.undo()
    assert client.get("/readyz").status_code == 200


# ---------------------------------------------------------------------------- offline Swagger UI
@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_need_no_internet(live, page):
    client = live["client"]
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*["']([^"']+)["']""", r.text)
    urls = [a or b for a, b in urls]
    assert urls and not [u for u in urls if re.match(r"(https?:)?//", u)], urls
    assert "cdn" not in r.text.lower()
    for url in urls:
        assert client.get(url).status_code == 200, url
    assert any(u.endswith(".js") for u in urls)
