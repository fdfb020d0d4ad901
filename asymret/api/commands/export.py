"""``asymret export``: one side of a pair file as a self-contained ONNX model (docs/export.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SIDES = ("query", "gallery")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="write one side of a pair as an ONNX model (the whole embedding, with its whitening)",
        description="Export the query or the gallery network of a pair file as one ONNX graph: backbone, "
        "projection, pooling, head, L2 and the pair's whitening, with a dynamic batch axis (and dynamic "
        "height/width for longer-side input sizes). The encoder spec (input size, mean, std), the side, the "
        "pair's meta and the weights hash go into the model's metadata.")
    parser.add_argument("out", metavar="OUT.onnx", help="where to write the model")
    parser.add_argument("--pair", required=True, metavar="PAIR.pt", help="the pair file of asymret train")
    parser.add_argument("--side", required=True, choices=SIDES, help="which network to export")
    parser.add_argument("--format", default="onnx", choices=("onnx",), help="output format (default onnx)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from asymret.retrieval.export import DEFAULT_OPSET, OnnxEncoder, export_onnx
    from asymret.retrieval.pair import load_pair
    from asymret.retrieval.sides import SideEncoder, embedding_space

    pair = load_pair(args.pair)
    encoder = pair.query_net if args.side == "query" else pair.gallery_net
    meta = {
        "side": args.side,
        "pair": pair.meta,
        "pair_file": Path(args.pair).name,
        # what `asymret index build` records for this pair's gallery side: a query model can be checked
        # against a gallery with gallery.embedding_space(gallery.network_spec) == this
        "gallery_space": embedding_space(SideEncoder.gallery(pair).network_spec()),
    }
    opset = DEFAULT_OPSET if args.opset is None else args.opset
    out = export_onnx(encoder, args.out, whitening=pair.whitening, opset=opset, meta=meta)
    model = OnnxEncoder(out)
    size = model.spec.input.size
    shape = f"(batch, 3, {size[0]}, {size[1]}) float32" if not isinstance(size, int) else \
        f"(batch, 3, height, width) float32, longer side {size}"
    white = f", {pair.whitening.kind} whitening" if pair.whitening is not None else ""
    print(f"wrote {out}: {args.side} network {encoder.spec.backbone}{white}, opset {model.opset}, "
          f"{out.stat().st_size / 1e6:.2f} MB")
    print(f"  input  images {shape}; "
          f"preprocessing {json.dumps(model.spec.input.model_dump(mode='json'))}")
    print(f"  output embeddings (batch, {model.dim}) float32, L2-normalised")
    parity = model.metadata.get("parity")
    if parity:
        shapes = ", ".join("x".join(map(str, s)) for s in parity["shapes"])
        print(f"  checked against PyTorch at {shapes}: max |diff| {parity['max_abs_diff']:.1e}")
    return 0
