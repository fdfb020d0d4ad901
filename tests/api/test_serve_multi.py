"""Several query networks, one gallery: two pairs sharing one gallery network served together, each
search checked against that pair run in-process (tests/api/servekit.Reference) with numpy ranking;
a pair of another gallery network is refused at start-up."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from asymret.api.service import Service
from asymret.api.settings import ServeConfig, pair_entry
from asymret.errors import ConfigError
from tests.api.servekit import QUERY_SPEC, Reference, encoded, files, make_shared_pairs, photo, serve
from tests.api.test_web import DevTools, browser  # noqa: F401 - the headless Chromium fixture

QUERY_NETS = {"phone": QUERY_SPEC,  # mobilenetv2_035 at 32 px
              "server": {"backbone": "resnet10t", "dim": 32, "input": {"size": 24}}}
IMAGES = [photo(i) for i in range(6)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    pairs = make_shared_pairs(root, QUERY_NETS)
    config = ServeConfig(pair=pairs["phone"], pairs=[pairs["server"]], galleries=root / "galleries", device="cpu",
                         max_wait_ms=20)
    with serve(config) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/v1/galleries", json={"name": "g"}).status_code == 201
        added = client.post("/v1/galleries/g/items", files=files(*(encoded(im) for im in IMAGES)))
        assert added.status_code == 201, added.text
        refs = {name: Reference(path) for name, path in pairs.items()}
        yield {"client": client, "root": root, "pairs": pairs, "config": config, "refs": refs,
               "ids": [item["id"] for item in added.json()["items"]]}


def expected_hits(setup, name: str, query) -> tuple[list[int], np.ndarray]:
    """Ids and scores of the gallery by brute-force inner product with ``name``'s query embedding."""
    g = setup["refs"]["phone"].gallery(IMAGES)  # the shared gallery network
    scores = g @ setup["refs"][name].query([query])[0]
    order = np.argsort(-scores)
    return [setup["ids"][j] for j in order], scores[order]


def search(client, query, **data):
    r = client.post("/v1/galleries/g/search/image", files=files(encoded(query)), data={"k": 6, **data})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("name", sorted(QUERY_NETS))
def test_each_query_net_answers_as_its_pair_in_process(setup, name):
    query = photo(40)
    body = search(setup["client"], query, query_net=name)
    assert body["query_net_name"] == name
    assert body["query_net"].startswith(QUERY_NETS[name]["backbone"])
    ids, scores = expected_hits(setup, name, query)
    hits = body["results"][0]["hits"]
    assert [h["id"] for h in hits] == ids
    np.testing.assert_allclose([h["score"] for h in hits], scores, atol=1e-5)


def test_the_two_networks_really_differ_and_the_default_is_the_first(setup):
    query = photo(41)
    phone, server = (search(setup["client"], query, query_net=n) for n in ("phone", "server"))
    default = search(setup["client"], query)
    assert default["query_net_name"] == "phone"
    assert [h["id"] for h in default["results"][0]["hits"]] == [h["id"] for h in phone["results"][0]["hits"]]
    assert [h["score"] for h in phone["results"][0]["hits"]] != [h["score"] for h in server["results"][0]["hits"]]


def test_encode_by_name_and_no_batch_mixes_networks(setup):
    """Concurrent /encode calls through both networks (coalesced per network within 20 ms): each gets its
    own network's vectors."""
    client, refs = setup["client"], setup["refs"]
    queries = [photo(60 + i) for i in range(8)]
    want = {name: refs[name].query(queries) for name in QUERY_NETS}
    got, errors = {}, []

    def encode(i: int):
        name = ("phone", "server")[i % 2]
        try:
            with httpx.Client(base_url=str(client.base_url), timeout=30) as own:
                r = own.post("/v1/encode", files=files(encoded(queries[i])), data={"query_net": name})
                got[i] = (name, r.json())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=encode, args=(i,)) for i in range(len(queries))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(got) == len(queries)
    for i, (name, body) in got.items():
        assert body["query_net_name"] == name
        np.testing.assert_allclose(body["vectors"][0], want[name][i], atol=1e-5)


