"""``asymret profile --pair P``: latency, throughput and peak memory of both networks of a pair.

Per side, device (CPU; CUDA when present) and batch size, PyTorch eager next to the exported ONNX model
under ONNX Runtime (asymret.retrieval.profile says exactly what is timed).
"""

from __future__ import annotations

import argparse
import json
import sys

from asymret.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("profile", help="latency, throughput and memory of a pair's networks",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--pair", required=True, metavar="PAIR.pt", help="the pair file")
    parser.add_argument("--batch-sizes", default="1,8,64", help="comma-separated (default 1,8,64)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: the CPU, and CUDA too when present")
    parser.add_argument("--runtime", choices=["both", "eager", "onnx"], default="both",
                        help="profile PyTorch eager, the ONNX export, or both (default)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per configuration (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise InputError(f"--batch-sizes {text!r}: give positive integers separated by commas, e.g. 1,8,64")
    return sizes


def run(args: argparse.Namespace) -> int:
    import torch

    from asymret.retrieval.pair import load_pair
    from asymret.retrieval.profile import format_profile, profile_pair

    if args.repeats < 1 or args.warmup < 0:
        raise InputError("--repeats must be at least 1 and --warmup at least 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda but CUDA is not available here; use --device cpu or auto")
    devices = {"auto": None, "cpu": ["cpu"], "cuda": ["cuda"]}[args.device]
    runtimes = ("eager", "onnx") if args.runtime == "both" else (args.runtime,)
    if args.threads:
        torch.set_num_threads(args.threads)
    pair = load_pair(args.pair)
    result = profile_pair(pair, batch_sizes(args.batch_sizes), devices, runtimes, args.warmup, args.repeats,
                          log=None if args.json else lambda m: print(m, file=sys.stderr))
    print(json.dumps(result) if args.json else format_profile(result))
    return 0
