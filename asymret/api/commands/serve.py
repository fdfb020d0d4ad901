"""``asymret serve``: the REST API and web page over a pair file and a gallery store."""

from __future__ import annotations

import argparse
import os
import typing
from pathlib import Path

SPECIAL = ("pair", "pairs")  # --pair fills both (the first is the default query network)


def _flag(name: str, field) -> str:
    return (field.json_schema_extra or {}).get("flag") or "--" + name.replace("_", "-")


def config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`~asymret.api.settings.ServeConfig` field, its help the field's description and its
    default, its type, choices and repetition from the field's annotation."""
    from asymret.api.settings import ServeConfig

    for name, field in ServeConfig.model_fields.items():
        if name in SPECIAL:
            continue
        kind, args = field.annotation, typing.get_args(field.annotation)
        default = field.get_default(call_default_factory=True)
        shown = f" (default {', '.join(map(str, default)) if isinstance(default, list) else default})" \
            if default not in (None, [], False) else ""
        options = {"dest": name, "help": f"{field.description}{shown}"}
        if kind is bool:
            options["action"] = "store_true"
            options["default"] = None
        elif typing.get_origin(kind) is typing.Literal:
            options["choices"] = list(args)
        else:
            base = args[0] if typing.get_origin(kind) is list else next(
                (a for a in args if a is not type(None)), kind) if args else kind
            options.update(type=base, metavar=_metavar(_flag(name, field), base))
            if typing.get_origin(kind) is list:
                options["action"] = "append"
        parser.add_argument(_flag(name, field), **options)


def _metavar(flag: str, kind: type) -> str:
    return {Path: "DIR", int: "N", float: "X"}.get(kind) or flag.rsplit("-", 1)[-1].upper()


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve search over REST and a web page (the query network encodes queries)",
        description="Serve the galleries of a gallery store: uploaded query images are encoded by the pair's "
        "query network, coalesced into batches, and searched in the space the gallery network built. "
        "Settings come from --config (YAML, keys as in docs/serve.md), flags on top; API keys also from "
        "the ASYMRET_API_KEYS environment variable (comma-separated), which keeps them out of `ps`.")
    parser.add_argument("--config", metavar="YAML", help="a serve config file")
    parser.add_argument("--pair", action="append", metavar="[NAME=]PAIR.pt",
                        help="the pair file of asymret train; repeat it to serve several query networks trained "
                        "against the same gallery network (the first is the default; NAME, what requests call "
                        "it by, defaults to the pair's run name)")
    config_flags(parser)
    parser.add_argument("--no-coalesce", action="store_true", help="encode each query alone (max_batch 1)")
    parser.set_defaults(func=run)


def build_config(args: argparse.Namespace):
    """The config file's settings, then the flags given, then ASYMRET_API_KEYS, validated."""
    from asymret.api.settings import ServeConfig
    from asymret.config import load_tree, validate

    tree, origins = load_tree(args.config) if args.config else ({}, {})
    if args.pair:  # the flags replace the config file's pairs: the first is the default query network
        tree["pair"], tree["pairs"] = args.pair[0], args.pair[1:]
        origins["pair"] = origins["pairs"] = "command line"
    for key in ServeConfig.model_fields:
        if key not in SPECIAL and getattr(args, key, None) is not None:
            tree[key], origins[key] = getattr(args, key), "command line"
    if args.no_coalesce:
        tree["max_batch"] = 1
    env_keys = [k.strip() for k in os.environ.get("ASYMRET_API_KEYS", "").split(",") if k.strip()]
    tree["api_keys"] = [*tree.get("api_keys", []), *env_keys]
    if tree.get("pair") is None and not tree.get("pairs"):
        from asymret.errors import ConfigError

        raise ConfigError("no pair file; pass --pair runs/<name>/pair.pt (or set 'pair' in --config)")
    return validate(tree, ServeConfig, origins, args.config or "command line")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from asymret.api.app import create_app
    from asymret.errors import NotFoundError
    from asymret.retrieval.checkpoints import load_torch_file

    config = build_config(args)
    for _, path in config.pair_entries():  # fail here with one line, not in a /readyz that never turns 200
        if not path.expanduser().is_file():
            raise NotFoundError(f"pair file not found: {path}; pass the pair.pt a training run wrote")
        load_torch_file(path.expanduser())  # a truncated file is a typed error here
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="info")
    return 0
