"""``asymret train CONFIG [key=value ...]``: one training run per query/gallery pair."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from asymret.errors import ConfigError


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
    parser.add_argument("--overwrite", action="store_true", help="start again in a run folder that already "
                        "holds a run (its checkpoints and metrics are deleted)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


RUN_FILES = ("metrics.jsonl", "checkpoints", "pair.pt")  # what a started run leaves in its folder


def _check_run_folder(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """A second ``train`` of the same config must not silently replace the first run."""
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not found or resume:
        return
    if not overwrite:
        raise ConfigError(f"run folder {run_dir} already holds a run ({', '.join(found)}); continue it with "
                          "--resume, start it again with --overwrite, or set name=... for a new run")
    if int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # a stale best.pt would become the pair
        for name in ("metrics.jsonl", "pair.pt"):
            (run_dir / name).unlink(missing_ok=True)


def run(args) -> int:
    from asymret.config import dump_config, load_config
    from asymret.training.config import ExperimentConfig

    cfg = load_config(args.config, args.overrides, ExperimentConfig)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    from asymret.training.trainer import train

    if args.resume and args.overwrite:
        raise ConfigError("give --resume (continue the run) or --overwrite (start it again), not both")
    _check_run_folder(Path(cfg.output_dir) / cfg.name, resume=args.resume, overwrite=args.overwrite)
    run_dir = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"run folder: {run_dir}\npair file:  {run_dir / 'pair.pt'}")
    return 0
