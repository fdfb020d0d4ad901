"""``evaluate_pair``'s rows with learned whitening: whose whitening each row applies, checked on the features.

AML's rule (its test code; methods.md §1): asymmetric testing whitens the queries (query network) AND the
database (gallery network) with the GALLERY network's whitening; the symmetric row uses the query network's
own, the gallery-alone row the gallery network's own. Each check below re-encodes the benchmark directly and
whitens in numpy, so the rule is tested against a hand computation, not against the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asymret.api.tables import format_pair_table
from asymret.mini import ensure_mini
from asymret.retrieval import metrics
from asymret.retrieval.datasets import RevisitedDataset
from asymret.retrieval.encode import encode_records
from asymret.retrieval.encoders import create_encoder
from asymret.retrieval.evaluate import LW, evaluate_pair
from asymret.retrieval.specs import EncoderSpec, InputSpec
from asymret.retrieval.whitening import Whitening


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return ensure_mini(tmp_path_factory.mktemp("mini"), size="tiny")


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    query_net = create_encoder(EncoderSpec(backbone="mobilenetv2_050", dim=8, input=InputSpec(size=32))).eval()
    gallery_net = create_encoder(EncoderSpec(backbone="resnet10t", dim=8, input=InputSpec(size=40))).eval()
    return query_net, gallery_net


@pytest.fixture(scope="module")
def raw(mini, nets):
    """Each network's plain embeddings of the queries and the database, encoded here."""
    query_net, gallery_net = nets
    data = RevisitedDataset(mini["roxford"])
    kw = {"num_workers": 0, "progress": False}
    return {"data": data,
            "q_q": encode_records(query_net, data.queries, **kw), "q_db": encode_records(query_net, data.database, **kw),
            "g_q": encode_records(gallery_net, data.queries, **kw),
            "g_db": encode_records(gallery_net, data.database, **kw)}


def numpy_whiten(x, m, P):
    y = (np.asarray(x, np.float64) - m) @ P.T
    return y / np.linalg.norm(y, axis=1, keepdims=True)


def random_whitening(seed: int, dim: int = 8):
    """A whitening far from the identity (so it changes rankings): m and P drawn at random."""
    rng = np.random.default_rng(seed)
    m, P = rng.normal(scale=0.3, size=dim), rng.normal(size=(dim, dim)) * np.linspace(3, 0.2, dim)[:, None]
    return m, P, Whitening(m, P, info={"learned_on": f"seed {seed}"})


def test_asymmetric_rows_whiten_both_sides_with_the_gallery_networks_whitening(mini, nets, raw):
    query_net, gallery_net = nets
    mg, Pg, gallery_w = random_whitening(1)
    mq, Pq, query_w = random_whitening(2)
    seen = {}
    results = evaluate_pair(query_net, gallery_net, "mini-roxford", mini["roxford"], num_workers=0,
                            whitenings={"query_net": query_w, "gallery_net": gallery_w},
                            on_row=lambda row, q, db: seen.setdefault(row, (np.asarray(q), np.asarray(db))))
    assert list(results) == ["gallery", "gallery" + LW, "symmetric", "symmetric" + LW, "asymmetric", "asymmetric" + LW]
    expected = {  # row: (queries, database), by hand
        "gallery": (raw["g_q"], raw["g_db"]),
        "gallery+Lw": (numpy_whiten(raw["g_q"], mg, Pg), numpy_whiten(raw["g_db"], mg, Pg)),
        "symmetric": (raw["q_q"], raw["q_db"]),
        "symmetric+Lw": (numpy_whiten(raw["q_q"], mq, Pq), numpy_whiten(raw["q_db"], mq, Pq)),
        "asymmetric": (raw["q_q"], raw["g_db"]),
        # the point: the QUERY network's queries go through the GALLERY network's whitening
        "asymmetric+Lw": (numpy_whiten(raw["q_q"], mg, Pg), numpy_whiten(raw["g_db"], mg, Pg)),
    }
    gnd = raw["data"].gnd
    for row, (q, db) in expected.items():
        np.testing.assert_allclose(seen[row][0], q, atol=1e-5, err_msg=row)
        np.testing.assert_allclose(seen[row][1], db, atol=1e-5, err_msg=row)
        score = {k: v for k, v in results[row].items() if k != "whitening"}
        assert score == metrics.evaluate_revisited(gnd, queries=q.astype(np.float32), database=db.astype(np.float32))
    # the query network's whitening on the query side would rank differently: the rule is observable
    wrong = metrics.evaluate_revisited(gnd, queries=numpy_whiten(raw["q_q"], mq, Pq).astype(np.float32),
                                       database=expected["asymmetric+Lw"][1].astype(np.float32))
    assert wrong["medium"]["mAP"] != results["asymmetric+Lw"]["medium"]["mAP"]
    assert results["asymmetric+Lw"]["whitening"] == {"network": "gallery_net", "kind": "learned", "input_dim": 8,
                                                     "dim": 8, "learned_on": "seed 1"}
    assert results["symmetric+Lw"]["whitening"]["network"] == "query_net"
    assert results["gallery+Lw"]["whitening"]["network"] == "gallery_net"
    assert all(results[row]["whitening"] is None for row in ("gallery", "symmetric", "asymmetric"))
    table = format_pair_table(results, "mini-roxford")
    assert "asymmetric (φq / φg) + Lw of φg, both sides" in table and "symmetric (φq / φq) + Lw of φq" in table
    assert "gallery_net: learned 8 -> 8 on seed 1" in table


def test_only_rows_whose_network_has_a_whitening_get_an_lw_row(mini, nets):
    query_net, gallery_net = nets
    _, _, query_w = random_whitening(2)
    rows = evaluate_pair(query_net, gallery_net, "mini-roxford", mini["roxford"], num_workers=0,
                         whitenings={"query_net": query_w, "gallery_net": None})
    assert list(rows) == ["gallery", "symmetric", "symmetric+Lw", "asymmetric"]
    assert list(evaluate_pair(query_net, gallery_net, "mini-roxford", mini["roxford"], num_workers=0,
                              rows=("asymmetric",))) == ["asymmetric"]


def test_a_co_trained_pairs_gallery_row_uses_the_reference_gallerys_own_whitening(mini, nets, raw):
    """ACD: gallery alone is the pre-co-training gallery with its own whitening; SIR the co-trained one with its."""
    query_net, gallery_net = nets
    reference = create_encoder(gallery_net.spec).eval()
    reference.load_state_dict(gallery_net.state_dict())
    mg, Pg, gallery_w = random_whitening(1)
    mr, Pr, reference_w = random_whitening(3)
    seen = {}
    evaluate_pair(query_net, gallery_net, "mini-roxford", mini["roxford"], num_workers=0, reference_gallery=reference,
                  rows=("gallery", "sir"), whitenings={"gallery_net": gallery_w, "reference_gallery_net": reference_w},
                  on_row=lambda row, q, db: seen.setdefault(row, np.asarray(q)))
    np.testing.assert_allclose(seen["gallery+Lw"], numpy_whiten(raw["g_q"], mr, Pr), atol=1e-5)
    np.testing.assert_allclose(seen["sir+Lw"], numpy_whiten(raw["g_q"], mg, Pg), atol=1e-5)


def test_a_whitening_of_another_size_is_refused(mini, nets):
    from asymret.errors import InputError

    query_net, gallery_net = nets
    with pytest.raises(InputError, match="gallery_net whitening takes 4-d"):
        evaluate_pair(query_net, gallery_net, "mini-roxford", mini["roxford"], num_workers=0,
                      whitenings={"gallery_net": Whitening(np.zeros(4), np.eye(4))})
