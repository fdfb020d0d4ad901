"""The retrieval-SfM-120k training pickle of cirtorch (Radenović et al., TPAMI 2018).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from asymret.errors import DataError
from asymret.retrieval.datasets.common import (
    LabelledSet,
    contiguous,
    load_pickle,
    require_files,
    require_keys,
    valid_indices,
)
from asymret.retrieval.records import ImageRecord


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
        data = load_pickle(pkl, "retrieval-SfM-120k pickle")
        require_keys(data, (split,), f"{pkl}")
        db = data[split]
        require_keys(db, ("cids", "cluster", "qidxs", "pidxs"), f"{pkl}: split '{split}'")
        n = len(db["cids"])
        if len(db["cluster"]) != n or len(db["qidxs"]) != len(db["pidxs"]):
            raise DataError(f"{pkl}: split '{split}' needs one cluster per cid and one pidx per qidx")
        if not (valid_indices(db["qidxs"], n) and valid_indices(db["pidxs"], n)):
            raise DataError(f"{pkl}: split '{split}' has qidxs/pidxs that are not indices 0..{n - 1} of cids")
        root = Path(image_root).expanduser() if image_root is not None else pkl.parent / "ims"
        self.clusters = np.asarray(db["cluster"])
        self.qidxs = np.asarray(db["qidxs"], dtype=np.int64)
        self.pidxs = np.asarray(db["pidxs"], dtype=np.int64)
        labels = contiguous(self.clusters)
        super().__init__([ImageRecord(cid2filename(c, root), int(lab), self.clusters[i].item(), split=split)
                          for i, (c, lab) in enumerate(zip(db["cids"], labels))])
        if check_files:
            require_files([r.path for r in self.records], pkl, f"image_root={root} must hold the SfM-120k ims/")
