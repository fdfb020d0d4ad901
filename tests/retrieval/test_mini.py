"""The mini benchmark: real on-disk formats, ground truth that agrees with what is rendered, determinism."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.transform import warp

from asymret.api.cli import main as cli
from asymret.errors import InputError
from asymret.mini import benchmark as mini
from asymret.mini import scene
from asymret.retrieval.datasets import RevisitedDataset, SfM120k, VeRi776, cid2filename
from asymret.retrieval.records import load_image

SEED = 3
VERI = re.compile(r"(\d{4})_c(\d{3})_(\d{8})_1\.jpg")


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("mini") / "out"
    return out, mini.build_mini(out, seed=SEED, size="tiny", workers=1)


@pytest.fixture(scope="module")
def gnd(built):
    with open(built[1]["gnd"], "rb") as f:
        return pickle.load(f)


# --- determinism and the build marker ---------------------------------------------------------------

def test_same_seed_same_bytes_in_any_number_of_processes(built, tmp_path):
    out, _ = built
    again = mini.build_mini(tmp_path / "again", seed=SEED, size="tiny", workers=2)
    assert tree_hash(again["root"]) == tree_hash(out)
    other = mini.build_mini(tmp_path / "other", seed=SEED + 1, size="tiny", workers=1)
    assert tree_hash(other["root"]) != tree_hash(out)


def test_ensure_keeps_a_complete_build_and_redoes_an_interrupted_one(tmp_path, monkeypatch):
    first = mini.ensure_mini(tmp_path, seed=SEED, size="tiny", workers=1)
    some_image = next((tmp_path / mini.VERI / "image_test").iterdir())
    original = some_image.read_bytes()
    calls = []
    monkeypatch.setattr(mini, "build_mini", lambda *a, **kw: calls.append(a))
    assert mini.ensure_mini(tmp_path, seed=SEED, size="tiny") == first
    assert calls == []
    monkeypatch.undo()

    some_image.unlink()  # an interrupted build: files missing, marker never written
    (tmp_path / mini.MARKER).unlink()
    assert mini.ensure_mini(tmp_path, seed=SEED, size="tiny", workers=1) == first
    assert some_image.read_bytes() == original


def test_unknown_size_is_a_user_error(tmp_path):
    with pytest.raises(InputError, match="small"):
        mini.build_mini(tmp_path, size="huge")


def test_manifest_and_readme_give_seed_size_version_and_counts(built, gnd):
    out = built[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["seed"], manifest["size"], manifest["format_version"]) == (SEED, "tiny", mini.FORMAT_VERSION)
    assert manifest["roxford"]["database"] == len(gnd["imlist"])
    assert manifest["roxford"]["queries"] == len(gnd["qimlist"])
    assert manifest["roxford"]["easy"] == sum(len(g["easy"]) for g in gnd["gnd"])
    readme = (out / "README.txt").read_text()
    assert f"seed: {SEED}" in readme and "size: tiny" in readme


# --- mini-roxford: the revisitop layout ------------------------------------------------------------

def test_gnd_pickle_has_exactly_the_revisitop_layout(built, gnd):
    assert built[1]["gnd"].read_bytes()[:2] == b"\x80\x03"  # protocol 3, as the official files
    assert list(gnd) == ["gnd", "imlist", "qimlist"]
    assert all(isinstance(n, str) and "." not in n for n in gnd["imlist"] + gnd["qimlist"])
    assert len(gnd["gnd"]) == len(gnd["qimlist"]) == 3
    n = len(gnd["imlist"])
    for g in gnd["gnd"]:
        assert list(g) == ["bbx", "easy", "hard", "junk"]
        assert len(g["bbx"]) == 4 and all(type(v) is float for v in g["bbx"])
        for key in ("easy", "hard", "junk"):
            assert all(type(i) is int and 0 <= i < n for i in g[key])
            assert g[key] == sorted(set(g[key]))
        assert not set(g["easy"]) & set(g["hard"]) and not set(g["junk"]) & set(g["easy"] + g["hard"])
        assert g["easy"] or g["hard"]


def test_bbx_lies_inside_its_query_image(built, gnd):
    jpg = built[0] / mini.ROXFORD / "jpg"
    for name, g in zip(gnd["qimlist"], gnd["gnd"]):
        w, h = Image.open(jpg / f"{name}.jpg").size
        x1, y1, x2, y2 = g["bbx"]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        assert (x2 - x1) * (y2 - y1) > 0.1 * w * h  # the landmark, not a sliver


def test_queries_are_separate_renders_not_in_the_database(built, gnd):
    jpg = built[0] / mini.ROXFORD / "jpg"
    assert not set(gnd["qimlist"]) & set(gnd["imlist"])
    assert len(set(gnd["imlist"])) == len(gnd["imlist"])
    db_bytes = {(jpg / f"{n}.jpg").read_bytes() for n in gnd["imlist"]}
    assert not any((jpg / f"{q}.jpg").read_bytes() in db_bytes for q in gnd["qimlist"])
    assert sorted(p.stem for p in jpg.iterdir()) == sorted(gnd["imlist"] + gnd["qimlist"])


def test_labelled_views_are_views_of_the_query_landmark(gnd):
    """Names carry the landmark (``<photo>_r<i>c<j>_<n>``): labels never point at another landmark or at
    a background photo; each landmark has all its rendered views in the database."""
    for q, g in zip(gnd["qimlist"], gnd["gnd"]):
        landmark = q.rsplit("_", 1)[0]
        labelled = g["easy"] + g["hard"] + g["junk"]
        assert all(gnd["imlist"][i].rsplit("_", 1)[0] == landmark for i in labelled)
    per_landmark = defaultdict(set)
    for i, name in enumerate(gnd["imlist"]):
        per_landmark[name.rsplit("_", 1)[0]].add(i)
    views = mini.SIZES["tiny"].views
    for q, g in zip(gnd["qimlist"], gnd["gnd"]):
        assert len(per_landmark[q.rsplit("_", 1)[0]]) == sum(views)
        assert len(g["easy"]) == views[0]  # easy views always show most of the landmark


def test_distractor_list_in_revisitop1m_format(built):
    root = built[0] / mini.ROXFORD / mini.DISTRACTORS
    lines = (root / "revisitop1m.txt").read_text().splitlines()
    assert len(lines) == mini.SIZES["tiny"].distractors
    assert all(line.endswith(".jpg") and (root / "jpg" / line).is_file() for line in lines)


def test_readers_open_both_datasets(built, gnd):
    out, info = built
    ds = RevisitedDataset(out / mini.ROXFORD, distractors=info["distractors"])
    assert ds.num_database == len(gnd["imlist"]) and ds.num_distractors == mini.SIZES["tiny"].distractors
    assert len(ds.database) == ds.num_database + ds.num_distractors
    x1, y1, x2, y2 = gnd["gnd"][0]["bbx"]
    assert load_image(ds.queries[0]).size == (round(x2) - round(x1), round(y2) - round(y1))
    veri = VeRi776(out / mini.VERI)
    assert len(veri.train) == info["veri_counts"]["train"] and len(veri.query) == info["veri_counts"]["query"]
    positives, junk = veri.groundtruth()
    gt, jk = read_index(out / mini.VERI / "gt_index.txt"), read_index(out / mini.VERI / "jk_index.txt")
    assert [list(p + 1) for p in positives] == gt and [list(j + 1) for j in junk] == jk


# --- mini-sfm: the retrieval-SfM-120k layout ------------------------------------------------------

def test_sfm_pickle_layout_pairs_and_images(built):
    info = built[1]
    with open(info["train_pkl"], "rb") as f:
        db = pickle.load(f)
    assert list(db) == ["train", "val"]
    spec = mini.SIZES["tiny"]
    seen_clusters = []
    for split, n_clusters in zip(("train", "val"), spec.sfm_clusters):
        d = db[split]
        assert list(d) == ["cids", "cluster", "qidxs", "pidxs"]
        assert len(d["cids"]) == len(d["cluster"]) == n_clusters * spec.sfm_views
        assert len(set(d["cids"])) == len(d["cids"]) and all(re.fullmatch(r"[0-9a-f]{32}", c) for c in d["cids"])
        assert len(d["qidxs"]) == len(d["pidxs"]) == n_clusters * ((spec.sfm_views + 1) // 2)
        for q, p in zip(d["qidxs"], d["pidxs"]):  # a pair is two different images of one cluster
            assert q != p and d["cluster"][q] == d["cluster"][p]
        assert all(cid2filename(c, info["train_images"]).is_file() for c in d["cids"])
        seen_clusters.append(set(d["cluster"]))
    assert not seen_clusters[0] & seen_clusters[1]
    files = [p for p in info["train_images"].rglob("*") if p.is_file()]
    assert len(files) == sum(len(db[s]["cids"]) for s in db)
    assert len(SfM120k(info["train_pkl"], image_root=info["train_images"])) == len(db["train"]["cids"])


def test_training_regions_never_hold_a_test_landmark(built):
    manifest = json.loads((built[0] / "manifest.json").read_text())
    landmarks, clusters = manifest["regions"]["landmarks"], manifest["regions"]["sfm"]
    assert len(landmarks) == mini.SIZES["tiny"].landmarks and len(clusters) == sum(mini.SIZES["tiny"].sfm_clusters)
    assert not set(landmarks) & set(clusters)
    landmarks, clusters, others = mini.split_regions(SEED, mini.SIZES["tiny"])
    boxes = [(r.photo, r.box) for r in landmarks + clusters + others]
    assert len(set(boxes)) == len(boxes)  # three disjoint sets of grid cells


# --- geometry, checked against a pixel computation ------------------------------------------------

def projected_mask(region: scene.Region, tform, out_hw) -> np.ndarray:
    """The landmark as an indicator image, warped like the photo: an independent visibility oracle."""
    mask = np.zeros(region.pixels().shape[:2])
    x0, y0, x1, y1 = region.core()
    ys, xs = np.mgrid[: mask.shape[0], : mask.shape[1]]
    mask[(xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)] = 1
    return warp(mask, tform, output_shape=out_hw, order=0) > 0.5


def shoelace(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


@pytest.mark.parametrize("kind", ["query", "easy", "hard", "junk_edge"])
def test_visible_fraction_and_box_match_the_warped_landmark_mask(kind):
    region = scene.Region("astronaut.png", (0, 0, 256, 256), "astronaut_r0c0")
    out_hw = (192, 256)
    for i in range(6):
        rng = np.random.default_rng([7, i])
        view = scene.VIEWS[kind]
        quad = scene.fit_inside(scene.view_quad(rng, region.core(), 256 / 192, view.zoom, view.shift, view.rot,
                                              view.persp), region.frame())
        _, tform = scene.render(region.pixels(), quad, out_hw)
        mask = projected_mask(region, tform, out_hw)
        x0, y0, x1, y1 = region.core()
        full = shoelace(tform.inverse(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])))
        visible = scene.visible_fraction(tform, region.core(), out_hw, None)
        assert abs(visible - mask.sum() / full) < 0.07
        assert kind != "query" or visible == 1  # a query shows its whole landmark
        if visible == 1:  # the query case: the box must be the landmark's own bounding box
            ys, xs = np.nonzero(mask)
            box = scene.box_in_frame(tform, region.core(), out_hw)
            assert np.allclose(box, [xs.min(), ys.min(), xs.max(), ys.max()], atol=2.5)


def test_fit_inside_keeps_views_within_their_region():
    rng = np.random.default_rng(0)
    box = (0, 0, 100, 60)
    for _ in range(200):
        quad = rng.uniform(-80, 180, (4, 2))
        fitted = scene.fit_inside(quad, box)
        assert (fitted >= 0).all() and (fitted[:, 0] <= 100).all() and (fitted[:, 1] <= 60).all()
    inside = np.array([[10.0, 10], [90, 12], [85, 50], [12, 55]])
    assert np.allclose(scene.fit_inside(inside, box), inside)


def test_hue_rotation_is_a_rotation_about_the_grey_axis():
    assert np.allclose(scene.hue_rotation(0), np.eye(3))
    for degrees in (17, 90, 180):
        m = scene.hue_rotation(degrees)
        assert np.allclose(m @ m.T, np.eye(3)) and np.isclose(np.linalg.det(m), 1)
        assert np.allclose(m @ np.ones(3), np.ones(3))  # grey stays grey, intensity (mean of RGB) is kept
    assert np.allclose(scene.hue_rotation(120), np.eye(3)[[2, 0, 1]])  # a third of the circle: R -> G -> B


def test_database_tones_remap_colours_but_queries_keep_them():
    img = np.random.default_rng(0).uniform(0.2, 0.8, (8, 8, 3)).astype(np.float32)
    remapped = []
    for kind in ("query", "mild", "severe"):
        tone_range = scene.TONES[kind]
        tones = [tone_range.sample(np.random.default_rng([1, i])) for i in range(200)]
        remapped.append(np.mean([not np.allclose(t.mix, np.eye(3)) for t in tones]))
        for t in tones:  # hue rotations, channel swaps and grey all keep each pixel's intensity
            assert np.allclose((img @ t.mix.T).mean(-1), img.mean(-1), atol=1e-5)
        out = tones[0].apply(np.random.default_rng(2), img)
        assert out.shape == img.shape and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    assert remapped[0] == 0 and remapped[1] > 0.9 and remapped[2] > 0.9
    assert scene.VIEWS["query"].tone == "query" and scene.VIEWS["hard"].tone == "severe"


def test_labels_follow_revisitop_visibility_rule():
    assert scene.label("easy", 0.9) == "easy" and scene.label("hard", 0.5) == "hard"
    assert scene.label("hard", 0.2) == "junk"  # under a quarter visible
    assert scene.label("junk_occluded", 0.6) == "junk"
    assert scene.label("junk_edge", 0.01) is None  # out of view: a plain negative


# --- mini-veri: the VeRi-776 layout ----------------------------------------------------------------

def read_index(path: Path) -> list[list[int]]:
    return [[int(v) for v in line.split()] for line in path.read_bytes().decode().split("\r\n")[:-1]]


def test_veri_names_lists_and_folders_agree(built):
    root = built[0] / mini.VERI
    lists = {part: (root / f"name_{part}.txt").read_text().splitlines() for part in ("train", "query", "test")}
    for part, names in lists.items():
        assert names == sorted(names) and len(set(names)) == len(names)
        assert all(VERI.fullmatch(n) for n in names)
        assert sorted(p.name for p in (root / f"image_{part}").iterdir()) == names
    assert set(lists["query"]) <= set(lists["test"])
    for name in lists["query"]:  # VeRi's query images are the test set's own files
        assert (root / "image_query" / name).read_bytes() == (root / "image_test" / name).read_bytes()
    ids = {part: {VERI.fullmatch(n)[1] for n in names} for part, names in lists.items()}
    assert not ids["train"] & ids["test"]
    assert len(ids["train"]) == mini.SIZES["tiny"].veri_train_ids
    assert len(ids["test"]) == mini.SIZES["tiny"].veri_test_ids


def test_veri_gt_and_jk_equal_what_the_names_imply(built):
    root = built[0] / mini.VERI
    test = (root / "name_test.txt").read_text().splitlines()
    queries = (root / "name_query.txt").read_text().splitlines()
    by_id = defaultdict(list)
    for i, name in enumerate(test, start=1):
        by_id[name[:4]].append((i, name.split("_")[1]))
    expected_gt = [[i for i, cam in by_id[q[:4]] if cam != q.split("_")[1]] for q in queries]
    expected_jk = [[i for i, cam in by_id[q[:4]] if cam == q.split("_")[1]] for q in queries]
    assert read_index(root / "gt_index.txt") == expected_gt
    assert read_index(root / "jk_index.txt") == expected_jk
    assert all(expected_gt) and all(test.index(q) + 1 in jk for q, jk in zip(queries, expected_jk))
    raw = (root / "gt_index.txt").read_bytes()
    assert raw.endswith(b" \r\n") and raw.count(b"\r\n") == len(queries)  # official: trailing space, CRLF


def test_each_query_camera_sees_its_vehicle_once_as_query(built):
    root = built[0] / mini.VERI
    queries = (root / "name_query.txt").read_text().splitlines()
    pairs = [(q[:4], q.split("_")[1]) for q in queries]
    assert len(set(pairs)) == len(pairs)
    test_pairs = {(n[:4], n.split("_")[1]) for n in (root / "name_test.txt").read_text().splitlines()}
    assert set(pairs) == test_pairs  # one query per (test vehicle, camera), as in VeRi


# --- CLI -------------------------------------------------------------------------------------------

def test_cli_builds_then_keeps(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(mini.SIZES, "small", mini.SIZES["tiny"])  # the CLI's sizes, at test scale
    assert cli(["data", "mini", str(tmp_path), "--seed", "5", "--workers", "1"]) == 0
    first = capsys.readouterr().out
    assert "small, seed 5" in first and "3 queries on 3 landmarks" in first
    before = tree_hash(tmp_path)
    assert cli(["data", "mini", str(tmp_path), "--seed", "5"]) == 0
    assert tree_hash(tmp_path) == before
    assert capsys.readouterr().out.splitlines()[1:] == first.splitlines()[1:]
