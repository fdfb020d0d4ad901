"""``asymret report``: PNG pictures of training runs, ranked lists and accuracy against cost."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="draw training curves, ranked-list grids and accuracy against cost as PNG files",
        description="Pictures from run folders (metrics.jsonl), --save-ranks folders of 'asymret evaluate' and "
        "evaluation JSON files (each with its pair's cost). Needs matplotlib: pip install \"asymret[report]\".")
    parser.add_argument("--runs", nargs="+", default=[], metavar="RUN",
                        help="run folders (runs/<name>) whose metrics.jsonl to draw, overlaid")
    parser.add_argument("--ranks", nargs="+", default=[], metavar="DIR",
                        help="folders written by 'asymret evaluate --pair ... --save-ranks DIR': one grid each")
    parser.add_argument("--results", nargs="+", default=[], metavar="R.json",
                        help="'asymret evaluate --pair ... --json' outputs (or --save-ranks' results.json), one "
                        "per pair: accuracy against query-side GFLOPs")
    parser.add_argument("--profile", nargs="+", default=[], metavar="P.json",
                        help="'asymret profile --json' outputs, one per --results file in the same order: adds "
                        "accuracy against latency at batch 1")
    parser.add_argument("--queries", type=int, default=3, help="worst and best queries per grid (default 3 each)")
    parser.add_argument("--k", type=int, default=10, help="ranked database images per grid line (default 10)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG files")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from asymret.api.report import write_report
    from asymret.errors import InputError

    if args.queries < 1 or args.k < 1:
        raise InputError("--queries and --k must be at least 1")
    for path in write_report(args.out, runs=args.runs, ranks=args.ranks, results=args.results,
                             profiles=args.profile, queries=args.queries, k=args.k):
        print(path)
    return 0