def test_info_lists_both_with_costs(setup):
    from asymret.retrieval.cost import encoder_cost

    info = setup["client"].get("/v1/info").json()
    nets = info["query_nets"]
    assert [(n["name"], n["default"], n["spec"]["backbone"]) for n in nets] == [
        ("phone", True, "mobilenetv2_035"), ("server", False, "resnet10t")]
    for net in nets:
        cost = encoder_cost(setup["refs"][net["name"]].pair.query_net)
        assert net["cost"]["params"] == cost["params"] and net["cost"]["input"] == cost["input"]
        assert net["cost"]["gflops"] == pytest.approx(cost["gflops"]) and cost["gflops"] > 0
        assert net["pair"]["run"] == net["name"]
    assert nets[1]["cost"]["input"] == [24, 24]
    gallery_cost = encoder_cost(setup["refs"]["phone"].pair.gallery_net)
    assert info["gallery_net_cost"]["params"] == gallery_cost["params"] > nets[0]["cost"]["params"]
    assert info["gallery_net"]["backbone"] == "resnet18" and info["query_net_name"].startswith("mobilenetv2_035")


def test_unknown_query_net_is_a_4xx_listing_the_names(setup):
    client = setup["client"]
    for r in (client.post("/v1/galleries/g/search/image", files=files(encoded(photo(1))), data={"query_net": "tv"}),
              client.post("/v1/encode", files=files(encoded(photo(1))), data={"query_net": "tv"})):
        assert r.status_code == 404, r.text
        message = r.json()["error"]["message"]
        assert "'tv'" in message and "'phone'" in message and "'server'" in message


def test_a_pair_of_another_gallery_network_is_refused_at_start_up(setup, tmp_path):
    other = make_shared_pairs(tmp_path, {"stranger": QUERY_SPEC}, seed=1)["stranger"]  # retrained gallery
    config = setup["config"].model_copy(update={"pairs": [setup["pairs"]["server"], other],
                                                "galleries": tmp_path / "g"})
    with pytest.raises(AssertionError, match="failed to load") as failed, serve(config):
        pass
    sentence = str(failed.value)
    assert f"pair 'stranger' ({other})" in sentence and "gallery weights' hash" in sentence
    assert "same gallery network" in sentence  # and what to do


def test_names_from_the_command_line_and_must_be_unique(setup, tmp_path):
    from asymret.api.cli import build_parser
    from asymret.api.commands.serve import build_config

    phone, server = setup["pairs"]["phone"], setup["pairs"]["server"]
    config = build_config(build_parser().parse_args(["serve", "--pair", f"small={phone}", "--pair", str(server)]))
    assert config.pair_entries() == [("small", phone), (None, server)]
    assert pair_entry(phone) == (None, phone)
    twice = ServeConfig(pair=phone, pairs=[phone], galleries=tmp_path / "g", device="cpu")
    with pytest.raises(ConfigError, match="both named 'phone'; name each query network with --pair NAME=PATH"):
        Service(twice).load()
    named = ServeConfig(pair=phone, pairs=[Path(f"copy={phone}")], galleries=tmp_path / "g2", device="cpu")
    service = Service(named)
    try:
        service.load()
        assert list(service.query_nets) == ["phone", "copy"]
    finally:
        service.close()


# ------------------------------------------------------------------------------------ the web page
@pytest.mark.slow
def test_page_offers_the_query_networks_and_searches_with_the_chosen_one(browser, setup, tmp_path):  # noqa: F811
    from websockets.sync.client import connect

    client = setup["client"]
    query = tmp_path / "query.png"
    photo(43, (80, 60)).save(query)
    expected = search(client, photo(43, (80, 60)), query_net="server", k=12)["results"][0]["hits"]
    target = httpx.put(f"{browser}/json/new?about:blank").json()
    with connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
        page = DevTools(ws)
        page("Runtime.enable")
        page("Page.navigate", url=f"{client.base_url}/")
        page.wait_for("document.querySelectorAll('#query_net option').length === 2 && "
                      "document.querySelectorAll('#gallery option').length === 1")
        page.js("window.status_text = () => document.getElementById('status').textContent")
        assert page.js("document.getElementById('query-net-choice').hidden") is False
        page.js("document.getElementById('query_net').value = 'server'")
        root = page("DOM.getDocument")["root"]["nodeId"]
        file_input = page("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        page("DOM.setFileInputFiles", files=[str(query)], nodeId=file_input)
        page.wait_for(f"document.querySelectorAll('#results .hit').length === {len(expected)}")
        shown = page.js("[...document.querySelectorAll('#results .hit')].map(h => +h.dataset.id)")
        status = page.js("status_text()")
    assert shown == [h["id"] for h in expected]  # ranked by the chosen network, as the API answers for it
    assert "resnet10t" in status and not page.exceptions
