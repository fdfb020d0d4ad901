"""Revisited Oxford / Paris (Radenović et al., CVPR 2018): ``jpg/`` plus ``gnd_<name>.pkl``, with the optional
revisitop1m distractors appended after the database.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from asymret.errors import DataError, InputError
from asymret.retrieval.datasets.common import (
    existing_dir,
    load_pickle,
    read_lines,
    require_files,
    require_keys,
    valid_indices,
)
from asymret.retrieval.records import ImageRecord

REVISITED_NAMES = ("roxford5k", "rparis6k")


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
    data = load_pickle(path, "revisited ground-truth pickle")
    require_keys(data, ("imlist", "qimlist", "gnd"), f"{path}")
    imlist, qimlist, gnd = data["imlist"], data["qimlist"], data["gnd"]
    if len(gnd) != len(qimlist):
        raise DataError(f"{path}: gnd has {len(gnd)} entries but qimlist names {len(qimlist)} queries")
    n = len(imlist)
    for i, (q, g) in enumerate(zip(qimlist, gnd)):
        where = f"{path}: query {i} ({q})"
        require_keys(g, ("bbx", "easy", "hard", "junk"), where)
        bad = [k for k in ("easy", "hard", "junk") if not valid_indices(g[k], n)]
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
        root = existing_dir(root, "jpg/ and gnd_<name>.pkl (e.g. roxford5k/)")
        gnd_path = self.gnd_path_in(root, name)
        self.name = gnd_path.stem[len("gnd_"):]
        data = read_gnd(gnd_path)
        imlist, qimlist, self.gnd = data["imlist"], data["qimlist"], data["gnd"]
        jpg = root / "jpg"
        self.queries = [ImageRecord(jpg / f"{q}.jpg", split="query", bbx=tuple(float(v) for v in g["bbx"]))
                        for q, g in zip(qimlist, self.gnd)]
        db = [ImageRecord(jpg / f"{n}.jpg", split="database") for n in imlist]
        if check_files:
            require_files([r.path for r in self.queries + db], gnd_path,
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
        names = [n for n in read_lines(list_file, "distractor list (revisitop1m.txt)") if n]
        if root is None:
            root = list_file.parent / "jpg" if (list_file.parent / "jpg").is_dir() else list_file.parent
        root = Path(root).expanduser()
        if check_files:
            require_files((os.path.join(root, n) for n in names), list_file,
                         f"distractor paths are read relative to {root}; pass distractor_root= if they "
                         "live elsewhere")
        return root, names
