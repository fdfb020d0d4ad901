"""What each side of a pair costs at run time: latency, throughput and peak memory per batch size.

For every side (query, gallery), device (CPU, and CUDA when present), runtime (PyTorch eager, and the
exported ONNX model under ONNX Runtime) and batch size: the median and 90th percentile of the wall time of
one call that embeds a batch (preprocessed tensors of the encoder's own input size, whitening and L2
included), after warm-up calls; throughput is the batch size over the median. ONNX Runtime gets as many
intra-op threads as torch has, so the two runtimes compare like for like. Peak memory is CUDA's
``max_memory_allocated`` for CUDA and, on the CPU, the growth of the process's resident high-water mark
(``ru_maxrss``) during the measurement: configurations run from small batches to large, so it is the extra
memory a larger batch needed, 0 when an earlier configuration had already reached it.
"""

from __future__ import annotations

import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from asymret.retrieval.cost import encoder_cost, input_hw
from asymret.retrieval.encoders import Encoder, eval_mode

BATCH_SIZES = (1, 8, 64)


def summary(seconds: list[float], batch: int) -> dict:
    """``{"median_ms", "p90_ms", "images_per_s", "calls"}`` of per-call wall times."""
    ms = sorted(1000 * s for s in seconds)
    median = statistics.median(ms)
    p90 = ms[min(len(ms) - 1, int(np.ceil(0.9 * len(ms))) - 1)]
    return {"median_ms": median, "p90_ms": p90, "images_per_s": 1000 * batch / median, "calls": len(ms)}


def timed(fn, warmup: int, repeats: int, sync=None) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn`` after ``warmup`` calls (``sync`` waits for the device)."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return times


def _rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def profile_eager(encoder: Encoder, whitening, batch: int, device: str, warmup: int, repeats: int) -> dict:
    """One configuration of PyTorch eager inference (inference mode, eval mode, float32)."""
    net = encoder.to(device)
    white = whitening.to(device) if whitening is not None else None
    x = torch.randn(batch, 3, *input_hw(encoder), device=device)
    cuda = device.startswith("cuda")

    def call():
        with torch.inference_mode():
            y = net(x)
            return white(y) if white is not None else y

    before = _rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with eval_mode(net):
        times = timed(call, warmup, repeats, torch.cuda.synchronize if cuda else None)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else max(0.0, _rss_mb() - before)
    return {**summary(times, batch), "peak_mem_mb": peak}


def profile_onnx(model_path: Path, encoder: Encoder, batch: int, device: str, warmup: int, repeats: int) -> dict:
    """One configuration of the exported model under ONNX Runtime (CPU provider, or CUDA's on CUDA)."""
    from asymret.retrieval.export import OnnxEncoder

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else \
        ["CPUExecutionProvider"]
    model = OnnxEncoder(model_path, providers=providers, threads=torch.get_num_threads())  # like for like
    x = np.random.default_rng(0).standard_normal((batch, 3, *input_hw(encoder))).astype(np.float32)
    before = _rss_mb()
    times = timed(lambda: model.encode(x), warmup, repeats)
    return {**summary(times, batch), "peak_mem_mb": max(0.0, _rss_mb() - before)}


def onnx_unavailable() -> str | None:
    """Why the ONNX rows cannot run here (a sentence), or None."""
    try:
        import onnxruntime  # noqa: F401

        from asymret.retrieval import export  # noqa: F401
    except ImportError as exc:
        return f"ONNX Runtime unavailable ({exc}); pip install \"asymret[onnx]\""
    return None


def profile_pair(pair, batch_sizes=BATCH_SIZES, devices=None, runtimes=("eager", "onnx"), warmup: int = 2,
                 repeats: int = 10, log=None) -> dict:
    """``{side: {"cost", device: {runtime: {batch: stats}}}}`` for the query and gallery networks of ``pair``.

    ``devices``: default CPU, plus CUDA when available. A runtime that cannot run gives ``{"error": why}``.
    """
    devices = devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    out: dict = {"torch_threads": torch.get_num_threads(), "warmup": warmup, "repeats": repeats}
    missing = onnx_unavailable() if "onnx" in runtimes else None
    with tempfile.TemporaryDirectory(prefix="asymret-profile-") as tmp:
        for side in ("query_net", "gallery_net"):
            encoder = getattr(pair, side)
            entry = out[side] = {"backbone": encoder.spec.backbone, "cost": encoder_cost(encoder)}
            model_path = None
            if "onnx" in runtimes and missing is None:
                from asymret.retrieval.export import export_onnx

                model_path = export_onnx(encoder, Path(tmp) / f"{side}.onnx", whitening=pair.whitening)
            for device in devices:
                for runtime in runtimes:
                    rows = entry.setdefault(device, {}).setdefault(runtime, {})
                    if runtime == "onnx" and missing:
                        rows["error"] = missing
                        continue
                    for batch in sorted(batch_sizes):
                        if log:
                            log(f"{side} {device} {runtime} batch {batch}")
                        if runtime == "eager":
                            rows[str(batch)] = profile_eager(encoder, pair.whitening, batch, device, warmup, repeats)
                        else:
                            rows[str(batch)] = profile_onnx(model_path, encoder, batch, device, warmup, repeats)
            encoder.to("cpu")
    return out


def format_profile(result: dict) -> str:
    """One table: a line per side, device and batch size; eager and ONNX side by side with their ratio."""
    head = (f"{'side':<12}{'device':<7}{'batch':>6}{'eager ms (p50/p90)':>21}{'img/s':>9}{'mem MB':>8}"
            f"{'onnx ms (p50/p90)':>20}{'img/s':>9}{'eager/onnx':>11}")
    lines = [head]
    for side in ("query_net", "gallery_net"):
        entry = result[side]
        c = entry["cost"]
        lines.append(f"{side} {entry['backbone']}: {c['params'] / 1e6:.2f}M params, {c['gflops']:.3f} GFLOPs at "
                     f"{c['input'][0]}x{c['input'][1]}")
        for device in (d for d in entry if d not in ("backbone", "cost")):
            eager, onnx = entry[device].get("eager", {}), entry[device].get("onnx", {})
            for batch in (b for b in eager if b != "error"):
                e, o = eager[batch], onnx.get(batch)
                line = (f"{'':<12}{device:<7}{batch:>6}{e['median_ms']:>12.2f} /{e['p90_ms']:>7.2f}"
                        f"{e['images_per_s']:>9.1f}{e['peak_mem_mb']:>8.1f}")
                if o:
                    line += (f"{o['median_ms']:>11.2f} /{o['p90_ms']:>7.2f}{o['images_per_s']:>9.1f}"
                             f"{e['median_ms'] / o['median_ms']:>10.2f}x")
                lines.append(line)
            if "error" in onnx:
                lines.append(f"{'':<12}{device:<7}onnx: {onnx['error']}")
    lines.append(f"wall time per call of one batch (preprocessed tensors in, whitened L2 embeddings out), "
                 f"{result['repeats']} calls after {result['warmup']} warm-up; torch threads {result['torch_threads']}")
    return "\n".join(lines)
