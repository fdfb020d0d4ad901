"""People's own data: a folder per label (:class:`LabelledFolder`) or a ``path,label[,camera]`` CSV
(:class:`CsvDataset`).
"""

from __future__ import annotations

import csv
from pathlib import Path

from asymret.errors import DataError
from asymret.retrieval.datasets.common import (
    IMAGE_EXTENSIONS,
    LabelledSet,
    contiguous,
    existing_dir,
    require_files,
)
from asymret.retrieval.records import ImageRecord


class LabelledFolder(LabelledSet):
    """A sub-folder per label (torchvision ``ImageFolder`` convention): labels 0..C-1 in sorted folder
    order, ``identity`` = the folder name, images found recursively by extension."""

    def __init__(self, root):
        root = existing_dir(root, "one sub-folder of images per label")
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
        labels = contiguous(raw)
        super().__init__([ImageRecord(root / path, int(lab), ident, camera, split="train")
                          for (path, _, camera), lab, ident in zip(rows, labels, raw)])
        if check_files:
            require_files([r.path for r in self.records], csv_path, f"paths are read relative to {root}")

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
