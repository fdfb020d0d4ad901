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

One module per layout (:mod:`.revisited`, :mod:`.veri`, :mod:`.sfm`, :mod:`.acd`, :mod:`.folder`) over
:mod:`.common`; this package re-exports them and holds the registry.
"""

from __future__ import annotations

import inspect

from asymret.errors import ConfigError
from asymret.retrieval.datasets.acd import (
    CUB200,
    INSHOP_HEADER,
    MSMT17,
    SOP_HEADER,
    InShop,
    QueryGallerySet,
    StanfordOnlineProducts,
    parse_msmt17_name,
)
from asymret.retrieval.datasets.common import IMAGE_EXTENSIONS, LabelledSet, read_lines, require_files
from asymret.retrieval.datasets.folder import CsvDataset, LabelledFolder
from asymret.retrieval.datasets.revisited import REVISITED_NAMES, RecordSequence, RevisitedDataset, read_gnd
from asymret.retrieval.datasets.sfm import SfM120k, cid2filename
from asymret.retrieval.datasets.veri import VERI_NAME, VeRi776, parse_veri_name

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

__all__ = [
    "CUB200", "DATASETS", "IMAGE_EXTENSIONS", "INSHOP_HEADER", "MSMT17", "REVISITED_NAMES", "SOP_HEADER", "VERI_NAME",
    "CsvDataset", "InShop", "LabelledFolder", "LabelledSet", "QueryGallerySet", "RecordSequence", "RevisitedDataset",
    "SfM120k", "StanfordOnlineProducts", "VeRi776", "cid2filename", "open_dataset", "parse_msmt17_name",
    "parse_veri_name", "read_gnd", "read_lines", "require_files",
]
