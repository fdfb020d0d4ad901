"""Re-ranking and query expansion on the demo pair: does expanding into the gallery's space recover the
asymmetric gap? (not CI)

The demo's pair (``asymret demo``: ImageNet MobileNetV2 at 224 px encodes the database, the same backbone
at 64 px trained with regression encodes the queries) on mini-roxford small + its 300 distractors, every
row with and without each post-processing method of :mod:`asymret.retrieval.rerank` (k-reciprocal, AQE,
αQE, DBA and DBA + each), at the papers' defaults. Beside the trained query network, the *untrained* one
(the same pretrained backbone at 64 px, 9 Medium mAP below the gallery): the case where the asymmetric gap
is large, so where moving the query into the gallery's space could recover most.

The trained pair's rows are what ``asymret evaluate --pair runs/query_regression/pair.pt --benchmark
mini-roxford --root data/mini-roxford --distractors data/mini-roxford/revisitop1m/revisitop1m.txt --rerank
kreciprocal,aqe,alpha_qe --dba`` prints; this script runs the same ``evaluate_pair`` once more with the
untrained query network and writes both into one table.

    OMP_NUM_THREADS=1 python -m asymret demo --out .         # once: data/ and runs/query_regression/pair.pt
    OMP_NUM_THREADS=1 python experiments/rerank_demo.py [--root .]

Writes ``docs/results/rerank_demo.json`` and prints the markdown table of ``docs/results/rerank_demo.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "results"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=".", help="the folder 'asymret demo --out' wrote (data/, runs/)")
    args = ap.parse_args()
    import torch

    from asymret.api.commands.demo import demo_networks
    from asymret.retrieval.encoders import create_encoder
    from asymret.retrieval.evaluate import Postprocessing, evaluate_pair, public, row_title
    from asymret.retrieval.pair import load_pair

    torch.set_num_threads(1)
    root = Path(args.root).resolve()
    pair = load_pair(root / "runs" / "query_regression" / "pair.pt")
    bench = {"benchmark": "mini-roxford", "root": root / "data" / "mini-roxford",
             "distractors": root / "data" / "mini-roxford" / "revisitop1m" / "revisitop1m.txt",
             "cache_dir": root / "runs" / ".cache", "num_workers": 0, "whitening": pair.whitening}
    post = Postprocessing(methods=("kreciprocal", "aqe", "alpha_qe"), dba=True)
    start = time.perf_counter()
    trained = evaluate_pair(pair.query_net, pair.gallery_net, rows=("gallery", "asymmetric", "symmetric"),
                            postprocessing=post, **bench)
    untrained = evaluate_pair(create_encoder(demo_networks()[1]), pair.gallery_net, rows=("asymmetric",),
                              postprocessing=post, **bench)
    rows = {**trained, **{name.replace("asymmetric", "asymmetric_untrained", 1): r for name, r in untrained.items()}}
    seconds = time.perf_counter() - start
    doc = {"rows": {name: public(r) for name, r in rows.items()}, "options": vars(post.options),
           "benchmark": "mini-roxford small + 300 distractors", "seconds": seconds}
    (DOCS / "rerank_demo.json").write_text(json.dumps(doc, indent=1))

    print("| row | Medium mAP | Medium mP@10 | Hard mAP | Hard mP@10 |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        title = row_title(name)
        print(f"| {title} | {100 * r['medium']['mAP']:.2f} | {100 * r['medium']['mP@10']:.2f} | "
              f"{100 * r['hard']['mAP']:.2f} | {100 * r['hard']['mP@10']:.2f} |")
    print(f"\n{seconds:.0f} s (encoding and scoring, gallery embeddings from the cache)")


if __name__ == "__main__":
    main()
