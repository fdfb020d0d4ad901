"""``asymret index``: search through the query network ranks the mini benchmark exactly as
``asymret evaluate``'s asymmetric path; torchrun splits a build; the gallery life cycle and its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from asymret.api.cli import main
from asymret.index import GalleryStore
from asymret.mini import ensure_mini
from asymret.retrieval import metrics
from asymret.retrieval.datasets import RevisitedDataset
from asymret.retrieval.encode import encode_records
from asymret.retrieval.encoders import create_encoder, encoder_checkpoint
from asymret.retrieval.evaluate import evaluate_pair
from asymret.retrieval.pair import load_pair, save_pair
from asymret.retrieval.specs import EncoderSpec, InputSpec
from asymret.retrieval.whitening import Whitening


def nets(seed: int):
    """A random-init query network (MobileNetV2, 40 px) and gallery network (ResNet10-T, 56 px)."""
    torch.manual_seed(seed)
    query_net = create_encoder(EncoderSpec(backbone="mobilenetv2_050", dim=16, input=InputSpec(size=40)))
    gallery_net = create_encoder(EncoderSpec(backbone="resnet10t", dim=16, input=InputSpec(size=56)))
    return query_net, gallery_net


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    whitening = Whitening.learn_pca(np.random.default_rng(0).normal(size=(64, 16)))
    return save_pair(tmp_path_factory.mktemp("pair") / "pair.pt", *nets(0), whitening)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return ensure_mini(tmp_path_factory.mktemp("mini"), size="tiny")


def run(capsys, *argv) -> str:
    capsys.readouterr()
    assert main(["index", *map(str, argv)]) == 0
    return capsys.readouterr().out


def fails(capsys, *argv) -> str:
    capsys.readouterr()
    assert main(["index", *map(str, argv)]) == 2
    return capsys.readouterr().err


def whiten(x, whitening) -> np.ndarray:
    """``l2n(P (x - m))`` in numpy: the reference for the gallery network's whitening."""
    y = (np.asarray(x, np.float64) - whitening.m.numpy()) @ whitening.P.numpy().T
    return y / np.linalg.norm(y, axis=1, keepdims=True)


def test_search_ranks_the_mini_benchmark_as_evaluate_asymmetric_does(mini, pair_file, tmp_path, capsys):
    root = tmp_path / "galleries"
    out = run(capsys, "build", "--pair", pair_file, "--images", mini["gnd"], "--name", "rox", "--root", root,
              "--workers", 0, "--shard-size", 8)
    assert "now 19 items (16-d)" in out
    data = RevisitedDataset(mini["roxford"])
    n = data.num_database

    ranking = []  # every query through the CLI, the whole database deep
    for record in data.queries:
        box = ",".join(str(v) for v in record.bbx)
        hits = json.loads(run(capsys, "search", "--name", "rox", "--root", root, "--pair", pair_file, "--image",
                              record.path, "--bbx", box, "-k", n, "--json"))["results"][0]["hits"]
        assert [h["path"] for h in hits[:3]] == [str(data.database[h["id"]].path) for h in hits[:3]]
        ranking.append([h["id"] for h in hits])
    ranking = np.array(ranking)

    # independent: both sides encoded directly, whitened in numpy, fully sorted
    pair = load_pair(pair_file)
    q = whiten(encode_records(pair.query_net, data.queries, num_workers=0, progress=False), pair.whitening)
    db = whiten(encode_records(pair.gallery_net, data.database, num_workers=0, progress=False), pair.whitening)
    expected = np.argsort(-(q @ db.T), axis=1, kind="stable")
    np.testing.assert_array_equal(ranking[:, :10], expected[:, :10])

    # and asymret evaluate's own asymmetric+Lw numbers (the gallery network's whitening on both sides, as the
    # index and its search apply it), from that ranking and through an index top-k
    kw = {"whitenings": pair.whitenings(), "rows": ("asymmetric",), "num_workers": 0}
    exact = evaluate_pair(pair.query_net, pair.gallery_net, "mini-roxford", mini["roxford"], **kw)["asymmetric+Lw"]
    assert exact.pop("whitening")["network"] == "gallery_net"
    assert metrics.evaluate_revisited(data.gnd, ranking=ranking) == exact
    again = evaluate_pair(pair.query_net, pair.gallery_net, "mini-roxford", mini["roxford"], topk=n,
                          **kw)["asymmetric+Lw"]
    assert {k: v for k, v in again.items() if k != "whitening"} == exact


