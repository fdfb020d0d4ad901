"""Reliability: schemathesis against our own OpenAPI spec (no 5xx, responses as documented), and 16
concurrent clients searching and adding, then a hard kill and restart that loses no acknowledged item."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from asymret.api.settings import ServeConfig
from tests.api.servekit import encoded, files, free_socket, make_pair, photo, serve, wait_ready

KEY = "fuzz-key"
DROP = "DELETE /v1/galleries/{name}"


@pytest.mark.slow
def test_schemathesis_no_server_errors(tmp_path):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import (
        content_type_conformance,
        negative_data_rejection,
        not_a_server_error,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    roots = tmp_path / "images"
    roots.mkdir()
    photo(0).save(roots / "a.png")
    config = ServeConfig(pair=make_pair(tmp_path / "pair.pt"), galleries=tmp_path / "galleries", device="cpu",
                         api_keys=[KEY], allowed_roots=[roots], max_request_mb=1)
    with serve(config) as url:
        client = httpx.Client(base_url=url, headers={"X-API-Key": KEY})
        client.post("/v1/galleries", json={"name": "g"})  # something to find: fuzzed names rarely hit one
        client.post("/v1/galleries/g/items", files=files(encoded(photo(1)), encoded(photo(2))))
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        calls, statuses = [], []

        def fuzz(operation, mode):
            checks = [not_a_server_error, status_code_conformance, content_type_conformance,
                      response_headers_conformance, response_schema_conformance, negative_data_rejection]

            @settings(max_examples=55, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                # valid cases search, add to and read the real gallery 'g' (fuzzed names are all 404s),
                # every second one, so that the rest still try other names; 'g' itself is never deleted
                pin = mode == GenerationMode.POSITIVE and len(calls) % 2 and case.operation.label != DROP
                if pin and "name" in (case.path_parameters or {}):
                    case.path_parameters["name"] = "g"
                response = case.call(base_url=url, headers={"X-API-Key": KEY}, timeout=30)
                calls.append(case.operation.label)
                statuses.append(response.status_code)
                case.validate_response(response, checks=checks)

            try:
                run()
            except Unsatisfiable:  # nothing to break in this operation (no parameters, no body)
                assert mode == GenerationMode.NEGATIVE

        operations = [result.ok() for result in schema.get_all_operations()]
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                fuzz(operation, mode)
        counts = {status: statuses.count(status) for status in sorted(set(statuses))}
        print(f"schemathesis: {len(calls)} cases over {len(set(calls))} of {len(operations)} operations; "
              f"statuses {counts}")  # the figure in docs/serve.md (pytest -s)
        assert len(calls) >= 1000, f"only {len(calls)} cases"
        assert max(statuses) < 500
        assert set(calls) == {operation.label for operation in operations}  # every operation was exercised
        assert {200, 201, 400, 404, 422} <= set(statuses)
        assert client.get("/readyz").status_code == 200


# ------------------------------------------------------------------------------------ concurrency
def start_server(pair, galleries, port: int) -> subprocess.Popen:
    """``asymret serve`` in a process of its own, so that it can be killed hard."""
    cmd = [sys.executable, "-m", "asymret", "serve", "--pair", str(pair), "--galleries", str(galleries),
           "--port", str(port), "--device", "cpu", "--api-key", KEY, "--max-wait-ms", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_concurrent_clients_then_hard_restart_keep_every_acknowledged_item(tmp_path):
    pair = make_pair(tmp_path / "pair.pt")
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}"
    server = start_server(pair, tmp_path / "galleries", port)
    try:
        wait_ready(url, timeout=90)
        headers = {"X-API-Key": KEY}
        assert httpx.post(f"{url}/v1/galleries", json={"name": "g"}, headers=headers).status_code == 201
        assert httpx.post(f"{url}/v1/galleries/g/items", files=files(encoded(photo(0))), headers=headers).status_code == 201
        acked, failures, counts = {}, [], {"search": 0, "add": 0}
        lock, stop = threading.Lock(), time.monotonic() + 4.0

        def searcher(n: int):
            blob = encoded(photo(1000 + n))
            with httpx.Client(base_url=url, timeout=30) as client:
                while time.monotonic() < stop:
                    if n % 3:
                        r = client.post("/v1/galleries/g/search/image", files=files(blob), data={"k": 5})
                    else:
                        vector = np.random.default_rng(n).standard_normal(32).tolist()
                        r = client.post("/v1/galleries/g/search", json={"queries": [{"vector": vector}], "k": 5})
                    with lock:
                        counts["search"] += 1
                        if r.status_code != 200 or not r.json()["results"][0]["hits"]:
                            failures.append((r.status_code, r.text[:200]))

        def adder(n: int):
            with httpx.Client(base_url=url, timeout=30, headers=headers) as client:
                i = 0
                while time.monotonic() < stop:
                    label = f"c{n}-{i}"
                    r = client.post("/v1/galleries/g/items", files=files(encoded(photo(10 * n + i))),
                                    data={"label": label, "camera": str(n)})
                    with lock:
                        counts["add"] += 1
                        if r.status_code == 201:
                            acked[r.json()["items"][0]["id"]] = label
                        else:
                            failures.append((r.status_code, r.text[:200]))
                    i += 1

        threads = [threading.Thread(target=searcher, args=(n,)) for n in range(12)]
        threads += [threading.Thread(target=adder, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not failures, failures[:3]
        assert counts["search"] >= 16 and len(acked) >= 4, counts
        metrics = httpx.get(f"{url}/metrics").text
        batches = float(metrics.split("asymret_query_batch_size_count ")[1].split()[0])
        images = float(metrics.split("asymret_query_batch_size_sum ")[1].split()[0])
        assert images / batches > 1, "concurrent queries were never coalesced"
        server.send_signal(signal.SIGKILL)  # no shutdown hook, no checkpoint: the journal must carry it
        server.wait(30)
        config = ServeConfig(pair=pair, galleries=tmp_path / "galleries", device="cpu")
        with serve(config) as again, httpx.Client(base_url=again, timeout=30) as client:  # restarted in-process
            assert client.get("/v1/galleries/g").json()["count"] == len(acked) + 1
            for item_id, label in acked.items():
                r = client.get(f"/v1/galleries/g/items/{item_id}")
                assert r.status_code == 200 and r.json()["label"] == label
    finally:
        server.kill()
        server.wait(30)
