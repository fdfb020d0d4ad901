"""Dataset readers against the real ground-truth files and tiny roots made here (no real images)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from asymret.errors import ConfigError, DataError, ImageError, InputError
from asymret.retrieval.datasets import (
    DATASETS,
    CsvDataset,
    LabelledFolder,
    RevisitedDataset,
    SfM120k,
    VeRi776,
    open_dataset,
    parse_veri_name,
    read_gnd,
)
from asymret.retrieval.records import load_image


def write_image(path: Path, size=(40, 30), seed=0) -> None:
    """Random pixels, format from the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def dump(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))
    return path


# --- revisited ------------------------------------------------------------------------------------

IMLIST = ["db_a", "db_b", "db_c", "db_d"]
QIMLIST = ["q_0", "q_1"]


def small_gnd():
    return {"imlist": list(IMLIST), "qimlist": list(QIMLIST),
            "gnd": [{"bbx": [5.0, 4.0, 25.0, 20.0], "easy": [0], "hard": [2], "junk": [3]},
                    {"bbx": [0, 0, 12, 30], "easy": [], "hard": [1, 3], "junk": []}]}


@pytest.fixture
def revisited_root(tmp_path):
    root = tmp_path / "roxford5k"
    for i, name in enumerate(IMLIST + QIMLIST):
        write_image(root / "jpg" / f"{name}.jpg", seed=i)
    dump(root / "gnd_roxford5k.pkl", small_gnd())
    return root


def test_revisited_queries_are_cropped_and_database_keeps_imlist_order(revisited_root):
    ds = RevisitedDataset(revisited_root)
    assert ds.name == "roxford5k" and ds.gnd == small_gnd()["gnd"]
    assert [r.path for r in ds.database] == [revisited_root / "jpg" / f"{n}.jpg" for n in IMLIST]
    assert {r.split for r in ds.database} == {"database"} and ds.num_database == 4 and ds.num_distractors == 0
    assert [r.split for r in ds.queries] == ["query", "query"]
    for record, g, name in zip(ds.queries, ds.gnd, QIMLIST):
        assert record.path == revisited_root / "jpg" / f"{name}.jpg"
        assert record.bbx == tuple(float(v) for v in g["bbx"])
        full = Image.open(record.path).convert("RGB")
        x1, y1, x2, y2 = g["bbx"]
        expected = np.asarray(full)[int(y1):int(y2), int(x1):int(x2)]
        crop = np.asarray(load_image(record))
        assert crop.shape == ((y2 - y1), (x2 - x1), 3)
        np.testing.assert_array_equal(crop, expected)


def test_revisited_distractors_come_after_the_database(revisited_root, tmp_path):
    r1m = tmp_path / "revisitop1m"
    names = ["00/x1.jpg", "01/x0.jpg", "00/x2.jpg"]
    for i, n in enumerate(names):
        write_image(r1m / "jpg" / n, seed=10 + i)
    (r1m / "revisitop1m.txt").write_text("\n".join(names[:2]) + "\n\n" + names[2] + "\n")
    ds = RevisitedDataset(revisited_root, distractors=r1m / "revisitop1m.txt")
    assert len(ds.database) == 7 and ds.num_database == 4 and ds.num_distractors == 3
    assert [r.path for r in ds.database[4:]] == [r1m / "jpg" / n for n in names]
    assert [r.split for r in ds.database] == ["database"] * 4 + ["distractor"] * 3
    assert ds.database[-1].path == r1m / "jpg" / names[-1] and list(ds.database)[3].path.stem == IMLIST[3]
    # every gnd index still names the same database image
    for g in ds.gnd:
        for key in ("easy", "hard", "junk"):
            assert [ds.database[i].path.stem for i in g[key]] == [IMLIST[i] for i in g[key]]
    with pytest.raises(IndexError):
        ds.database[7]


def test_revisited_distractor_root_defaults_and_missing_distractor(revisited_root, tmp_path):
    flat = tmp_path / "flat"
    write_image(flat / "a" / "d0.jpg")
    (flat / "list.txt").write_text("a/d0.jpg\n")
    ds = RevisitedDataset(revisited_root, distractors=flat / "list.txt")
    assert ds.database[4].path == flat / "a" / "d0.jpg"  # no jpg/ next to the list: its own folder
    elsewhere = RevisitedDataset(revisited_root, distractors=flat / "list.txt", distractor_root=flat / "a",
                                 check_files=False)
    assert elsewhere.database[4].path == flat / "a" / "a" / "d0.jpg"
    (flat / "list.txt").write_text("a/d0.jpg\nb/gone.jpg\nb/gone2.jpg\n")
    with pytest.raises(DataError, match=r"2 of 3 images .* missing .*b/gone\.jpg"):
        RevisitedDataset(revisited_root, distractors=flat / "list.txt")
    with pytest.raises(DataError, match="distractor list"):
        RevisitedDataset(revisited_root, distractors=flat / "nope.txt")
    with pytest.raises(InputError):
        RevisitedDataset(revisited_root, distractor_root=flat)


