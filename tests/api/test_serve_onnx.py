"""``asymret serve --runtime onnx``: the query networks exported at start-up and run by ONNX Runtime answer
as the PyTorch pairs do (hits and scores against a brute-force search with the in-process networks)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from asymret.api.settings import ServeConfig
from tests.api.servekit import Reference, encoded, files, make_shared_pairs, photo, serve

pytest.importorskip("onnxruntime", reason="the [onnx] extra (onnxruntime) is not installed")
QUERY_NETS = {"phone": {"backbone": "mobilenetv2_035", "dim": 32, "input": {"size": 32}},
              "server": {"backbone": "resnet10t", "head": "fc", "fc_dim": 32, "input": {"size": [24, 20]}}}
IMAGES = [photo(i, (60 + 10 * i, 48)) for i in range(6)]  # several aspect ratios: longer-side specs keep them


@pytest.mark.slow
def test_onnx_runtime_answers_as_the_pytorch_pairs(tmp_path):
    pairs = make_shared_pairs(tmp_path, QUERY_NETS)
    config = ServeConfig(pair=pairs["phone"], pairs=[pairs["server"]], galleries=tmp_path / "galleries",
                         device="cpu", runtime="onnx", torch_threads=1)
    refs = {name: Reference(path) for name, path in pairs.items()}
    with serve(config) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.post("/v1/galleries", json={"name": "g"}).status_code == 201
        added = client.post("/v1/galleries/g/items", files=files(*(encoded(im) for im in IMAGES)))
        assert added.status_code == 201, added.text
        ids = [item["id"] for item in added.json()["items"]]
        gallery = refs["phone"].gallery(IMAGES)
        for name in QUERY_NETS:
            for query in (photo(40, (90, 60)), photo(41, (50, 70))):
                r = client.post("/v1/galleries/g/search/image", files=files(encoded(query)),
                                data={"k": 6, "query_net": name})
                assert r.status_code == 200, r.text
                hits = r.json()["results"][0]["hits"]
                scores = gallery @ refs[name].query([query])[0]
                order = np.argsort(-scores)
                assert [h["id"] for h in hits] == [ids[j] for j in order]
                np.testing.assert_allclose([h["score"] for h in hits], scores[order], atol=1e-4)
            vectors = client.post("/v1/encode", files=files(encoded(IMAGES[0]), encoded(IMAGES[3])),
                                  data={"query_net": name}).json()
            got = np.array(vectors["vectors"])
            np.testing.assert_allclose(got, refs[name].query([IMAGES[0], IMAGES[3]]), atol=1e-4)
