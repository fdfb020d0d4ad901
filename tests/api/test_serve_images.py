"""Malformed and unusual uploads: each is a 4xx with a JSON error, or the correct answer.

"Correct" is checked against an independent computation: the test builds the RGB image the upload
should stand for with numpy (CMYK formula, 16-to-8-bit shift, the first GIF frame, the EXIF rotation
done by hand) and compares the server's query vector with the in-process query network's.
"""

from __future__ import annotations

import io
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from asymret.api.settings import ServeConfig
from tests.api.servekit import Reference, encoded, files, make_pair, photo, serve

MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    pair = make_pair(root / "pair.pt")
    config = ServeConfig(pair=pair, galleries=root / "galleries", device="cpu", max_image_pixels=MAX_PIXELS,
                         max_image_mb=0.5, max_request_mb=2)
    with serve(config) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/v1/galleries", json={"name": "g"}).status_code == 201
        assert client.post("/v1/galleries/g/items", files=files(encoded(photo(1)))).status_code == 201
        yield client, Reference(pair)


# ------------------------------------------------------------------------------------ bad uploads
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but whose data is a few bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def png_bomb() -> bytes:
    """A real decompression bomb: 4000 x 4000 zeros (16 MB decoded) in a few kB."""
    blob = encoded(Image.new("L", (4000, 4000)), "PNG", optimize=True)
    assert len(blob) < 50_000
    return blob


BAD = {
    "empty": lambda: b"",
    "truncated_jpeg": lambda: encoded(photo(2, (200, 160)), "JPEG")[:600],
    "truncated_png": lambda: encoded(photo(2, (200, 160)))[:-200],
    "png_bomb": png_bomb,
    "huge_dimensions": lambda: png_claiming(100_000, 100_000),
    "text": lambda: b"just some text, not an image\n" * 10,
    "html": lambda: b"<!doctype html><svg xmlns='http://www.w3.org/2000/svg'></svg>",
    "tiff_not_accepted": lambda: encoded(photo(2), "TIFF"),
    "over_size_limit": lambda: encoded(Image.fromarray(np.random.default_rng(0).integers(
        0, 256, (400, 600, 3), dtype=np.uint8)), "BMP"),  # 720 kB > 0.5 MB
    "jpeg_header_only": lambda: encoded(photo(2), "JPEG")[:20],
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_upload_is_a_4xx(setup, kind):
    client, _ = setup
    blob = BAD[kind]()
    for path in ("/v1/encode", "/v1/galleries/g/search/image", "/v1/galleries/g/items"):
        r = client.post(path, files=files(blob, content_type="image/png"))
        assert r.status_code == 422, (path, r.status_code, r.text)
        assert r.json()["error"]["code"] == "invalid_image"
    assert client.get("/v1/galleries/g").json()["count"] == 1  # nothing was added
    assert client.get("/healthz").status_code == 200


# ----------------------------------------------------------------------------------- good uploads
def rgb(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(array).astype(np.uint8), "RGB")


def cmyk_jpeg():
    src = np.asarray(photo(3, (64, 48))).astype(int)
    cmyk = np.concatenate([255 - src, np.full(src.shape[:2] + (1,), 40)], axis=2)
    blob = encoded(Image.fromarray(cmyk.astype(np.uint8), "CMYK"), "JPEG", quality=95)
    c = np.asarray(Image.open(io.BytesIO(blob))).astype(float)  # the CMYK values the file holds
    k = 255 - c[..., 3:]
    return blob, rgb(np.round((255 - c[..., :3]) * k / 255))


def sixteen_bit_png():
    grey = np.asarray(photo(4, (50, 30)).convert("L")).astype(np.uint16)
    blob = encoded(Image.fromarray(grey * 257))  # full 16-bit range: 0..65535
    return blob, rgb(np.repeat(grey[..., None], 3, axis=2))


def animated_gif():
    frames = [photo(s, (40, 40)).quantize(32) for s in (5, 6, 7)]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out.getvalue(), frames[0].convert("RGB")


def exif_rotated_jpeg():
    stored = photo(8, (64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    blob = encoded(stored, "JPEG", quality=95, exif=exif.tobytes())
    pixels = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    return blob, rgb(np.rot90(pixels, k=-1))  # clockwise by hand: 64x32 stored, 32x64 shown


def grayscale_png():
    grey = np.asarray(photo(9).convert("L"))
    return encoded(Image.fromarray(grey, "L")), rgb(np.repeat(grey[..., None], 3, axis=2))


def alpha_png():
    color = np.asarray(photo(10))
    alpha = np.tile(np.linspace(0, 255, color.shape[1]).astype(np.uint8), (color.shape[0], 1))[..., None]
    # alpha is dropped, as the offline gallery reader (load_image) drops it
    return encoded(Image.fromarray(np.concatenate([color, alpha], axis=2), "RGBA")), rgb(color)


def declared_as_text():
    image = photo(11)
    return encoded(image), image


def tiny_and_thin():
    image = photo(12, (1, 300))
    return encoded(image), image


GOOD = {"cmyk_jpeg": cmyk_jpeg, "sixteen_bit_png": sixteen_bit_png, "animated_gif": animated_gif,
        "exif_rotated_jpeg": exif_rotated_jpeg, "grayscale_png": grayscale_png, "alpha_png": alpha_png,
        "wrong_content_type": declared_as_text, "one_pixel_wide": tiny_and_thin}


@pytest.mark.parametrize("kind", sorted(GOOD))
def test_unusual_upload_gives_the_correct_vector(setup, kind):
    client, ref = setup
    blob, expected = GOOD[kind]()
    r = client.post("/v1/encode", files=files(blob, content_type="text/plain"))
    assert r.status_code == 200, r.text
    got = np.array(r.json()["vectors"][0])
    want = ref.query([expected])[0]
    assert float(got @ want) > 0.9999, kind  # unit vectors: cosine 1 up to rounding of the pixel values
    search = client.post("/v1/galleries/g/search/image", files=files(blob))
    assert search.status_code == 200 and len(search.json()["results"][0]["hits"]) == 1


def test_pixel_limit_is_read_from_the_header(setup):
    """Just over the limit is refused, just under is served: the size, not the file, decides."""
    client, _ = setup
    over = encoded(Image.new("L", (1001, 1000)), "PNG")
    under = encoded(Image.new("L", (1000, 1000)), "PNG")
    assert client.post("/v1/encode", files=files(over)).status_code == 422
    assert "pixel" in client.post("/v1/encode", files=files(over)).json()["error"]["message"]
    assert client.post("/v1/encode", files=files(under)).status_code == 200
