"""``asymret weights``: look into checkpoint files and convert published ones into asymret encoders (docs/weights.md).

``inspect FILE`` says which layout a file has (cirtorch network, asymret encoder, timm/torchvision state dict),
how many tensors, and its meta. ``convert IN --out OUT`` writes an asymret encoder checkpoint
(``{"spec", "state_dict"}``, what ``weights:`` and pair files hold) plus, for cirtorch networks, the learned
whitening of their ``meta['Lw']`` under ``"whitening"``, which training puts into the pair file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from asymret.errors import ConfigError


def register(subparsers) -> None:
    parser = subparsers.add_parser("weights", help="inspect and convert checkpoint files (cirtorch, torchvision)",
                                   description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="weights_command", metavar="WEIGHTS_COMMAND", required=True)
    inspect = sub.add_parser("inspect", help="layout, tensor count and meta of a checkpoint file")
    inspect.add_argument("file", metavar="FILE", help="a checkpoint path or a pkg:<distribution>/<file> reference")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(func=run_inspect)
    convert = sub.add_parser("convert", help="write an asymret encoder checkpoint (and its whitening)",
                             description="Convert a cirtorch network or a timm/torchvision backbone state dict "
                             "into an asymret encoder checkpoint for weights:.")
    convert.add_argument("input", metavar="IN", help="the file to convert (a path or a pkg: reference)")
    convert.add_argument("--out", required=True, metavar="OUT.pt", help="where to write the asymret checkpoint")
    convert.add_argument("--from", dest="source", choices=("auto", "cirtorch", "state-dict"), default="auto",
                         help="the input's layout (default: detected)")
    convert.add_argument("--backbone", help="timm model name (default for cirtorch: meta['architecture'])")
    convert.add_argument("--pooling", choices=("gem", "avg", "max"), default="gem",
                         help="pooling of a state-dict input (cirtorch files say their own)")
    convert.add_argument("--size", type=int, help="the encoder's image size, longer side (default: asymret's)")
    convert.add_argument("--whitening", metavar="DATASET", help="cirtorch: the meta['Lw'] entry to keep "
                         "(default: the only one, else retrieval-SfM-120k)")
    convert.add_argument("--multiscale", action="store_true", help="cirtorch: keep the multi-scale whitening "
                         "('ms') and encode at scales 1, 1/sqrt(2), 1/2 as cirtorch's test.py does")
    convert.add_argument("--no-whitening", action="store_true", help="cirtorch: leave meta['Lw'] out")
    convert.set_defaults(func=run_convert)


def run_inspect(args: argparse.Namespace) -> int:
    from asymret.retrieval.checkpoints import describe_checkpoint, read_checkpoint

    info = {"file": args.file, **describe_checkpoint(read_checkpoint(args.file))}
    print(json.dumps(info, indent=2, default=str) if args.json else format_info(info))
    return 0


def format_info(info: dict) -> str:
    """The text of ``inspect``: one ``key: value`` line per entry, nested dicts on one line."""
    lines = [info["file"], f"  layout: {info['layout']}", f"  tensors: {info['tensors']} ({info['values']:,} values)"]
    for key in ("meta", "Lw", "spec", "whitening"):
        if key in info:
            lines.append(f"  {key}: {json.dumps(info[key], default=str) if isinstance(info[key], dict) else info[key]}")
    hint = {"cirtorch": "asymret weights convert FILE --out OUT.pt (or weights: FILE with a matching spec)",
            "state-dict": "weights: FILE with the timm backbone it was trained as (keys or layout must match)",
            "asymret-encoder": "weights: FILE with the spec above"}.get(info["layout"])
    if hint:
        lines.append(f"  use: {hint.replace('FILE', info['file'])}")
    return "\n".join(lines)


def run_convert(args: argparse.Namespace) -> int:
    import torch

    from asymret.files import atomic_write
    from asymret.retrieval.checkpoints import detect_layout, read_checkpoint

    obj = read_checkpoint(args.input)
    layout = detect_layout(obj) if args.source == "auto" else args.source
    if layout == "asymret-encoder":
        raise ConfigError(f"{args.input} is an asymret encoder checkpoint already; use it as weights: directly")
    if layout not in ("cirtorch", "state-dict"):
        raise ConfigError(f"{args.input} holds no state dict of tensors; give a cirtorch network or a state dict")
    checkpoint, summary = convert_cirtorch(obj, args) if layout == "cirtorch" else convert_state_dict(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: torch.save(checkpoint, tmp))
    print(f"wrote {out}: {summary}")
    spec = {k: v for k, v in checkpoint["spec"].items() if k in SHOWN and v not in (None, "none")}
    print(f"use it as (YAML): {json.dumps({**spec, 'weights': str(out), 'pretrained': False})}")
    return 0


SHOWN = ("backbone", "pooling", "head", "fc_dim", "input")


def _encoder(spec: dict, path: str):
    """``spec`` built and ``path`` loaded into it; an invalid spec is a :class:`ConfigError`."""
    from pydantic import ValidationError

    from asymret.retrieval.encoders import create_encoder

    try:
        return create_encoder({**spec, "weights": path})
    except ValidationError as exc:
        raise ConfigError(f"the encoder spec {spec} is invalid ({exc.errors()[0]['msg']}); fix --backbone/--size")


def _checkpoint(encoder, source: dict, whitening=None) -> dict:
    from asymret.retrieval.encoders import encoder_checkpoint

    checkpoint = encoder_checkpoint(encoder)
    checkpoint["spec"]["weights"] = None
    return {**checkpoint, "whitening": whitening.state_dict() if whitening is not None else None, "source": source}


def convert_cirtorch(obj: dict, args: argparse.Namespace) -> tuple[dict, str]:
    """A cirtorch network as an asymret encoder checkpoint with its ``Lw`` whitening (cirtorch test.py)."""
    from asymret.retrieval.checkpoints import (
        cirtorch_spec,
        cirtorch_whitening,
        cirtorch_whitening_entry,
        plain_meta,
    )
    from asymret.retrieval.specs import MULTISCALE

    input_kw = {"size": args.size} if args.size else {}
    if args.multiscale:
        input_kw["scales"] = list(MULTISCALE)
    encoder = _encoder(cirtorch_spec(obj, args.backbone, **input_kw), args.input)
    whitening = None if args.no_whitening else cirtorch_whitening(obj["meta"], args.whitening, args.multiscale)
    if args.whitening and whitening is None:
        raise ConfigError(f"{args.input} keeps no learned whitening (meta['Lw']); drop --whitening")
    source = {"file": str(args.input), "layout": "cirtorch", "meta": plain_meta(obj["meta"])}
    summary = f"{encoder.spec.backbone} {encoder.spec.pooling} encoder, {encoder.dim}-d"
    if whitening is not None:
        dataset, mode = cirtorch_whitening_entry(obj["meta"], args.whitening, args.multiscale)
        source["whitening"] = {"dataset": dataset, "mode": mode}
        summary += f", learned whitening {dataset} {mode} ({whitening.P.shape[1]} -> {whitening.dim})"
    return _checkpoint(encoder, source, whitening), summary


def convert_state_dict(args: argparse.Namespace) -> tuple[dict, str]:
    """A timm/torchvision backbone state dict (by name or by layout) as an asymret encoder checkpoint."""
    if not args.backbone:
        raise ConfigError(f"{args.input} is a plain state dict; say which timm backbone it is with --backbone")
    spec = {"backbone": args.backbone, "pooling": args.pooling, **({"input": {"size": args.size}} if args.size else {})}
    encoder = _encoder(spec, args.input)
    source = {"file": str(args.input), "layout": "state-dict"}
    return _checkpoint(encoder, source), f"{args.backbone} {args.pooling} encoder, {encoder.dim}-d"
