"""Gallery building: inputs, sharded encoding equal to encoding each image alone, resume after a
SIGKILL without re-encoding, add/remove with stable ids, precomputed embeddings, index-backed ranking."""

from __future__ import annotations

import csv
import hashlib
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from asymret.errors import ConflictError, DataError, InputError
from asymret.index import GalleryStore
from asymret.retrieval import gallery as gb
from asymret.retrieval import metrics, sides
from asymret.retrieval.datasets import inputs
from asymret.retrieval.encoders import create_encoder
from asymret.retrieval.evaluate import index_ranking
from asymret.retrieval.pair import load_pair, save_pair
from asymret.retrieval.records import load_image
from asymret.retrieval.specs import EncoderSpec, InputSpec
from asymret.retrieval.whitening import Whitening

# (sub-folder or "" for the top level, width, height): mixed sizes, so shards hold mixed shapes
IMAGES = [("a", 40, 24), ("a", 24, 40), ("a", 36, 36), ("a", 40, 24), ("b", 20, 30), ("b", 32, 32),
          ("b", 28, 40), ("", 30, 20)]
ENCODE = {"num_workers": 0, "progress": False}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (sub, w, h) in enumerate(IMAGES):
        (root / sub).mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / sub / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    """A random-init pair whose PCA whitening also reduces 8 -> 6 dimensions."""
    torch.manual_seed(0)
    query_net = create_encoder(EncoderSpec(backbone="resnet10t", dim=8, input=InputSpec(size=24)))
    gallery_net = create_encoder(EncoderSpec(backbone="resnet10t", dim=8, input=InputSpec(size=32)))
    whitening = Whitening.learn_pca(np.random.default_rng(1).normal(size=(40, 8)), dim=6)
    return save_pair(tmp_path_factory.mktemp("pair") / "pair.pt", query_net, gallery_net, whitening)


@pytest.fixture(scope="module")
def side(pair_file):
    return sides.SideEncoder.gallery(load_pair(pair_file))


@pytest.fixture(scope="module")
def reference(side, folder):
    """Each image alone through the gallery network, whitened in numpy: ``l2n(P (x - m))``."""
    records = inputs.read_images(folder)
    x = np.concatenate([side.encoder.encode_batch(side.encoder.transform(load_image(r))[None]).numpy()
                        for r in records]).astype(np.float64)
    m, P = side.whitening.m.numpy(), side.whitening.P.numpy()
    y = (x - m) @ P.T
    return y / np.linalg.norm(y, axis=1, keepdims=True)


@pytest.fixture
def store(tmp_path):
    with GalleryStore(tmp_path / "galleries") as s:
        yield s


def stored(store, name):
    """All (ids, vectors, rows) of a Flat gallery, by id."""
    with store.open(name, readonly=True) as gallery:
        vectors, ids = gallery.index.flat_storage()
        order = np.argsort(ids)
        items = gallery.get(ids[order])
        return ids[order], np.array(vectors[order]), [(i.path, i.label, i.camera) for i in items]


# ------------------------------------------------------------------------------------------ inputs
def test_read_images_folder_list_csv_and_gnd(folder, tmp_path):
    records = inputs.read_images(folder)
    assert [r.path.name for r in records] == [f"img{i}.png" for i in range(8)]  # a/, b/, then the top level
    assert [r.identity for r in records] == ["a"] * 4 + ["b"] * 3 + [None]
    rows = gb.item_rows(records)
    sha = hashlib.sha256((folder / "b" / "img4.png").read_bytes()).hexdigest()
    assert rows[4] == {"path": str(folder / "b" / "img4.png"), "label": "b", "camera": None, "sha256": sha}

    listing = tmp_path / "list.txt"  # absolute paths, and paths relative to the list's folder
    listing.write_text(f"# database\n{folder / 'a' / 'img1.png'}\n\n{os.path.relpath(folder, tmp_path)}/b/img5.png\n")
    assert [r.path.resolve() for r in inputs.read_images(listing)] == [folder / "a" / "img1.png", folder / "b" / "img5.png"]

    table = tmp_path / "items.csv"
    table.write_text(f"path,label,camera\n{folder}/b/img6.png,car7,3\n{folder}/img7.png,car2,1\n")
    assert [(r.path.name, r.identity, r.camera) for r in inputs.read_images(table)] == [
        ("img6.png", "car7", 3), ("img7.png", "car2", 1)]

    bench = tmp_path / "bench"
    (bench / "jpg").mkdir(parents=True)
    for name in ("x", "y", "q"):
        Image.new("RGB", (16, 16)).save(bench / "jpg" / f"{name}.jpg")
    gnd = {"imlist": ["y", "x"], "qimlist": ["q"], "gnd": [{"bbx": [0, 0, 8, 8], "easy": [1], "hard": [], "junk": []}]}
    (bench / "gnd_bench.pkl").write_bytes(pickle.dumps(gnd))
    assert [r.path.name for r in inputs.read_images(bench / "gnd_bench.pkl")] == ["y.jpg", "x.jpg"]  # imlist order