def test_revisited_gnd_file_lookup(tmp_path):
    other = tmp_path / "my_oxford"
    for name in IMLIST + QIMLIST:
        write_image(other / "jpg" / f"{name}.jpg")
    dump(other / "gnd_roxford5k.pkl", small_gnd())
    assert RevisitedDataset(other).name == "roxford5k"  # the single gnd_*.pkl in the root
    dump(other / "gnd_rparis6k.pkl", small_gnd())
    with pytest.raises(DataError, match="exactly one gnd_"):
        RevisitedDataset(other)
    assert RevisitedDataset(other, name="rparis6k").name == "rparis6k"
    with pytest.raises(DataError, match="gnd_nope.pkl"):
        RevisitedDataset(other, name="nope")
    # another dataset's ground truth in a root named for a revisited dataset
    paris = tmp_path / "rparis6k"
    paris.mkdir()
    dump(paris / "gnd_roxford5k.pkl", small_gnd())
    with pytest.raises(DataError, match="ground truth of roxford5k.*named rparis6k"):
        RevisitedDataset(paris, check_files=False)
    with pytest.raises(DataError, match="dataset root not found"):
        RevisitedDataset(tmp_path / "absent")


def test_revisited_images_not_in_jpg_are_reported_together(revisited_root):
    for name in ("db_b", "db_d"):
        (revisited_root / "jpg" / f"{name}.jpg").unlink()
    with pytest.raises(DataError, match=r"2 of 6 images .*gnd_roxford5k\.pkl .*missing.*db_b\.jpg.*db_d\.jpg"):
        RevisitedDataset(revisited_root)
    assert RevisitedDataset(revisited_root, check_files=False).num_database == 4


def _drop_imlist(g):
    del g["imlist"]


def _index_out_of_range(g):
    g["gnd"][1]["junk"] = [4]


def _negative_index(g):
    g["gnd"][0]["easy"] = [-1]


def _float_index(g):
    g["gnd"][0]["hard"] = [1.5]


def _short_bbx(g):
    g["gnd"][0]["bbx"] = [1, 2, 3]


def _text_bbx(g):
    g["gnd"][1]["bbx"] = ["a", 1, 2, 3]


def _missing_junk(g):
    del g["gnd"][1]["junk"]


def _gnd_count(g):
    g["gnd"].pop()


@pytest.mark.parametrize("corrupt, message", [
    (_drop_imlist, "lacks the key.*imlist"),
    (_index_out_of_range, r"query 1 \(q_1\) has junk entries .* 0\.\.3"),
    (_negative_index, "query 0.*easy"),
    (_float_index, "query 0.*hard"),
    (_short_bbx, "bbx must be 4 numbers"),
    (_text_bbx, "bbx must be 4 numbers"),
    (_missing_junk, r"query 1 \(q_1\) lacks the key.*junk"),
    (_gnd_count, "gnd has 1 entries but qimlist names 2"),
])
def test_revisited_gnd_validation(revisited_root, corrupt, message):
    gnd = small_gnd()
    corrupt(gnd)
    dump(revisited_root / "gnd_roxford5k.pkl", gnd)
    with pytest.raises(DataError, match=message) as info:
        RevisitedDataset(revisited_root)
    assert "gnd_roxford5k.pkl" in str(info.value)


def test_revisited_refuses_pickles_that_are_not_plain_data(revisited_root):
    (revisited_root / "gnd_roxford5k.pkl").write_bytes(pickle.dumps({"imlist": Path("x")}))
    with pytest.raises(DataError, match="not a readable"):
        RevisitedDataset(revisited_root)
    (revisited_root / "gnd_roxford5k.pkl").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="not a readable"):
        RevisitedDataset(revisited_root)


def test_image_that_does_not_decode_is_an_image_error(revisited_root):
    (revisited_root / "jpg" / "db_c.jpg").write_bytes(b"\xff\xd8 truncated")
    ds = RevisitedDataset(revisited_root)  # it exists, so the reader accepts it; decoding fails later
    with pytest.raises(ImageError, match="does not decode.*db_c.jpg"):
        load_image(ds.database[2])


