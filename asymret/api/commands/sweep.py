"""``asymret sweep SWEEP.yaml [key=value ...]``: a grid of overrides over one config, trained and evaluated, one table."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep", help="train and evaluate a grid of overrides of one config, collect one table",
        description="Run every point of a sweep file's grid (one after the other): train it (skipped when its run "
        "folder already holds pair.pt; resumed from checkpoints/last.pt), evaluate it, and write the table of the "
        "metrics per grid point to <output_dir>/<name>/<name>.md and .json. The file format is in "
        "asymret.training.sweep and docs/tables.md.")
    parser.add_argument("sweep", help="sweep YAML (experiments/sweeps/...)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="set in every run, e.g. data.root=/data/VeRi (not a swept key)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and what each needs; train nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args) -> int:
    from asymret.training.sweep import run_sweep

    result = run_sweep(args.sweep, args.overrides, dry_run=args.dry_run, progress=not args.no_progress)
    print(result["markdown"], end="")
    if args.dry_run:
        todo = [r for r in result["rows"] if r["status"] not in ("done", "shared")]
        print(f"\n{len(result['rows'])} grid points, {len(todo)} to train or evaluate (dry run: nothing was run)")
    else:
        print(f"\ntable: {result['files'][0]} and {result['files'][1]}")
    return 0
