"""``rerank`` on the search API (aqe, alpha_qe, kreciprocal), over real HTTP, against the methods
computed here from the gallery's vectors."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from asymret.api.settings import ServeConfig
from asymret.index import GalleryStore
from asymret.retrieval import rerank
from asymret.retrieval.gallery import build_from_embeddings
from tests.api.servekit import encoded, files, make_pair, photo, serve

DIM = 32


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_rerank")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, DIM))
    labels = rng.integers(6, size=60)
    vectors = unit(centres[labels] + 0.8 * rng.normal(size=(60, DIM)))
    rows = [{"label": "ab"[i % 2], "camera": str(i % 3)} for i in range(60)]
    with GalleryStore(root / "galleries") as store:
        build_from_embeddings(store, "vecs", vectors, rows, progress=False)
        build_from_embeddings(store, "graph", vectors[:10], factory="HNSW8", progress=False)
    config = ServeConfig(pair=make_pair(root / "pair.pt"), galleries=root / "galleries", device="cpu")
    query = unit(centres[labels[:1]] + 0.8 * rng.normal(size=(1, DIM)))[0]
    return {"config": config, "vectors": vectors, "rows": rows, "query": query}


@pytest.fixture(scope="module")
def client(setup):
    with serve(setup["config"]) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield c


def dist(a, b):
    return np.sqrt(np.maximum(2 - 2 * a.astype(np.float64) @ b.T.astype(np.float64), 0))


def search(client, **body) -> list[dict]:
    r = client.post("/v1/galleries/vecs/search", json=body)
    assert r.status_code == 200, r.text
    return r.json()["results"][0]["hits"]


def expected_qe(q, g, alpha, k, keep=None):
    """The query plus its top 2 (weights max(sim, 0)^alpha), normalised; then the k best by it."""
    ids = np.flatnonzero(keep) if keep is not None else np.arange(len(g))
    sims = g[ids] @ q
    top = ids[np.argsort(-sims, kind="stable")[:2]]
    y = q + sum(max(float(g[j] @ q), 0.0) ** alpha * g[j] for j in top)
    y /= np.linalg.norm(y)
    order = ids[np.argsort(-(g[ids] @ y), kind="stable")[:k]]
    return order, g[order] @ y


@pytest.mark.parametrize("method,alpha", [("alpha_qe", 3.0), ("aqe", 0.0)])
def test_query_expansion_searches_again_with_the_expanded_query(client, setup, method, alpha):
    g, q = setup["vectors"], setup["query"]
    plain = search(client, queries=[{"vector": q.tolist()}], k=8)
    hits = search(client, queries=[{"vector": q.tolist()}], k=8, rerank=method)
    order, scores = expected_qe(q, g, alpha, 8)
    assert [h["id"] for h in hits] == order.tolist()
    np.testing.assert_allclose([h["rerank_score"] for h in hits], scores, atol=1e-5)
    np.testing.assert_allclose([h["score"] for h in hits], g[order] @ q, atol=1e-5)  # cosine to the query as sent
    assert all(h.get("rerank_score") is None for h in plain)
    # with a filter, the expansion and the second search keep to the matching items
    labels = np.array([r["label"] for r in setup["rows"]])
    filtered = search(client, queries=[{"vector": q.tolist()}], k=5, rerank=method, filters={"label": "b"})
    assert [h["id"] for h in filtered] == expected_qe(q, g, alpha, 5, keep=labels == "b")[0].tolist()


def test_kreciprocal_reranks_the_shortlist(client, setup):
    g, q = setup["vectors"], setup["query"]
    hits = search(client, queries=[{"vector": q.tolist()}, {"item_id": 3}], k=7, rerank="kreciprocal")
    # the shortlist is the whole 60-item gallery (under 100): the dense reference on query + gallery
    final = rerank.re_ranking(dist(q[None], g), np.zeros((1, 1)), dist(g, g))[0]
    order = np.argsort(final, kind="stable")[:7]
    assert [h["id"] for h in hits] == order.tolist()
    np.testing.assert_allclose([h["rerank_score"] for h in hits], 1 - final[order], atol=1e-5)
    assert [h["id"] for h in hits] != [h["id"] for h in search(client, queries=[{"vector": q.tolist()}], k=7)]
    # by item: the item is left out of its own shortlist
    r = client.post("/v1/galleries/vecs/search", json={"queries": [{"item_id": 3}], "k": 7, "rerank": "kreciprocal"})
    by_item = r.json()["results"][0]["hits"]
    others = np.delete(np.arange(60), 3)
    final = rerank.re_ranking(dist(g[3:4], g[others]), np.zeros((1, 1)), dist(g[others], g[others]))[0]
    assert [h["id"] for h in by_item] == others[np.argsort(final, kind="stable")[:7]].tolist()


def test_rerank_errors_and_image_search(client):
    r = client.post("/v1/galleries/graph/search", json={"queries": [{"vector": [1.0] * DIM}], "rerank": "aqe"})
    assert r.status_code == 400 and "rerank=aqe needs a Flat gallery" in r.json()["error"]["message"]
    r = client.post("/v1/galleries/vecs/search", json={"queries": [{"vector": [1.0] * DIM}], "rerank": "diffusion"})
    assert r.status_code == 422
    # by image: the query network's vector, then the same post-processing
    blob = files(encoded(photo(7)))
    vector = client.post("/v1/encode", files=blob).json()["vectors"][0]
    by_image = client.post("/v1/galleries/vecs/search/image", files=blob, data={"k": "4", "rerank": "alpha_qe"})
    assert by_image.status_code == 200, by_image.text
    by_vector = client.post("/v1/galleries/vecs/search", json={"queries": [{"vector": vector}], "k": 4,
                                                                "rerank": "alpha_qe"}).json()
    assert [h["id"] for h in by_image.json()["results"][0]["hits"]] == [h["id"] for h in by_vector["results"][0]["hits"]]