def test_torchrun_two_processes_build_the_gallery_one_process_builds(mini, pair_file, tmp_path, capsys):
    root = tmp_path / "galleries"
    images = mini["roxford"] / "jpg"
    common = ["--pair", pair_file, "--images", images, "--root", root, "--workers", 0, "--shard-size", 3]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "asymret", "index", "build", "--name", "two", *map(str, common)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    shards = -(-22 // 3)  # 22 images: ranks take shards 0, 2, 4, 6 and 1, 3, 5, 7
    assert "rank 0/2: 4 shard(s) of 12 image(s) to encode" in done.stderr
    assert "rank 1/2: 4 shard(s) of 10 image(s) to encode" in done.stderr and shards == 8
    assert "now 22 items" in done.stdout and "12 images encoded by this process" in done.stdout
    run(capsys, "build", "--name", "one", *common)

    with GalleryStore(root) as store:
        both = []
        for name in ("two", "one"):
            with store.open(name, readonly=True) as gallery:
                vectors, ids = gallery.index.flat_storage()
                order = np.argsort(ids)
                both.append((ids[order], np.array(vectors[order]), [i.path for i in gallery.get(ids[order])]))
    np.testing.assert_array_equal(both[0][0], np.arange(22))
    np.testing.assert_array_equal(both[0][0], both[1][0])
    np.testing.assert_allclose(both[0][1], both[1][1], atol=1e-6)
    assert both[0][2] == both[1][2] == [str(p) for p in sorted(images.glob("*.jpg"))]


def test_gallery_life_cycle_and_errors(mini, pair_file, tmp_path, capsys):
    root = tmp_path / "galleries"
    bare_pair = save_pair(tmp_path / "bare.pt", *nets(1))  # no whitening
    weights = tmp_path / "gallery_net.pt"
    torch.save(encoder_checkpoint(load_pair(bare_pair).gallery_net), weights)
    spec = tmp_path / "gallery.yaml"
    spec.write_text(yaml.safe_dump({"gallery_net": {"backbone": "resnet10t", "dim": 16, "input": {"size": 56}}}))
    images = sorted((mini["roxford"] / "jpg").glob("*.jpg"))
    (tmp_path / "first.txt").write_text("\n".join(str(p) for p in images[:6]))
    (tmp_path / "more.txt").write_text("\n".join(str(p) for p in images[6:9]))
    common = ["--name", "g", "--root", root]

    run(capsys, "build", *common, "--gallery-net", spec, "--weights", weights, "--images", tmp_path / "first.txt",
        "--workers", 0)
    out = run(capsys, "add", *common, "--pair", bare_pair, "--images", tmp_path / "more.txt", "--workers", 0)
    assert "now 9 items" in out and "3 added" in out
    assert "removed 2 item(s)" in run(capsys, "remove", *common, "--ids", "0,7")
    info = json.loads(run(capsys, "info", *common, "--json"))
    assert (info["count"], info["factory"], info["dim"], info["pending_build"]) == (7, "Flat", 16, None)
    assert info["network_spec"]["gallery_net"]["weights"] == str(weights)
    assert "resnet10t at 56 px" in run(capsys, "info", *common)

    # the pair's gallery network was read from another file: same weights, same space, search allowed
    hits = json.loads(run(capsys, "search", *common, "--pair", bare_pair, "--image", images[1], "-k", 3,
                          "--json"))["results"][0]["hits"]
    assert len(hits) == 3 and not {h["id"] for h in hits} & {0, 7}
    assert [h["path"] for h in hits] == [str(images[h["id"]]) for h in hits]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)

    with GalleryStore(root) as store, store.open("g", readonly=True) as gallery:
        stored, ids = gallery.index.flat_storage()
    vectors = tmp_path / "v.npy"
    np.save(vectors, np.array(stored[:2]))
    found = json.loads(run(capsys, "search", *common, "--vector", vectors, "-k", 1, "--json"))["results"]
    assert [r["hits"][0]["id"] for r in found] == ids[:2].tolist()
    text = run(capsys, "search", *common, "--vector", vectors, "-k", 2)
    assert f"{ids[0]:>10}" in text and images[int(ids[0])].name in text

    listing = json.loads(run(capsys, "list", "--root", root, "--json"))
    assert [(g["name"], g["count"]) for g in listing] == [("g", 7)]

    assert "was encoded by resnet10t at 56 px" in fails(capsys, "search", *common, "--pair", pair_file,
                                                        "--image", images[0])
    assert "already exists" in fails(capsys, "build", *common, "--pair", bare_pair, "--images", images[0].parent)
    assert "one of them" in fails(capsys, "search", *common)
    assert "--image needs --pair" in fails(capsys, "search", *common, "--image", images[0])
    assert "four numbers" in fails(capsys, "search", *common, "--pair", bare_pair, "--image", images[0],
                                   "--bbx", "1,2,3")
    assert "has no item [42]" in fails(capsys, "remove", *common, "--ids", "42")
    assert "needs the gallery network" in fails(capsys, "add", *common, "--images", tmp_path / "more.txt")

    assert "deleted gallery 'g' (7 items)" in run(capsys, "delete", *common)
    assert "no gallery named 'g'" in fails(capsys, "info", *common)


