"""``asymret serve`` under loopback load: QPS and p50/p99 latency for 1 and 8 concurrent clients,
search by vector and by image, against two baselines measured in the same run:

* in-process: the same decode + query-network encode + index search, called directly in a loop
  (goal: HTTP p50 with 1 client <= 1.3x the in-process p50);
* coalescing off: the same server with ``--no-coalesce`` (one forward pass per query image)
  (goal: image-search QPS with 8 clients >= 2x with coalescing on).

The server runs as ``asymret serve`` in its own process; clients are threads with keep-alive httpx
connections. The pair has the first demo's shapes (gallery ResNet-18 256-d at 112 px, query
MobileNetV2-0.5 256-d at 80 px), randomly initialised (speed does not depend on the weights), or
pass ``--pair``. The gallery holds ``--gallery-size`` synthetic unit vectors (Flat index).

    python benchmarks/bench_serve.py             # about 2 minutes
    python benchmarks/bench_serve.py --quick     # about 40 s
    python benchmarks/bench_serve.py --quick --onnx   # and a server with --runtime onnx
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

K = 10


def make_pair(path: Path) -> Path:
    import torch

    from asymret.retrieval.encoders import create_encoder
    from asymret.retrieval.pair import save_pair

    torch.manual_seed(0)
    gallery_net = create_encoder({"backbone": "resnet18", "dim": 256, "input": {"size": 112}})
    query_net = create_encoder({"backbone": "mobilenetv2_050", "dim": 256, "input": {"size": 80}})
    return save_pair(path, query_net, gallery_net, meta={"run": "bench_serve"})


def make_gallery(root: Path, pair_path: Path, n: int) -> None:
    from asymret.index import GalleryStore, synthetic_embeddings
    from asymret.retrieval.pair import load_pair

    pair = load_pair(pair_path)
    with GalleryStore(root) as store:
        gallery = store.create("bench", pair.gallery_net.dim, "Flat",
                               network_spec=pair.gallery_net.spec.model_dump(mode="json"))
        vectors = np.asarray(synthetic_embeddings(n, pair.gallery_net.dim, seed=0), np.float32)
        gallery.add(vectors, [{"label": str(i % 500), "camera": str(i % 6)} for i in range(n)])
        gallery.close()


def query_images(count: int) -> list[bytes]:
    """JPEG queries of one size (so that coalesced queries stack into one tensor), 320 x 240."""
    rng = np.random.default_rng(1)
    out = []
    for _ in range(count):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(small).resize((320, 240), Image.BICUBIC).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


# ------------------------------------------------------------------------------------------ server
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(pair: Path, galleries: Path, device: str, coalesce: bool, threads: int,
                 runtime: str = "torch") -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "asymret", "serve", "--pair", str(pair), "--galleries", str(galleries),
           "--port", str(port), "--device", device, "--torch-threads", str(threads), "--runtime", runtime,
           *([] if coalesce else ["--no-coalesce"])]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"asymret serve exited with {process.returncode}")
        time.sleep(0.2)
    process.kill()
    raise SystemExit("asymret serve did not become ready in 180 s")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


# ------------------------------------------------------------------------------------------- load
def load(url: str, request, clients: int, seconds: float, warmup: int = 3) -> dict:
    """``clients`` threads calling ``request(client, i)`` back to back for ``seconds``."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    start_line = threading.Barrier(clients + 1)

    def run(n: int):
        with httpx.Client(base_url=url, timeout=60) as client:
            for i in range(warmup):
                request(client, n * 1000 + i)
            start_line.wait()
            i = 0
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                response = request(client, n * 1000 + i)
                latencies[n].append(time.perf_counter() - t)
                if response.status_code != 200:
                    raise SystemExit(f"HTTP {response.status_code}: {response.text[:200]}")
                i += 1

    threads = [threading.Thread(target=run, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    stop_at = float("inf")
    start_line.wait()
    began = time.perf_counter()
    stop_at = began + seconds
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    return summary(np.concatenate([np.asarray(lat) for lat in latencies]), elapsed)


def summary(latencies: np.ndarray, elapsed: float) -> dict:
    return {"qps": len(latencies) / elapsed, "p50_ms": 1000 * float(np.percentile(latencies, 50)),
            "p99_ms": 1000 * float(np.percentile(latencies, 99)), "n": len(latencies)}


def by_vector(vectors: np.ndarray):
    def request(client: httpx.Client, i: int):
        return client.post("/v1/galleries/bench/search", json={"queries": [{"vector": vectors[i % len(vectors)].tolist()}],
                                                               "k": K})
    return request


def by_image(images: list[bytes]):
    def request(client: httpx.Client, i: int):
        blob = images[i % len(images)]
        return client.post("/v1/galleries/bench/search/image", data={"k": str(K)},
                           files=[("image", ("q.jpg", blob, "image/jpeg"))])
    return request


def in_process(pair_path: Path, galleries: Path, device: str, threads: int, vectors, images, seconds: float) -> dict:
    """The same work without HTTP: decode, encode with the query network, search the gallery."""
    import faiss
    import torch

    from asymret.api.uploads import ImageLimits, decode_image
    from asymret.index import GalleryStore
    from asymret.retrieval.encode import encode_images
    from asymret.retrieval.pair import load_pair

    device = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    pair = load_pair(pair_path, device=device)
    faiss.omp_set_num_threads(1)  # as the server does (ServeConfig.search_threads)
    if threads:
        torch.set_num_threads(threads)  # as the server does (ServeConfig.torch_threads)
    with GalleryStore(galleries) as store:
        gallery = store.open("bench", readonly=True)

        def vector_search(i):
            return gallery.search(vectors[i % len(vectors)][None], K)

        def image_search(i):
            image = decode_image(images[i % len(images)], ImageLimits())
            return gallery.search(encode_images(pair.query_net, [image]), K)

        results = {}
        for name, work in (("vector", vector_search), ("image", image_search)):
            for i in range(3):
                work(i)
            latencies, began = [], time.perf_counter()
            while time.perf_counter() - began < seconds:
                t = time.perf_counter()
                work(len(latencies))
                latencies.append(time.perf_counter() - t)
            results[name] = summary(np.asarray(latencies), time.perf_counter() - began)
        gallery.close()
    return results


# -------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pair", type=Path, help="a pair file (default: random-init demo-shaped pair)")
    parser.add_argument("--gallery-size", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="intra-op threads, server and in-process alike (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="3 s per measurement")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--onnx", action="store_true", help="also image search through a server with --runtime onnx "
                        "(the query network under ONNX Runtime), against the PyTorch server")
    args = parser.parse_args()
    seconds = 3.0 if args.quick else args.seconds
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        results = run(args, Path(tmp), seconds)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def run(args, work: Path, seconds: float) -> dict:
    pair = args.pair or make_pair(work / "pair.pt")
    make_gallery(work / "galleries", pair, args.gallery_size)
    vectors = np.asarray(np.random.default_rng(2).standard_normal((256, 256)), np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    images = query_images(32)
    print(f"# {os.cpu_count()} CPUs, device {args.device}, torch threads {args.torch_threads or 'default'}, "
          f"gallery {args.gallery_size:,} x 256 Flat, k={K}, "
          f"{seconds:.0f} s per cell; query images 320x240 JPEG -> MobileNetV2-0.5 at 80 px", flush=True)

    results = {"in_process": in_process(pair, work / "galleries", args.device, args.torch_threads, vectors, images,
                                        seconds)}
    for coalesce in (True, False):
        process, url = start_server(pair, work / "galleries", args.device, coalesce, args.torch_threads)
        try:
            for name, request in (("vector", by_vector(vectors)), ("image", by_image(images))):
                if not coalesce and name == "vector":
                    continue  # no query network involved: coalescing cannot matter
                for clients in (1, 8):
                    key = f"{'http' if coalesce else 'http_no_coalesce'}/{name}/{clients}"
                    results[key] = load(url, request, clients, seconds)
                    r = results[key]
                    print(f"{key:<28} {r['qps']:8.1f} QPS   p50 {r['p50_ms']:7.2f} ms   p99 {r['p99_ms']:7.2f} ms",
                          flush=True)
            if coalesce:
                metrics = httpx.get(f"{url}/metrics").text
                total = float(metrics.split("asymret_query_batch_size_sum ")[1].split()[0])
                batches = float(metrics.split("asymret_query_batch_size_count ")[1].split()[0])
                results["mean_batch"] = total / batches
        finally:
            stop(process)
    if args.onnx:
        process, url = start_server(pair, work / "galleries", args.device, True, args.torch_threads, "onnx")
        try:
            for clients in (1, 8):
                key = f"http_onnx/image/{clients}"
                results[key] = r = load(url, by_image(images), clients, seconds)
                print(f"{key:<28} {r['qps']:8.1f} QPS   p50 {r['p50_ms']:7.2f} ms   p99 {r['p99_ms']:7.2f} ms",
                      flush=True)
        finally:
            stop(process)
    return results


def report(r: dict) -> None:
    print("\n| case | clients | QPS | p50 ms | p99 ms |\n|---|---|---|---|---|")
    for name in ("vector", "image"):
        ip = r["in_process"][name]
        print(f"| {name}, in-process | 1 | {ip['qps']:.1f} | {ip['p50_ms']:.2f} | {ip['p99_ms']:.2f} |")
        for prefix, label in (("http", "HTTP"), ("http_no_coalesce", "HTTP, coalescing off"),
                              ("http_onnx", "HTTP, --runtime onnx")):
            for clients in (1, 8):
                if (c := r.get(f"{prefix}/{name}/{clients}")) is not None:
                    print(f"| {name}, {label} | {clients} | {c['qps']:.1f} | {c['p50_ms']:.2f} | {c['p99_ms']:.2f} |")
    for name in ("vector", "image"):
        ratio = r[f"http/{name}/1"]["p50_ms"] / r["in_process"][name]["p50_ms"]
        print(f"\n{name}: HTTP p50 (1 client) / in-process p50 = {ratio:.2f}x (goal <= 1.3x)")
    gain = r["http/image/8"]["qps"] / r["http_no_coalesce/image/8"]["qps"]
    print(f"image, 8 clients: coalescing on / off = {gain:.2f}x QPS (goal >= 2x); "
          f"mean batch {r['mean_batch']:.1f} images")
    if "http_onnx/image/1" in r:
        for clients in (1, 8):
            torch_p50, onnx_p50 = r[f"http/image/{clients}"]["p50_ms"], r[f"http_onnx/image/{clients}"]["p50_ms"]
            print(f"image, {clients} client(s): p50 PyTorch / ONNX Runtime = {torch_p50 / onnx_p50:.2f}x")


if __name__ == "__main__":
    main()
