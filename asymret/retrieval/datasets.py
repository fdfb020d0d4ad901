"""Dataset readers: benchmark layouts and people's own data, each as lists of :class:`ImageRecord`.

* :class:`RevisitedDataset`: revisited Oxford / Paris (Radenović et al., CVPR 2018), ``jpg/`` plus
  ``gnd_<name>.pkl``, with the optional revisitop1m distractors appended after the database.
* :class:`VeRi776`: VeRi-776 (Liu et al., ICME 2016), ``image_*/`` plus ``name_*.txt``; ground
  truth derived from the names exactly as the official ``gt_index.txt`` / ``jk_index.txt``.
* :class:`SfM120k`: the retrieval-SfM-120k training pickle of cirtorch (Radenović et al., TPAMI 2018).
* ACD's other benchmarks, from their official files: :class:`MSMT17` (``list_*.txt``, the same-camera
  rule), :class:`InShop` (``list_eval_partition.txt``, query/gallery by item), :class:`StanfordOnlineProducts`
  (``Ebay_{train,test}.txt``) and :class:`CUB200` (``images.txt``, ``image_class_labels.txt``; classes 1-100
  train), the last two searched leave-one-out. Each has ``train``, ``query``, ``gallery`` and ``groundtruth()``.
* :class:`LabelledFolder` and :class:`CsvDataset`: a folder per label, or a ``path,label[,camera]`` CSV.

Configs name a reader by its key in :data:`DATASETS` and open it with :func:`open_dataset`.
"""

from __future__ import annotations

import csv
import inspect
import os
import pickle
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path, PurePosixPath

import numpy as np

from asymret.errors import ConfigError, DataError, InputError
from asymret.retrieval.metrics import reid_groundtruth
from asymret.retrieval.records import ImageRecord

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
REVISITED_NAMES = ("roxford5k", "rparis6k")
VERI_NAME = re.compile(r"(\d+)_c(\d+)_\d+_\d+\.\w+")  # VVVV_cCCC_FFFFFFFF_S.jpg


# --- shared helpers ------------------------------------------------------------------------------

