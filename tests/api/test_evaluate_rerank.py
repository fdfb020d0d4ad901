"""``asymret evaluate --pair P --rerank ... --dba``: post-processed rows beside the plain ones, each equal
to its method computed here on features encoded directly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from asymret.api.cli import main
from asymret.mini import ensure_mini
from asymret.retrieval import metrics, rerank
from asymret.retrieval.datasets import RevisitedDataset
from asymret.retrieval.encode import encode_records
from asymret.retrieval.encoders import create_encoder
from asymret.retrieval.pair import save_pair
from asymret.retrieval.specs import EncoderSpec, InputSpec


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rerank")
    mini = ensure_mini(root / "mini", size="tiny")
    torch.manual_seed(0)
    query_net = create_encoder(EncoderSpec(backbone="mobilenetv2_050", dim=16, input=InputSpec(size=40)))
    gallery_net = create_encoder(EncoderSpec(backbone="resnet10t", dim=16, input=InputSpec(size=56)))
    return {"mini": mini, "pair": save_pair(root / "pair.pt", query_net, gallery_net), "nets": (query_net, gallery_net)}


def evaluate(capsys, setup, *extra) -> dict:
    mini = setup["mini"]
    capsys.readouterr()
    argv = ["evaluate", "--pair", setup["pair"], "--benchmark", "mini-roxford", "--root", mini["roxford"],
            "--distractors", mini["distractors"], "--workers", 0, "--rows", "gallery,asymmetric", "--json", *extra]
    assert main([str(a) for a in argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_rows_with_and_without_post_processing(capsys, setup):
    plain = evaluate(capsys, setup)
    post = evaluate(capsys, setup, "--rerank", "kreciprocal,alpha_qe", "--dba", "--k1", 5, "--k2", 2, "--qe-n", 3,
                    "--lambda", 0)  # Jaccard distance alone: on random networks' features it reorders
    assert {"gallery", "asymmetric"} <= set(plain) and not any("+" in row for row in plain)
    assert post["gallery"] == plain["gallery"] and post["asymmetric"] == plain["asymmetric"]
    assert {"gallery+kreciprocal", "gallery+alpha_qe", "gallery+dba", "gallery+dba+kreciprocal",
            "asymmetric+kreciprocal", "asymmetric+kreciprocal_expanded", "asymmetric+alpha_qe", "asymmetric+dba",
            "asymmetric+dba+alpha_qe", "asymmetric+dba+kreciprocal_expanded"} <= set(post)
    assert post["postprocessing"] == {"methods": ["kreciprocal", "alpha_qe"], "dba": True, "k1": 5, "k2": 2,
                                      "lambda_value": 0.0, "qe_n": 3, "qe_alpha": 3.0, "dba_k": 3, "dba_alpha": 3.0}

    # independent: both sides encoded here (database + distractors), each method written as its formula
    query_net, gallery_net = setup["nets"]
    data = RevisitedDataset(setup["mini"]["roxford"], distractors=setup["mini"]["distractors"])
    q = encode_records(query_net, data.queries, num_workers=0, progress=False)
    db = encode_records(gallery_net, data.database, num_workers=0, progress=False)

    def expanded(x, base, n, alpha):
        sims = x @ base.T
        top = np.argsort(-sims, axis=1, kind="stable")[:, :n]
        w = np.maximum(np.take_along_axis(sims, top, 1), 0) ** alpha
        y = x + np.einsum("qn,qnd->qd", w, base[top])
        return y / np.linalg.norm(y, axis=1, keepdims=True)

    top3 = np.argsort(-(db @ db.T), axis=1, kind="stable")[:, :3]
    w = np.maximum(np.take_along_axis(db @ db.T, top3, 1), 0) ** 3
    dba = np.einsum("qn,qnd->qd", w, db[top3])
    dba /= np.linalg.norm(dba, axis=1, keepdims=True)

    def check(row, **source):
        want = metrics.evaluate_revisited(data.gnd, **source)
        for protocol in metrics.REVISITED_PROTOCOLS:
            assert post[row][protocol] == pytest.approx(want[protocol], abs=1e-9), (row, protocol)

    check("asymmetric+alpha_qe", queries=expanded(q, db, 3, 3), database=db)
    check("asymmetric+dba", queries=q, database=dba)
    check("asymmetric+dba+alpha_qe", queries=expanded(q, dba, 3, 3), database=dba)
    dist = rerank.re_ranking(np.sqrt(np.maximum(2 - 2 * q @ db.T, 0)), np.sqrt(np.maximum(2 - 2 * q @ q.T, 0)),
                             np.sqrt(np.maximum(2 - 2 * db @ db.T, 0)), k1=5, k2=2, lambda_value=0)
    check("asymmetric+kreciprocal", scores=-dist)
    # the re-ranked order is not the plain one (else the check above would hold trivially)
    assert (np.argsort(dist, axis=1, kind="stable") != np.argsort(-(q @ db.T), axis=1, kind="stable")).any()


def test_table_and_bad_settings(capsys, setup):
    mini = setup["mini"]
    capsys.readouterr()
    argv = ["evaluate", "--pair", setup["pair"], "--benchmark", "mini-roxford", "--root", mini["roxford"],
            "--workers", 0, "--rows", "asymmetric", "--rerank", "aqe"]
    assert main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    assert "asymmetric (φq / φg) + AQE" in out and "post-processing: k1=20, k2=6, lambda_value=0.3, qe_n=2" in out
    assert main([str(a) for a in argv[:-1]] + ["kreciprocal", "--k1", "0"]) == 2
    assert "k1 must be a positive integer" in capsys.readouterr().err
    assert main([str(a) for a in argv[:-1]] + ["diffusion"]) == 2
    assert "unknown re-ranking method(s) diffusion" in capsys.readouterr().err
