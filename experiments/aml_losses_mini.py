"""The AML loss study on the mini benchmark (not CI): 7 losses against one frozen gallery network.

Trains the demo's gallery network once, then one query network per loss (asymmetric training, the
anchor through the query network and every other tuple member from the cached gallery
embeddings), and evaluates each pair symmetrically and asymmetrically on mini-roxford. The AML
paper's pattern (Table 8): in asymmetric testing regression and Contr+ work while triplet, MS, RKD
and DarkRank collapse, because nothing in those losses ties the two spaces together.

    python experiments/aml_losses_mini.py [--out exp-aml] [--epochs 15] [--seeds 1]

Besides mAP it records, per run, ``d_self`` on unseen images: the mean distance between the query and
the gallery network's embeddings of the same mini-roxford database image (how far the query network
got into the gallery's space), and the same for the untrained query network and for chance
(two random directions). On a 2-core machine shared with other jobs, run it with OMP_NUM_THREADS=1.

Writes ``docs/results/aml_losses_mini.md`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np

from asymret.api.commands.demo import demo_configs
from asymret.retrieval.evaluate import evaluate_pair
from asymret.retrieval.mini import ensure_mini
from asymret.retrieval.pair import load_pair
from asymret.training.config import ExperimentConfig
from asymret.training.trainer import train


def d_self(pair, records) -> float:
    """Mean ``‖φq(x) − φg(x)‖`` over ``records``: how close the query network maps an image to where the
    gallery network maps it (AML's regression target), on images neither network was trained on."""
    from asymret.retrieval.encode import encode_records

    q = encode_records(pair.query_net, records, progress=False)
    g = encode_records(pair.gallery_net, records, progress=False)
    return float(np.linalg.norm(q - g, axis=1).mean())


LOSSES = ["contrastive", "contr_plus", "triplet", "multi_similarity", "regression", "rkd", "darkrank"]
log = logging.getLogger("aml_losses_mini")
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
    from asymret.retrieval.datasets import RevisitedDataset
    from asymret.retrieval.encoders import create_encoder
    from asymret.retrieval.pair import Pair

    unseen = list(RevisitedDataset(mini["roxford"]).database)  # images no network trained on
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
            entry.setdefault("d_self", []).append(d_self(pair, unseen))
            log.info("%s seed %d: asym M %.2f sym M %.2f d_self %.3f", loss, seed, entry["asymmetric_medium"][-1],
                         entry["symmetric_medium"][-1], entry["d_self"][-1])
    untrained = Pair(create_encoder(ExperimentConfig.model_validate(query_cfg).query_net), gallery_pair.gallery_net)
    raw = evaluate_pair(untrained.query_net, untrained.gallery_net, "mini-roxford", mini["roxford"],
                        rows=("symmetric", "asymmetric"), cache_dir=out / "runs" / ".cache")
    raw["d_self"] = d_self(untrained, unseen)
    write_docs(rows, table, raw, args, time.perf_counter() - started)


def fmt(values, digits: int = 2):
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def write_docs(rows, table, raw, args, seconds):
    DOCS.mkdir(parents=True, exist_ok=True)
    g = rows["gallery network alone"]
    lines = [
        "# AML losses on the mini benchmark",
        "",
        (f"`OMP_NUM_THREADS=1 python experiments/aml_losses_mini.py --seeds {args.seeds}"
        f"{f' --epochs {args.epochs}' if args.epochs else ''}` ({seconds / 60:.0f} min on this machine)."),
        "Gallery network: ResNet-18 (256-d, 48x48), trained symmetric-contrastive on mini-sfm (the demo's recipe);",
        "query network: MobileNetV2-0.5 (256-d, 48x48), trained from scratch asymmetrically with each loss against",
        "the frozen gallery network. mini-roxford mAP (%), Medium / Hard. `d_self`: mean distance between the",
        "query and gallery embeddings of the same mini-roxford database image (unseen in training).",
        "",
        (f"Gallery network alone: Medium {100 * g['medium']['mAP']:.2f}, Hard {100 * g['hard']['mAP']:.2f}. "
        f"Untrained query network: asymmetric Medium {100 * raw['asymmetric']['medium']['mAP']:.2f}, "
        f"symmetric Medium {100 * raw['symmetric']['medium']['mAP']:.2f}, d_self {raw['d_self']:.3f}."),
        "",
        "| loss | asym Medium | asym Hard | sym Medium | sym Hard | d_self |",
        "|---|---|---|---|---|---|",
    ]
    for loss, e in table.items():
        lines.append(f"| `{loss}` | {fmt(e['asymmetric_medium'])} | {fmt(e['asymmetric_hard'])} | "
                     f"{fmt(e['symmetric_medium'])} | {fmt(e['symmetric_hard'])} | {fmt(e['d_self'], 3)} |")
    (DOCS / "aml_losses_mini.md").write_text("\n".join(lines) + "\n")
    (DOCS / "aml_losses_mini.json").write_text(json.dumps({"gallery": rows, "losses": table, "untrained": raw},
                                                          indent=1, default=float))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
