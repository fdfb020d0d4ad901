"""Helpers for the serve tests: a tiny random-init pair, a real uvicorn server on a free port, images."""

from __future__ import annotations

import io
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from asymret.retrieval.encoders import create_encoder
from asymret.retrieval.pair import load_pair, save_pair

QUERY_SPEC = {"backbone": "mobilenetv2_035", "dim": 32, "input": {"size": 32}}
GALLERY_SPEC = {"backbone": "resnet18", "dim": 32, "input": {"size": 32}}


def make_pair(path: Path) -> Path:
    """Two random-init tiny encoders (fast on CPU): resnet18 gallery side, mobilenetv2_035 query side."""
    torch.manual_seed(0)
    return save_pair(path, create_encoder(QUERY_SPEC), create_encoder(GALLERY_SPEC), meta={"run": "test"})


def make_shared_pairs(folder: Path, query_specs: dict[str, dict], seed: int = 0) -> dict[str, Path]:
    """Pairs ``<folder>/<name>.pt`` (run name ``name``), one per query spec, all with the same gallery
    encoder object: several query networks trained against one gallery network."""
    torch.manual_seed(seed)
    gallery = create_encoder(GALLERY_SPEC)
    return {name: save_pair(Path(folder) / f"{name}.pt", create_encoder(spec), gallery, meta={"run": name})
            for name, spec in query_specs.items()}


class Reference:
    """The pair in-process: the independent computation the server's answers are checked against."""

    def __init__(self, pair_path: Path):
        self.pair = load_pair(pair_path)

    def _embed(self, net, images) -> np.ndarray:
        with torch.inference_mode():
            x = torch.cat([net(net.transform(im)[None]) for im in images])  # one image at a time, no batching
        return torch.nn.functional.normalize(x, dim=-1).numpy()

    def query(self, images) -> np.ndarray:
        return self._embed(self.pair.query_net, images)

    def gallery(self, images) -> np.ndarray:
        return self._embed(self.pair.gallery_net, images)


def free_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def serve(config, timeout: float = 60.0):
    """A uvicorn server for ``config`` on 127.0.0.1 (a free port) in a thread; yields its base URL once ready."""
    import uvicorn

    from asymret.api.app import create_app

    sock = free_socket()
    server = uvicorn.Server(uvicorn.Config(create_app(config), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        wait_ready(url, timeout)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def wait_ready(url: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/readyz", timeout=2)
            if response.status_code == 200:
                return response.json()
            if response.json().get("error"):
                raise AssertionError(f"server failed to load: {response.json()['error']}")
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def photo(seed: int, size=(48, 40)) -> Image.Image:
    """A smooth random RGB image (blurred noise): distinct per seed, stable under JPEG."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


def encoded(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kw)
    return out.getvalue()


def files(*blobs: bytes, name: str = "image", content_type: str = "application/octet-stream") -> list:
    return [(name, (f"f{i}", blob, content_type)) for i, blob in enumerate(blobs)]
