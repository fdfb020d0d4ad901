"""``asymret serve`` over real HTTP (uvicorn on 127.0.0.1): every route, its error paths, and answers
checked against the pair run in-process with numpy ranking (tests/api/servekit.Reference)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from asymret.api.batcher import Batcher
from asymret.api.settings import ServeConfig
from asymret.errors import ConfigError
from tests.api.servekit import GALLERY_SPEC, Reference, encoded, files, make_pair, photo, serve

KEY = {"X-API-Key": "s3cret"}
LABELS = ["a", "a", "b", "b", "c", "c"]
CAMERAS = ["1", "2", "1", "1", "2", "1"]
COLORS = ["red", "blue", "red", "red", "blue", "red"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    pair = make_pair(root / "pair.pt")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    for i in range(3):
        photo(100 + i).save(images / "sub" / f"p{i}.png")
    (root / "outside.png").write_bytes(encoded(photo(999)))
    (images / "escape.png").symlink_to(root / "outside.png")
    (images / "inner_link.png").symlink_to(images / "sub" / "p0.png")
    config = ServeConfig(pair=pair, galleries=root / "galleries", api_keys=[KEY["X-API-Key"]],
                         allowed_roots=[images], device="cpu", max_request_mb=1, max_image_pixels=1_000_000)
    return {"root": root, "config": config, "images": images, "ref": Reference(pair)}


@pytest.fixture(scope="module")
def server(setup):
    with serve(setup["config"]) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def gallery(client):
    """Gallery 'people': six uploaded images with labels, cameras and attributes."""
    assert client.post("/v1/galleries", json={"name": "people"}, headers=KEY).status_code == 201
    blobs = [encoded(photo(i)) for i in range(6)]
    r = client.post("/v1/galleries/people/items", files=files(*blobs), headers=KEY,
                    data={"label": LABELS, "camera": CAMERAS,
                          "attributes": [json.dumps({"color": c, "n": i}) for i, c in enumerate(COLORS)]})
    assert r.status_code == 201, r.text
    return {"items": r.json()["items"], "images": [photo(i) for i in range(6)]}


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    return body["error"]["code"]


# ------------------------------------------------------------------------------------ operations
def test_health_ready_docs_page(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["ready"] is True
    assert "swagger" in client.get("/docs").text.lower()
    spec = client.get("/openapi.json").json()
    assert {"/v1/galleries", "/v1/galleries/{name}", "/v1/galleries/{name}/items",
            "/v1/galleries/{name}/items/paths", "/v1/galleries/{name}/items/{item_id}",
            "/v1/galleries/{name}/items/{item_id}/thumbnail", "/v1/galleries/{name}/search",
            "/v1/galleries/{name}/search/image", "/v1/encode", "/v1/info", "/healthz", "/readyz",
            "/metrics"} <= set(spec["paths"])
    assert "X-API-Key" in json.dumps(spec["components"]["securitySchemes"])
    page = client.get("/")
    assert page.headers["content-type"].startswith("text/html") and "/static/app.js" in page.text
    assert "search/image" in client.get("/static/app.js").text


def test_info(client):
    info = client.get("/v1/info").json()
    assert info["query_net"]["backbone"] == "mobilenetv2_035" and info["gallery_net"]["backbone"] == "resnet18"
    assert info["dim"] == 32 and info["pair"]["run"] == "test" and info["whitening"] is None
    assert info["limits"]["max_image_pixels"] == 1_000_000


# ------------------------------------------------------------------------------------- galleries
def test_gallery_lifecycle(client):
    assert error_of(client.post("/v1/galleries", json={"name": "tmp"}), 401) == "unauthorized"
    assert error_of(client.post("/v1/galleries", json={"name": "tmp"}, headers={"X-API-Key": "nope"}), 403)
    r = client.post("/v1/galleries", json={"name": "tmp", "factory": "HNSW16"}, headers=KEY)
    assert r.status_code == 201
    made = r.json()
    assert (made["dim"], made["factory"], made["count"], made["compatible"]) == (32, "HNSW16", 0, True)
    assert made["network_spec"]["gallery_net"]["backbone"] == GALLERY_SPEC["backbone"]
    assert len(made["network_spec"]["weights_sha256"]) == 64  # as asymret index build records it
    assert error_of(client.post("/v1/galleries", json={"name": "tmp"}, headers=KEY), 409) == "conflict"
    assert error_of(client.post("/v1/galleries", json={"name": "../x"}, headers=KEY), 422) == "invalid_request"
    assert error_of(client.post("/v1/galleries", json={"name": "y", "factory": "Nope9"}, headers=KEY), 400)
    assert "tmp" in [g["name"] for g in client.get("/v1/galleries").json()["galleries"]]
    assert client.get("/v1/galleries/tmp").json()["index"]["factory"] == "HNSW16"
    assert error_of(client.delete("/v1/galleries/tmp"), 401) == "unauthorized"
    assert client.delete("/v1/galleries/tmp", headers=KEY).json() == {"deleted": "tmp"}
    assert error_of(client.get("/v1/galleries/tmp"), 404) == "not_found"
    assert error_of(client.delete("/v1/galleries/tmp", headers=KEY), 404) == "not_found"


# ----------------------------------------------------------------------------------------- items
def test_added_items_are_gallery_network_embeddings(client, gallery, setup):
    items = gallery["items"]
    assert [(i["label"], i["camera"], i["attributes"]["color"]) for i in items] == list(zip(LABELS, CAMERAS, COLORS))
    assert client.get(f"/v1/galleries/people/items/{items[2]['id']}").json() == items[2]
    assert client.get("/v1/galleries/people").json()["count"] == 6
    # search by an item: scores are the gallery network's cosine similarities, computed here independently
    g = setup["ref"].gallery(gallery["images"])
    r = client.post("/v1/galleries/people/search", json={"queries": [{"item_id": items[0]["id"]}], "k": 5})
    hits = r.json()["results"][0]["hits"]
    expected = np.argsort(-(g[1:] @ g[0]))[:5] + 1  # the item itself is left out
    assert [h["id"] for h in hits] == [items[j]["id"] for j in expected]
    np.testing.assert_allclose([h["score"] for h in hits], np.sort(g[1:] @ g[0])[::-1][:5], atol=1e-5)


def test_add_errors(client, gallery):
    one = files(encoded(photo(7)))
    assert error_of(client.post("/v1/galleries/people/items", files=one), 401) == "unauthorized"
    assert error_of(client.post("/v1/galleries/nope/items", files=one, headers=KEY), 404) == "not_found"
    two = files(encoded(photo(7)), encoded(photo(8)))
    assert error_of(client.post("/v1/galleries/people/items", files=two, data={"label": ["x"]}, headers=KEY), 400)
    bad = {"attributes": "[1, 2]"}
    assert error_of(client.post("/v1/galleries/people/items", files=one, data=bad, headers=KEY), 400)
    assert error_of(client.post("/v1/galleries/people/items", headers=KEY), 422) == "invalid_request"
    assert client.get("/v1/galleries/people").json()["count"] == 6  # nothing half-added


def test_add_by_server_path(client, setup):
    assert client.post("/v1/galleries", json={"name": "paths"}, headers=KEY).status_code == 201
    images = setup["images"]
    body = {"items": [{"path": "sub/p0.png", "label": "7"}, {"path": str(images / "sub" / "p1.png")},
                      {"path": "inner_link.png", "camera": 3}]}  # numbers are taken as text
    r = client.post("/v1/galleries/paths/items/paths", json=body, headers=KEY)
    assert r.status_code == 201, r.text
    added = r.json()["items"]
    assert [a["path"] for a in added] == [str((images / "sub" / f"p{i}.png").resolve()) for i in (0, 1, 0)]
    assert (added[0]["label"], added[2]["camera"]) == ("7", "3")
    # the stored vectors are the gallery network's: item 0 and item 2 are the same file
    g = setup["ref"].gallery([photo(100), photo(101)])
    hits = client.post("/v1/galleries/paths/search", json={"queries": [{"vector": g[1].tolist()}], "k": 3}).json()
    top = hits["results"][0]["hits"]
    assert top[0]["id"] == added[1]["id"] and top[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert top[1]["score"] == pytest.approx(top[2]["score"], abs=1e-6) == pytest.approx(float(g[0] @ g[1]), abs=1e-5)


@pytest.mark.parametrize("path, status", [
    ("../outside.png", 403), ("sub/../../outside.png", 403), ("{root}/outside.png", 403), ("/etc/passwd", 403),
    ("escape.png", 403), ("sub/missing.png", 404), ("sub", 422)])
def test_server_paths_are_confined_to_roots(client, setup, path, status):
    client.post("/v1/galleries", json={"name": "confined"}, headers=KEY)
    body = {"items": [{"path": path.format(root=setup["root"])}]}
    error_of(client.post("/v1/galleries/confined/items/paths", json=body, headers=KEY), status)


def test_thumbnail_and_delete(client, setup):
    client.post("/v1/galleries", json={"name": "thumbs"}, headers=KEY)
    wide = photo(5, size=(400, 100))
    r = client.post("/v1/galleries/thumbs/items", files=files(encoded(wide)), headers=KEY)
    item = r.json()["items"][0]
    thumb = client.get(item["thumbnail_url"])
    assert thumb.headers["content-type"] == "image/jpeg"
    with Image.open(__import__("io").BytesIO(thumb.content)) as im:
        assert im.size == (160, 40)  # longer side 160, aspect kept
    assert Path(item["path"]).is_file()
    assert error_of(client.delete(f"/v1/galleries/thumbs/items/{item['id']}"), 401) == "unauthorized"
    assert client.delete(f"/v1/galleries/thumbs/items/{item['id']}", headers=KEY).json() == {"deleted": str(item["id"])}
    assert not Path(item["path"]).exists()  # the kept upload goes with its item
    assert error_of(client.get(f"/v1/galleries/thumbs/items/{item['id']}"), 404) == "not_found"
    assert error_of(client.get(f"/v1/galleries/thumbs/items/{item['id']}/thumbnail"), 404) == "not_found"
    assert error_of(client.delete(f"/v1/galleries/thumbs/items/{item['id']}", headers=KEY), 404) == "not_found"
    assert error_of(client.get("/v1/galleries/thumbs/items/99999999999999999999"), 422) == "invalid_request"


# ---------------------------------------------------------------------------------------- search
def test_search_by_image_uses_the_query_network(client, gallery, setup):
    ref = setup["ref"]
    g = ref.gallery(gallery["images"])
    queries = [photo(1), photo(50)]
    q = ref.query(queries)
    r = client.post("/v1/galleries/people/search/image", files=files(*(encoded(x) for x in queries)), data={"k": 4})
    body = r.json()
    assert r.status_code == 200 and body["query_net"].startswith("mobilenetv2_035") and body["took_ms"] > 0
    ids = [it["id"] for it in gallery["items"]]
    for result, qv in zip(body["results"], q):
        scores = g @ qv
        order = np.argsort(-scores)[:4]
        assert [h["id"] for h in result["hits"]] == [ids[j] for j in order]
        np.testing.assert_allclose([h["score"] for h in result["hits"]], scores[order], atol=1e-5)
        assert result["hits"][0]["thumbnail_url"] == f"/v1/galleries/people/items/{ids[order[0]]}/thumbnail"


def test_encode_returns_the_query_vectors(client, setup):
    images = [photo(3), photo(4, size=(20, 64))]
    r = client.post("/v1/encode", files=files(*(encoded(x) for x in images)))
    assert r.json()["dim"] == 32
    np.testing.assert_allclose(np.array(r.json()["vectors"]), setup["ref"].query(images), atol=1e-5)


def _search(client, **body):
    r = client.post("/v1/galleries/people/search", json=body)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def test_filters_reid_rule_and_groups(client, gallery, setup):
    g = setup["ref"].gallery(gallery["images"])
    ids = np.array([it["id"] for it in gallery["items"]])
    q = setup["ref"].query([photo(42)])[0]
    scores = g @ q

    def expect(keep):
        order = [j for j in np.argsort(-scores) if keep(j)]
        return [int(ids[j]) for j in order]

    def hit_ids(results):
        return [h["id"] for h in results[0]["hits"]]

    vector = [{"vector": q.tolist()}]
    assert hit_ids(_search(client, queries=vector, k=6, filters={"label": ["a", "c"]})) == \
        expect(lambda j: LABELS[j] in ("a", "c"))
    assert hit_ids(_search(client, queries=vector, k=6, filters={"camera": "1", "attributes": {"color": "red"}})) == \
        expect(lambda j: CAMERAS[j] == "1" and COLORS[j] == "red")
    assert hit_ids(_search(client, queries=vector, k=6, filters={"attributes": {"n": 4}})) == [int(ids[4])]
    # re-ID rule: identity b seen by camera 1 is dropped, b elsewhere and others on camera 1 stay
    reid = [{"vector": q.tolist(), "label": "b", "camera": "1"}]
    assert hit_ids(_search(client, queries=reid, k=6, exclude_same_camera=True)) == \
        expect(lambda j: not (LABELS[j] == "b" and CAMERAS[j] == "1"))
    # k smaller than what the rule drops: later rounds fetch more, still exact
    assert hit_ids(_search(client, queries=reid, k=2, exclude_same_camera=True)) == \
        expect(lambda j: not (LABELS[j] == "b" and CAMERAS[j] == "1"))[:2]
    # by item: its own label and camera apply (item 0 is a/1)
    by_item = _search(client, queries=[{"item_id": int(ids[0])}], k=5, exclude_same_camera=True)
    assert int(ids[0]) not in hit_ids(by_item) and all(
        (h["label"], h["camera"]) != ("a", "1") for h in by_item[0]["hits"])
    grouped = _search(client, queries=vector, k=6, group_by_label=True)[0]
    best = {}
    for h in grouped["hits"]:
        best.setdefault(h["label"], []).append(h["id"])
    assert [grp["label"] for grp in grouped["groups"]] == list(best)
    assert all([h["id"] for h in grp["hits"]] == best[grp["label"]] for grp in grouped["groups"])
    assert all(grp["score"] == grp["hits"][0]["score"] for grp in grouped["groups"])


def test_batch_search_mixes_vectors_and_items(client, gallery, setup):
    g = setup["ref"].gallery(gallery["images"])
    ids = [it["id"] for it in gallery["items"]]
    results = _search(client, queries=[{"vector": g[3].tolist()}, {"item_id": ids[3]}], k=3)
    assert results[0]["hits"][0]["id"] == ids[3]  # an item finds itself by its vector ...
    assert results[1]["hits"][0]["id"] == results[0]["hits"][1]["id"]  # ... but not by its id


def test_search_errors(client, gallery):
    q = [{"vector": [1.0] * 32}]

    def post(body, name="people"):
        return client.post(f"/v1/galleries/{name}/search", json=body)

    assert error_of(post({"queries": q, "k": 0}), 422) == "invalid_request"
    assert error_of(post({"queries": []}), 422) == "invalid_request"
    assert error_of(post({"queries": [{"vector": [1.0], "item_id": 1}]}), 422) == "invalid_request"
    assert error_of(post({"queries": [{"vector": [1.0] * 31}]}), 400) == "invalid_input"
    assert error_of(post({"queries": [{"vector": [0.0] * 32}]}), 400) == "invalid_input"
    assert error_of(post({"queries": q, "exclude_same_camera": True}), 400) == "invalid_input"
    assert error_of(post({"queries": q, "filters": {"color": "red"}}), 422) == "invalid_request"
    assert error_of(post({"queries": [{"item_id": 10**9}]}), 404) == "not_found"
    assert error_of(post({"queries": q}, name="nope"), 404) == "not_found"
    nan = client.post("/v1/galleries/people/search", content=b'{"queries": [{"vector": [NaN' + b", 1.0" * 31 + b"]}]}",
                      headers={"content-type": "application/json"})
    assert error_of(nan, 400) == "invalid_input"
    assert error_of(client.post("/v1/galleries/people/search", content=b"{not json",
                                headers={"content-type": "application/json"}), 422) == "invalid_request"
    image = files(encoded(photo(1)))
    assert error_of(client.post("/v1/galleries/people/search/image", files=image, data={"filters": "{"}), 400)
    assert error_of(client.post("/v1/galleries/people/search/image", files=image, data={"k": "many"}), 422)


def test_item_search_needs_exact_vectors(client):
    client.post("/v1/galleries", json={"name": "hnsw", "factory": "HNSW8"}, headers=KEY)
    item = client.post("/v1/galleries/hnsw/items", files=files(encoded(photo(1))), headers=KEY).json()["items"][0]
    r = client.post("/v1/galleries/hnsw/search", json={"queries": [{"item_id": item["id"]}]})
    assert "Flat" in r.json()["error"]["message"] and r.status_code == 400


def test_gallery_of_another_network_refuses_images(client, setup, server):
    from asymret.index import GalleryStore

    ours = client.get("/v1/galleries/people").json()["network_spec"]
    retrained = {**ours, "weights_sha256": "0" * 64}  # same architecture, other weights: another space
    with GalleryStore(setup["config"].galleries) as store:  # another process's galleries, made while serving
        for name, spec in (("other", retrained), ("bare", None)):
            made = store.create(name, 32, "Flat", network_spec=spec)
            made.add(np.eye(32, dtype=np.float32)[:4])
            made.close()
    info = client.get("/v1/galleries/other").json()
    assert info["compatible"] is False and info["count"] == 4
    image = files(encoded(photo(1)))
    refused = client.post("/v1/galleries/other/search/image", files=image)
    assert error_of(refused, 409) == "conflict" and "weights 000000000000" in refused.json()["error"]["message"]
    assert error_of(client.post("/v1/galleries/other/items", files=image, headers=KEY), 409) == "conflict"
    hits = _search_named(client, "other", {"queries": [{"vector": np.eye(32)[2].tolist()}], "k": 1})
    assert hits[0]["id"] == 2 and hits[0]["score"] == pytest.approx(1.0)
    # built from bare vectors: no network recorded, only the dimension can be checked
    assert client.get("/v1/galleries/bare").json()["compatible"] is True
    assert client.post("/v1/galleries/bare/search/image", files=image).status_code == 200


def _search_named(client, name, body):
    return client.post(f"/v1/galleries/{name}/search", json=body).json()["results"][0]["hits"]


# ------------------------------------------------------------------------------ protocol errors
def test_http_errors_are_json(client, server):
    assert error_of(client.get("/v2/nothing"), 404) == "not_found"
    assert error_of(client.put("/v1/galleries"), 405) == "method_not_allowed"
    big = b"x" * ((1 << 20) + 1)
    assert error_of(client.post("/v1/encode", files=files(big)), 413) == "content_too_large"

    def chunks():  # no Content-Length: the limit applies while the body streams in
        for _ in range(40):
            yield b"y" * 65536

    r = httpx.post(f"{server}/v1/galleries/people/search", content=chunks(), headers={"content-type": "application/json"})
    assert error_of(r, 413) == "content_too_large"
    assert client.get("/readyz").status_code == 200  # and the server is still up


def test_metrics(client, gallery):
    client.post("/v1/galleries/people/search/image", files=files(encoded(photo(1))))
    text = client.get("/metrics").text
    assert 'asymret_http_requests_total{method="POST",route="/v1/galleries/{name}/search/image",status="200"}' in text
    assert 'asymret_http_request_seconds_bucket{le="0.001",method="POST",route="/v1/galleries/{name}/search"' in text
    count = client.get("/v1/galleries/people").json()["count"]
    assert f'asymret_gallery_items{{gallery="people"}} {float(count)}' in text
    batches = float(text.split("asymret_query_batch_size_count ")[1].split()[0])
    assert batches >= 1
    assert 'route="unmatched"' in text  # unknown paths share one label


def test_keys_for_reads(setup, tmp_path):
    config = setup["config"].model_copy(update={"keys_for_reads": True, "galleries": tmp_path / "g"})
    with serve(config) as url:
        assert error_of(httpx.get(f"{url}/v1/galleries"), 401) == "unauthorized"
        assert httpx.get(f"{url}/v1/galleries", headers=KEY).json() == {"galleries": []}
        assert httpx.get(f"{url}/healthz").status_code == 200  # probes need no key


def test_not_ready_until_loaded_and_after_failure(setup, tmp_path):
    import uvicorn

    from asymret.api.app import create_app
    from tests.api.servekit import free_socket

    bad = setup["config"].model_copy(update={"pair": tmp_path / "missing.pt", "galleries": tmp_path / "g"})
    sock = free_socket()
    server = uvicorn.Server(uvicorn.Config(create_app(bad), log_level="critical"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        for _ in range(100):
            try:
                ready = httpx.get(f"{url}/readyz")
                if ready.json()["error"]:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        assert ready.status_code == 503 and "pair file not found" in ready.json()["error"]
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert error_of(httpx.get(f"{url}/v1/galleries"), 503) == "not_ready"
    finally:
        server.should_exit = True
        thread.join(10)


# --------------------------------------------------------------------------------------- batcher
def test_batcher_coalesces_within_bounds():
    sizes, release = [], threading.Event()

    def double(items):
        sizes.append(len(items))
        release.wait(5)  # the first batch holds the worker while the others queue up
        return [2 * x for x in items]

    batcher = Batcher(double, max_batch=4, max_wait_ms=50)
    futures = [batcher.submit(0)]
    time.sleep(0.1)
    futures += [batcher.submit(i) for i in range(1, 11)]
    release.set()
    assert [f.result(5) for f in futures] == [2 * i for i in range(11)]
    batcher.close()
    assert sizes[0] == 1 and max(sizes) == 4 and sum(sizes) == 11 and len(sizes) == 4  # 1 + 4 + 4 + 2


def test_batcher_never_holds_a_lone_request_but_waits_for_company_under_load():
    hour = 3_600_000  # max_wait_ms: a lone request that waited for it would time out below
    lone = Batcher(lambda items: [x + 1 for x in items], max_batch=8, max_wait_ms=hour)
    assert [lone(i, timeout=60) for i in range(3)] == [1, 2, 3]  # one at a time: each runs at once
    lone.close()

    sizes, release = [], threading.Event()

    def record(items):
        sizes.append(len(items))
        release.wait(60)
        return items

    busy = Batcher(record, max_batch=4, max_wait_ms=hour)
    first = [busy.submit(0)]
    while not sizes:  # the worker holds item 0; two more queue behind it: requests arrive together
        time.sleep(0.01)
    first += [busy.submit(1), busy.submit(2)]
    release.set()
    assert [f.result(60) for f in first] == [0, 1, 2] and sizes == [1, 2]
    # the last batch held 2, so the next one waits for company: it runs when full, not with its first item
    later = [busy.submit(i) for i in range(4)]
    assert [f.result(60) for f in later] == [0, 1, 2, 3] and sizes == [1, 2, 4]
    busy.close()


def test_batcher_isolates_a_bad_item_and_can_be_off():
    def invert(items):
        return [1 / x for x in items]

    batcher = Batcher(invert, max_batch=8, max_wait_ms=100)
    futures = [batcher.submit(x) for x in (1, 0, 4)]
    assert futures[0].result(5) == 1 and futures[2].result(5) == 0.25
    with pytest.raises(ZeroDivisionError):
        futures[1].result(5)
    batcher.close()
    sizes = []
    off = Batcher(lambda items: sizes.append(len(items)) or items, max_batch=1, max_wait_ms=100)
    assert [f.result(5) for f in [off.submit(i) for i in range(5)]] == list(range(5))
    off.close()
    assert sizes == [1] * 5


# ------------------------------------------------------------------------------------------- CLI
def test_serve_config_from_file_flags_and_env(tmp_path, monkeypatch):
    from asymret.api.cli import build_parser
    from asymret.api.commands.serve import build_config

    (tmp_path / "serve.yaml").write_text("pair: p.pt\nport: 9000\napi_keys: [a]\nmax_batch: 8\n")
    monkeypatch.setenv("ASYMRET_API_KEYS", "b, c")
    args = build_parser().parse_args(["serve", "--config", str(tmp_path / "serve.yaml"), "--port", "9100",
                                      "--allow-root", "/data", "--no-coalesce"])
    config = build_config(args)
    assert (config.port, config.api_keys, config.max_batch, config.allowed_roots) == (9100, ["a", "b", "c"], 1,
                                                                                     [Path("/data")])
    assert str(config.pair) == "p.pt" and config.host == "127.0.0.1"
    monkeypatch.delenv("ASYMRET_API_KEYS")
    with pytest.raises(ConfigError, match="no pair file"):
        build_config(build_parser().parse_args(["serve"]))
    (tmp_path / "typo.yaml").write_text("pair: p.pt\nmax_bach: 8\n")
    with pytest.raises(ConfigError, match="unknown key 'max_bach'"):
        build_config(build_parser().parse_args(["serve", "--config", str(tmp_path / "typo.yaml")]))


def test_every_serve_setting_is_a_flag_and_the_flag_sets_it(tmp_path):
    """serve builds its flags from ServeConfig: each field (but the pairs, which --pair fills) has one, and a
    value given on the command line arrives in that field, typed."""
    import typing

    from asymret.api.cli import build_parser
    from asymret.api.commands.serve import SPECIAL, build_config
    from asymret.api.settings import ServeConfig

    argv, want = ["serve", "--pair", "p.pt"], {}
    for name, field in ServeConfig.model_fields.items():
        if name in SPECIAL:
            continue
        flag = (field.json_schema_extra or {}).get("flag") or "--" + name.replace("_", "-")
        kind, args = field.annotation, typing.get_args(field.annotation)
        if kind is bool:
            argv.append(flag)
            want[name] = True
        elif typing.get_origin(kind) is typing.Literal:
            argv += [flag, str(args[-1])]
            want[name] = args[-1]
        elif typing.get_origin(kind) is list:
            value = "PNG" if name == "image_formats" else "x1"
            argv += [flag, value]
            want[name] = [args[0](value)]
        else:
            base = next((a for a in args if a is not type(None)), kind) if args else kind
            value = {int: "70", float: "3.5"}.get(base, "v1")
            argv += [flag, value]
            want[name] = base(value)
    want["backend"], argv[argv.index("--backend") + 1] = "faiss", "faiss"  # milvus would take --uri and --token
    config = build_config(build_parser().parse_args(argv))
    assert {name: getattr(config, name) for name in want} == want


def test_serve_cli_refuses_a_missing_pair(tmp_path, capsys):
    from asymret.api.cli import main

    assert main(["serve", "--pair", str(tmp_path / "none.pt"), "--galleries", str(tmp_path)]) == 2
    assert "pair file not found" in capsys.readouterr().err
