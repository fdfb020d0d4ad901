"""``asymret profile``: the timing statistics, the result's shape for eager and ONNX, and the CLI."""

from __future__ import annotations

import json

import pytest

from asymret.api.cli import main
from asymret.retrieval.profile import format_profile, profile_pair, summary, timed
from tests.api.servekit import make_pair


def test_summary_median_p90_and_throughput():
    s = summary([0.010, 0.030, 0.020, 0.040, 0.050, 0.060, 0.070, 0.080, 0.090, 0.100], batch=8)
    assert s["median_ms"] == pytest.approx(55.0) and s["p90_ms"] == pytest.approx(90.0)
    assert s["images_per_s"] == pytest.approx(8 / 0.055) and s["calls"] == 10


def test_timed_counts_warmup_apart_from_the_timed_calls():
    calls = []
    times = timed(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from asymret.retrieval.pair import load_pair

    return load_pair(make_pair(tmp_path_factory.mktemp("profile") / "pair.pt"))


def test_profile_pair_has_both_sides_runtimes_and_batches(pair):
    result = profile_pair(pair, batch_sizes=(2, 1), devices=["cpu"], warmup=1, repeats=2)
    for side in ("query_net", "gallery_net"):
        entry = result[side]
        assert entry["cost"]["gflops"] > 0 and entry["backbone"] == getattr(pair, side).spec.backbone
        for runtime in ("eager", "onnx"):
            rows = entry["cpu"][runtime]
            assert list(rows) == ["1", "2"], rows  # small batches first (the memory column's premise)
            assert all(r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"] and r["peak_mem_mb"] >= 0
                       for r in rows.values())
    text = format_profile(result)
    assert "eager/onnx" in text and "query_net mobilenetv2_035" in text and "gallery_net resnet18" in text


def test_cli_json_and_bad_batch_sizes(pair, tmp_path, capsys):
    path = make_pair(tmp_path / "pair.pt")
    assert main(["profile", "--pair", str(path), "--batch-sizes", "1", "--repeats", "1", "--warmup", "0",
                 "--runtime", "eager", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["query_net"]["cpu"]) == {"eager"} and "1" in out["query_net"]["cpu"]["eager"]
    assert main(["profile", "--pair", str(path), "--batch-sizes", "0,x"]) == 2
    assert "--batch-sizes" in capsys.readouterr().err