def test_build_from_embeddings_and_metadata(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "m.csv").write_text("path,label\n" + "".join(f"img{i}.jpg,car{i % 5}\n" for i in range(50)))
    common = ["--name", "e", "--root", tmp_path / "galleries"]
    out = run(capsys, "build", *common, "--embeddings", tmp_path / "x.npy", "--meta", tmp_path / "m.csv")
    assert "now 50 items (8-d)" in out
    np.save(tmp_path / "q.npy", x[17])
    hit = json.loads(run(capsys, "search", *common, "--vector", tmp_path / "q.npy", "-k", 1, "--json"))
    assert {k: hit["results"][0]["hits"][0][k] for k in ("id", "path", "label")} == {
        "id": 17, "path": "img17.jpg", "label": "car2"}
    assert "gallery network: unknown network" in run(capsys, "info", *common)
    assert "--meta goes with --embeddings" in fails(capsys, "build", "--name", "f", "--root", tmp_path / "galleries",
                                                    "--images", tmp_path, "--meta", tmp_path / "m.csv")


def test_build_with_dba_from_embeddings(tmp_path, capsys):
    from asymret.retrieval.rerank import database_augmentation

    x = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.save(tmp_path / "x.npy", x)
    root = tmp_path / "galleries"
    assert "--dba-k and --dba-alpha set database-side augmentation" in fails(
        capsys, "build", "--name", "d", "--root", root, "--embeddings", tmp_path / "x.npy", "--dba-k", 2)
    run(capsys, "build", "--name", "d", "--root", root, "--embeddings", tmp_path / "x.npy", "--dba", "--dba-k", 2)
    assert "vectors processed before adding: database_augmentation (alpha=3.0, k=2)" in run(
        capsys, "info", "--name", "d", "--root", root)
    with GalleryStore(root) as store, store.open("d", readonly=True) as gallery:
        vectors, ids = gallery.index.flat_storage()
        np.testing.assert_allclose(vectors[np.argsort(ids)], database_augmentation(x, k=2), atol=1e-6)