@pytest.mark.parametrize("name, n_db, no_easy", [("roxford5k", 4993, 2), ("rparis6k", 6322, 0)])
def test_real_revisited_ground_truth(groundtruth_data, tmp_path, name, n_db, no_easy):
    root = tmp_path / name
    root.mkdir()
    os.symlink(groundtruth_data / "revisited" / f"gnd_{name}.pkl", root / f"gnd_{name}.pkl")
    ds = RevisitedDataset(root, check_files=False)
    raw = pickle.loads((groundtruth_data / "revisited" / f"gnd_{name}.pkl").read_bytes())
    assert len(ds.queries) == 70 and ds.num_database == n_db == len(ds.database)
    assert sum(len(g["easy"]) == 0 for g in ds.gnd) == no_easy
    assert [r.path.name for r in ds.database] == [f"{n}.jpg" for n in raw["imlist"]]
    assert [r.path.name for r in ds.queries] == [f"{n}.jpg" for n in raw["qimlist"]]
    assert [list(r.bbx) for r in ds.queries] == [[float(v) for v in g["bbx"]] for g in raw["gnd"]]
    assert read_gnd(groundtruth_data / "revisited" / f"gnd_{name}.pkl") == raw


# --- VeRi-776 -------------------------------------------------------------------------------------

def read_index_file(path: Path) -> list[np.ndarray]:
    return [np.array(line.split(), dtype=np.int64) - 1 for line in path.read_text().splitlines()]


@pytest.fixture
def real_veri(groundtruth_data, tmp_path):
    """VeRi776 over shared/data's name lists, or their generated twin's."""
    root = tmp_path / "VeRi"
    root.mkdir()
    for part in ("train", "query", "test"):
        os.symlink(groundtruth_data / "veri776" / f"name_{part}.txt", root / f"name_{part}.txt")
    return VeRi776(root, check_files=False)


def test_real_veri_groundtruth_equals_official_index_files(real_veri, groundtruth_data):
    positives, junk = real_veri.groundtruth()
    gt = read_index_file(groundtruth_data / "veri776" / "gt_index.txt")
    jk = read_index_file(groundtruth_data / "veri776" / "jk_index.txt")
    assert len(positives) == len(gt) == len(jk) == 1678 == len(real_veri.query)
    for ours, official in zip(positives, gt):
        np.testing.assert_array_equal(ours, official)
    for ours, official in zip(junk, jk):
        np.testing.assert_array_equal(ours, official)


def test_real_veri_without_camera_rule_only_the_query_itself_is_junk(real_veri, groundtruth_data):
    names = [r.path.name for r in real_veri.gallery]
    positives, junk = real_veri.groundtruth(camera_rule=False)
    gt = read_index_file(groundtruth_data / "veri776" / "gt_index.txt")
    jk = read_index_file(groundtruth_data / "veri776" / "jk_index.txt")
    for q, pos, jnk, g, j in zip(real_veri.query, positives, junk, gt, jk):
        own = names.index(q.path.name)
        np.testing.assert_array_equal(jnk, [own])
        np.testing.assert_array_equal(pos, np.setdiff1d(np.union1d(g, j), [own]))


def test_real_veri_train_labels_match_name_train_labeled(real_veri, groundtruth_data):
    official = [line.split() for line in (groundtruth_data / "veri776" / "name_train_labeled.txt").read_text().splitlines()]
    assert [r.path.name for r in real_veri.train] == [name for name, _ in official]
    assert [r.label for r in real_veri.train] == [int(label) for _, label in official]
    assert [r.identity for r in real_veri.train] == [int(name[:4]) for name, _ in official]
    assert len({r.label for r in real_veri.train}) == 576
    assert {r.split for r in real_veri.train} == {"train"} and {r.split for r in real_veri.gallery} == {"gallery"}


def make_veri(root: Path, lists: dict[str, list[str]]) -> Path:
    for part, names in lists.items():
        for name in names:
            (root / f"image_{part}").mkdir(parents=True, exist_ok=True)
            (root / f"image_{part}" / name).write_bytes(b"")
        (root / f"name_{part}.txt").write_text("\n".join(names) + "\n")
    return root


