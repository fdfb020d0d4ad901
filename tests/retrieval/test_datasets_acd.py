"""Readers of ACD's other benchmarks: hand-made roots with the real file and image names, the mini renders,
and one-sentence errors for missing or malformed files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from asymret.errors import DataError, InputError
from asymret.mini import ensure_mini_acd
from asymret.retrieval.datasets import (
    CUB200,
    MSMT17,
    InShop,
    StanfordOnlineProducts,
    open_dataset,
    parse_msmt17_name,
)
from tests.retrieval.test_datasets import write_image


def make(root: Path, files: dict[str, str], images=()) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    for i, image in enumerate(images):
        write_image(root / image, seed=i)
    return root


def one_sentence(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and re.sub(r"e\.g\. ", "", message).count(". ") == 0, message
    return message


# --- MSMT17 ---------------------------------------------------------------------------------------

MSMT_TRAIN = ["0000/0000_000_01_0303morning_0008_0.jpg 0", "0000/0000_001_03_0303morning_0017_0.jpg 0",
              "0114/0114_019_10_0303noon_0284_2_ex.jpg 114"]
MSMT_VAL = ["0001/0001_000_01_0303morning_0017_2.jpg 1"]
MSMT_QUERY = ["0000/0000_000_01_0303morning_0015_0.jpg 0", "0003/0003_000_05_0113noon_0422_1.jpg 3"]
MSMT_GALLERY = ["0000/0000_002_01_0303morning_0031_0.jpg 0", "0000/0000_004_07_0303afternoon_0102_0.jpg 0",
                "0003/0003_001_05_0113noon_0430_0.jpg 3", "0003/0003_002_12_0114morning_0008_0.jpg 3",
                "0003/0003_003_12_0114morning_0019_0.jpg 3", "0007/0007_000_01_0302noon_0500_0.jpg 7"]


def msmt17_root(tmp_path, train="train", test="test") -> Path:
    lists = {"list_train.txt": MSMT_TRAIN, "list_val.txt": MSMT_VAL, "list_query.txt": MSMT_QUERY,
             "list_gallery.txt": MSMT_GALLERY}
    images = [f"{train}/{line.split()[0]}" for line in MSMT_TRAIN + MSMT_VAL]
    images += [f"{test}/{line.split()[0]}" for line in MSMT_QUERY + MSMT_GALLERY]
    return make(tmp_path / "MSMT17", {k: "\n".join(v) + "\n" for k, v in lists.items()}, images)


@pytest.mark.parametrize("layout", [("train", "test"), ("mask_train_v2", "mask_test_v2")], ids=["V1", "V2"])
def test_msmt17_reads_the_official_lists(tmp_path, layout):
    root = msmt17_root(tmp_path, *layout)
    data = MSMT17(root)
    assert [(r.identity, r.camera, r.label) for r in data.train] == [(0, 1, 0), (0, 3, 0), (114, 10, 1)]
    assert data.train[2].path == root / layout[0] / "0114" / "0114_019_10_0303noon_0284_2_ex.jpg"
    assert [(r.identity, r.camera) for r in data.query] == [(0, 1), (3, 5)]
    assert data.query[0].path.parent == root / layout[1] / "0000" and len(data.gallery) == 6
    with_val = MSMT17(root, include_val=True)
    assert [r.identity for r in with_val.train] == [0, 0, 114, 1] and [r.label for r in with_val.train] == [0, 0, 2, 1]
    positives, junk = data.groundtruth()  # the same-camera rule, as VeRi: person 0 on camera 1 is junk
    assert [p.tolist() for p in positives] == [[1], [3, 4]] and [j.tolist() for j in junk] == [[0], [2]]
    positives, junk = data.groundtruth(camera_rule=False)
    assert [p.tolist() for p in positives] == [[0, 1], [2, 3, 4]] and all(j.size == 0 for j in junk)


def test_msmt17_name_parser():
    assert parse_msmt17_name("0114/0114_019_10_0303noon_0284_2_ex.jpg", "x:1") == (114, 10)
    with pytest.raises(DataError, match="x:3: '0001_c2_f0046182.jpg' is not an MSMT17 image name"):
        parse_msmt17_name("0001_c2_f0046182.jpg", "x:3")


@pytest.mark.parametrize("name, text, message", [
    ("list_query.txt", "0000/0000_000_01_0303morning_0015_0.jpg\n", r"list_query.txt:1: expected 2 fields"),
    ("list_query.txt", "0000/0000_000_01_0303morning_0015_0.jpg zero\n", r":1: the person id must be an integer"),
    ("list_gallery.txt", "0000_c1s1_001051_00.jpg 0\n", r":1: '0000_c1s1_001051_00.jpg' is not an MSMT17 image name"),
    ("list_train.txt", "\n0002/0002_000_01_0303morning_0015_0.jpg 3\n", r":2: the name says person 2 but the line gives 3"),
    ("list_train.txt", "\n\n", r"list_train.txt lists no images"),
])
def test_msmt17_malformed_lists(tmp_path, name, text, message):
    root = msmt17_root(tmp_path)
    (root / name).write_text(text)
    with pytest.raises(DataError, match=message) as exc:
        MSMT17(root)
    one_sentence(exc)


def test_msmt17_missing_files(tmp_path):
    root = msmt17_root(tmp_path)
    (root / "list_gallery.txt").unlink()
    with pytest.raises(DataError, match="MSMT17 list list_gallery.txt not found: expected the file .*list_gallery.txt"):
        MSMT17(root)
    root = msmt17_root(tmp_path / "b")
    (root / "test" / "0003" / "0003_000_05_0113noon_0422_1.jpg").unlink()
    with pytest.raises(DataError, match=r"1 of 11 images named in .*list_\*.txt are missing .*0003_000_05") as exc:
        MSMT17(root)
    one_sentence(exc)
    assert len(MSMT17(root, check_files=False).query) == 2
    with pytest.raises(DataError, match="has neither train/ \\+ test/"):
        MSMT17(make(tmp_path / "bare", {"list_train.txt": MSMT_TRAIN[0]}))
    with pytest.raises(DataError, match="dataset root not found"):
        MSMT17(tmp_path / "nowhere")


# --- In-Shop --------------------------------------------------------------------------------------

INSHOP_ROWS = [("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
               ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train"),
               ("img/MEN/Denim/id_00000080/01_1_front.jpg", "id_00000080", "train"),
               ("img/WOMEN/Blouses_Shirts/id_00000001/02_1_front.jpg", "id_00000001", "query"),
               ("img/WOMEN/Blouses_Shirts/id_00000001/02_2_side.jpg", "id_00000001", "gallery"),
               ("img/WOMEN/Blouses_Shirts/id_00000001/02_4_full.jpg", "id_00000001", "gallery"),
               ("img/MEN/Tees_Tanks/id_00000007/01_1_front.jpg", "id_00000007", "query"),
               ("img/MEN/Tees_Tanks/id_00000007/01_3_back.jpg", "id_00000007", "gallery"),
               ("img/MEN/Tees_Tanks/id_00000007/01_7_additional.jpg", "id_00000007", "gallery")]


def partition(rows=INSHOP_ROWS, count=None, header="image_name item_id evaluation_status") -> str:
    # the official file pads the name column with spaces
    return f"{len(rows) if count is None else count}\n{header}\n" + "".join(
        f"{n:<60}{i} {s}\n" for n, i, s in rows)


@pytest.mark.parametrize("official", [False, True], ids=["flat", "Eval+Img"])
def test_inshop_reads_list_eval_partition(tmp_path, official):
    lists, images = ("Eval/list_eval_partition.txt", "Img/") if official else ("list_eval_partition.txt", "")
    root = make(tmp_path / "InShop", {lists: partition()}, [images + r[0] for r in INSHOP_ROWS])
    data = InShop(root)
    assert [(r.identity, r.label) for r in data.train] == [("id_00000002", 0), ("id_00000002", 0), ("id_00000080", 1)]
    assert data.train[0].path == root / images / INSHOP_ROWS[0][0]
    assert [r.identity for r in data.query] == ["id_00000001", "id_00000007"] and len(data.gallery) == 4
    positives, junk = data.groundtruth()
    assert [p.tolist() for p in positives] == [[0, 1], [2, 3]] and all(j.size == 0 for j in junk)
    assert all(r.camera is None for r in data.query + data.gallery)


@pytest.mark.parametrize("text, message", [
    ("52712\nimage_name item_id\nimg/a.jpg id_1 train\n", (r":2: expected the header 'image_name item_id "
                                                            r"evaluation_status', found 'image_name item_id'")),
    ("many\nimage_name item_id evaluation_status\nimg/a.jpg id_1 train\n", (r":1: the first line \(the number of "
                                                                            r"images\) must be an integer")),
    (partition(count=52712), r"the first line says 52712 images but 9 are listed"),
    (partition(INSHOP_ROWS[:3] + [("img/x.jpg", "id_9", "test")] + INSHOP_ROWS[3:]),
     r":6: evaluation_status must be train, query or gallery, got 'test'"),
    (partition(INSHOP_ROWS[:2] + [("img/x.jpg", "id_9", "train extra")]), r":5: expected 3 fields"),
    (partition(INSHOP_ROWS[:3] + INSHOP_ROWS[4:6]), r"has no query images"),
    ("1\n", r"is too short"),
])
def test_inshop_malformed_partition(tmp_path, text, message):
    root = make(tmp_path / "InShop", {"list_eval_partition.txt": text})
    with pytest.raises(DataError, match=message) as exc:
        InShop(root, check_files=False)
    one_sentence(exc)


# --- SOP ------------------------------------------------------------------------------------------

SOP_HEADER = "image_id class_id super_class_id path\n"
SOP_TRAIN = ["1 1 1 bicycle_final/111085122871_0.JPG", "2 1 1 bicycle_final/111085122871_1.JPG",
             "3 2 1 bicycle_final/111265328556_0.JPG", "4 2 1 bicycle_final/111265328556_1.JPG"]
SOP_TEST = ["59552 11319 1 bicycle_final/111085468421_0.JPG", "59553 11319 1 bicycle_final/111085468421_1.JPG",
            "59554 11320 2 cabinet_final/110999851706_0.JPG", "59555 11320 2 cabinet_final/110999851706_1.JPG",
            "59556 11320 2 cabinet_final/110999851706_2.JPG"]


def sop_root(tmp_path) -> Path:
    files = {"Ebay_train.txt": SOP_HEADER + "\n".join(SOP_TRAIN) + "\n",
             "Ebay_test.txt": SOP_HEADER + "\n".join(SOP_TEST) + "\n"}
    return make(tmp_path / "Stanford_Online_Products", files, [r.split()[3] for r in SOP_TRAIN + SOP_TEST])


def test_sop_reads_ebay_lists_and_searches_the_test_split_leave_one_out(tmp_path):
    root = sop_root(tmp_path)
    data = StanfordOnlineProducts(root)
    assert [(r.identity, r.label) for r in data.train] == [(1, 0), (1, 0), (2, 1), (2, 1)]
    assert data.query is data.gallery and [r.identity for r in data.query] == [11319, 11319, 11320, 11320, 11320]
    assert data.query[2].path == root / "cabinet_final" / "110999851706_0.JPG" and data.query[2].extra == {"super_class": 2}
    positives, junk = data.groundtruth()  # every other image of its product; itself is junk
    assert [p.tolist() for p in positives] == [[1], [0], [3, 4], [2, 4], [2, 3]]
    assert [j.tolist() for j in junk] == [[0], [1], [2], [3], [4]]


@pytest.mark.parametrize("name, text, message", [
    ("Ebay_test.txt", "image_id class_id path\n1 1 a.JPG\n", (r"Ebay_test.txt: expected the header 'image_id class_id "
                                                            r"super_class_id path', found 'image_id class_id path'")),
    ("Ebay_train.txt", SOP_HEADER + "1 one 1 a/b.JPG\n", r"Ebay_train.txt:2: class_id must be an integer, got 'one'"),
    ("Ebay_train.txt", SOP_HEADER + "1 1 a/b.JPG\n", r"Ebay_train.txt:2: expected 4 fields"),
    ("Ebay_test.txt", SOP_HEADER, r"Ebay_test.txt lists no images under its header"),
    ("Ebay_test.txt", "", r"found 'an empty file'"),
])
def test_sop_malformed_lists(tmp_path, name, text, message):
    root = sop_root(tmp_path)
    (root / name).write_text(text)
    with pytest.raises(DataError, match=message) as exc:
        StanfordOnlineProducts(root)
    one_sentence(exc)


# --- CUB-200-2011 ---------------------------------------------------------------------------------

CUB_IMAGES = ["1 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg",
              "2 001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg",
              "3 002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg",
              "4 003.Sooty_Albatross/Sooty_Albatross_0031_1066.jpg",
              "5 004.Groove_billed_Ani/Groove_Billed_Ani_0010_1704.jpg",
              "6 004.Groove_billed_Ani/Groove_Billed_Ani_0016_1616.jpg"]
CUB_LABELS = ["1 1", "2 1", "3 2", "4 3", "5 4", "6 4"]


def cub_root(tmp_path, labels=CUB_LABELS) -> Path:
    files = {"images.txt": "\n".join(CUB_IMAGES) + "\n", "image_class_labels.txt": "\n".join(labels) + "\n",
             "train_test_split.txt": "1 1\n2 0\n3 1\n4 0\n5 1\n6 0\n"}
    return make(tmp_path / "CUB_200_2011", files, [f"images/{r.split()[1]}" for r in CUB_IMAGES])


def test_cub_splits_classes_in_half_and_searches_the_test_split_leave_one_out(tmp_path):
    root = cub_root(tmp_path)
    data = CUB200(root)  # 4 classes: 1-2 train, 3-4 test (as 1-100 / 101-200 of the real 200)
    assert [(r.identity, r.label) for r in data.train] == [(1, 0), (1, 0), (2, 1)]
    assert data.train[0].path == root / "images" / "001.Black_footed_Albatross" / "Black_Footed_Albatross_0046_18.jpg"
    assert data.query is data.gallery and [r.identity for r in data.query] == [3, 4, 4]
    positives, junk = data.groundtruth()
    assert [p.tolist() for p in positives] == [[], [2], [1]] and [j.tolist() for j in junk] == [[0], [1], [2]]
    assert [r.identity for r in CUB200(root, train_classes=1).train] == [1, 1]
    with pytest.raises(InputError, match="train_classes must leave classes on both sides"):
        CUB200(root, train_classes=4)


@pytest.mark.parametrize("labels, message", [
    (CUB_LABELS[:5], (r"image_class_labels.txt must give one class per image of images.txt \(1 images without one, "
                     r"e.g. id 6; 5 labels for 6 images\)")),
    (CUB_LABELS[:5] + ["5 4"], r"image_class_labels.txt:6: image id 5 appears twice"),
    (CUB_LABELS[:5] + ["6 Groove"], r"\(image 6\): the class id must be an integer, got 'Groove'"),
    (CUB_LABELS[:5] + ["6"], r"image_class_labels.txt:6: expected 2 fields \(<image id> <class id>\)"),
])
def test_cub_malformed_files(tmp_path, labels, message):
    root = cub_root(tmp_path, labels)
    with pytest.raises(DataError, match=message) as exc:
        CUB200(root)
    one_sentence(exc)


def test_cub_missing_images_txt(tmp_path):
    root = cub_root(tmp_path)
    (root / "images.txt").unlink()
    with pytest.raises(DataError, match=r"CUB images.txt not found: expected the file .*images.txt"):
        CUB200(root)


# --- the mini renders -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minis(tmp_path_factory):
    return ensure_mini_acd(tmp_path_factory.mktemp("mini-acd"), size="tiny")


def test_readers_open_their_mini_render(minis):
    counts = minis["counts"]
    msmt = open_dataset("msmt17", root=minis["msmt17"])
    c = counts["mini-msmt17"]
    assert (len(msmt.train), len(msmt.query), len(msmt.gallery)) == (c["train"], c["query"], c["gallery"])
    assert len(open_dataset("msmt17", root=minis["msmt17"], include_val=True).train) == c["train"] + c["val"]
    assert sorted({r.label for r in msmt.train}) == list(range(len({r.identity for r in msmt.train})))
    positives, junk = msmt.groundtruth()
    for q, p, j in zip(msmt.query, positives, junk):  # every query has a match on another camera
        assert p.size and all(msmt.gallery[i].camera != q.camera for i in p)
        assert all(msmt.gallery[i].camera == q.camera and msmt.gallery[i].identity == q.identity for i in j)

    shop = open_dataset("inshop", root=minis["inshop"])
    c = counts["mini-inshop"]
    assert (len(shop.train), len(shop.query), len(shop.gallery)) == (c["train"], c["query"], c["gallery"])
    assert len({r.label for r in shop.train}) == c["train_items"]
    assert not {r.identity for r in shop.train} & {r.identity for r in shop.gallery}
    assert all(p.size for p in shop.groundtruth()[0])

    for name, key in (("sop", "mini-sop"), ("cub200", "mini-cub200")):
        data = open_dataset(name, root=minis[name])
        assert data.query is data.gallery and len(data.query) == counts[key]["test"]
        assert len(data.train) == counts[key]["train"]
        assert not {r.identity for r in data.train} & {r.identity for r in data.query}
        positives, junk = data.groundtruth()
        assert all(p.size and q not in p for q, p in enumerate(positives))
        assert [j.tolist() for j in junk] == [[q] for q in range(len(data.query))]


def test_mini_render_is_deterministic(minis, tmp_path):
    again = ensure_mini_acd(tmp_path, size="tiny")
    for name in ("msmt17", "inshop", "sop", "cub200"):
        files = sorted(p.relative_to(minis[name]) for p in minis[name].rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(again[name]) for p in again[name].rglob("*") if p.is_file())
        assert all((minis[name] / f).read_bytes() == (again[name] / f).read_bytes() for f in files)


def test_mini_acd_keeps_a_complete_build_and_refuses_bad_arguments(minis):
    marker = minis["root"] / ".mini-acd-complete"
    stamp = marker.stat().st_mtime_ns
    assert ensure_mini_acd(minis["root"], size="tiny")["counts"] == minis["counts"]
    assert marker.stat().st_mtime_ns == stamp
    with pytest.raises(InputError, match="unknown mini benchmark size 'huge'"):
        ensure_mini_acd(minis["root"], size="huge")
    with pytest.raises(InputError, match="seed must be a non-negative integer"):
        ensure_mini_acd(minis["root"], seed=-1, size="tiny")


def test_open_dataset_passes_reader_options(tmp_path):
    root = cub_root(tmp_path)
    assert [r.identity for r in open_dataset("cub200", root=root, train_classes=3).query] == [4, 4]
    assert len(open_dataset("msmt17", root=msmt17_root(tmp_path), include_val=True).train) == 4


def test_data_mini_acd_command_prints_each_dataset_with_its_evaluate_line(minis, capsys):
    import argparse

    from asymret.api.commands.data import run_mini_acd

    args = argparse.Namespace(out=minis["root"], seed=0, size="tiny", workers=1, force=False)
    assert run_mini_acd(args) == 0  # a complete build of this seed and size: kept, not re-rendered
    out = capsys.readouterr().out
    for name in ("msmt17", "inshop", "sop", "cub200"):
        assert f"asymret evaluate --benchmark {name} --root {minis[name]}" in out
    assert "train_ids 4" in out and "test_ids 3" in out and "cameras 3" in out
