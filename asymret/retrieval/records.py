"""The one record type every dataset reader yields, and the one place images are opened.

A query's ``bbx`` crop happens here, once, so no caller ever crops (revisited protocol: queries are
cropped to their box before encoding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from asymret.errors import ImageError


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset.

    ``label``: contiguous integer class for training (cluster, landmark, identity), or None.
    ``identity``: the dataset's own identity as written in its files (e.g. VeRi vehicle id 2).
    ``camera``: camera id where the dataset has one.
    ``split``: "train", "query", "database", "distractor", "gallery".
    ``bbx``: query box ``(x1, y1, x2, y2)`` in pixels of the full image, applied by :func:`load_image`.
    """

    path: Path
    label: int | None = None
    identity: int | str | None = None
    camera: int | None = None
    split: str = "database"
    bbx: tuple[float, float, float, float] | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)


def crop_box(image: Image.Image, bbx) -> Image.Image:
    """Crop to ``[x1, y1, x2, y2]`` as revisitop does (``img.crop(bbx)``), clipped to the image."""
    x1, y1, x2, y2 = (float(v) for v in bbx)
    w, h = image.size
    x1, y1 = max(0.0, x1), max(0.0, y1)
    x2, y2 = min(float(w), x2), min(float(h), y2)
    if x2 - x1 < 1 or y2 - y1 < 1:
        raise ImageError(f"query box {list(bbx)} lies outside the {w}x{h} image; fix the ground-truth bbx")
    return image.crop((x1, y1, x2, y2))


def load_image(record: ImageRecord | str | Path) -> Image.Image:
    """Open an image as RGB (EXIF orientation applied), cropped to the record's ``bbx`` if it has one."""
    from PIL import ImageOps

    path = Path(record.path if isinstance(record, ImageRecord) else record)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            image = im.convert("RGB")
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}") from None
    except IsADirectoryError:
        raise ImageError(f"expected an image file, found a directory: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageError(f"image does not decode: {path} ({exc}); replace or remove it") from None
    if isinstance(record, ImageRecord) and record.bbx is not None:
        image = crop_box(image, record.bbx)
    return image
