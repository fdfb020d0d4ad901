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

import io
import os
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from asymret.errors import ForbiddenError, ImageError, InputError, NotFoundError

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
