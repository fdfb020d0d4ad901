"""What ``asymret index build|add`` reads: the images (a folder, a list file, a ``path,label[,camera]`` CSV or a
revisited ``gnd_*.pkl``) and, for a gallery built from precomputed embeddings, a metadata CSV."""

from __future__ import annotations

import csv
from pathlib import Path

from asymret.errors import DataError
from asymret.retrieval.datasets.common import IMAGE_EXTENSIONS, read_lines, require_files
from asymret.retrieval.datasets.folder import CsvDataset
from asymret.retrieval.datasets.revisited import RevisitedDataset
from asymret.retrieval.records import ImageRecord


def read_images(source) -> list[ImageRecord]:
    """Records of a folder, a list file, a CSV ``path,label[,camera]`` or a ``gnd_*.pkl`` (see module doc)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return image_folder(path)
    if not path.is_file():
        raise DataError(f"images not found: {path}; give a folder, a list file (one path per line), "
                        "a CSV path,label[,camera] or a gnd_*.pkl")
    if path.suffix.lower() == ".csv":
        return list(CsvDataset(path))
    if path.suffix == ".pkl":
        return list(RevisitedDataset(path.parent, name=path.stem.removeprefix("gnd_")).database)
    lines = [line for line in read_lines(path, "image list (one path per line)") if line and not line.startswith("#")]
    paths = [path.parent / line for line in lines]
    if not paths:
        raise DataError(f"{path} lists no images; write one image path per line")
    require_files(paths, path, f"relative paths are read from {path.parent}")
    return [ImageRecord(p) for p in paths]


def image_folder(root: Path) -> list[ImageRecord]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise DataError(f"no images in {root} ({', '.join(IMAGE_EXTENSIONS)}); point --images at the image folder")
    return [ImageRecord(p, identity=p.relative_to(root).parts[0] if p.parent != root else None) for p in files]


def read_item_rows(path) -> list[dict]:
    """Rows of a metadata CSV whose header names any of ``path,label,camera`` (other columns become
    the item's attributes), for a gallery built from precomputed embeddings."""
    path = Path(path).expanduser()
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise DataError(f"{path} is empty; its first line must be a header such as path,label,camera")
            rows = [{k.strip(): (v.strip() if isinstance(v, str) and v.strip() else None)
                     for k, v in row.items() if k} for row in reader]
    except (FileNotFoundError, IsADirectoryError):
        raise DataError(f"metadata CSV not found: {path}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; save the CSV as UTF-8") from None
    keys = ("path", "label", "camera")
    return [{**{k: row.pop(k, None) for k in keys}, "attributes": {k: v for k, v in row.items() if v is not None}}
            for row in rows]
