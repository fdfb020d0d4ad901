"""``asymret whiten``: learned whitening for an existing pair, stored in it, then used by ``evaluate`` and refused
by galleries built without it; the pair file is never left broken."""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from asymret.api.cli import main
from asymret.mini import ensure_mini
from asymret.retrieval.datasets import SfM120k
from asymret.retrieval.encode import encode_records
from asymret.retrieval.encoders import create_encoder
from asymret.retrieval.pair import load_pair, save_pair
from asymret.retrieval.specs import EncoderSpec, InputSpec
from tests.retrieval.test_whitening import cirtorch_apply, cirtorch_lw


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return ensure_mini(tmp_path_factory.mktemp("mini"), size="tiny")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A random-init pair without any whitening (8-d on both sides)."""
    torch.manual_seed(0)
    query_net = create_encoder(EncoderSpec(backbone="mobilenetv2_050", dim=8, input=InputSpec(size=32)))
    gallery_net = create_encoder(EncoderSpec(backbone="resnet10t", dim=8, input=InputSpec(size=40)))
    return save_pair(tmp_path_factory.mktemp("pair") / "pair.pt", query_net, gallery_net, meta={"run": "plain"})


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def whitened(mini, plain, tmp_path_factory):
    out = tmp_path_factory.mktemp("whitened") / "pair.pt"
    before = digest(plain)
    assert main(["whiten", "--pair", str(plain), "--data", str(mini["train_pkl"]), "--out", str(out),
                 "--device", "cpu", "--workers", "0", "--json"]) == 0
    assert digest(plain) == before  # --out: the original is untouched
    return out


def test_whiten_stores_each_networks_lw_from_sfm_pairs_equal_to_cirtorch(mini, plain, whitened):
    pair = load_pair(whitened)
    assert pair.meta["run"] == "plain" and "whitened" in pair.meta
    with open(mini["train_pkl"], "rb") as f:
        train = pickle.load(f)["train"]
    q, p = np.asarray(train["qidxs"]), np.asarray(train["pidxs"])
    used = np.unique(np.concatenate([q, p]))
    where = {int(i): k for k, i in enumerate(used)}
    records = SfM120k(mini["train_pkl"]).records
    for white, net in ((pair.whitening, pair.gallery_net), (pair.query_whitening, pair.query_net)):
        X = encode_records(net, [records[i] for i in used], num_workers=0, progress=False)
        m, P = cirtorch_lw(X, [where[int(i)] for i in q], [where[int(i)] for i in p])
        ours, ref = white(X), cirtorch_apply(X, m, P)
        np.testing.assert_allclose(ours @ ours.T, ref @ ref.T, atol=2e-3)
        assert white.info["pair_source"] == "sfm" and white.info["pairs"] == len(q) and white.info["images"] == len(used)
        assert str(mini["train_pkl"]) in white.info["learned_on"]


def test_evaluate_shows_each_row_with_and_without_whitening(mini, whitened, capsys):
    base = ["evaluate", "--pair", whitened, "--benchmark", "mini-roxford", "--root", mini["roxford"], "--device", "cpu",
            "--workers", "0"]
    code, out, _ = cli(capsys, *base, "--json")
    assert code == 0
    doc = json.loads(out)
    rows = [k for k in doc if isinstance(doc[k], dict) and "whitening" in doc[k]]
    assert rows == ["gallery", "gallery+Lw", "symmetric", "symmetric+Lw", "asymmetric", "asymmetric+Lw"]
    assert [doc[r]["whitening"] and doc[r]["whitening"]["network"] for r in rows] == \
        [None, "gallery_net", None, "query_net", None, "gallery_net"]
    assert doc["asymmetric+Lw"]["whitening"]["kind"] == "learned"
    code, out, _ = cli(capsys, *base, "--json", "--no-whitening")
    doc = json.loads(out)
    assert code == 0 and [k for k in doc if isinstance(doc[k], dict) and "whitening" in doc[k]] == \
        ["gallery", "symmetric", "asymmetric"]
    code, out, _ = cli(capsys, *base)
    assert code == 0 and "asymmetric (φq / φg) + Lw of φg, both sides" in out and "+ Lw: whitening l2n(P (x - m))" in out
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = capsys.readouterr().out
    assert "--no-whitening" in out and "asymmetric+Lw uses the GALLERY network's whitening" in out


def test_a_failed_whiten_leaves_the_pair_file_as_it_was(tmp_path, whitened, mini, capsys):
    target = tmp_path / "pair.pt"
    target.write_bytes(whitened.read_bytes())
    before = digest(target)
    (tmp_path / "bad.csv").write_text("path,label\nmissing_a.jpg,a\nmissing_b.jpg,a\n")
    code, _, err = cli(capsys, "whiten", "--pair", target, "--data", tmp_path / "bad.csv", "--device", "cpu")
    assert code == 2 and "missing" in err
    (tmp_path / "folder" / "a").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(tmp_path / "folder" / "a" / f"{i}.jpg")
    code, _, err = cli(capsys, "whiten", "--pair", target, "--data", tmp_path / "folder", "--pairs", "sfm")
    assert code == 2 and "qidxs/pidxs" in err
    code, _, err = cli(capsys, "whiten", "--pair", target, "--data", mini["train_pkl"], "--dim", "9",
                       "--device", "cpu", "--workers", "0")
    assert code == 2 and "keeps 1 to 8 dimensions" in err
    assert digest(target) == before and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_in_place_keep_existing_and_networks(tmp_path, plain, whitened, mini, capsys):
    target = tmp_path / "pair.pt"
    target.write_bytes(plain.read_bytes())
    code, out, _ = cli(capsys, "whiten", "--pair", target, "--data", mini["train_pkl"], "--networks", "gallery",
                       "--device", "cpu", "--workers", "0", "--json", "--dim", "4")
    assert code == 0 and json.loads(out)["learned"] == ["gallery_net"]
    pair = load_pair(target)
    assert pair.whitening.dim == 4 and pair.query_whitening is None
    code, out, _ = cli(capsys, "whiten", "--pair", target, "--data", mini["train_pkl"], "--keep-existing",
                       "--device", "cpu", "--workers", "0", "--json")
    assert code == 0 and json.loads(out)["learned"] == ["query_net"]
    again = load_pair(target)
    assert torch.equal(again.whitening.P, pair.whitening.P) and again.query_whitening.dim == 8
    code, _, err = cli(capsys, "whiten", "--pair", target, "--data", mini["train_pkl"], "--networks", "reference")
    assert code == 2 and "ACD" in err


def test_a_gallery_built_without_the_whitening_refuses_the_whitened_pair(tmp_path, mini, plain, whitened, capsys):
    """The gallery whitening is part of the embedding space a gallery records: search with the whitened pair
    against a gallery the plain pair built is refused, not silently mixed."""
    root = tmp_path / "galleries"
    code, _, _ = cli(capsys, "index", "build", "--pair", plain, "--images", mini["gnd"], "--name", "rox", "--root",
                     root, "--workers", 0, "--device", "cpu")
    assert code == 0
    query = next(iter(sorted((mini["roxford"] / "jpg").iterdir())))
    code, _, err = cli(capsys, "index", "search", "--name", "rox", "--root", root, "--pair", whitened, "--image",
                       query, "--device", "cpu")
    assert code == 2 and "learned whitening" in err and "rebuild it" in err
    code, _, _ = cli(capsys, "index", "search", "--name", "rox", "--root", root, "--pair", plain, "--image", query,
                     "--device", "cpu")
    assert code == 0


def test_cache_dir_reuses_a_networks_cached_training_embeddings(tmp_path, mini, plain, capsys):
    """With --cache-dir the frozen gallery network is not run again: its cached embeddings (here deliberately
    not its real ones) are what its whitening is learned from; the query network, not cached, is encoded."""
    from asymret.retrieval.cache import EmbeddingCache, cache_key

    pair = load_pair(plain)
    records = SfM120k(mini["train_pkl"]).records
    fake = np.random.default_rng(0).normal(size=(len(records), 8)).astype(np.float32)
    cache = EmbeddingCache(tmp_path / "cache")
    entry = cache.path(cache_key(pair.gallery_net, records))  # the documented layout: <key>/embeddings.npy
    entry.parent.mkdir(parents=True)
    np.save(entry, fake)
    code, _, _ = cli(capsys, "whiten", "--pair", plain, "--data", mini["train_pkl"], "--out", tmp_path / "p.pt",
                     "--cache-dir", tmp_path / "cache", "--device", "cpu", "--workers", "0", "--json")
    assert code == 0
    with open(mini["train_pkl"], "rb") as f:
        train = pickle.load(f)["train"]
    q, p = np.asarray(train["qidxs"]), np.asarray(train["pidxs"])
    used = np.unique(np.concatenate([q, p]))
    where = {int(i): k for k, i in enumerate(used)}
    m, P = cirtorch_lw(fake[used], [where[int(i)] for i in q], [where[int(i)] for i in p])
    white = load_pair(tmp_path / "p.pt").whitening
    ours, ref = white(fake[used]), cirtorch_apply(fake[used], m, P)
    np.testing.assert_allclose(ours @ ours.T, ref @ ref.T, atol=2e-3)
