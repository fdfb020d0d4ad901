"""``asymret config CONFIG [key=value ...]``: validate a config and print it resolved (as --print-config)."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "config", help="validate an experiment config and print it resolved",
        description="Resolve _base_ inheritance and key=value overrides, validate, print as YAML.")
    parser.add_argument("config", help="YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="settings on top of the file, e.g. train.epochs=5")
    parser.set_defaults(func=run)


def run(args) -> int:
    from asymret.config import dump_config, load_config
    from asymret.training.config import ExperimentConfig

    print(dump_config(load_config(args.config, args.overrides, ExperimentConfig)), end="")
    return 0
