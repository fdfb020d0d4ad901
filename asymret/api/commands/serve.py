"""``asymret serve``: the REST API and web page over a pair file and a gallery store."""

from __future__ import annotations

import argparse
import os

FLAGS = {  # flag -> ServeConfig key (--pair: below, it fills two keys)
    "galleries": "galleries", "db": "db_url", "host": "host", "port": "port", "device": "device",
    "api_key": "api_keys", "allow_root": "allowed_roots", "max_request_mb": "max_request_mb",
    "max_image_pixels": "max_image_pixels", "max_batch": "max_batch", "max_wait_ms": "max_wait_ms",
    "torch_threads": "torch_threads", "runtime": "runtime", "backend": "backend", "uri": "uri", "token": "token",
}


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
    parser.add_argument("--galleries", metavar="DIR", help="gallery store folder (default ./galleries)")
    parser.add_argument("--db", metavar="URL", help="SQLAlchemy URL of the metadata (default: SQLite in DIR)")
    parser.add_argument("--backend", choices=["faiss", "milvus"], help="where galleries live (default faiss: "
                        "FAISS files + SQL metadata; milvus: docs/scale.md)")
    parser.add_argument("--uri", metavar="URI", help="with --backend milvus: a Milvus Lite file (default "
                        "DIR/galleries.milvus.db) or http://host:19530")
    parser.add_argument("--token", metavar="T", help="with --backend milvus: the server's token (user:password)")
    parser.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where the networks run (default auto: a GPU if any)")
    parser.add_argument("--api-key", action="append", metavar="KEY", help="accept this X-API-Key (repeatable)")
    parser.add_argument("--keys-for-reads", action="store_true", help="ask for an API key on reads too")
    parser.add_argument("--allow-root", action="append", metavar="DIR",
                        help="items may be added by server path from under DIR (repeatable)")
    parser.add_argument("--max-request-mb", type=float, help="largest request body (default 32)")
    parser.add_argument("--max-image-pixels", type=int, help="width x height limit per image (default 40M)")
    parser.add_argument("--max-batch", type=int, help="most query images per forward pass (default 32)")
    parser.add_argument("--max-wait-ms", type=float, help="longest a query waits for a batch (default 2)")
    parser.add_argument("--no-coalesce", action="store_true", help="encode each query alone (max_batch 1)")
    parser.add_argument("--torch-threads", type=int, help="intra-op threads of the networks (default: one per "
                        "core; 1 on a CPU shared with other work)")
    parser.add_argument("--runtime", choices=["torch", "onnx"], help="what encodes the queries: PyTorch (default) "
                        "or ONNX Runtime on the query network exported at start-up (pip install \"asymret[onnx]\")")
    parser.set_defaults(func=run)


def build_config(args: argparse.Namespace):
    """The config file's settings, then the flags given, then ASYMRET_API_KEYS, validated."""
    from asymret.api.settings import ServeConfig
    from asymret.config import load_tree, validate

    tree, origins = load_tree(args.config) if args.config else ({}, {})
    if args.pair:  # the flags replace the config file's pairs: the first is the default query network
        tree["pair"], tree["pairs"] = args.pair[0], args.pair[1:]
        origins["pair"] = origins["pairs"] = "command line"
    for flag, key in FLAGS.items():
        if getattr(args, flag) is not None:
            tree[key], origins[key] = getattr(args, flag), "command line"
    if args.keys_for_reads:
        tree["keys_for_reads"] = True
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
