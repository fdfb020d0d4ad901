"""``asymret report``: the three kinds of picture from a quick demo, saved ranks that agree with the evaluation,
grid frames in the protocol's colours, TensorBoard scalars from training, and one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
import sys

import numpy as np
import pytest
from PIL import Image

from asymret.api.cli import main

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A quick demo, then ``evaluate --save-ranks`` on its pair (and its ``--json`` result)."""
    out = tmp_path_factory.mktemp("report_demo")
    assert main(["demo", "--quick", "--out", str(out), "--json"]) == 0
    data = out / "data" / "mini-roxford"
    ranks = out / "ranks"
    argv = ["evaluate", "--pair", str(out / "runs" / "query_regression" / "pair.pt"), "--benchmark",
            "mini-roxford", "--root", str(data), "--distractors", str(data / "revisitop1m" / "revisitop1m.txt"),
            "--device", "cpu", "--json", "--save-ranks", str(ranks)]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(argv) == 0
    results = out / "evaluation.json"
    results.write_text(buffer.getvalue().strip().splitlines()[-1])
    return {"out": out, "run": out / "runs" / "query_regression", "ranks": ranks, "results": results}


def not_blank(path, min_size=(300, 200)):
    image = Image.open(path).convert("RGB")
    assert image.width >= min_size[0] and image.height >= min_size[1], image.size
    pixels = np.asarray(image, dtype=np.float64)
    assert pixels.std() > 10  # not one flat colour
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20
    return image


