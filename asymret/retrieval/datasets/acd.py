"""ACD's other benchmarks from their official files: :class:`MSMT17` (``list_*.txt``, the same-camera rule),
:class:`InShop` (``list_eval_partition.txt``, query/gallery by item), :class:`StanfordOnlineProducts`
(``Ebay_{train,test}.txt``) and :class:`CUB200` (``images.txt``, ``image_class_labels.txt``; classes 1-100 train),
the last two searched leave-one-out. Each has ``train``, ``query``, ``gallery`` and ``groundtruth()``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path, PurePosixPath

import numpy as np

from asymret.errors import DataError, InputError
from asymret.retrieval.datasets.common import (
    contiguous,
    existing_dir,
    read_lines,
    require_files,
)
from asymret.retrieval.metrics import reid_groundtruth
from asymret.retrieval.records import ImageRecord

#
# Each reads the dataset's *official* files (not the renamed folders of the D3still/ACD code) into the
# splits that code evaluates on (AIR_Distiller ``dataloader/datasets/*.py``): MSMT17 train / query /
# gallery with the same-camera rule; In-Shop train / query / gallery by item; SOP and CUB-200-2011 a
# train split of classes and a test split searched leave-one-out (every test image is a query against
# all the others; the D3still code gets the same by giving each image its own camera).


def _split_fields(line: str, count: int, where: str, layout: str) -> list[str]:
    """The whitespace-separated fields of a list line; exactly ``count`` of them or a DataError."""
    fields = line.split()
    if len(fields) != count:
        raise DataError(f"{where}: expected {count} fields ({layout}), found {len(fields)}; fix or remove the line")
    return fields


def _integer(text: str, what: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataError(f"{where}: {what} must be an integer, got '{text}'") from None


def _relabelled(records: list[ImageRecord]) -> list[ImageRecord]:
    """Training records with ``label`` = contiguous class in sorted order of their identities."""
    labels = contiguous([r.identity for r in records]) if records else []
    return [replace(r, label=int(lab)) for r, lab in zip(records, labels)]


class QueryGallerySet:
    """A benchmark with a labelled ``train`` split and a test split of ``query`` and ``gallery`` records.

    ``leave_one_out``: ``query`` and ``gallery`` are one list (the test split), and each query's own
    gallery entry is junk, so a query is never its own match (SOP, CUB-200-2011).
    :meth:`groundtruth` gives the positives and junk of the re-ID protocol (metrics.reid_groundtruth).
    """

    leave_one_out = False
    train: list[ImageRecord]
    query: list[ImageRecord]
    gallery: list[ImageRecord]

    def groundtruth(self, camera_rule: bool = True) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per query, (positives, junk) as 0-based gallery indices: same identity is positive; with
        ``camera_rule`` and cameras on both sides, same identity on the same camera is junk; the query's
        own entry is junk in a leave-one-out split."""
        cams = all(r.camera is not None for r in self.query + self.gallery)
        return reid_groundtruth(
            [r.identity for r in self.query], [r.camera for r in self.query] if cams else None,
            [r.identity for r in self.gallery], [r.camera for r in self.gallery] if cams else None,
            camera_rule=camera_rule and cams,
            query_gallery_index=np.arange(len(self.query)) if self.leave_one_out else None)

    def _check(self, root: Path, lists: str, hint: str) -> None:
        records = self.train + self.query + ([] if self.leave_one_out else self.gallery)
        require_files([r.path for r in records], f"{root}/{lists}", hint)


# MSMT17 (Wei et al., CVPR 2018). Names PPPP_NNN_CC_<day><time>_FFFF_K[_ex].jpg: person, index, camera
# (01-15), capture slot (0303morning ...), frame, ...; the lists give "<pid folder>/<name> <pid>".
MSMT17_LAYOUTS = (("train", "test"), ("mask_train_v2", "mask_test_v2"))  # MSMT17_V1, MSMT17_V2