def test_veri_small_root(tmp_path):
    root = make_veri(tmp_path, {"train": ["0010_c001_00000001_0.jpg", "0003_c002_00000002_0.jpg",
                                          "0010_c003_00000003_0.jpg"],
                                "query": ["0004_c001_00000010_0.jpg"],
                                "test": ["0004_c001_00000010_0.jpg", "0004_c002_00000011_0.jpg",
                                         "0005_c001_00000012_0.jpg", "0004_c001_00000013_0.jpg"]})
    ds = VeRi776(root)
    assert [(r.label, r.identity, r.camera) for r in ds.train] == [(1, 10, 1), (0, 3, 2), (1, 10, 3)]
    assert [(r.identity, r.camera, r.label) for r in ds.query] == [(4, 1, None)]
    assert ds.gallery[2].path == root / "image_test" / "0005_c001_00000012_0.jpg"
    (pos,), (junk,) = ds.groundtruth()
    assert pos.tolist() == [1] and junk.tolist() == [0, 3]
    (pos,), (junk,) = ds.groundtruth(camera_rule=False)
    assert pos.tolist() == [1, 3] and junk.tolist() == [0]
    (root / "image_test" / "0005_c001_00000012_0.jpg").unlink()
    with pytest.raises(DataError, match=r"1 of 8 images .*missing.*0005_c001_00000012_0\.jpg"):
        VeRi776(root)


def test_veri_errors_name_the_file_and_line(tmp_path):
    root = make_veri(tmp_path, {"train": ["0001_c001_00000001_0.jpg"], "test": ["0001_c001_00000001_0.jpg"],
                                "query": ["0001_c001_00000001_0.jpg", "car_12.jpg"]})
    with pytest.raises(DataError, match=r"name_query\.txt:2: 'car_12\.jpg' is not a VeRi image name"):
        VeRi776(root)
    assert parse_veri_name("0776_c020_00123456_1.jpg", "x") == (776, 20)
    with pytest.raises(DataError, match="list.txt:7: '0776_020_1_1.jpg'"):
        parse_veri_name("0776_020_1_1.jpg", "list.txt:7")
    (root / "name_query.txt").unlink()
    with pytest.raises(DataError, match=r"expected the file .*name_query\.txt"):
        VeRi776(root)


# --- SfM-120k -------------------------------------------------------------------------------------

def cirtorch_cid2filename(cid, prefix):
    """cirtorch.datasets.datahelpers.cid2filename, verbatim."""
    return os.path.join(prefix, cid[-2:], cid[-4:-2], cid[-6:-4], cid)