def test_report_writes_the_three_pictures(demo, capsys):
    out = demo["out"] / "report"
    assert main(["report", "--runs", str(demo["run"]), "--ranks", str(demo["ranks"]), "--results",
                 str(demo["results"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    names = {"training_curves.png", "ranks_ranks.png", "accuracy_vs_cost.png"}
    assert {p.split("/")[-1] for p in printed} == names
    for name in names:
        assert (out / name).is_file()
        not_blank(out / name)
    assert (out / "ranks_ranks.png").stat().st_size < 400_000  # palette PNG: small enough for the docs


def test_saved_ranks_agree_with_the_evaluation(demo):
    from asymret.retrieval.ranks import load_ranks

    doc = load_ranks(demo["ranks"])
    evaluated = json.loads(demo["results"].read_text())
    assert json.loads((demo["ranks"] / "results.json").read_text())["cost"] == evaluated["cost"]
    assert set(doc["rows"]) == {"gallery", "symmetric", "asymmetric"}
    for row, r in doc["rows"].items():
        assert abs(np.nanmean(r["AP"]) - evaluated[row]["medium"]["mAP"]) < 1e-9
        assert r["mAP"] == pytest.approx(evaluated[row]["medium"]["mAP"], abs=1e-12)
        assert r["topk"].shape == (len(doc["queries"]), 20)
        assert np.all(np.diff(r["scores"], axis=1) <= 1e-6)  # best first
        assert set(r["topk"].ravel().tolist()) <= set(doc["database"])
    assert all(q["bbx"] is not None for q in doc["queries"])  # revisited queries are cropped to their box
    from asymret.retrieval.datasets import RevisitedDataset
    from asymret.retrieval.metrics import revisited_groundtruth

    data = RevisitedDataset(demo["out"] / "data" / "mini-roxford")
    pos, junk = revisited_groundtruth(data.gnd, "medium")
    assert [g["positive"] for g in doc["groundtruth"]] == [p.tolist() for p in pos]
    assert [g["junk"] for g in doc["groundtruth"]] == [j.tolist() for j in junk]


def test_grid_frames_take_the_protocol_colours(demo, tmp_path):
    from asymret.api.report import RELEVANCE_COLOURS, rank_grid
    from asymret.retrieval.ranks import load_ranks

    doc = load_ranks(demo["ranks"])
    grid = rank_grid(doc, tmp_path / "grid.png", k=10)
    image = Image.open(grid.path).convert("RGB")
    assert {c["row"] for c in grid.cells} == {"asymmetric", "gallery"}
    seen = set()
    for cell in grid.cells:
        q, i = cell["query"], cell["id"]
        gt = doc["groundtruth"][q]
        expected = "positive" if i in gt["positive"] else "junk" if i in gt["junk"] else "negative"
        assert cell["relevance"] == expected
        x0, y0, _, y1 = cell["box"]
        pixel = image.getpixel((x0 + 1, (y0 + y1) // 2))  # inside the left edge of the frame
        assert np.abs(np.subtract(pixel, RELEVANCE_COLOURS[expected])).max() <= 8, (cell, pixel)
        seen.add(expected)
    assert "positive" in seen and "negative" in seen
    green = next(c for c in grid.cells if c["relevance"] == "positive")
    r, g, b = image.getpixel((green["box"][0] + 1, (green["box"][1] + green["box"][3]) // 2))
    assert g > 120 and r < 60 and b < 60
    # the asymmetric line of a query sits right above the gallery-alone line of the same query
    first = [c for c in grid.cells if c["rank"] == 1]
    assert [c["row"] for c in first[:2]] == ["asymmetric", "gallery"] and first[0]["query"] == first[1]["query"]


def test_worst_and_best_queries():
    from asymret.api.report import pick_queries

    assert pick_queries(np.array([0.5, 0.1, np.nan, 0.9, 0.3]), 1) == [("worst", 1), ("best", 3)]
    assert pick_queries(np.array([0.5, 0.1, 0.9]), 3) == [("worst", 1), ("worst", 0), ("best", 2)]


def test_reid_ranks_follow_the_camera_rule(demo, tmp_path, monkeypatch):
    from asymret.retrieval import metrics
    from asymret.retrieval import ranks as ranks_module
    from asymret.retrieval.datasets import VeRi776
    from asymret.retrieval.ranks import RankRecorder, relevance

    root = demo["out"] / "data" / "mini-veri"
    data = VeRi776(root)
    recorder = RankRecorder("mini-veri", root, k=5)
    rng = np.random.default_rng(0)
    q, db = (rng.standard_normal((n, 8)).astype(np.float32) for n in (len(data.query), len(data.gallery)))
    q, db = q / np.linalg.norm(q, axis=1, keepdims=True), db / np.linalg.norm(db, axis=1, keepdims=True)
    recorder("asymmetric", q, db)
    pos, junk = data.groundtruth()
    expected = metrics.evaluate_reid(pos, junk, queries=q, database=db)["mAP"]
    assert abs(np.nanmean(recorder.rows["asymmetric"]["AP"]) - expected) < 1e-9
    path = recorder.save(demo["out"] / "reid_ranks")
    from asymret.retrieval.ranks import load_ranks

    doc = load_ranks(path)
    assert not list(path.parent.glob("*.npy"))  # small: inline
    monkeypatch.setattr(ranks_module, "INLINE_LIMIT", 1)  # large rows go to .npy files beside ranks.json
    big = load_ranks(recorder.save(demo["out"] / "reid_ranks_npy"))
    assert (demo["out"] / "reid_ranks_npy" / "asymmetric_topk.npy").is_file()
    np.testing.assert_array_equal(big["rows"]["asymmetric"]["topk"], doc["rows"]["asymmetric"]["topk"])
    from asymret.api.report import rank_grid

    grid = rank_grid(big, tmp_path / "reid.png", k=5)  # re-ID: one row, no boxes
    not_blank(grid.path)
    assert {c["row"] for c in grid.cells} == {"asymmetric"}
    for qi, query in enumerate(data.query):
        ids = list(range(len(data.gallery)))
        for i, rel in zip(ids, relevance(doc, qi, ids)):
            g = data.gallery[i]
            same = g.identity == query.identity
            want = ("junk" if g.camera == query.camera else "positive") if same else "negative"
            assert rel == want


def test_tensorboard_scalars_from_training(demo):
    tb = demo["run"] / "tb"
    events = list(tb.glob("events.out.tfevents.*"))
    assert events, f"no events file under {tb}"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/d_self", "lr", "time_s"} <= tags
    record = json.loads((demo["run"] / "metrics.jsonl").read_text().splitlines()[0])
    (event,) = acc.Scalars("train/loss")
    assert event.step == 1 and event.value == pytest.approx(record["loss"], rel=1e-6)


def test_tensorboard_tags_and_absence(tmp_path, monkeypatch):
    from asymret.training import tensorboard

    record = {"epoch": 2, "loss": 0.5, "d_pos": 0.1, "lr": 1e-3, "time_s": 1.0,
              "val": {"row": "asymmetric", "score": 0.7, "medium": {"mAP": 0.7, "queries": 3}, "exact": True}}
    assert tensorboard.scalars(record) == {"train/loss": 0.5, "train/d_pos": 0.1, "lr": 1e-3, "time_s": 1.0,
                                           "val/score": 0.7, "val/medium/mAP": 0.7, "val/medium/queries": 3.0}
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    monkeypatch.setattr(tensorboard, "_unavailable", False)
    tensorboard.log_scalars(tmp_path, record, final=True)
    assert not (tmp_path / "tb").exists()


def test_cost_plot_with_a_profile(demo, tmp_path):
    from asymret.api.report import latency_ms, plot_cost

    profile = {"query_net": {"cpu": {"eager": {"1": {"median_ms": 3.0}, "8": {"median_ms": 9.0}}}},
               "gallery_net": {"cpu": {"eager": {"1": {"median_ms": 20.0}}}}}
    assert latency_ms(profile, "query_net") == 3.0 and latency_ms(profile, "missing") is None
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    out = plot_cost([demo["results"], demo["ranks"] / "results.json"], tmp_path / "cost.png", profiles=[path, path])
    image = not_blank(out)
    assert image.height > 600  # a second line of panels: accuracy against latency


def test_report_errors(demo, tmp_path, capsys, monkeypatch):
    assert main(["report", "--out", str(tmp_path)]) == 2
    assert "nothing to draw" in capsys.readouterr().err
    assert main(["report", "--runs", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"asymmetric": {"medium": {"mAP": 0.5}}}))
    assert main(["report", "--results", str(bad), "--out", str(tmp_path)]) == 2
    assert "has no 'cost'" in capsys.readouterr().err
    assert main(["report", "--results", str(demo["results"]), "--profile", str(bad), str(bad),
                 "--out", str(tmp_path)]) == 2
    assert "one --profile per --results" in capsys.readouterr().err
    assert main(["report", "--ranks", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "--save-ranks" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["report", "--runs", str(demo["run"]), "--out", str(tmp_path)]) == 2
    assert 'pip install "asymret[report]"' in capsys.readouterr().err


def test_training_curves_overlay_runs_with_validation(tmp_path):
    from asymret.api.report import plot_training

    runs = []
    for n, scale in (("run_a", 1.0), ("run_b", 2.0)):
        run = tmp_path / n
        run.mkdir()
        lines = [{"epoch": e, "loss": scale / e, "d_pos": 0.5 / e, "d_neg": 0.1 * e, "lr": 1e-3 * 0.9 ** e,
                  "time_s": 1.0, **({"val": {"row": "asymmetric", "score": 0.5 + 0.05 * e}} if e % 2 == 0 else {})}
                 for e in range(1, 7)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        runs.append(run)
    image = not_blank(plot_training(runs, tmp_path / "curves.png"))
    assert image.height > 500  # loss, d_pos, d_neg, lr, validation: two lines of panels
    (tmp_path / "run_a" / "metrics.jsonl").write_text("{not json\n")
    from asymret.errors import DataError

    with pytest.raises(DataError, match=r"metrics.jsonl:1 is not a JSON line"):
        plot_training(runs, tmp_path / "curves.png")