def parse_msmt17_name(name: str, where: str) -> tuple[int, int]:
    """(person id, camera id) of an MSMT17 image name; ``where`` is ``file:line``."""
    parts = PurePosixPath(name).stem.split("_")
    if len(parts) < 4 or not all(p.isdigit() for p in parts[:3]):
        raise DataError(f"{where}: '{name}' is not an MSMT17 image name PPPP_NNN_CC_..., e.g. "
                        "0000/0000_000_01_0303morning_0015_0.jpg; fix or remove the line")
    return int(parts[0]), int(parts[2])


class MSMT17(QueryGallerySet):
    """MSMT17: ``list_{train,val,query,gallery}.txt`` with ``train/`` + ``test/`` (MSMT17_V1) or
    ``mask_train_v2/`` + ``mask_test_v2/`` (MSMT17_V2) under ``root``.

    Each list line is ``<folder>/<name> <person id>``; the camera comes from the name. ``train`` is
    ``list_train.txt`` (1,041 persons, 30,248 images), plus ``list_val.txt`` with ``include_val`` (the
    32,621 images of the paper's training set; torchreid adds val only when asked, as here); records get
    contiguous labels in sorted person order. ``query`` (11,659) and ``gallery`` (82,161) keep the raw
    test person ids (which restart at 0) and cameras: same person on the same camera is junk, as in VeRi.
    """

    def __init__(self, root, include_val: bool = False, check_files: bool = True):
        root = existing_dir(root, "list_train.txt, list_query.txt, list_gallery.txt and train/ + test/ "
                                   "(MSMT17_V1) or mask_train_v2/ + mask_test_v2/ (MSMT17_V2)")
        train_dir, test_dir = self._image_dirs(root, check_files)
        train = self._read(root / "list_train.txt", train_dir, "train")
        if include_val:
            train += self._read(root / "list_val.txt", train_dir, "train")
        self.train = _relabelled(train)
        self.query = self._read(root / "list_query.txt", test_dir, "query")
        self.gallery = self._read(root / "list_gallery.txt", test_dir, "gallery")
        if check_files:
            self._check(root, "list_*.txt", f"list_train/val.txt name images in {train_dir.name}/, "
                                            f"list_query/gallery.txt in {test_dir.name}/")

    @staticmethod
    def _image_dirs(root: Path, check_files: bool) -> tuple[Path, Path]:
        for train, test in MSMT17_LAYOUTS:
            if (root / train).is_dir() or (root / test).is_dir():
                return root / train, root / test
        if check_files:
            raise DataError(f"{root} has neither train/ + test/ (MSMT17_V1) nor mask_train_v2/ + mask_test_v2/ "
                            "(MSMT17_V2); point root at the extracted MSMT17 folder")
        return root / MSMT17_LAYOUTS[0][0], root / MSMT17_LAYOUTS[0][1]

    @staticmethod
    def _read(list_file: Path, image_dir: Path, split: str) -> list[ImageRecord]:
        records = []
        for lineno, line in enumerate(read_lines(list_file, f"MSMT17 list {list_file.name}"), 1):
            if not line:
                continue
            where = f"{list_file}:{lineno}"
            path, pid = _split_fields(line, 2, where, "<folder>/<image name> <person id>")
            pid = _integer(pid, "the person id", where)
            named, camera = parse_msmt17_name(path, where)
            if named != pid:
                raise DataError(f"{where}: the name says person {named} but the line gives {pid}; the id column "
                                "must be the person id the name starts with")
            records.append(ImageRecord(image_dir / path, identity=pid, camera=camera, split=split))
        if not records:
            raise DataError(f"{list_file} lists no images; expected lines '<folder>/<image name> <person id>'")
        return records


# In-Shop Clothes Retrieval (Liu et al., DeepFashion, CVPR 2016): Eval/list_eval_partition.txt names every
# image with its item id and split; images under Img/img/... (or the img/ folder moved up next to the list).
INSHOP_HEADER = ("image_name", "item_id", "evaluation_status")