@pytest.fixture
def sfm_pkl(tmp_path):
    cids = [f"{i:02d}abcdef{i * 7919:08x}" for i in range(6)]
    db = {"train": {"cids": cids[:5], "cluster": [7, 3, 7, 12, 3], "qidxs": [0, 1], "pidxs": [2, 4]},
          "val": {"cids": cids[5:], "cluster": [0], "qidxs": [], "pidxs": []}}
    for cid in cids:
        path = Path(cirtorch_cid2filename(cid, tmp_path / "ims"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    return dump(tmp_path / "retrieval-SfM-120k.pkl", db), db


def test_sfm120k_reader(sfm_pkl, tmp_path):
    pkl, db = sfm_pkl
    ds = SfM120k(pkl)
    assert [str(r.path) for r in ds] == [cirtorch_cid2filename(c, str(tmp_path / "ims")) for c in db["train"]["cids"]]
    assert ds.labels.tolist() == [1, 0, 1, 2, 0] and [r.identity for r in ds] == [7, 3, 7, 12, 3]
    assert ds.clusters.tolist() == [7, 3, 7, 12, 3] and ds.num_classes == 3
    assert ds.qidxs.dtype == np.int64 and ds.qidxs.tolist() == [0, 1] and ds.pidxs.tolist() == [2, 4]
    val = SfM120k(pkl, image_root=tmp_path / "ims", split="val")
    assert len(val) == 1 and val[0].split == "val" and val.qidxs.shape == (0,)


def test_sfm120k_errors(sfm_pkl, tmp_path):
    pkl, db = sfm_pkl
    with pytest.raises(DataError, match="lacks the key.*test"):
        SfM120k(pkl, split="test")
    with pytest.raises(DataError, match="missing"):
        SfM120k(pkl, image_root=tmp_path / "elsewhere")
    db["train"]["pidxs"] = [2, 5]
    dump(pkl, db)
    with pytest.raises(DataError, match="not indices 0..4"):
        SfM120k(pkl)
    del db["train"]["cluster"]
    dump(pkl, db)
    with pytest.raises(DataError, match="split 'train' lacks the key.*cluster"):
        SfM120k(pkl)


# --- folder and CSV -------------------------------------------------------------------------------

def naive_positives(labels, i):
    return [j for j in range(len(labels)) if labels[j] == labels[i] and j != i]


def test_labelled_folder(tmp_path):
    for rel in ("dog/b.png", "dog/a.jpg", "cat/x.JPG", "cat/deep/y.jpeg", "ant/z.webp"):
        write_image(tmp_path / rel)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    ds = LabelledFolder(tmp_path)
    assert [(r.path.relative_to(tmp_path).as_posix(), r.label, r.identity) for r in ds] == [
        ("ant/z.webp", 0, "ant"), ("cat/deep/y.jpeg", 1, "cat"), ("cat/x.JPG", 1, "cat"),
        ("dog/a.jpg", 2, "dog"), ("dog/b.png", 2, "dog")]
    assert ds.labels.tolist() == [0, 1, 1, 2, 2] and ds.num_classes == 3
    for i in range(len(ds)):
        assert ds.positives(i).tolist() == naive_positives(ds.labels, i)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="without images.*empty"):
        LabelledFolder(tmp_path)


def test_labelled_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no sub-folders"):
        LabelledFolder(tmp_path)
    with pytest.raises(DataError, match="dataset root not found"):
        LabelledFolder(tmp_path / "nope")


def test_csv_dataset(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg", "sub/e.jpg"):
        write_image(tmp_path / name)
    (tmp_path / "list.csv").write_text("path,label,camera\na.jpg,10,1\nb.jpg,2,\n\nc.jpg,10,3\n"
                                       "d.jpg,2,1\nsub/e.jpg,7,2\n")
    ds = CsvDataset(tmp_path / "list.csv")
    assert [r.path for r in ds] == [tmp_path / n for n in ("a.jpg", "b.jpg", "c.jpg", "d.jpg", "sub/e.jpg")]
    assert ds.labels.tolist() == [2, 0, 2, 0, 1]  # numeric order: 2 < 7 < 10
    assert [r.identity for r in ds] == [10, 2, 10, 2, 7] and [r.camera for r in ds] == [1, None, 3, 1, 2]
    for i in range(len(ds)):
        assert ds.positives(i).tolist() == naive_positives(ds.labels, i)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "named.csv").write_text("label,path\ncar,a.jpg\nbus,b.jpg\n")
    named = CsvDataset(tmp_path / "other" / "named.csv", root=tmp_path)
    assert named.labels.tolist() == [1, 0] and [r.identity for r in named] == ["car", "bus"]
    assert named[0].path == tmp_path / "a.jpg" and named[0].camera is None


@pytest.mark.parametrize("text, message", [
    ("path,camera\na.jpg,1\n", "lacks column.*label"),
    ("path,label,camera\na.jpg,1,1\nb.jpg,2\n", r"list\.csv:3: expected 3 fields"),
    ("path,label\na.jpg,1\nb.jpg\n", r"list\.csv:3: expected 2 fields"),
    ("path,label,camera\na.jpg,1,front\n", r"list\.csv:2: camera must be an integer"),
    ("path,label\n", "lists no images"),
    ("path,label\nmissing.jpg,1\n", r"1 of 1 images .*missing.*missing\.jpg"),
])
def test_csv_errors_name_the_line(tmp_path, text, message):
    write_image(tmp_path / "a.jpg")
    (tmp_path / "list.csv").write_text(text)
    with pytest.raises(DataError, match=message):
        CsvDataset(tmp_path / "list.csv")


def test_csv_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"expected the file .*list\.csv"):
        CsvDataset(tmp_path / "list.csv")


# --- registry -------------------------------------------------------------------------------------

def test_open_dataset_by_name(tmp_path):
    assert set(DATASETS) == {"revisited", "veri776", "sfm120k", "folder", "csv", "msmt17", "inshop", "sop", "cub200"}
    write_image(tmp_path / "a.jpg")
    (tmp_path / "list.csv").write_text("path,label\na.jpg,x\n")
    ds = open_dataset("csv", csv_path=tmp_path / "list.csv")
    assert isinstance(ds, CsvDataset) and ds[0].path == tmp_path / "a.jpg"
    with pytest.raises(ConfigError, match="unknown dataset kind 'cvs'.*csv"):
        open_dataset("cvs", csv_path=tmp_path / "list.csv")
    with pytest.raises(ConfigError, match="dataset 'csv' has no parameter csv_file.*are: csv_path, root"):
        open_dataset("csv", csv_file=tmp_path / "list.csv")
    with pytest.raises(ConfigError, match="dataset 'veri776' needs root"):
        open_dataset("veri776")
