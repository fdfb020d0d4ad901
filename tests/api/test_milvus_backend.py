"""``--backend milvus`` end to end: on the demo (mini) gallery the CLI and the REST API answer with the
same ids and scores as the FAISS backend (exact Flat index on both), and the service over Milvus Lite
keeps what it was given through search, add, remove and a restart."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from asymret.api.settings import ServeConfig
from asymret.retrieval.datasets import RevisitedDataset
from tests.api.servekit import encoded, files, photo, serve
from tests.api.test_index_cli import fails, mini, nets, pair_file, run  # noqa: F401  (fixtures)

pytest.importorskip("milvus_lite", reason="milvus-lite has no wheel for this platform; the milvus backend is untested here")


def release(lite) -> None:
    """Stop this process's Milvus Lite server for ``lite``: the next store reads the file again."""
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(str(lite))


@pytest.fixture(scope="module")
def demo(mini, pair_file, tmp_path_factory):  # noqa: F811
    """The mini benchmark's database built by the CLI into both backends (same command, --backend apart)."""
    root = tmp_path_factory.mktemp("demo")
    lite = root / "galleries.milvus.db"
    common = ["--pair", pair_file, "--images", mini["gnd"], "--name", "rox", "--workers", 0, "--shard-size", 8]
    backends = {"faiss": ["--root", root / "faiss"], "milvus": ["--root", root / "milvus", "--backend", "milvus",
                                                               "--uri", lite]}
    return {"root": root, "lite": lite, "backends": backends, "common": common}


def test_cli_answers_equal_on_both_backends(demo, mini, pair_file, capsys):  # noqa: F811
    data = RevisitedDataset(mini["roxford"])
    answers = {}
    for backend, where in demo["backends"].items():
        assert "now 19 items (16-d)" in run(capsys, "build", *demo["common"], *where)
        results = []
        for record in data.queries:
            box = ",".join(str(v) for v in record.bbx)
            out = json.loads(run(capsys, "search", "--name", "rox", *where, "--pair", pair_file, "--image",
                                 record.path, "--bbx", box, "-k", data.num_database, "--json"))
            results.append([(h["id"], h["score"], h["path"], h["label"]) for h in out["results"][0]["hits"]])
        answers[backend] = results
    for faiss_row, milvus_row in zip(answers["faiss"], answers["milvus"]):
        assert [h[0] for h in faiss_row] == [h[0] for h in milvus_row] and len(faiss_row) == data.num_database
        np.testing.assert_allclose([h[1] for h in faiss_row], [h[1] for h in milvus_row], atol=1e-6)
        assert [h[2:] for h in faiss_row] == [h[2:] for h in milvus_row]

    milvus = ["--name", "rox", *demo["backends"]["milvus"]]
    info = json.loads(run(capsys, "info", *milvus, "--json"))
    assert (info["count"], info["index"]["type"], info["pending_build"]) == (19, "FLAT", None)
    assert "Milvus FLAT in collection asymret_rox" in run(capsys, "info", *milvus)
    listing = json.loads(run(capsys, "list", *demo["backends"]["milvus"], "--json"))
    assert [(g["name"], g["count"]) for g in listing] == [("rox", 19)]
    other = pair_file.parent / "other.pt"
    from asymret.retrieval.pair import save_pair

    save_pair(other, *nets(1))
    assert "was encoded by resnet10t" in fails(capsys, "search", *milvus, "--pair", other, "--image",
                                               data.queries[0].path)
    assert "already exists" in fails(capsys, "build", *demo["common"], *demo["backends"]["milvus"])
    assert "add --backend milvus" in fails(capsys, "list", "--root", demo["root"], "--uri", demo["lite"])


