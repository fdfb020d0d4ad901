"""VeRi-776 (Liu et al., ICME 2016): ``image_*/`` plus ``name_*.txt``; ground truth derived from the names
exactly as the official ``gt_index.txt`` / ``jk_index.txt``.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from asymret.errors import DataError
from asymret.retrieval.datasets.common import (
    contiguous,
    existing_dir,
    read_lines,
    require_files,
)
from asymret.retrieval.metrics import reid_groundtruth
from asymret.retrieval.records import ImageRecord

VERI_NAME = re.compile(r"(\d+)_c(\d+)_\d+_\d+\.\w+")  # VVVV_cCCC_FFFFFFFF_S.jpg


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
        root = existing_dir(root, "image_train/, image_query/, image_test/ and name_*.txt")
        train = self._read(root, "train", "train")
        self.query = self._read(root, "query", "query")
        self.gallery = self._read(root, "test", "gallery")
        labels = contiguous([r.identity for r in train])
        self.train = [replace(r, label=int(lab)) for r, lab in zip(train, labels)]
        if check_files:
            require_files([r.path for r in self.train + self.query + self.gallery], f"{root}/name_*.txt",
                         "every name in name_*.txt needs its image in the matching image_*/ folder")

    @staticmethod
    def _read(root: Path, part: str, split: str) -> list[ImageRecord]:
        list_file, image_dir = root / f"name_{part}.txt", root / f"image_{part}"
        records = []
        for lineno, name in enumerate(read_lines(list_file, f"VeRi list name_{part}.txt"), 1):
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