def test_read_images_errors(tmp_path):
    with pytest.raises(DataError, match="images not found"):
        inputs.read_images(tmp_path / "nowhere")
    listing = tmp_path / "list.txt"
    listing.write_text("missing1.jpg\nmissing2.jpg\n")
    with pytest.raises(DataError, match="2 of 2 images named in .* are missing"):
        inputs.read_images(listing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images in"):
        inputs.read_images(tmp_path / "empty")


# -------------------------------------------------------------------------------------- building
def test_sharded_build_equals_encoding_each_image_alone(store, side, folder, reference):
    records = inputs.read_images(folder)
    summary = gb.build_gallery(store, "g", side, records, shard_size=3, **ENCODE)
    assert (summary["count"], summary["encoded"], summary["added"], summary["dim"]) == (8, 8, 8, 6)
    ids, vectors, rows = stored(store, "g")
    np.testing.assert_array_equal(ids, np.arange(8))  # ids are record positions
    np.testing.assert_allclose(vectors, reference, atol=1e-5)
    assert rows == [(str(r.path), r.identity, None) for r in records]
    assert not (store.folder("g") / "build").exists()
    with store.open("g", readonly=True) as gallery:
        spec = gallery.network_spec
    assert spec["gallery_net"]["input"]["size"] == 32 and spec["whitening"]["dim"] == 6
    assert sides.embedding_space(spec) == sides.embedding_space(side.network_spec())
    with pytest.raises(ConflictError, match="already exists"):
        gb.build_gallery(store, "g", side, records, **ENCODE)


KILLED_BUILD = textwrap.dedent("""
    import os, signal, sys
    from asymret.index.backend import open_store
    from asymret.retrieval import gallery as gb
    from asymret.retrieval import sides
    from asymret.retrieval.datasets import inputs
    from asymret.retrieval.pair import load_pair

    real, calls = sides.encode_records, []

    def dies_on_third_shard(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kw)

    sides.encode_records = dies_on_third_shard
    backend, root, uri, pair, images = sys.argv[1:]
    gb.build_gallery(open_store(backend, root, uri=uri or None), "g", sides.SideEncoder.gallery(load_pair(pair)),
                     inputs.read_images(images), shard_size=2, num_workers=0, progress=False)
""")  # argv: backend, store root, Milvus URI ('' for faiss), pair file, images


def test_killed_build_resumes_without_encoding_done_shards_again(store, side, folder, pair_file, reference,
                                                                 monkeypatch):
    killed = subprocess.run([sys.executable, "-c", KILLED_BUILD, "faiss", str(store.root), "", str(pair_file),
                             str(folder)],
                            check=False, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    pending = gb.pending_build(store, "g")
    assert (pending["shards"], pending["shards_done"], pending["kind"]) == (4, 2, "build")

    encoded = []
    real = sides.encode_records

    def recording(encoder, records, **kw):
        encoded.extend(r.path.name for r in records)
        return real(encoder, records, **kw)

    monkeypatch.setattr(sides, "encode_records", recording)
    summary = gb.build_gallery(store, "g", side, inputs.read_images(folder), shard_size=2, **ENCODE)
    assert encoded == [f"img{i}.png" for i in range(4, 8)]  # shards 0 and 1 came from disk
    assert (summary["encoded"], summary["added"], summary["count"]) == (4, 8, 8)
    ids, vectors, _ = stored(store, "g")
    np.testing.assert_array_equal(ids, np.arange(8))
    np.testing.assert_allclose(vectors, reference, atol=1e-5)
    assert gb.pending_build(store, "g") is None


def test_unfinished_build_of_another_job_is_refused(store, side, folder, monkeypatch):
    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(sides, "encode_records", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gb.build_gallery(store, "g", side, inputs.read_images(folder), shard_size=2, **ENCODE)
    with pytest.raises(ConflictError, match=r"unfinished build of another job \(its shard_size differ"):
        gb.build_gallery(store, "g", side, inputs.read_images(folder), shard_size=4, **ENCODE)


def test_add_takes_new_ids_and_refuses_another_gallery_network(store, side, folder, reference):
    records = inputs.read_images(folder)
    gb.build_gallery(store, "g", side, records[:5], **ENCODE)
    with store.open("g") as gallery:
        gallery.remove([4])  # the largest id: its number must not be given out again
    summary = gb.add_images(store, "g", side, records[5:], shard_size=2, **ENCODE)
    assert (summary["count"], summary["added"]) == (7, 3)
    ids, vectors, rows = stored(store, "g")
    np.testing.assert_array_equal(ids, [0, 1, 2, 3, 5, 6, 7])
    np.testing.assert_allclose(vectors, reference[[0, 1, 2, 3, 5, 6, 7]], atol=1e-5)
    assert [row[0] for row in rows[4:]] == [str(r.path) for r in records[5:]]

    other = sides.SideEncoder(create_encoder(EncoderSpec(backbone="resnet10t", dim=6, input=InputSpec(size=32))))
    with pytest.raises(ConflictError, match="was encoded by resnet10t at 32 px.*pca whitening to 6-d"):
        gb.add_images(store, "g", other, records, **ENCODE)


def test_build_from_embeddings_trains_ivf_and_keeps_rows(store, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    meta = tmp_path / "meta.csv"
    with meta.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "camera", "city"])
        writer.writerows([f"img{i}.jpg", f"id{i % 7}", "" if i % 2 else "c1", "paris"] for i in range(400))
    rows = inputs.read_item_rows(meta)
    assert rows[1] == {"path": "img1.jpg", "label": "id1", "camera": None, "attributes": {"city": "paris"}}
    with pytest.raises(InputError, match="400 embeddings but 399 metadata rows"):
        gb.build_from_embeddings(store, "e", x, rows[:-1], progress=False)

    summary = gb.build_from_embeddings(store, "e", x, rows, factory="IVF4,Flat", progress=False)
    assert (summary["count"], summary["added"]) == (400, 400)
    queries = x[:5] + 0.1 * rng.standard_normal((5, 8)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    with store.open("e", readonly=True) as gallery:
        assert gallery.index.is_trained
        hits = gallery.search(queries, 10, nprobe=4)  # every list probed: exact
    expected = np.argsort(-(queries @ x.T), axis=1)[:, :10]
    assert [[h.id for h in row] for row in hits] == expected.tolist()
    assert hits[2][0].item.label == f"id{expected[2, 0] % 7}" and hits[2][0].item.attributes == {"city": "paris"}


def dba_direct(x, k=3, alpha=3.0):
    """Each row from its k most similar rows (itself included) by a full sort, weights sim^alpha."""
    x = np.asarray(x, np.float64)
    sims = x @ x.T
    out = []
    for i in range(len(x)):
        top = np.argsort(-sims[i], kind="stable")[:k]
        y = sum(max(sims[i, j], 0) ** alpha * x[j] for j in top)
        out.append(y / np.linalg.norm(y))
    return np.array(out)


def test_dba_is_applied_once_at_build_and_recorded(store, side, folder, reference, caplog):
    records = inputs.read_images(folder)
    with pytest.raises(InputError, match="positive integer"):
        gb.dba_settings(True, k=0)
    with pytest.raises(InputError, match="add --dba"):
        gb.dba_settings(False, k=2)
    gb.build_gallery(store, "dba", side, records, shard_size=3, dba=gb.dba_settings(True, k=2, alpha=1.0), **ENCODE)
    _, vectors, _ = stored(store, "dba")
    np.testing.assert_allclose(vectors, dba_direct(reference, k=2, alpha=1.0), atol=1e-5)
    with store.open("dba", readonly=True) as gallery:
        assert gallery.processing == {"database_augmentation": {"k": 2, "alpha": 1.0}}
        assert gallery.info()["processing"] == gallery.processing
    copy = folder.parent / "later" / "copy.png"  # a new image: the same path and bytes would be skipped
    copy.parent.mkdir()
    copy.write_bytes(records[0].path.read_bytes())
    with caplog.at_level("WARNING"):
        gb.add_images(store, "dba", side, [gb.ImageRecord(copy)], **ENCODE)
    assert "the images added now are not augmented" in caplog.text
    _, vectors, _ = stored(store, "dba")
    np.testing.assert_allclose(vectors[-1], reference[0], atol=1e-5)  # added as encoded

    x = reference.astype(np.float32)
    gb.build_from_embeddings(store, "dba_vectors", x, dba=gb.dba_settings(True), progress=False)
    _, vectors, _ = stored(store, "dba_vectors")
    np.testing.assert_allclose(vectors, dba_direct(x), atol=1e-5)
    with store.open("dba_vectors", readonly=True) as gallery:
        assert gallery.processing == {"database_augmentation": {"k": 3, "alpha": 3.0}}


# ----------------------------------------------------------------------------- index-backed ranking
def test_index_ranking_agrees_with_exact_evaluation_when_k_covers_the_positives():
    rng = np.random.default_rng(0)
    db = rng.standard_normal((300, 16)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = db[:4] + 0.3 * rng.standard_normal((4, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    gnd = [{"easy": [i, 50 + i], "hard": [100 + i], "junk": [150 + i]} for i in range(4)]
    exact = metrics.evaluate_revisited(gnd, queries=q, database=db)
    assert exact["exact"]

    ranking = index_ranking(q, db, k=300)
    np.testing.assert_array_equal(ranking, np.argsort(-(q @ db.T), axis=1, kind="stable"))
    assert metrics.evaluate_revisited(gnd, ranking=ranking) == exact

    deepest = max(int(np.flatnonzero(ranking[i] == j)[0]) for i, g in enumerate(gnd) for j in g["easy"] + g["hard"])
    assert metrics.evaluate_revisited(gnd, ranking=index_ranking(q, db, k=deepest + 1)) == exact
    truncated = metrics.evaluate_revisited(gnd, ranking=index_ranking(q, db, k=deepest))
    assert truncated["exact"] is False and truncated["medium"]["mAP"] < exact["medium"]["mAP"]
