"""``asymret train CONFIG [key=value ...]``: one training run per query/gallery pair."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a query network from a YAML config",
        description="Train a query network against a frozen gallery network (or alone, loss.mode: "
        "symmetric). Writes runs/<name>/: config.yaml, metrics.jsonl, checkpoints/, pair.pt. "
        "Multi-GPU / multi-process: torchrun --nproc_per_node N -m asymret train CONFIG.")
    parser.add_argument("config", help="experiment YAML (configs/...)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="e.g. train.epochs=5")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--resume", action="store_true", help="continue from runs/<name>/checkpoints/last.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args) -> int:
    from asymret.config import dump_config, load_config
    from asymret.training.config import ExperimentConfig

    cfg = load_config(args.config, args.overrides, ExperimentConfig)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    from asymret.training.trainer import train

    run_dir = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"run folder: {run_dir}\npair file:  {run_dir / 'pair.pt'}")
    return 0