class InShop(QueryGallerySet):
    """In-Shop: ``list_eval_partition.txt`` (in ``root`` or ``root/Eval``) and the images it names
    (``img/...``, relative to ``root`` or ``root/Img``).

    The file is the image count, the header ``image_name item_id evaluation_status``, then one line per
    image; status ``train`` (3,997 items, 25,882 images), ``query`` (14,218) or ``gallery`` (12,612; 3,985
    test items). ``identity`` is the item id (``id_00000001``); a query's positives are the gallery
    images of its item, and queries are not in the gallery (no junk, no cameras).
    """

    def __init__(self, root, check_files: bool = True):
        root = existing_dir(root, "list_eval_partition.txt (or Eval/list_eval_partition.txt) and img/")
        list_file = root / "list_eval_partition.txt"
        if not list_file.is_file() and (root / "Eval" / "list_eval_partition.txt").is_file():
            list_file = root / "Eval" / "list_eval_partition.txt"
        rows = self._rows(list_file)
        top = PurePosixPath(rows[0][0]).parts[0]
        image_root = root / "Img" if not (root / top).is_dir() and (root / "Img" / top).is_dir() else root
        parts = {"train": [], "query": [], "gallery": []}
        for name, item, status in rows:
            parts[status].append(ImageRecord(image_root / name, identity=item, split=status))
        self.train = _relabelled(parts["train"])
        self.query, self.gallery = parts["query"], parts["gallery"]
        if not self.query or not self.gallery:
            raise DataError(f"{list_file} has no {'query' if not self.query else 'gallery'} images; "
                            "evaluation_status must be train, query or gallery")
        if check_files:
            self._check(root, list_file.name, f"image names are read relative to {image_root}")

    @staticmethod
    def _rows(list_file: Path) -> list[tuple[str, str, str]]:
        lines = [(n, line) for n, line in enumerate(read_lines(list_file, "In-Shop list_eval_partition.txt"), 1)
                 if line]
        if len(lines) < 3:
            raise DataError(f"{list_file} is too short: expected the image count, the header "
                            f"{' '.join(INSHOP_HEADER)} and one line per image")
        (n0, count), (n1, header) = lines[0], lines[1]
        count = _integer(count, "the first line (the number of images)", f"{list_file}:{n0}")
        if tuple(header.split()) != INSHOP_HEADER:
            raise DataError(f"{list_file}:{n1}: expected the header '{' '.join(INSHOP_HEADER)}', found '{header}'")
        rows = []
        for lineno, line in lines[2:]:
            where = f"{list_file}:{lineno}"
            name, item, status = _split_fields(line, 3, where, "image_name item_id evaluation_status")
            if status not in ("train", "query", "gallery"):
                raise DataError(f"{where}: evaluation_status must be train, query or gallery, got '{status}'")
            rows.append((name, item, status))
        if count != len(rows):
            raise DataError(f"{list_file}: the first line says {count} images but {len(rows)} are listed; "
                            "the file is truncated or the count is wrong")
        return rows


# Stanford Online Products (Oh Song et al., CVPR 2016): Ebay_train.txt / Ebay_test.txt, header
# "image_id class_id super_class_id path"; 11,318 train classes (59,551 images), 11,316 test classes (60,502).
SOP_HEADER = ("image_id", "class_id", "super_class_id", "path")


