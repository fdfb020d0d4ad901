"""What the service accepts from outside: uploaded image bytes and server-side paths.

Images are checked before they are decoded in full: size in bytes, then the header alone (format
whitelist, width x height against a pixel limit, the guard against decompression bombs that PIL's
``Image.MAX_IMAGE_PIXELS`` stands for), and only then decoded. Decoding then follows
:func:`asymret.retrieval.records.load_image` (EXIF orientation, RGB), so an uploaded query is
prepared exactly as the gallery images were offline; 16-bit grey images are scaled to 8 bits instead
of being clipped. Every failure is an :class:`~asymret.errors.ImageError` (HTTP 422).

Server paths must lie under one of the configured roots, after resolving ``..`` and symlinks
(:class:`~asymret.errors.ForbiddenError`, HTTP 403, otherwise); any OSError a path causes (a name over
the file system's limit, a loop of links, a file that cannot be read) is an
:class:`~asymret.errors.InputError` (HTTP 400) naming the path and the reason.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from asymret.errors import AsymretError, ForbiddenError, ImageError, InputError, NotFoundError

log = logging.getLogger("asymret.serve")
UPLOADS = "_uploads"  # under the galleries folder; gallery names cannot start with '_'
UPLOAD_GRACE_S = 600.0  # an upload file younger than this may belong to an add in progress
SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


@dataclass(frozen=True)
class ImageLimits:
    """``max_bytes`` per image file, ``max_pixels`` (width x height) per frame, accepted PIL formats."""

    max_bytes: int = 16 << 20
    max_pixels: int = 40_000_000
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP")


def decode_image(data: bytes, limits: ImageLimits, name: str = "upload") -> Image.Image:
    """An RGB image from encoded bytes, refused (ImageError) unless it passes ``limits`` first."""
    if not data:
        raise ImageError(f"{name} is empty; send the image file's bytes")
    if len(data) > limits.max_bytes:
        raise ImageError(f"{name} is {len(data)} bytes, over the {limits.max_bytes}-byte limit; send a smaller image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                _check_header(im, limits, name)
                im.load()
                return _to_rgb(ImageOps.exif_transpose(im))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name} declares more pixels than the {limits.max_pixels}-pixel limit; "
                         "send a smaller image") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image PIL recognises; send {_accepted(limits)}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or corrupt data
        raise ImageError(f"{name} does not decode ({exc}); send a complete, valid image") from None


def _check_header(im: Image.Image, limits: ImageLimits, name: str) -> None:
    if im.format not in limits.formats:
        raise ImageError(f"{name} is {im.format}, not accepted; send {_accepted(limits)}")
    w, h = im.size
    if w < 1 or h < 1 or w * h > limits.max_pixels:
        raise ImageError(f"{name} is {w}x{h} = {w * h} pixels, over the {limits.max_pixels}-pixel limit; "
                         "send a smaller image")


def _accepted(limits: ImageLimits) -> str:
    return ", ".join(limits.formats)


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB as ``load_image`` does (``convert``), except 16-bit grey, which PIL would clip at 255."""
    if im.mode in SIXTEEN_BIT:
        grey = np.asarray(im).astype(np.int64).clip(0, 65535) >> 8
        return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


# ----------------------------------------------------------------------------------- server paths
def resolve_under_roots(path: str, roots: Sequence[Path]) -> Path:
    """The real file ``path`` names, which must lie under one of ``roots`` (relative: under the first).

    ``..`` components are refused outright; the lexical path and then the symlink-resolved one must
    both stay under a root, so a link inside a root that points outside it is refused too.
    """
    if not roots:
        raise ForbiddenError("this server accepts no server-side paths; start it with --allow-root DIR "
                             "or upload the image instead")
    if "\x00" in path or ".." in Path(path).parts:
        raise ForbiddenError(f"path {path!r} contains '..' or a NUL byte; give a plain path under an allowed root")
    candidate = Path(os.path.abspath(Path(roots[0]) / path))  # an absolute ``path`` replaces the root
    if not any(_under(candidate, Path(os.path.abspath(r))) for r in roots):
        raise ForbiddenError(f"path {path!r} is outside the allowed roots; give a path under "
                             f"{', '.join(str(r) for r in roots)}")
    with user_path_errors(path):
        if not candidate.exists():
            raise NotFoundError(f"no file at {path!r} on the server; check the path")
        real = Path(os.path.realpath(candidate, strict=True))
        if not any(_under(real, Path(os.path.realpath(r))) for r in roots):
            raise ForbiddenError(f"path {path!r} leads outside the allowed roots through a symbolic link")
        if not real.is_file():
            raise ImageError(f"path {path!r} is not a file; give an image file")
    return real


def read_user_file(path: Path, shown: str) -> bytes:
    """The bytes of a file a user named (``shown`` as they wrote it), OSError as the user's error."""
    with user_path_errors(shown):
        return path.read_bytes()