def _existing_dir(root, expected: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset root not found: {root}; expected a folder holding {expected}")
    return root


def _read_lines(path: Path, what: str) -> list[str]:
    """Stripped lines of a text list (CRLF tolerated); blank lines stay so line numbers stay true."""
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (FileNotFoundError, IsADirectoryError):
        raise DataError(f"{what} not found: expected the file {path}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a UTF-8 text list; expected {what}") from None


class _PlainUnpickler(pickle.Unpickler):
    """Ground-truth pickles hold lists, dicts, numbers and at most numpy arrays; any other global
    would run code while loading, so it is refused."""

    _ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
                for n in ("_reconstruct", "scalar")} | {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it references {module}.{name}, not plain data")


def _load_pickle(path: Path, what: str):
    try:
        with open(path, "rb") as f:
            return _PlainUnpickler(f, encoding="latin1").load()  # latin1: Python 2 era pickles too
    except (FileNotFoundError, IsADirectoryError):
        raise DataError(f"{what} not found: expected the file {path}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as exc:
        raise DataError(f"{path} is not a readable {what} ({exc}); replace it with the original file") from None


def _require_keys(obj, keys, where: str) -> None:
    if not isinstance(obj, dict):
        raise DataError(f"{where} must be a dict with keys {', '.join(keys)}, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DataError(f"{where} lacks the key(s) {', '.join(missing)}")


def _valid_indices(values, n: int) -> bool:
    """A 1-D collection of integers in ``0..n-1`` (empty is fine)."""
    try:
        arr = np.asarray(values)
    except ValueError:  # ragged nesting
        return False
    return arr.ndim == 1 and (arr.size == 0 or (arr.dtype.kind in "iu" and arr.min() >= 0 and arr.max() < n))


def _check_files(paths, source: str, hint: str) -> None:
    """One error for all missing images: their count and the first few paths."""
    paths = list(paths)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        first = ", ".join(str(p) for p in missing[:3])
        raise DataError(f"{len(missing)} of {len(paths)} images named in {source} are missing "
                        f"(first: {first}); {hint}")


def _contiguous(raw) -> np.ndarray:
    """Labels 0..C-1 in sorted order of the raw values (identities, clusters, folder names)."""
    return np.unique(np.asarray(raw), return_inverse=True)[1].astype(np.int64)


class LabelledSet(Sequence):
    """Records with contiguous labels: what every trainable reader offers a sampler or miner.

    Positives for training are "same label" (the metric-learning convention of
    pytorch-metric-learning's miners): :meth:`positives` gives them for one record.
    """

    def __init__(self, records: list[ImageRecord]):
        self.records = records
        self.labels = np.array([r.label for r in records], dtype=np.int64)
        self._groups: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def positives(self, index: int) -> np.ndarray:
        """Indices of the other records with the label of record ``index``, ascending."""
        if self._groups is None:
            order = np.argsort(self.labels, kind="stable")
            bounds = np.flatnonzero(np.diff(self.labels[order])) + 1
            self._groups = np.split(order, bounds)
        group = self._groups[self.labels[index]]
        return group[group != index]


# --- revisited Oxford / Paris ----------------------------------------------------------------------

class RecordSequence(Sequence):
    """``head`` records, then records for ``names`` under ``root`` made on access.

    A million R1M distractors cost a list of strings here, not a million record objects.
    """

    def __init__(self, head: list[ImageRecord], root: Path, names: list[str], split: str):
        self.head, self.root, self.names, self.split = head, root, names, split

    def __len__(self) -> int:
        return len(self.head) + len(self.names)

    def __iter__(self):
        yield from self.head
        for name in self.names:
            yield ImageRecord(self.root / name, split=self.split)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range for {len(self)} records")
        if i < len(self.head):
            return self.head[i]
        return ImageRecord(self.root / self.names[i - len(self.head)], split=self.split)


def read_gnd(path) -> dict:
    """A revisitop ground-truth pickle, validated: ``imlist``, ``qimlist`` and per query ``gnd``
    entries ``bbx`` (4 numbers), ``easy`` / ``hard`` / ``junk`` (0-based indices into ``imlist``)."""
    path = Path(path).expanduser()
    data = _load_pickle(path, "revisited ground-truth pickle")
    _require_keys(data, ("imlist", "qimlist", "gnd"), f"{path}")
    imlist, qimlist, gnd = data["imlist"], data["qimlist"], data["gnd"]
    if len(gnd) != len(qimlist):
        raise DataError(f"{path}: gnd has {len(gnd)} entries but qimlist names {len(qimlist)} queries")
    n = len(imlist)
    for i, (q, g) in enumerate(zip(qimlist, gnd)):
        where = f"{path}: query {i} ({q})"
        _require_keys(g, ("bbx", "easy", "hard", "junk"), where)
        bad = [k for k in ("easy", "hard", "junk") if not _valid_indices(g[k], n)]
        if bad:
            raise DataError(f"{where} has {'/'.join(bad)} entries that are not indices 0..{n - 1} "
                            "of imlist; the pickle does not fit its own image list")
        try:
            box = np.asarray(g["bbx"], dtype=float)
        except (TypeError, ValueError):
            box = np.empty(0)
        if box.shape != (4,) or not np.isfinite(box).all():
            raise DataError(f"{where}: bbx must be 4 numbers [x1, y1, x2, y2], got {g['bbx']!r}")
    return data


class RevisitedDataset:
    """Revisited Oxford / Paris: ``root/jpg/<name>.jpg`` and ``root/gnd_<name>.pkl`` (revisitop).

    ``queries`` carry their ``bbx``, so :func:`load_image` crops them as the protocol requires;
    ``database`` lists ``imlist`` in order, then the revisitop1m distractors (``split="distractor"``)
    so every ``gnd`` index stays valid and any index >= ``num_database`` is a negative.
    ``distractors`` is a list file (one path per line, relative to ``distractor_root``, by default
    the ``jpg/`` folder next to the list file, else the list file's folder).
    """

    def __init__(self, root, name: str | None = None, distractors=None, distractor_root=None,
                 check_files: bool = True):
        root = _existing_dir(root, "jpg/ and gnd_<name>.pkl (e.g. roxford5k/)")
        gnd_path = self.gnd_path_in(root, name)
        self.name = gnd_path.stem[len("gnd_"):]
        data = read_gnd(gnd_path)
        imlist, qimlist, self.gnd = data["imlist"], data["qimlist"], data["gnd"]
        jpg = root / "jpg"
        self.queries = [ImageRecord(jpg / f"{q}.jpg", split="query", bbx=tuple(float(v) for v in g["bbx"]))
                        for q, g in zip(qimlist, self.gnd)]
        db = [ImageRecord(jpg / f"{n}.jpg", split="database") for n in imlist]
        if check_files:
            _check_files([r.path for r in self.queries + db], gnd_path,
                         f"check that {gnd_path.name} is the ground truth of the images in {jpg}")
        d_root, d_names = self._distractors(distractors, distractor_root, check_files)
        self.database = RecordSequence(db, d_root, d_names, "distractor")
        self.num_database = len(db)
        self.num_distractors = len(d_names)

    @staticmethod
    def gnd_path_in(root: Path, name: str | None) -> Path:
        """``gnd_<name>.pkl``, name defaulting to the root's; else the root's single ``gnd_*.pkl``."""
        wanted = root / f"gnd_{name or root.name}.pkl"
        if wanted.is_file() or name is not None:
            if not wanted.is_file():
                raise DataError(f"revisited ground truth not found: expected the file {wanted}")
            return wanted
        found = sorted(root.glob("gnd_*.pkl"))
        if len(found) != 1:
            listed = ", ".join(p.name for p in found) or "none"
            raise DataError(f"expected {wanted.name} or exactly one gnd_*.pkl in {root}, found: {listed}; "
                            "pass name= to choose")
        other = found[0].stem[len("gnd_"):]
        if root.name in REVISITED_NAMES and other != root.name:
            raise DataError(f"{found[0]} is the ground truth of {other}, but the root is named {root.name}; "
                            f"put gnd_{root.name}.pkl there")
        return found[0]

    @staticmethod
    def _distractors(list_file, root, check_files: bool) -> tuple[Path, list[str]]:
        if list_file is None:
            if root is not None:
                raise InputError("distractor_root was given without a distractors list file; pass both")
            return Path(), []
        list_file = Path(list_file).expanduser()
        names = [n for n in _read_lines(list_file, "distractor list (revisitop1m.txt)") if n]
        if root is None:
            root = list_file.parent / "jpg" if (list_file.parent / "jpg").is_dir() else list_file.parent
        root = Path(root).expanduser()
        if check_files:
            _check_files((os.path.join(root, n) for n in names), list_file,
                         f"distractor paths are read relative to {root}; pass distractor_root= if they "
                         "live elsewhere")
        return root, names


# --- VeRi-776 --------------------------------------------------------------------------------------

def parse_veri_name(name: str, where: str) -> tuple[int, int]:
    """(vehicle id, camera id) of a VeRi name ``VVVV_cCCC_FFFFFFFF_S.jpg``; ``where`` is ``file:line``."""
    m = VERI_NAME.fullmatch(name)
    if m is None:
        raise DataError(f"{where}: '{name}' is not a VeRi image name VVVV_cCCC_FFFFFFFF_S.jpg; "
                        "fix or remove the line")
    return int(m[1]), int(m[2])


class VeRi776:
    """VeRi-776: ``image_{train,query,test}/`` with ``name_{train,query,test}.txt``.

    Identity and camera come from the names ``VVVV_cCCC_FFFFFFFF_S.jpg``. ``train`` records get
    contiguous labels in sorted identity order (as ``name_train_labeled.txt``); ``query`` and
    ``gallery`` (the test set) keep raw identities.
    """

    def __init__(self, root, check_files: bool = True):
        root = _existing_dir(root, "image_train/, image_query/, image_test/ and name_*.txt")
        train = self._read(root, "train", "train")
        self.query = self._read(root, "query", "query")
        self.gallery = self._read(root, "test", "gallery")
        labels = _contiguous([r.identity for r in train])
        self.train = [replace(r, label=int(lab)) for r, lab in zip(train, labels)]
        if check_files:
            _check_files([r.path for r in self.train + self.query + self.gallery], f"{root}/name_*.txt",
                         "every name in name_*.txt needs its image in the matching image_*/ folder")

    @staticmethod
    def _read(root: Path, part: str, split: str) -> list[ImageRecord]:
        list_file, image_dir = root / f"name_{part}.txt", root / f"image_{part}"
        records = []
        for lineno, name in enumerate(_read_lines(list_file, f"VeRi list name_{part}.txt"), 1):
            if not name:
                continue
            identity, camera = parse_veri_name(name, f"{list_file}:{lineno}")
            records.append(ImageRecord(image_dir / name, identity=identity, camera=camera, split=split))
        return records

    def groundtruth(self, camera_rule: bool = True) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per query, (positives, junk) as 0-based gallery indices; with ``camera_rule`` these equal
        the official ``gt_index.txt`` / ``jk_index.txt`` (the query's own gallery copy is junk)."""
        where = {r.path.name: i for i, r in enumerate(self.gallery)}
        return reid_groundtruth([r.identity for r in self.query], [r.camera for r in self.query],
                                [r.identity for r in self.gallery], [r.camera for r in self.gallery],
                                camera_rule=camera_rule,
                                query_gallery_index=[where.get(r.path.name, -1) for r in self.query])


# --- retrieval-SfM-120k ----------------------------------------------------------------------------

def cid2filename(cid: str, prefix: Path) -> Path:
    """cirtorch's image path for a SfM-120k cid: ``prefix/cid[-2:]/cid[-4:-2]/cid[-6:-4]/cid``."""
    return prefix / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid


class SfM120k(LabelledSet):
    """One split of the retrieval-SfM-120k pickle (cirtorch ``TuplesDataset``).

    Records have ``label`` = the cluster as a contiguous class, ``identity`` = the raw cluster id.
    ``qidxs`` / ``pidxs`` are the query / positive pairs of the split, ``clusters`` the raw cluster
    of every image (negatives come from other clusters). ``image_root`` defaults to ``ims/`` next to
    the pickle, as cirtorch lays it out.
    """

    def __init__(self, pkl, image_root=None, split: str = "train", check_files: bool = True):
        pkl = Path(pkl).expanduser()
        data = _load_pickle(pkl, "retrieval-SfM-120k pickle")
        _require_keys(data, (split,), f"{pkl}")
        db = data[split]
        _require_keys(db, ("cids", "cluster", "qidxs", "pidxs"), f"{pkl}: split '{split}'")
        n = len(db["cids"])
        if len(db["cluster"]) != n or len(db["qidxs"]) != len(db["pidxs"]):
            raise DataError(f"{pkl}: split '{split}' needs one cluster per cid and one pidx per qidx")
        if not (_valid_indices(db["qidxs"], n) and _valid_indices(db["pidxs"], n)):
            raise DataError(f"{pkl}: split '{split}' has qidxs/pidxs that are not indices 0..{n - 1} of cids")
        root = Path(image_root).expanduser() if image_root is not None else pkl.parent / "ims"
        self.clusters = np.asarray(db["cluster"])
        self.qidxs = np.asarray(db["qidxs"], dtype=np.int64)
        self.pidxs = np.asarray(db["pidxs"], dtype=np.int64)
        labels = _contiguous(self.clusters)
        super().__init__([ImageRecord(cid2filename(c, root), int(lab), self.clusters[i].item(), split=split)
                          for i, (c, lab) in enumerate(zip(db["cids"], labels))])
        if check_files:
            _check_files([r.path for r in self.records], pkl, f"image_root={root} must hold the SfM-120k ims/")


# --- people's own data -----------------------------------------------------------------------------

class LabelledFolder(LabelledSet):
    """A sub-folder per label (torchvision ``ImageFolder`` convention): labels 0..C-1 in sorted folder
    order, ``identity`` = the folder name, images found recursively by extension."""

    def __init__(self, root):
        root = _existing_dir(root, "one sub-folder of images per label")
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise DataError(f"{root} has no sub-folders; put each label's images in a folder of its own")
        records, empty = [], []
        for label, name in enumerate(classes):
            files = sorted(p for p in (root / name).rglob("*")
                           if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not files:
                empty.append(name)
            records += [ImageRecord(p, label, name, split="train") for p in files]
        if empty:
            raise DataError(f"label folder(s) without images in {root}: {', '.join(empty)}; add images "
                            f"({', '.join(IMAGE_EXTENSIONS)}) or remove the folders")
        super().__init__(records)


class CsvDataset(LabelledSet):
    """A CSV with header ``path,label[,camera]``; paths relative to ``root`` (default: the CSV's
    folder). Labels become 0..C-1 in sorted order of the raw labels (numeric when all are integers),
    the raw label is kept in ``identity``."""

    def __init__(self, csv_path, root=None, check_files: bool = True):
        csv_path = Path(csv_path).expanduser()
        root = Path(root).expanduser() if root is not None else csv_path.parent
        rows = self._rows(csv_path)
        raw = [label for _, label, _ in rows]
        try:
            raw = [int(v) for v in raw]
        except ValueError:
            pass
        labels = _contiguous(raw)
        super().__init__([ImageRecord(root / path, int(lab), ident, camera, split="train")
                          for (path, _, camera), lab, ident in zip(rows, labels, raw)])
        if check_files:
            _check_files([r.path for r in self.records], csv_path, f"paths are read relative to {root}")

    @staticmethod
    def _rows(csv_path: Path) -> list[tuple[str, str, int | None]]:
        try:
            with open(csv_path, newline="", encoding="utf-8") as f:
                reader = csv.reader(f)
                header = [h.strip().lower() for h in next(reader, [])]
                missing = [c for c in ("path", "label") if c not in header]
                if missing:
                    raise DataError(f"{csv_path}: the header lacks column(s) {', '.join(missing)}; "
                                    "the first line must read path,label[,camera]")
                col = {c: header.index(c) for c in ("path", "label", "camera") if c in header}
                need = max(col.values()) + 1
                rows = []
                for row in reader:
                    if not any(cell.strip() for cell in row):
                        continue
                    where = f"{csv_path}:{reader.line_num}"
                    if len(row) < need:
                        raise DataError(f"{where}: expected {need} fields ({','.join(header[:need])}), "
                                        f"found {len(row)}")
                    path, label = row[col["path"]].strip(), row[col["label"]].strip()
                    if not path or not label:
                        raise DataError(f"{where}: path and label must not be empty")
                    rows.append((path, label, CsvDataset._camera(row, col, where)))
        except (FileNotFoundError, IsADirectoryError):
            raise DataError(f"CSV list not found: expected the file {csv_path} (header path,label[,camera])") from None
        except UnicodeDecodeError:
            raise DataError(f"{csv_path} is not UTF-8 text; save the CSV as UTF-8") from None
        if not rows:
            raise DataError(f"{csv_path} lists no images; add rows path,label[,camera] under the header")
        return rows

    @staticmethod
    def _camera(row: list[str], col: dict, where: str) -> int | None:
        cell = row[col["camera"]].strip() if "camera" in col else ""
        try:
            return int(cell) if cell else None
        except ValueError:
            raise DataError(f"{where}: camera must be an integer id, got '{cell}'") from None


# --- ACD's other benchmarks: MSMT17, In-Shop, SOP, CUB-200-2011 ------------------------------------
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
    labels = _contiguous([r.identity for r in records]) if records else []
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
        _check_files([r.path for r in records], f"{root}/{lists}", hint)


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
        root = _existing_dir(root, "list_train.txt, list_query.txt, list_gallery.txt and train/ + test/ "
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
        for lineno, line in enumerate(_read_lines(list_file, f"MSMT17 list {list_file.name}"), 1):
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
        root = _existing_dir(root, "list_eval_partition.txt (or Eval/list_eval_partition.txt) and img/")
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
        lines = [(n, line) for n, line in enumerate(_read_lines(list_file, "In-Shop list_eval_partition.txt"), 1)
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
        root = _existing_dir(root, "Ebay_train.txt, Ebay_test.txt and the <category>_final/ image folders")
        self.train = _relabelled(self._read(root, "Ebay_train.txt", "train"))
        self.query = self.gallery = self._read(root, "Ebay_test.txt", "gallery")
        if check_files:
            self._check(root, "Ebay_*.txt", f"paths are read relative to {root}")

    @staticmethod
    def _read(root: Path, name: str, split: str) -> list[ImageRecord]:
        list_file = root / name
        lines = [(n, line) for n, line in enumerate(_read_lines(list_file, f"SOP list {name}"), 1) if line]
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
        root = _existing_dir(root, "images.txt, image_class_labels.txt and images/ (the CUB_200_2011 folder)")
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
        for lineno, line in enumerate(_read_lines(list_file, what), 1):
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


# --- registry --------------------------------------------------------------------------------------

DATASETS: dict[str, type] = {
    "revisited": RevisitedDataset,
    "veri776": VeRi776,
    "sfm120k": SfM120k,
    "folder": LabelledFolder,
    "csv": CsvDataset,
    "msmt17": MSMT17,
    "inshop": InShop,
    "sop": StanfordOnlineProducts,
    "cub200": CUB200,
}


def open_dataset(kind: str, **kw):
    """Open the reader a config names: ``open_dataset("veri776", root="data/VeRi")``."""
    if kind not in DATASETS:
        raise ConfigError(f"unknown dataset kind '{kind}'; choose one of: {', '.join(DATASETS)}")
    cls = DATASETS[kind]
    params = inspect.signature(cls).parameters
    unknown = [k for k in kw if k not in params]
    missing = [k for k, p in params.items() if p.default is p.empty and k not in kw]
    if unknown or missing:
        wrong = f"has no parameter {', '.join(unknown)}" if unknown else f"needs {', '.join(missing)}"
        raise ConfigError(f"dataset '{kind}' {wrong}; its parameters are: {', '.join(params)}")
    return cls(**kw)
