"""Idempotent adds: which images of an ``index add`` are already in the gallery, and which do not decode.

An image is "already stored" when the gallery holds an item with the same absolute path *and* the
same SHA-256 of the file's bytes, so rerunning an add (after a kill, or by mistake) adds nothing twice.
The same path with other bytes is a new version of that file: it is added as a new item and the
old item stays (nothing stored is removed by an add; ``asymret index remove`` drops the old one).
Records cropped to a box (``bbx``) are several items of one file and are never deduplicated.

With ``skip_bad`` each image is also decoded once here, and those that do not decode are logged
and left out (``asymret index add --skip-bad``) instead of stopping the add half-way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from asymret.errors import ImageError
from asymret.files import file_sha256
from asymret.index import Gallery
from asymret.retrieval.records import ImageRecord, load_image

log = logging.getLogger(__name__)
CHUNK = 1 << 20


def record_sha256(record: ImageRecord) -> str | None:
    """The SHA-256 of the record's file; None for a crop (``bbx``) or a file that cannot be read (the encoder
    reports that)."""
    if record.bbx is not None:
        return None
    try:
        return file_sha256(record.path)
    except OSError:
        return None


@dataclass
class Selection:
    """The positions of the records to add, and what was left out (counts and the bad files)."""

    keep: list[int]
    stored: int = 0
    bad: list[str] = field(default_factory=list)


def select_new(gallery: Gallery, records: Sequence[ImageRecord], *, skip_bad: bool = False) -> Selection:
    """The records not yet in ``gallery`` (by path and SHA-256); with ``skip_bad``, only those that decode."""
    paths = [os.path.abspath(r.path) for r in records]
    hashes = [record_sha256(r) for r in records]
    stored = gallery.stored(paths, hashes)
    selection = Selection(keep=[])
    for i, record in enumerate(records):
        if stored[i] and hashes[i] is not None:
            selection.stored += 1
            continue
        if skip_bad:
            try:
                load_image(record)
            except ImageError as exc:
                log.warning("skipping %s", exc)
                selection.bad.append(str(record.path))
                continue
        selection.keep.append(i)
    if selection.stored:
        log.info("%d image(s) already in gallery '%s' (same path and bytes): not added again",
                 selection.stored, gallery.name)
    return selection
