"""The AML loss study on the mini benchmark (not CI): 7 losses against one frozen gallery network.

Trains the demo's gallery network once, then one query network per loss (asymmetric training, the
anchor through the query network and every other tuple member from the cached gallery
embeddings), and evaluates each pair symmetrically and asymmetrically on mini-roxford. The AML
paper's pattern (Table 8): in asymmetric testing regression and Contr+ work while triplet, MS, RKD
and DarkRank collapse, because nothing in those losses ties the two spaces together.

    python experiments/aml_losses_mini.py [--out exp-aml] [--epochs 6] [--seeds 1]

Writes ``docs/results/aml_losses_mini.md`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

from asymret.api.commands.demo import demo_configs
from asymret.retrieval.evaluate import evaluate_pair
from asymret.retrieval.mini import ensure_mini
from asymret.retrieval.pair import load_pair
from asymret.training.config import ExperimentConfig
from asymret.training.trainer import train

LOSSES = ["contrastive", "contr_plus", "triplet", "multi_similarity", "regression", "rkd", "darkrank"]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "results"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="exp-aml")
    ap.add_argument("--epochs", type=int, default=None, help="query-network epochs (default: the demo's)")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--losses", default=",".join(LOSSES))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out).resolve()
    mini = ensure_mini(out / "data")
    started = time.perf_counter()
    gallery_cfg, query_cfg = demo_configs(out / "data", out / "runs", False, mini)
    if not (out / "runs" / "gallery" / "query_net.pt").is_file():
        train(ExperimentConfig.model_validate(gallery_cfg), progress=False)
    gallery_pair = load_pair(out / "runs" / "gallery" / "pair.pt")
    rows = {"gallery network alone": evaluate_pair(gallery_pair.query_net, gallery_pair.gallery_net, "mini-roxford",
                                                   mini["roxford"], rows=("gallery",))["gallery"]}
    table: dict[str, dict[str, list[float]]] = {}
    for loss in args.losses.split(","):
        for seed in range(args.seeds):
            cfg = dict(query_cfg, name=f"{loss}_s{seed}", seed=seed, loss={"name": loss})
            if args.epochs:
                cfg["train"] = dict(cfg["train"], epochs=args.epochs)
            run = train(ExperimentConfig.model_validate(cfg), progress=False)
            pair = load_pair(run / "pair.pt")
            res = evaluate_pair(pair.query_net, pair.gallery_net, "mini-roxford", mini["roxford"],
                                rows=("symmetric", "asymmetric"), cache_dir=out / "runs" / ".cache")
            entry = table.setdefault(loss, {})
            for row in ("symmetric", "asymmetric"):
                for proto in ("medium", "hard"):
                    entry.setdefault(f"{row}_{proto}", []).append(100 * res[row][proto]["mAP"])
            logging.info("%s seed %d: asym M %.2f sym M %.2f", loss, seed, entry["asymmetric_medium"][-1],
                         entry["symmetric_medium"][-1])
    untrained = ExperimentConfig.model_validate(query_cfg)
    from asymret.retrieval.encoders import create_encoder

    raw = evaluate_pair(create_encoder(untrained.query_net), gallery_pair.gallery_net, "mini-roxford", mini["roxford"],
                        rows=("symmetric", "asymmetric"), cache_dir=out / "runs" / ".cache")
    write_docs(rows, table, raw, args, time.perf_counter() - started)


def fmt(values):
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def write_docs(rows, table, raw, args, seconds):
    DOCS.mkdir(parents=True, exist_ok=True)
    g = rows["gallery network alone"]
    lines = [
        "# AML losses on the mini benchmark",
        "",
        f"`python experiments/aml_losses_mini.py --seeds {args.seeds}` ({seconds / 60:.0f} min on this machine).",
        "Gallery network: ResNet-18 (256-d), trained symmetric-contrastive on mini-sfm; query network:",
        "MobileNetV2-0.5 (256-d), trained asymmetrically with each loss against the frozen gallery network.",
        "mini-roxford mAP (%), Medium / Hard.",
        "",
        f"Gallery network alone: Medium {100 * g['medium']['mAP']:.2f}, Hard {100 * g['hard']['mAP']:.2f}. "
        f"Untrained query network: asymmetric Medium {100 * raw['asymmetric']['medium']['mAP']:.2f}, "
        f"symmetric Medium {100 * raw['symmetric']['medium']['mAP']:.2f}.",
        "",
        "| loss | asym Medium | asym Hard | sym Medium | sym Hard |",
        "|---|---|---|---|---|",
    ]
    for loss, e in table.items():
        lines.append(f"| `{loss}` | {fmt(e['asymmetric_medium'])} | {fmt(e['asymmetric_hard'])} | "
                     f"{fmt(e['symmetric_medium'])} | {fmt(e['symmetric_hard'])} |")
    (DOCS / "aml_losses_mini.md").write_text("\n".join(lines) + "\n")
    (DOCS / "aml_losses_mini.json").write_text(json.dumps({"gallery": rows, "losses": table, "untrained": raw},
                                                          indent=1, default=float))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
