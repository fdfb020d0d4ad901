"""``asymret data mini OUT [--seed N] [--size small|medium] [--force]``: render the bundled mini benchmark;
``asymret data mini-acd OUT ...``: the same for ACD's other benchmarks (MSMT17, In-Shop, SOP, CUB-200-2011).

Builds ``OUT/mini-roxford`` (revisited-Oxford layout, with revisitop1m-style distractors),
``OUT/mini-sfm`` (retrieval-SfM-120k layout, for training) and ``OUT/mini-veri`` (VeRi-776 layout)
from the photographs inside scikit-image; an existing complete build of the same seed and size is
kept unless ``--force``. See ``docs/mini-benchmark.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from asymret.mini import build_mini, build_mini_acd, ensure_mini, ensure_mini_acd


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="prepare datasets (the bundled mini benchmark)",
                                   description="Prepare datasets.")
    commands = parser.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    mini = commands.add_parser("mini", help="render the mini benchmark (mini-roxford, mini-sfm, mini-veri) into OUT",
                               description=__doc__.splitlines()[0])
    render_arguments(mini, "small: about 1,700 images, under a minute; medium: about 6,000 images")
    mini.set_defaults(func=run_mini)
    acd = commands.add_parser(
        "mini-acd", help="render mini versions of ACD's other benchmarks (mini-msmt17, mini-inshop, mini-sop, "
        "mini-cub200) into OUT", description="Render MSMT17, In-Shop, SOP and CUB-200-2011 in miniature, each in "
        "its official layout, from the photographs inside scikit-image (docs/reid.md).")
    render_arguments(acd, "small: about 1,200 images in all, seconds; medium: about 4,000, a minute")
    acd.set_defaults(func=run_mini_acd)


def render_arguments(parser: argparse.ArgumentParser, sizes: str) -> None:
    """The options every mini renderer takes; ``sizes`` says what small and medium render."""
    parser.add_argument("out", type=Path, metavar="OUT", help="folder to write the datasets into")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    parser.add_argument("--size", choices=("small", "medium"), default="small", help=sizes)
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT holds a complete build")
    parser.add_argument("--workers", type=int, default=None, help="rendering processes (default: all cores)")


def run_mini(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    build = build_mini if args.force else ensure_mini
    info = build(args.out, seed=args.seed, size=args.size, workers=args.workers)
    print(format_summary(info, time.perf_counter() - start))
    return 0


def run_mini_acd(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    build = build_mini_acd if args.force else ensure_mini_acd
    info = build(args.out, seed=args.seed, size=args.size, workers=args.workers)
    lines = [(f"ACD mini benchmarks ({info['size']}, seed {info['seed']}) in {info['root']}  "
             f"[{time.perf_counter() - start:.1f} s]")]
    for name in ("msmt17", "inshop", "sop", "cub200"):
        counts = ", ".join(f"{k} {v}" for k, v in info["counts"][f"mini-{name}"].items())
        lines.append(f"  {info[name]}: {counts}   (asymret evaluate --benchmark {name} --root {info[name]})")
    print("\n".join(lines))
    return 0


def format_summary(info: dict, seconds: float) -> str:
    rox, sfm, veri = info["roxford_counts"], info["sfm_counts"], info["veri_counts"]
    roxford = (f"{rox['queries']} queries on {rox['landmarks']} landmarks, {rox['database']} database images "
               f"(positives: {rox['easy']} easy, {rox['hard']} hard; {rox['junk']} junk)")
    vehicles = (f"{veri['train_ids']} train vehicles ({veri['train']} images), {veri['test_ids']} test vehicles "
                f"({veri['test']} images, {veri['query']} queries), {veri['cameras']} cameras")
    training = (f"training clusters {sfm['train']['clusters']} ({sfm['train']['images']} images, "
                f"{sfm['train']['pairs']} pairs), val {sfm['val']['clusters']} ({sfm['val']['images']} images)")
    return "\n".join([
        f"mini benchmark ({info['size']}, seed {info['seed']}) in {info['root']}  [{seconds:.1f} s]",
        f"  {info['roxford']}: {roxford}",
        f"  {info['distractors']}: {rox['distractors']} distractors",
        f"  {info['train_pkl']}: {training}",
        f"  {info['veri']}: {vehicles}",
    ])