def test_rest_answers_equal_on_both_backends(demo, mini, pair_file, capsys):  # noqa: F811
    if not (demo["root"] / "faiss").exists():
        test_cli_answers_equal_on_both_backends(demo, mini, pair_file, capsys)
    data = RevisitedDataset(mini["roxford"])
    images = [encoded(photo(7)), (data.queries[0].path).read_bytes()]
    configs = {"faiss": ServeConfig(pair=pair_file, galleries=demo["root"] / "faiss", device="cpu"),
               "milvus": ServeConfig(pair=pair_file, galleries=demo["root"] / "milvus", device="cpu",
                                     backend="milvus", uri=str(demo["lite"]))}
    answers = {}
    for backend, config in configs.items():
        with serve(config) as url, httpx.Client(base_url=url, timeout=30) as client:
            by_image = client.post("/v1/galleries/rox/search/image", files=files(*images),
                                   data={"k": "19", "label": ["x", "x"], "camera": ["1", "1"]})
            assert by_image.status_code == 200, by_image.text
            by_item = client.post("/v1/galleries/rox/search", json={"k": 5, "queries": [{"item_id": 3}, {"item_id": 0}]})
            assert by_item.status_code == 200, by_item.text
            answers[backend] = [r["hits"] for r in by_image.json()["results"] + by_item.json()["results"]]
    for faiss_hits, milvus_hits in zip(answers["faiss"], answers["milvus"]):
        assert [h["id"] for h in faiss_hits] == [h["id"] for h in milvus_hits]
        np.testing.assert_allclose([h["score"] for h in faiss_hits], [h["score"] for h in milvus_hits], atol=1e-6)
    assert 3 not in [h["id"] for h in answers["milvus"][2]] and len(answers["milvus"][2]) == 5


def test_service_on_milvus_lite_keeps_items_through_a_restart(pair_file, tmp_path):  # noqa: F811
    lite = tmp_path / "g.milvus.db"
    config = ServeConfig(pair=pair_file, galleries=tmp_path / "galleries", device="cpu", backend="milvus",
                         uri=str(lite))
    blobs = [encoded(photo(i)) for i in range(5)]
    with serve(config) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/v1/galleries", json={"name": "people"}).status_code == 201
        added = client.post("/v1/galleries/people/items", files=files(*blobs),
                            data={"label": ["a", "a", "b", "b", "c"], "camera": ["1", "2", "1", "2", "1"]})
        assert added.status_code == 201, added.text
        ids = [item["id"] for item in added.json()["items"]]
        assert ids == [0, 1, 2, 3, 4]
        assert client.delete("/v1/galleries/people/items/1").status_code == 200
        rule = client.post("/v1/galleries/people/search/image", files=files(blobs[0]),
                           data={"k": "4", "exclude_same_camera": "true", "label": "a", "camera": "1"})
        assert rule.status_code == 200, rule.text
        before = rule.json()["results"][0]["hits"]
        assert [h["id"] for h in before] and not {0, 1} & {h["id"] for h in before}  # itself (a, 1) and removed
        info = client.get("/v1/galleries/people").json()
        assert info["count"] == 4 and info["compatible"]
    release(lite)
    with serve(config) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/v1/galleries/people").json()["count"] == 4
        again = client.post("/v1/galleries/people/search/image", files=files(blobs[0]),
                            data={"k": "4", "exclude_same_camera": "true", "label": "a", "camera": "1"})
        assert again.json()["results"][0]["hits"] == before
        assert client.get("/v1/galleries/people/items/1").status_code == 404
        more = client.post("/v1/galleries/people/items", files=files(encoded(photo(9))), data={"label": "d"})
        assert [item["id"] for item in more.json()["items"]] == [5]  # never a removed item's id


def test_build_from_embeddings_into_milvus(tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "q.npy", x[17])
    (tmp_path / "m.csv").write_text("path,label\n" + "".join(f"img{i}.jpg,car{i % 5}\n" for i in range(50)))
    common = ["--name", "e", "--root", tmp_path / "scratch", "--backend", "milvus", "--uri", tmp_path / "e.milvus.db"]
    assert "now 50 items (8-d)" in run(capsys, "build", *common, "--embeddings", tmp_path / "x.npy", "--meta",
                                       tmp_path / "m.csv", "--factory", "HNSW16")
    hit = json.loads(run(capsys, "search", *common, "--vector", tmp_path / "q.npy", "-k", 1, "--json"))
    assert {k: hit["results"][0]["hits"][0][k] for k in ("id", "path", "label")} == {
        "id": 17, "path": "img17.jpg", "label": "car2"}
    assert "removed 2 item(s) from gallery 'e'; 48 remain" in run(capsys, "remove", *common, "--ids", "3,17")
    assert "has no item [17]" in fails(capsys, "remove", *common, "--ids", "17")
    assert "deleted gallery 'e' (48 items)" in run(capsys, "delete", *common)
