"""Pair files: one call round-trips both encoders, whitening and metadata; versions are guarded."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from asymret import __version__
from asymret.errors import DataError, InputError, NotFoundError
from asymret.retrieval.encoders import create_encoder, encoder_checkpoint
from asymret.retrieval.pair import FORMAT_VERSION, LOADERS, load_pair, save_pair, weights_hash
from asymret.retrieval.specs import EncoderSpec, InputSpec
from asymret.retrieval.whitening import Whitening


@pytest.fixture(scope="module")
def nets():
    """A low-resolution query network and a re-ID style gallery network, trained a little (moved BN)."""
    query_net = create_encoder(EncoderSpec(backbone="resnet10t", dim=32, gem_p=2.2, input=InputSpec(size=40)))
    gallery_net = create_encoder(
        EncoderSpec(
            backbone="resnet18", last_stride=1, head="bnneck", num_classes=5, input=InputSpec(size=(48, 24))
        )
    )
    with torch.no_grad():  # non-default running statistics must survive the round trip too
        query_net.train()(torch.randn(4, 3, 40, 32))
        gallery_net.train()(torch.randn(4, 3, 48, 24))
    return query_net.eval(), gallery_net.eval()


@pytest.fixture(scope="module")
def whitening():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 512))
    return Whitening.learn_pca(X, dim=16)


def test_round_trip_gives_identical_outputs_specs_and_hashes(tmp_path, nets, whitening):
    query_net, gallery_net = nets
    path = save_pair(
        tmp_path / "runs" / "x" / "pair.pt", query_net, gallery_net, whitening, meta={"run": "x"}
    )
    pair = load_pair(path)
    assert pair.query_net.spec == query_net.spec and pair.gallery_net.spec == gallery_net.spec
    assert not pair.query_net.training and not pair.gallery_net.training
    for before, after, shape in (
        (query_net, pair.query_net, (2, 3, 40, 32)),
        (gallery_net, pair.gallery_net, (2, 3, 48, 24)),
    ):
        x = torch.randn(*shape)
        assert torch.equal(after.encode_batch(x), before.encode_batch(x))
        assert weights_hash(after) == weights_hash(before)
    assert torch.equal(pair.whitening.P, whitening.P) and pair.whitening.kind == "pca"
    assert pair.meta["run"] == "x" and pair.meta["asymret_version"] == __version__ and "created" in pair.meta
    assert [p.name for p in path.parent.iterdir()] == ["pair.pt"]  # the temporary file was renamed


def test_saving_over_an_existing_pair_replaces_it(tmp_path, nets):
    query_net, gallery_net = nets
    save_pair(tmp_path / "pair.pt", query_net, gallery_net, meta={"run": "first"})
    save_pair(tmp_path / "pair.pt", query_net, gallery_net, meta={"run": "second"})
    pair = load_pair(tmp_path / "pair.pt")
    assert pair.meta["run"] == "second" and pair.whitening is None


def test_weights_hash_tracks_weights_and_buffers_only(nets):
    query_net, _ = nets
    twin = copy.deepcopy(query_net)
    assert weights_hash(twin) == weights_hash(query_net)
    with torch.no_grad():
        twin.projection[0].weight[0, 0] += 1e-3
    assert weights_hash(twin) != weights_hash(query_net)
    twin = copy.deepcopy(query_net)
    twin.pool.p.data.fill_(3.0)
    assert weights_hash(twin) != weights_hash(query_net)


def test_a_hand_written_version_1_file_keeps_loading(tmp_path, nets):
    """The v1 layout as documented, written without save_pair: old files must load forever."""
    query_net, gallery_net = nets
    payload = {
        "format": "asymret.pair",
        "format_version": 1,
        "query_net": encoder_checkpoint(query_net),
        "gallery_net": encoder_checkpoint(gallery_net),
        "whitening": None,
        "meta": {"created": "2024-01-01T00:00:00+00:00", "asymret_version": "0.0.1"},
    }
    torch.save(payload, tmp_path / "old.pt")
    pair = load_pair(tmp_path / "old.pt")
    assert 1 in LOADERS and pair.meta["asymret_version"] == "0.0.1"
    x = torch.randn(1, 3, 40, 40)
    assert torch.equal(pair.query_net.encode_batch(x), query_net.encode_batch(x))


def test_newer_unknown_and_foreign_files_are_refused(tmp_path, nets):
    query_net, gallery_net = nets
    path = save_pair(tmp_path / "pair.pt", query_net, gallery_net)
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, tmp_path / "newer.pt")
    with pytest.raises(DataError, match="upgrade asymret"):
        load_pair(tmp_path / "newer.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    (tmp_path / "text.pt").write_text("hello")
    for name in ("foreign.pt", "text.pt"):
        with pytest.raises(DataError, match="pair file"):
            load_pair(tmp_path / name)
    with pytest.raises(NotFoundError):
        load_pair(tmp_path / "absent.pt")


def test_weights_that_do_not_fit_their_spec_are_a_data_error(tmp_path, nets):
    query_net, gallery_net = nets
    path = save_pair(tmp_path / "pair.pt", query_net, gallery_net)
    payload = torch.load(path, weights_only=True)
    payload["query_net"]["spec"]["dim"] = 64
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(DataError, match="shape mismatches"):
        load_pair(tmp_path / "bad.pt")


def test_metadata_must_be_json_like(tmp_path, nets):
    with pytest.raises(InputError, match="JSON"):
        save_pair(tmp_path / "pair.pt", *nets, meta={"tensor": torch.ones(1)})
    assert not any(tmp_path.iterdir())


def test_format_2_keeps_the_gallery_before_co_training(tmp_path, nets):
    """ACD pairs: the co-trained gallery and, for the gallery-alone/SIR rows, the original one."""
    query_net, gallery_net = nets
    original = create_encoder(gallery_net.spec)
    original.load_state_dict(gallery_net.state_dict())
    with torch.no_grad():
        original.head.classifier.weight.add_(1.0)
    pair = load_pair(save_pair(tmp_path / "acd.pt", query_net, gallery_net, reference_gallery=original))
    assert pair.co_trained and not pair.reference_gallery.training
    assert weights_hash(pair.reference_gallery) == weights_hash(original) != weights_hash(pair.gallery_net)
    plain = load_pair(save_pair(tmp_path / "plain.pt", query_net, gallery_net))
    assert not plain.co_trained and plain.reference_gallery is None
    payload = torch.load(tmp_path / "plain.pt", weights_only=True)
    assert payload["format_version"] == FORMAT_VERSION and payload["reference_gallery_net"] is None


def test_format_3_keeps_each_networks_whitening(tmp_path, nets):
    """The gallery network's whitening (asymmetric search, serving), the query network's own (symmetric rows)
    and an ACD pair's reference gallery's, each with its provenance."""
    query_net, gallery_net = nets
    rng = np.random.default_rng(1)
    gallery_w = Whitening.learn(rng.normal(size=(80, gallery_net.dim)), np.arange(40), np.arange(40, 80), dim=8,
                                info={"learned_on": "sfm120k x.pkl", "pairs": 40})
    query_w = Whitening.learn_pca(rng.normal(size=(50, query_net.dim)))
    reference_w = Whitening.learn_pca(rng.normal(size=(50, gallery_net.dim)), dim=4)
    path = save_pair(tmp_path / "p.pt", query_net, gallery_net, gallery_w, reference_gallery=gallery_net,
                     query_whitening=query_w, reference_whitening=reference_w)
    pair = load_pair(path)
    white = pair.whitenings()
    for name, w in (("gallery_net", gallery_w), ("query_net", query_w), ("reference_gallery_net", reference_w)):
        assert torch.equal(white[name].P, w.P) and torch.equal(white[name].m, w.m) and white[name].kind == w.kind
    assert pair.whitening is white["gallery_net"] and white["gallery_net"].info == {"learned_on": "sfm120k x.pkl",
                                                                                    "pairs": 40}
    with pytest.raises(InputError, match="query_net whitening takes 512-d"):
        save_pair(tmp_path / "bad.pt", query_net, gallery_net, query_whitening=reference_w)
    with pytest.raises(InputError, match="reference_gallery_net is absent"):
        save_pair(tmp_path / "bad.pt", query_net, gallery_net, reference_whitening=reference_w)
    assert not (tmp_path / "bad.pt").exists()


def test_a_hand_written_version_2_file_keeps_loading_without_the_query_whitening(tmp_path, nets, whitening):
    """Format 2 (before each network had its own whitening): its one whitening is the gallery network's."""
    query_net, gallery_net = nets
    payload = {
        "format": "asymret.pair", "format_version": 2,
        "query_net": encoder_checkpoint(query_net), "gallery_net": encoder_checkpoint(gallery_net),
        "whitening": whitening.state_dict(), "meta": {"created": "2025-01-01T00:00:00+00:00"},
        "reference_gallery_net": None,
    }
    torch.save(payload, tmp_path / "v2.pt")
    pair = load_pair(tmp_path / "v2.pt")
    assert torch.equal(pair.whitening.P, whitening.P) and pair.whitening.info == {}
    assert pair.query_whitening is None and pair.reference_whitening is None
    assert pair.whitenings() == {"query_net": None, "gallery_net": pair.whitening, "reference_gallery_net": None}


def test_a_stored_whitening_that_does_not_fit_its_network_is_a_data_error(tmp_path, nets):
    query_net, gallery_net = nets
    path = save_pair(tmp_path / "p.pt", query_net, gallery_net)
    payload = torch.load(path, weights_only=True)
    payload["query_whitening"] = Whitening.learn_pca(np.random.default_rng(0).normal(size=(20, 7))).state_dict()
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(DataError, match="asymret whiten"):
        load_pair(tmp_path / "bad.pt")