class StanfordOnlineProducts(QueryGallerySet):
    """SOP: ``Ebay_train.txt`` and ``Ebay_test.txt`` in ``root``, image paths relative to ``root``.

    ``identity`` is the ``class_id`` (the product), ``extra["super_class"]`` its category. The test split
    is searched leave-one-out: every test image queries all the others (``query`` is ``gallery``).
    """

    leave_one_out = True

    def __init__(self, root, check_files: bool = True):
        root = existing_dir(root, "Ebay_train.txt, Ebay_test.txt and the <category>_final/ image folders")
        self.train = _relabelled(self._read(root, "Ebay_train.txt", "train"))
        self.query = self.gallery = self._read(root, "Ebay_test.txt", "gallery")
        if check_files:
            self._check(root, "Ebay_*.txt", f"paths are read relative to {root}")

    @staticmethod
    def _read(root: Path, name: str, split: str) -> list[ImageRecord]:
        list_file = root / name
        lines = [(n, line) for n, line in enumerate(read_lines(list_file, f"SOP list {name}"), 1) if line]
        if not lines or tuple(lines[0][1].split()) != SOP_HEADER:
            found = lines[0][1] if lines else "an empty file"
            raise DataError(f"{list_file}: expected the header '{' '.join(SOP_HEADER)}', found '{found}'")
        records = []
        for lineno, line in lines[1:]:
            where = f"{list_file}:{lineno}"
            _, class_id, super_id, path = _split_fields(line, 4, where, " ".join(SOP_HEADER))
            records.append(ImageRecord(root / path, identity=_integer(class_id, "class_id", where), split=split,
                                       extra={"super_class": _integer(super_id, "super_class_id", where)}))
        if not records:
            raise DataError(f"{list_file} lists no images under its header")
        return records


# CUB-200-2011 (Wah et al., 2011): images.txt "<image id> <path>", image_class_labels.txt "<image id> <class>",
# images under images/. Retrieval uses the class split of the metric-learning literature (Oh Song et al.
# 2016): classes 1-100 train (5,864 images), 101-200 test (5,924); train_test_split.txt is the
# classification split and is not read.


class CUB200(QueryGallerySet):
    """CUB-200-2011: ``images.txt``, ``image_class_labels.txt`` and ``images/`` under ``root``.

    ``identity`` is the class id. The first ``train_classes`` classes in id order train (default: half
    of them, classes 1-100 of 200), the others are the test split, searched leave-one-out.
    """

    leave_one_out = True

    def __init__(self, root, train_classes: int | None = None, check_files: bool = True):
        root = existing_dir(root, "images.txt, image_class_labels.txt and images/ (the CUB_200_2011 folder)")
        paths = self._pairs(root / "images.txt", "<image id> <image path>", "CUB images.txt")
        classes = self._pairs(root / "image_class_labels.txt", "<image id> <class id>", "CUB image_class_labels.txt")
        unlabelled = [i for i in paths if i not in classes]
        if unlabelled or len(classes) != len(paths):
            raise DataError(f"{root}: image_class_labels.txt must give one class per image of images.txt "
                            f"({len(unlabelled)} images without one, e.g. id {unlabelled[0] if unlabelled else '-'}; "
                            f"{len(classes)} labels for {len(paths)} images)")
        where = {i: f"{root / 'image_class_labels.txt'} (image {i})" for i in classes}
        label = {i: _integer(c, "the class id", where[i]) for i, c in classes.items()}
        ids = sorted(set(label.values()))
        n_train = len(ids) // 2 if train_classes is None else train_classes
        if not 0 < n_train < len(ids):
            raise InputError(f"train_classes must leave classes on both sides (1 to {len(ids) - 1} of the "
                             f"{len(ids)} classes), got {n_train}")
        train_ids = set(ids[:n_train])
        records = [ImageRecord(root / "images" / p, identity=label[i], split="train" if label[i] in train_ids
                               else "gallery") for i, p in paths.items()]
        self.train = _relabelled([r for r in records if r.split == "train"])
        self.query = self.gallery = [r for r in records if r.split == "gallery"]
        if check_files:
            self._check(root, "images.txt", f"image paths are read relative to {root / 'images'}")

    @staticmethod
    def _pairs(list_file: Path, layout: str, what: str) -> dict[int, str]:
        """``{image id: second field}`` of a two-column CUB file, ids unique, in file order."""
        out: dict[int, str] = {}
        for lineno, line in enumerate(read_lines(list_file, what), 1):
            if not line:
                continue
            where = f"{list_file}:{lineno}"
            image_id, value = _split_fields(line, 2, where, layout)
            image_id = _integer(image_id, "the image id", where)
            if image_id in out:
                raise DataError(f"{where}: image id {image_id} appears twice; each image needs one line")
            out[image_id] = value
        if not out:
            raise DataError(f"{list_file} lists no images; expected lines '{layout}'")
        return out
