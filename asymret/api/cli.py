"""The ``asymret`` command line: one command, subcommands discovered from ``asymret.api.commands``.

User errors (:class:`asymret.errors.AsymretError`) print one line, ``error: ...``, and exit 2;
``ASYMRET_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys

from asymret import __version__
from asymret.errors import AsymretError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asymret",
        description="Asymmetric image retrieval: train query networks against gallery networks, "
        "index galleries, serve search, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"asymret {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    from asymret.api import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it picked is noise
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except AsymretError as exc:
        if os.environ.get("ASYMRET_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
