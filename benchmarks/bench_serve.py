"""``asymret serve`` under loopback load: QPS and p50/p99 latency for 1 and 8 concurrent clients,
search by vector and by image, against baselines measured in the same run:

* in-process: the same decode + query-network encode + index search, called directly in a loop
  (goal: HTTP p50 with 1 client <= 1.3x the in-process p50);
* coalescing off: the same server with ``--no-coalesce`` (one forward pass per query image)
  (goal: image-search QPS with 8 clients >= 2x with coalescing on);
* the HTTP floor: ``GET /healthz`` (no work, on the event loop) over the same client, what any request
  pays for the round trip (client, loopback, HTTP parsing, routing).

The machine may be shared, so the cells are interleaved: every round measures each cell once for
``--seconds``, in a new order each round, and the tables give each cell's median over ``--rounds``
rounds, each ratio the median of its per-round ratios (with the range), and the load average beside them.

The servers run as ``asymret serve`` in their own processes; clients are threads with keep-alive httpx
connections. The pair has the first demo's shapes (gallery ResNet-18 256-d at 112 px, query
MobileNetV2-0.5 256-d at 80 px), randomly initialised (speed does not depend on the weights), or
pass ``--pair``. The gallery holds ``--gallery-size`` synthetic unit vectors (Flat index).

    python benchmarks/bench_serve.py             # about 3 minutes
    python benchmarks/bench_serve.py --quick     # about 1 minute
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


class InProcess:
    """The same work without HTTP: decode, encode with the query network, search the gallery."""

    def __init__(self, pair_path: Path, galleries: Path, device: str, threads: int, vectors, images):
        import faiss
        import torch

        from asymret.api.uploads import ImageLimits, decode_image
        from asymret.index import GalleryStore
        from asymret.retrieval.encode import encode_images, encode_tensors, inference
        from asymret.retrieval.pair import load_pair

        device = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
        pair = load_pair(pair_path, device=device)
        faiss.omp_set_num_threads(1)  # as the server does (ServeConfig.search_threads)
        if threads:
            torch.set_num_threads(threads)  # as the server does (ServeConfig.torch_threads)
        self.store = GalleryStore(galleries)
        self.gallery = gallery = self.store.open("bench", readonly=True)

        def vector_search(i):
            return gallery.search(vectors[i % len(vectors)][None], K)

        def image_search(i):
            image = decode_image(images[i % len(images)], ImageLimits())
            return gallery.search(encode_images(pair.query_net, [image]), K)

        # the parts of an image search, for the account of what bounds coalescing (report)
        transform = pair.query_net.transform
        tensors = [transform(decode_image(blob, ImageLimits())) for blob in images[:8]]

        def decode(i):
            return transform(decode_image(images[i % len(images)], ImageLimits()))

        def encoder(batch):
            def run(i):
                with inference(torch.device(device)):
                    return encode_tensors(pair.query_net, tensors[:batch], torch.device(device))
            return run

        self.work = {"vector": vector_search, "image": image_search, "decode": decode, "encode/1": encoder(1),
                     "encode/8": encoder(8)}

    def measure(self, name: str, seconds: float) -> dict:
        work = self.work[name]
        for i in range(3):
            work(i)
        latencies, began = [], time.perf_counter()
        while time.perf_counter() - began < seconds:
            t = time.perf_counter()
            work(len(latencies))
            latencies.append(time.perf_counter() - t)
        return summary(np.asarray(latencies), time.perf_counter() - began)

    def close(self) -> None:
        self.gallery.close()
        self.store.close()


def cpu_seconds(pid: int | None = None) -> float | None:
    """CPU time (user + system) of process ``pid`` (None: this one) so far; None where /proc is missing."""
    if pid is None:
        return time.process_time()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_counts(url: str) -> tuple[float, float]:
    metrics = httpx.get(f"{url}/metrics").text
    total = float(metrics.split("asymret_query_batch_size_sum ")[1].split()[0])
    return total, float(metrics.split("asymret_query_batch_size_count ")[1].split()[0])


# -------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pair", type=Path, help="a pair file (default: random-init demo-shaped pair)")
    parser.add_argument("--gallery-size", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=2.0, help="per cell and round")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (medians over them)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="intra-op threads, server and in-process alike (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 1.5 s cells")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--onnx", action="store_true", help="also image search through a server with --runtime onnx "
                        "(the query network under ONNX Runtime), against the PyTorch server")
    args = parser.parse_args()
    seconds, rounds = (1.5, 3) if args.quick else (args.seconds, args.rounds)
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        results = run(args, Path(tmp), seconds, rounds)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def run(args, work: Path, seconds: float, rounds: int) -> dict:
    pair = args.pair or make_pair(work / "pair.pt")
    make_gallery(work / "galleries", pair, args.gallery_size)
    vectors = np.asarray(np.random.default_rng(2).standard_normal((256, 256)), np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    images = query_images(32)
    print(f"# {os.cpu_count()} CPUs, device {args.device}, torch threads {args.torch_threads or 'default'}, "
          f"gallery {args.gallery_size:,} x 256 Flat, k={K}, {rounds} interleaved rounds of {seconds:g} s per cell; "
          f"query images 320x240 JPEG -> MobileNetV2-0.5 at 80 px; load average {load_average()}", flush=True)
    servers = {"http": True, "http_no_coalesce": False}
    if args.onnx:
        servers["http_onnx"] = True
    urls, processes = {}, []
    try:
        for prefix, coalesce in servers.items():
            process, urls[prefix] = start_server(pair, work / "galleries", args.device, coalesce, args.torch_threads,
                                                 "onnx" if prefix == "http_onnx" else "torch")
            processes.append(process)
        local = InProcess(pair, work / "galleries", args.device, args.torch_threads, vectors, images)
        pids = dict(zip(servers, (p.pid for p in processes)))
        cells = [(f"in_process/{name}", lambda n=name: local.measure(n, seconds), None)
                 for name in ("vector", "image", "decode", "encode/1", "encode/8")]
        requests = {"healthz": lambda client, i: client.get("/healthz"), "vector": by_vector(vectors),
                    "image": by_image(images)}
        for prefix in servers:
            for name, request in requests.items():
                if prefix != "http" and name != "image":
                    continue  # no query network involved: coalescing and the runtime cannot matter
                for clients in (1, 8):
                    if name == "healthz" and clients == 8:
                        continue
                    cells.append((f"{prefix}/{name}/{clients}",
                                  lambda u=urls[prefix], r=request, c=clients: load(u, r, c, seconds), pids[prefix]))
        per_round: dict[str, list[dict]] = {key: [] for key, _, _ in cells}
        batched = [0.0, 0.0]  # images and batches of the coalescing server during its 8-client image cells
        loads = []
        for round_ in range(rounds):
            # a new order each round: a cell measured right after others on the same server ran measurably
            # slower (the coalescing server's 1-client image cell: 14.5 against 9.9 ms with the servers swapped)
            order = np.random.default_rng(round_).permutation(len(cells))
            for key, measure, pid in (cells[i] for i in order):
                before = batch_counts(urls["http"]) if key == "http/image/8" else None
                cpu = cpu_seconds(pid)  # the server's CPU for HTTP cells (its work, whatever the load), else ours
                cell = measure()
                spent = cpu_seconds(pid)
                if cpu is not None and spent is not None:
                    cell["cpu_ms"] = 1000 * (spent - cpu) / cell["n"]  # warm-up requests included: a slight excess
                per_round[key].append(cell)
                if before is not None:
                    after = batch_counts(urls["http"])
                    batched = [batched[0] + after[0] - before[0], batched[1] + after[1] - before[1]]
            loads.append(os.getloadavg()[0])
            print(f"round {round_ + 1}/{rounds}: load average {loads[-1]:.1f}", flush=True)
        local.close()
    finally:
        for process in processes:
            stop(process)
    results = {key: median_cell(rows) for key, rows in per_round.items()}
    results["rounds"] = per_round
    results["mean_batch"] = batched[0] / max(batched[1], 1)
    results["load_average"] = {"min": min(loads), "max": max(loads)}
    return results


def load_average() -> str:
    return " / ".join(f"{v:.1f}" for v in os.getloadavg()) + f" (1/5/15 min, {os.cpu_count()} CPUs)"


def median_cell(rows: list[dict]) -> dict:
    keys = ("qps", "p50_ms", "p99_ms", "cpu_ms") if all("cpu_ms" in r for r in rows) else ("qps", "p50_ms", "p99_ms")
    return {key: float(np.median([r[key] for r in rows])) for key in keys} | {"n": int(sum(r["n"] for r in rows))}


def ratio(r: dict, top: str, bottom: str, key: str) -> tuple[float, float, float]:
    """Median, min and max over the rounds of ``top[key] / bottom[key]``."""
    values = [a[key] / b[key] for a, b in zip(r["rounds"][top], r["rounds"][bottom])]
    return float(np.median(values)), min(values), max(values)


def report(r: dict) -> None:
    def row(label: str, clients: int, c: dict) -> None:
        cpu = f"{c['cpu_ms']:.2f}" if "cpu_ms" in c else "-"
        print(f"| {label} | {clients} | {c['qps']:.1f} | {c['p50_ms']:.2f} | {c['p99_ms']:.2f} | {cpu} |")

    print("\n| case | clients | QPS | p50 ms | p99 ms | CPU ms / request |\n|---|---|---|---|---|---|")
    row("HTTP floor: GET /healthz", 1, r["http/healthz/1"])
    for name in ("vector", "image"):
        row(f"{name}, in-process", 1, r[f"in_process/{name}"])
        for prefix, label in (("http", "HTTP"), ("http_no_coalesce", "HTTP, coalescing off"),
                              ("http_onnx", "HTTP, --runtime onnx")):
            for clients in (1, 8):
                if (c := r.get(f"{prefix}/{name}/{clients}")) is not None:
                    row(f"{name}, {label}", clients, c)
    print("(CPU: the server process's user + system time per request, or this process's in-process; "
          "unlike latency it does not count the time spent waiting for a core)")
    print(f"\nmedians of {len(r['rounds']['http/image/1'])} interleaved rounds; load average "
          f"{r['load_average']['min']:.1f}-{r['load_average']['max']:.1f} during them")
    for name in ("vector", "image"):
        mid, low, high = ratio(r, f"http/{name}/1", f"in_process/{name}", "p50_ms")
        floor = r[f"in_process/{name}"]["p50_ms"] + r["http/healthz/1"]["p50_ms"]
        print(f"{name}: HTTP p50 (1 client) / in-process p50 = {mid:.2f}x (rounds {low:.2f}-{high:.2f}; goal <= 1.3x); "
              f"in-process + HTTP floor = {floor / r[f'in_process/{name}']['p50_ms']:.2f}x")
        if "cpu_ms" in r[f"http/{name}/1"] and "cpu_ms" in r[f"in_process/{name}"]:
            print(f"{name}: server CPU per request / in-process CPU per search = "
                  f"{r[f'http/{name}/1']['cpu_ms'] / r[f'in_process/{name}']['cpu_ms']:.2f}x (1 client)")
    mid, low, high = ratio(r, "http/image/8", "http_no_coalesce/image/8", "qps")
    print(f"image, 8 clients: coalescing on / off = {mid:.2f}x QPS (rounds {low:.2f}-{high:.2f}; goal >= 2x); "
          f"mean batch {r['mean_batch']:.1f} images")
    # What bounds coalescing: it saves only the encoder's share of a request's CPU. The rest (the HTTP round
    # trip, upload parsing, decode + resize, search, the response) is paid per request on the same cores,
    # so the QPS gain at 8 clients cannot exceed (rest + encode at batch 1) / (rest + encode at batch 8 / 8),
    # in CPU time, which unlike latency does not depend on how busy the machine is.
    if all("cpu_ms" in r[k] for k in ("in_process/encode/1", "in_process/encode/8", "http_no_coalesce/image/1")):
        e1, e8 = r["in_process/encode/1"]["cpu_ms"], r["in_process/encode/8"]["cpu_ms"] / 8
        rest = r["http_no_coalesce/image/1"]["cpu_ms"] - e1
        print(f"image, CPU per request: encode {e1:.2f} ms at batch 1, {e8:.2f} ms per image at batch 8; decode + "
              f"resize {r['in_process/decode']['cpu_ms']:.2f} ms; the rest of a request {rest:.2f} ms (server CPU, "
              f"coalescing off, 1 client, less the encode): coalescing can give at most {(rest + e1) / (rest + e8):.2f}x; "
              f"measured at 8 clients: {r['http_no_coalesce/image/8']['cpu_ms'] / r['http/image/8']['cpu_ms']:.2f}x "
              "less server CPU per request")
    if "http_onnx/image/1" in r:
        for clients in (1, 8):
            mid, _, _ = ratio(r, f"http/image/{clients}", f"http_onnx/image/{clients}", "p50_ms")
            print(f"image, {clients} client(s): p50 PyTorch / ONNX Runtime = {mid:.2f}x")


if __name__ == "__main__":
    main()