@contextmanager
def user_path_errors(path: str):
    """Any OSError on a path a user gave (a 300-character name, a loop of links, a file gone or
    unreadable) as an :class:`~asymret.errors.InputError` (HTTP 400) that names the path and the reason."""
    try:
        yield
    except OSError as exc:
        shown = path if len(path) <= 120 else f"{path[:100]}...{path[-12:]} ({len(path)} characters)"
        raise InputError(f"path {shown!r} cannot be used on the server ({exc.strerror or exc}); give the "
                         "path of a readable image file under an allowed root") from None


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def own_upload(path: str | None, folder: Path) -> Path | None:
    """The file ``path`` names if it is a regular file of ``folder`` once resolved (``..`` and links
    followed, never a link itself), else None: what deleting an item may delete with it. Stored paths
    are compared resolved, not as text: ``<folder>/../../victim.txt`` is outside ``folder``."""
    if not path:
        return None
    try:
        given = Path(path)
        real = given.resolve(strict=True)
        inside = real.is_relative_to(folder.resolve()) and real != folder.resolve()
        return real if inside and not given.is_symlink() and real.is_file() else None
    except (OSError, RuntimeError, ValueError):  # gone, a loop of links, a NUL byte: nothing of ours
        return None


class Uploads:
    """The images a server takes in and keeps: decoded within ``limits``, read from under ``allowed_roots``,
    uploads kept under ``root/<gallery>/`` (their thumbnails are served from them), orphans swept."""

    def __init__(self, root: Path, limits: ImageLimits, allowed_roots: Sequence[Path] = (), *,
                 grace_s: float = UPLOAD_GRACE_S, thumbnail_px: int = 160):
        self.root, self.limits, self.allowed_roots = Path(root), limits, list(allowed_roots)
        self.grace_s, self.thumbnail_px, self._swept = grace_s, thumbnail_px, {}
        self.thumbnail = functools.lru_cache(maxsize=4096)(self._thumbnail)

    def decode(self, data: bytes, name: str = "upload"):
        return decode_image(data, self.limits, name)

    def remove(self, gallery: str) -> None:
        """Every kept upload of ``gallery`` (it was deleted)."""
        shutil.rmtree(self.root / gallery, ignore_errors=True)

    def image_from_path(self, path: str):
        """``(RGB image, real path)`` of a server file under the allowed roots."""
        real = resolve_under_roots(path, self.allowed_roots)
        return decode_image(read_user_file(real, path), self.limits, f"file {path!r}"), real

    def save(self, gallery: str, data: bytes) -> Path:
        """Keep an uploaded (already validated) gallery image: its thumbnail is served from it."""
        folder = self.root / gallery
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{uuid.uuid4().hex}.{Image.open(io.BytesIO(data)).format.lower()}"
        path.write_bytes(data)
        return path.resolve()

    def sweep(self, name: str, gallery, *, force: bool = False) -> int:
        """Delete upload files of gallery ``name`` that no item points to and that are older than
        ``upload_grace_s`` (left by a kill between saving the upload and committing its row; younger
        ones may belong to an add in progress). Runs at open and at most once per grace period on adds;
        a file an item points to is never deleted. Returns how many went."""
        now = time.time()
        if not force and now - self._swept.get(name, 0.0) < self.grace_s:
            return 0
        self._swept[name] = now
        folder = self.root / name
        if not folder.is_dir():
            return 0
        old = [p for p in folder.iterdir() if p.is_file() and now - p.stat().st_mtime > self.grace_s]
        if not old:
            return 0
        paths = [str(p.resolve()) for p in old]
        orphans = [p for p, used in zip(old, gallery.referenced(paths)) if not used]
        for path in orphans:
            path.unlink(missing_ok=True)
        if orphans:
            log.warning("gallery '%s': deleted %d upload file(s) no item points to (left by a kill)", name, len(orphans))
        return len(orphans)

    def forget(self, gallery: str, path: str | None) -> None:
        """Delete the kept upload of an item of ``gallery``: only a real file in its own uploads folder."""
        real = own_upload(path, self.root / gallery)
        if real is not None:
            real.unlink(missing_ok=True)

    def item_image(self, path: str | None) -> Path:
        """The image file of an item, if it lies where this server may read (roots or uploads)."""
        if path:
            try:
                return resolve_under_roots(path, [*self.allowed_roots, self.root])
            except AsymretError:  # outside the roots, gone, not a file, a name the file system refuses
                pass
        raise NotFoundError("this item has no image the server may show (added by path outside the "
                            "allowed roots, or the file is gone); add its folder with --allow-root")

    def thumbnail_of(self, path: str | None) -> bytes:
        """The JPEG thumbnail of an item's image (cached while the file is unchanged)."""
        real = self.item_image(path)
        try:
            return self.thumbnail(real, real.stat().st_mtime_ns)
        except OSError:  # gone (or unreadable) since it was found
            raise NotFoundError("this item's image file is gone or unreadable on the server; add the "
                                "image again") from None

    def _thumbnail(self, path: Path, mtime_ns: int) -> bytes:
        image = decode_image(path.read_bytes(), self.limits, f"item image {path.name}")
        image.thumbnail((self.thumbnail_px, self.thumbnail_px))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        return out.getvalue()
