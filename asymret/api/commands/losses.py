"""``asymret losses [NAME] [--json]``: the loss zoo by name, with family, defaults and source equation.

The defaults shown are the registered classes' keyword defaults, i.e. exactly what
``create_loss(name)`` builds; config files override them by the same keyword names.
"""

from __future__ import annotations

import argparse
import json

from asymret.errors import NotFoundError
from asymret.training.losses.registry import LossInfo, list_losses


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("losses", help="list the losses by name, with defaults and sources",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", help="show one loss only")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    infos = list_losses()
    if args.name:
        infos = [_find(infos, args.name)]
    if args.json:
        records = [as_record(info) for info in infos]
        print(json.dumps(records[0] if args.name else records, indent=2, ensure_ascii=False, default=str))
    else:
        print(format_table(infos))
    return 0


def _find(infos: list[LossInfo], name: str) -> LossInfo:
    for info in infos:
        if info.name == name:
            return info
    raise NotFoundError(f"no loss named '{name}'; choose one of: {', '.join(i.name for i in infos)}")


def as_record(info: LossInfo) -> dict:
    return {"name": info.name, "family": info.family, "summary": info.summary, "source": info.source,
            "equation": info.equation, "defaults": info.defaults, "needs": list(info.needs),
            "batch_reduction": info.batch_reduction}


def _defaults_text(info: LossInfo) -> str:
    return ", ".join(f"{k}={v}" for k, v in info.defaults.items()) or "-"


def format_table(infos: list[LossInfo]) -> str:
    """One line per loss (name, family, defaults, source), then its summary and equation indented."""
    infos = sorted(infos, key=lambda i: (i.family, i.name))
    header = ("NAME", "FAMILY", "DEFAULTS", "SOURCE")
    rows = [(i.name, i.family, _defaults_text(i), i.source) for i in infos]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(3)]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3]

    lines = [line(header)]
    for info, row in zip(infos, rows):
        over = "summed over the batch's tuples, as its reference code" if info.batch_reduction == "sum" else \
            "mean over the batch"
        lines += [line(row), f"    {info.summary}", f"    = {info.equation}   ({over})", ""]
    return "\n".join(lines).rstrip()
