"""Learned whitening on the demo pair: which whitening each test setting should use, measured (not CI).

Takes the pair ``asymret demo --out DIR`` trained (ImageNet MobileNetV2 + GeM at 224 px as the gallery network,
the same backbone at 64 px trained with regression as the query network), encodes mini-sfm's training pairs and
the mini-roxford test set (+ its distractors) once with each network, and scores on the same features:

* no whitening, and each network's learned whitening (Lw, cirtorch's whitenlearn on mini-sfm's 200 qidxs/pidxs
  pairs) with AML's rule: asymmetric = the gallery network's on both sides, symmetric = the query network's;
* Lw keeping fewer dimensions, and PCA whitening (unsupervised) instead;
* asymmetric testing with the other rules one could think of: each side its own network's whitening, or the query
  network's on both sides.

    OMP_NUM_THREADS=1 python experiments/whitening_demo.py --demo DIR

Writes ``docs/results/whitening_demo.md`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

DOCS = Path(__file__).resolve().parents[1] / "docs" / "results"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", required=True, help="the --out folder of a finished 'asymret demo'")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()

    from asymret.retrieval import metrics
    from asymret.retrieval.cache import EmbeddingCache
    from asymret.retrieval.datasets import RevisitedDataset, SfM120k
    from asymret.retrieval.encode import encode_records
    from asymret.retrieval.pair import load_pair
    from asymret.retrieval.whitening import Whitening, learn_encoder_whitening

    demo = Path(args.demo).expanduser()
    pair = load_pair(demo / "runs" / "query_regression" / "pair.pt")
    cache = EmbeddingCache(demo / "runs" / ".cache")
    kw = {"batch_size": 16, "num_workers": args.workers, "progress": False}
    start = time.perf_counter()

    train = SfM120k(demo / "data" / "mini-sfm" / "mini-sfm.pkl")
    used = np.unique(np.concatenate([train.qidxs, train.pidxs]))
    train_emb = {"query_net": encode_records(pair.query_net, train.records, **kw),
                 "gallery_net": np.asarray(cache.get(pair.gallery_net, train.records, **kw))}  # training's cache

    def learn(name, net, kind="learned", dim=None):
        return learn_encoder_whitening(net, train.records, train.qidxs, None if kind == "pca" else train.pidxs,
                                       kind=kind, dim=dim, embeddings=train_emb[name], **kw)

    data = RevisitedDataset(demo / "data" / "mini-roxford",
                            distractors=demo / "data" / "mini-roxford" / "revisitop1m" / "revisitop1m.txt")
    g_db = np.asarray(cache.get(pair.gallery_net, data.database, **kw))
    g_q = encode_records(pair.gallery_net, data.queries, **kw)
    q_q = encode_records(pair.query_net, data.queries, **kw)
    q_db = encode_records(pair.query_net, data.database, **kw)

    def score(q, db):
        r = metrics.evaluate_revisited(data.gnd, queries=q, database=db)
        return {"medium": round(100 * r["medium"]["mAP"], 2), "hard": round(100 * r["hard"]["mAP"], 2)}

    def rows(wq: Whitening | None, wg: Whitening | None) -> dict:
        """The three rows with AML's rule: gallery's whitening on both asymmetric sides, each network's own else."""
        ident = (lambda x: x)
        fg, fq = wg or ident, wq or ident
        return {"gallery": score(fg(g_q), fg(g_db)), "symmetric": score(fq(q_q), fq(q_db)),
                "asymmetric": score(fg(q_q), fg(g_db))}

    results = {"none": rows(None, None)}
    whitenings = {}
    for label, kind, dim in (("Lw", "learned", None), ("Lw, 256-d", "learned", 256), ("Lw, 64-d", "learned", 64),
                             ("PCA-w, 256-d", "pca", 256), ("PCA-w, 64-d", "pca", 64)):
        wq, wg = learn("query_net", pair.query_net, kind, dim), learn("gallery_net", pair.gallery_net, kind, dim)
        whitenings[label] = (wq, wg)
        results[label] = rows(wq, wg)
    wq, wg = whitenings["Lw"]
    other_rules = {
        "gallery's Lw on both sides (AML)": results["Lw"]["asymmetric"],
        "each side its own network's Lw": score(wq(q_q), wg(g_db)),
        "query network's Lw on both sides": score(wq(q_q), wq(g_db)),
    }
    elapsed = time.perf_counter() - start
    doc = {"pairs": len(train.qidxs), "images": len(used), "dim": pair.gallery_net.dim,
           "distractors": data.num_distractors, "rows": results, "asymmetric_rules": other_rules,
           "seconds": round(elapsed, 1)}
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "whitening_demo.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [
        "# Learned whitening on the demo pair",
        "",
        "`OMP_NUM_THREADS=1 python experiments/whitening_demo.py --demo DIR` after `asymret demo --out DIR`: the demo's",
        "pair (gallery network ImageNet MobileNetV2 + GeM at 224 px, frozen; query network the same backbone at 64 px,",
        (f"trained with regression). Whitening learned on mini-sfm's {doc['pairs']} training pairs "
         f"({doc['images']} images), {doc['dim']}-d descriptors;"),
        f"test: mini-roxford `small` + {doc['distractors']} distractors. Medium / Hard mAP (%).",
        "Whitened rows follow AML's rule: asymmetric uses the gallery network's whitening on both sides, symmetric the",
        "query network's, gallery-alone the gallery network's.",
        "",
        "| whitening | gallery alone | symmetric | asymmetric |",
        "|---|---|---|---|",
    ]
    for label, r in results.items():
        lines.append(f"| {label} | " + " | ".join(f"{r[k]['medium']:.2f} / {r[k]['hard']:.2f}"
                                                 for k in ("gallery", "symmetric", "asymmetric")) + " |")
    lines += ["", "Asymmetric testing with full Lw under other rules (same features):", "",
              "| rule | Medium mAP | Hard mAP |", "|---|---|---|"]
    for label, r in other_rules.items():
        lines.append(f"| {label} | {r['medium']:.2f} | {r['hard']:.2f} |")
    lines += ["", f"{elapsed:.0f} s on the shared 2-core machine (encoding included)."]
    (DOCS / "whitening_demo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
