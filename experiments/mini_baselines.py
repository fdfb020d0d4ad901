"""Floors of the mini benchmark (not CI): what mini-roxford gives without any training.

* ``chance``: random vectors (the mAP of a random ranking; mean of 10 draws);
* ``pixels``: 16x16 RGB thumbnails, mean-centred, L2-normalised (cosine similarity): colour layout alone;
* ``random-init``: a ResNet-18 with random weights, GeM pooling, 256-d projection (the demo's gallery
  network before training), at the given input size;
* optionally trained pair files (``--pair``), gallery row and asymmetric row.

    python experiments/mini_baselines.py --data data/mini [--size small] [--input 112] [--pair runs/x/pair.pt]

Prints Easy / Medium / Hard mAP (%) per row.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from PIL import Image

from asymret.mini import ensure_mini
from asymret.retrieval.evaluate import evaluate_features_revisited, evaluate_pair
from asymret.retrieval.records import load_image


def thumbnails(records, side: int = 16) -> np.ndarray:
    """``side`` x ``side`` RGB thumbnails, each mean-centred and L2-normalised: colour layout alone."""
    rows = []
    for record in records:
        x = np.asarray(load_image(record).convert("RGB").resize((side, side), Image.BILINEAR), np.float32).ravel()
        x = x - x.mean()
        rows.append(x / max(np.linalg.norm(x), 1e-8))
    return np.stack(rows)


def pct(result: dict) -> dict:
    return {p: round(100 * result[p]["mAP"], 2) for p in ("easy", "medium", "hard")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/mini", help="mini benchmark folder (built if absent)")
    ap.add_argument("--size", default="small")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--input", default="112", help="random-init input size: 112 (longer side) or 96x96")
    ap.add_argument("--inits", type=int, default=3, help="random initialisations to average")
    ap.add_argument("--pair", action="append", default=[], help="trained pair file(s) to score as well")
    args = ap.parse_args()
    from asymret.retrieval.datasets import RevisitedDataset
    from asymret.retrieval.encoders import create_encoder
    from asymret.retrieval.pair import load_pair

    mini = ensure_mini(args.data, seed=args.seed, size=args.size, workers=None)
    ds = RevisitedDataset(mini["roxford"])
    rng = np.random.default_rng(0)
    spread: dict[str, float] = {}

    def unit(n):
        x = rng.standard_normal((n, 64)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    draws = [pct(evaluate_features_revisited(mini["gnd"], unit(len(ds.queries)), unit(len(ds.database))))
             for _ in range(10)]
    rows = {"chance (random ranking)": {p: round(float(np.mean([d[p] for d in draws])), 2) for p in draws[0]}}
    rows["pixels (16x16)"] = pct(evaluate_features_revisited(mini["gnd"], thumbnails(ds.queries),
                                                             thumbnails(ds.database)))
    size = [int(v) for v in args.input.split("x")] if "x" in args.input else int(args.input)
    inits = []
    for seed in range(args.inits):  # random weights differ a lot from draw to draw: report mean and spread
        torch.manual_seed(seed)
        net = create_encoder({"backbone": "resnet18", "dim": 256, "input": {"size": size}})
        inits.append(pct(evaluate_pair(net, net, "mini-roxford", mini["roxford"], rows=("gallery",))["gallery"]))
    for p in ("easy", "medium", "hard"):
        spread[p] = float(np.std([r[p] for r in inits]))
    rows[f"random-init ResNet-18 ({args.input}), mean of {args.inits}"] = {
        p: round(float(np.mean([r[p] for r in inits])), 2) for p in ("easy", "medium", "hard")}
    for path in args.pair:
        pair = load_pair(path)
        res = evaluate_pair(pair.query_net, pair.gallery_net, "mini-roxford", mini["roxford"],
                            rows=("gallery", "asymmetric"))
        rows[f"{path}: gallery"] = pct(res["gallery"])
        rows[f"{path}: asymmetric"] = pct(res["asymmetric"])
    for name, r in rows.items():
        print(f"{name:60s} E {r['easy']:6.2f}  M {r['medium']:6.2f}  H {r['hard']:6.2f}")
    print(f"random-init spread (std over {args.inits} draws):", {p: round(v, 2) for p, v in spread.items()})
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
