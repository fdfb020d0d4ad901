"""``asymret evaluate`` on ACD's other benchmarks, on their mini renders: features, trained pairs, one ACD run.

The features path is checked against the per-query loop of tests/retrieval/test_metrics_acd.py with the ground
truth read here from the list files by hand; the pair path against the features path on the same encodings.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from asymret.api.cli import main
from asymret.mini import ensure_mini_acd
from asymret.retrieval.datasets import open_dataset
from asymret.retrieval.encode import encode_records
from asymret.retrieval.encoders import create_encoder
from asymret.retrieval.evaluate import evaluate_features_benchmark, public
from asymret.retrieval.pair import load_pair, save_pair
from asymret.training.config import ExperimentConfig
from asymret.training.trainer import train
from tests.retrieval.test_metrics_acd import loop_metrics

BENCHMARKS = ("msmt17", "inshop", "sop", "cub200")


@pytest.fixture(scope="module")
def minis(tmp_path_factory):
    return ensure_mini_acd(tmp_path_factory.mktemp("mini-acd"), size="tiny")


def unit(rng, n, d=16):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def run_json(capsys, argv):
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def hand_read(benchmark, root):
    """(query labels, gallery labels, junk of query q) straight from the list files."""
    if benchmark == "msmt17":
        def rows(name):
            return [(int(line.split()[1]), int(line.split()[0].split("/")[1].split("_")[2]))
                    for line in (root / f"list_{name}.txt").read_text().split("\n") if line]
        q, g = rows("query"), rows("gallery")
        return ([i for i, _ in q], [i for i, _ in g],
                lambda k: {j for j, (i, c) in enumerate(g) if (i, c) == q[k]})
    if benchmark == "inshop":
        rows = [line.split() for line in (root / "Eval" / "list_eval_partition.txt").read_text().split("\n")[2:] if line]
        return ([i for _, i, s in rows if s == "query"], [i for _, i, s in rows if s == "gallery"], lambda k: set())
    if benchmark == "sop":
        labels = [int(line.split()[1]) for line in (root / "Ebay_test.txt").read_text().split("\n")[1:] if line]
    else:
        classes = [int(line.split()[1]) for line in (root / "image_class_labels.txt").read_text().split("\n") if line]
        labels = [c for c in classes if c > max(classes) // 2]
    return labels, labels, lambda k: {k}


@pytest.mark.parametrize("bench", BENCHMARKS)
def test_features_equal_the_loop(bench, minis, tmp_path, capsys):
    root = minis[bench]
    q_labels, g_labels, junk_of = hand_read(bench, root)
    rng = np.random.default_rng(0)
    queries = unit(rng, len(q_labels))
    database = queries if q_labels is g_labels else unit(rng, len(g_labels))
    np.save(tmp_path / "q.npy", queries)
    np.save(tmp_path / "x.npy", database)
    out = run_json(capsys, ["evaluate", "features", "--protocol", bench, "--root", str(root),
                            "--queries", str(tmp_path / "q.npy"), "--database", str(tmp_path / "x.npy")])
    scores = queries.astype(np.float64) @ database.T.astype(np.float64)
    want = loop_metrics(scores, np.asarray(q_labels), np.asarray(g_labels), junk_of)
    recall = bench != "msmt17"
    assert {k for k in out if k.startswith("Recall@")} == ({f"Recall@{k}" for k in (1, 10, 20, 30, 100, 1000)}
                                                           if recall else set())
    for key in ("mAP", "mAP_official", "R1", "R5", "R10", "mINP", "queries") + (
            tuple(k for k in want if k.startswith("Recall@")) if recall else ()):
        assert out[key] == pytest.approx(want[key], abs=1e-6), key  # float32 scores in asymret, float64 here
    assert main(["evaluate", "features", "--protocol", bench, "--root", str(root), "--queries",
                 str(tmp_path / "q.npy"), "--database", str(tmp_path / "x.npy")]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header[:6] == ["mAP", "mAP_official", "R1", "R5", "R10", "mINP"]
    assert header[6:] == (["Recall@1", "Recall@10", "Recall@20", "Recall@30", "Recall@100", "Recall@1000", "queries"]
                          if recall else ["queries"])


def test_features_need_root_and_matching_rows(minis, tmp_path, capsys):
    np.save(tmp_path / "q.npy", unit(np.random.default_rng(0), 5))
    assert main(["evaluate", "features", "--protocol", "sop", "--queries", str(tmp_path / "q.npy"),
                 "--database", str(tmp_path / "q.npy")]) == 2
    assert "--protocol sop needs --root" in capsys.readouterr().err
    assert main(["evaluate", "features", "--protocol", "sop", "--root", str(minis["sop"]), "--queries",
                 str(tmp_path / "q.npy"), "--database", str(tmp_path / "q.npy")]) == 2
    assert "queries has 5 rows but the sop query split lists" in capsys.readouterr().err


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    torch.manual_seed(0)
    spec = {"pooling": "avg", "head": "bnneck", "num_classes": 4}
    query = create_encoder({"backbone": "resnet10t", "input": {"size": [24, 24]}, **spec})
    gallery = create_encoder({"backbone": "resnet10t", "input": {"size": [48, 48]}, **spec})
    return save_pair(tmp_path_factory.mktemp("pair") / "pair.pt", query, gallery)


@pytest.mark.parametrize("bench", BENCHMARKS)
def test_evaluate_pair_on_the_mini_render(bench, minis, pair_file, tmp_path, capsys):
    root = minis[bench]
    out = run_json(capsys, ["evaluate", "--pair", str(pair_file), "--benchmark", bench, "--root", str(root),
                            "--workers", "0"])
    assert list(out) == ["gallery", "symmetric", "asymmetric", "cost", "dataset", "precision"]
    pair = load_pair(pair_file)
    data = open_dataset(bench, root=root)
    q = encode_records(pair.query_net, data.query, batch_size=16, num_workers=0)
    g = encode_records(pair.gallery_net, data.gallery, batch_size=16, num_workers=0)
    assert out["asymmetric"].pop("whitening") is None  # the pair holds no learned whitening: no +Lw rows
    assert out["asymmetric"] == pytest.approx(public(evaluate_features_benchmark(bench, root, q, g)), abs=1e-12)
    assert ("Recall@1000" in out["asymmetric"]) == (bench != "msmt17")
    main(["evaluate", "--pair", str(pair_file), "--benchmark", bench, "--root", str(root), "--workers", "0",
          "--save-ranks", str(tmp_path)])
    table = capsys.readouterr().out
    ranks = json.loads((tmp_path / "ranks.json").read_text())
    assert len(ranks["rows"]["asymmetric"]["AP"]) == len(data.query)
    assert "asymmetric (φq / φg)" in table and (("Recall@10" in table) == (bench != "msmt17"))


def test_one_acd_run_end_to_end_on_mini_sop(minis, tmp_path, capsys):
    """Gallery alone, a d3still student against it, ACD from the student, each validated on mini-sop, then the
    four rows of a co-trained pair from the CLI."""
    root = str(minis["sop"])
    classes = minis["counts"]["mini-sop"]["train_classes"]

    def net(size, **kw):
        return {"backbone": "resnet10t", "pooling": "avg", "head": "bnneck", "num_classes": classes,
                "input": {"size": [size, size]}, **kw}

    common = {"seed": 1, "output_dir": str(tmp_path), "data": {"format": "sop", "root": root, "num_workers": 0},
              "eval": {"benchmark": "sop", "root": root},
              "train": {"epochs": 1, "validate_every": 1, "optim": {"optimizer": "sgd", "lr": 0.01},
                        "reid": {"ids_per_batch": 2, "images_per_id": 2, "distill_batch_size": 4}}}
    gallery = train(ExperimentConfig.model_validate({**common, "name": "g", "query_net": net(48),
                                                     "loss": {"name": "reid_supervised", "mode": "symmetric"}}),
                    progress=False)
    student = train(ExperimentConfig.model_validate({
        **common, "name": "s", "query_net": net(24), "gallery_net": net(48, weights=str(gallery / "query_net.pt")),
        "loss": {"name": "d3still"}}), progress=False)
    acd = train(ExperimentConfig.model_validate({
        **common, "name": "s_acd", "gallery_frozen": False, "loss": {"name": "d3still"},
        "acd": {"pair": str(student / "pair.pt"), "raho_batches": 1}}), progress=False)
    for run in (gallery, student, acd):
        record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        assert 0 <= record["val"]["score"] <= 1 and "Recall@1000" in record["val"]
    out = run_json(capsys, ["evaluate", "--pair", str(acd / "pair.pt"), "--benchmark", "sop", "--root", root,
                            "--workers", "0"])
    assert list(out) == ["gallery", "symmetric", "asymmetric", "sir", "cost", "dataset", "precision"]
    assert all(0 <= out[row]["Recall@1"] <= out[row]["Recall@10"] <= 1 for row in ("gallery", "asymmetric", "sir"))
