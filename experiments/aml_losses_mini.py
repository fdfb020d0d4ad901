"""The AML loss study on the mini benchmark (not CI): 7 losses against one frozen, pretrained gallery network.

The gallery network is the demo's: ImageNet MobileNetV2-1.0 with GeM at 224 px, frozen. One query network
per loss and seed is trained asymmetrically on mini-sfm (the anchor through the query network, every other
tuple member from the cached gallery embeddings) and evaluated symmetrically and asymmetrically on
mini-roxford with its 300 distractors. Two starting points for the query network, both the pretrained
backbone at 64 px (1/12 of the gallery's FLOPs):

- ``unaligned``: a freshly initialised fc layer after GeM (1280 -> 1280), so the query space starts unrelated
  to the gallery's: AML's setting, where only a loss that ties the two spaces can give asymmetric accuracy;
- ``shared``: no new layer (the demo's query network), so the spaces start nearly aligned and a loss can only
  keep or lose that alignment.

The AML paper's pattern (Table 8): in asymmetric testing regression and Contr+ work while triplet, MS, RKD and
DarkRank collapse. ``d_self``: the mean distance between the query and gallery embeddings of the same
mini-roxford database image (unseen in training).

    OMP_NUM_THREADS=1 python experiments/aml_losses_mini.py [--out exp-aml] [--seeds 3] [--jobs 2]

Writes ``docs/results/aml_losses_mini.md`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

LOSSES = ["contrastive", "contr_plus", "triplet", "multi_similarity", "regression", "rkd", "darkrank"]
# Same steps and rates for every loss of a setting. A fresh fc layer learns at 100x the backbone's rate.
SETTINGS = {
    "unaligned": {"query_net": {"head": "fc"}, "query_lr": 1e-5, "head_lr_mult": 100.0},
    "shared": {"query_net": {}, "query_lr": 1e-4, "head_lr_mult": 1.0},
}
COMMON = {"query_epochs": 10, "query_tuples": 200, "negatives": 3}
log = logging.getLogger("aml_losses_mini")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "results"


def d_self(query_net, gallery_net, records, cache: Path) -> float:
    """Mean ``‖φq(x) − φg(x)‖`` over ``records``: how close the query network maps an image to where the
    gallery network maps it (AML's regression target), on images neither network was trained on."""
    from asymret.retrieval.cache import EmbeddingCache
    from asymret.retrieval.encode import encode_records

    q = encode_records(query_net, records, progress=False, num_workers=0)
    g = np.asarray(EmbeddingCache(cache).get(gallery_net, records, progress=False, num_workers=0))
    return float(np.linalg.norm(q - g, axis=1).mean())


def config(out: Path, mini: dict, setting: str, loss: str, seed: int) -> dict:
    from asymret.api.commands.demo import demo_config

    s = SETTINGS[setting]
    cfg = demo_config(out / "runs", False, mini, loss=loss, query_net=s["query_net"], query_lr=s["query_lr"], **COMMON)
    cfg["train"]["optim"]["head_lr_mult"] = s["head_lr_mult"]
    cfg["data"]["num_workers"] = 0
    return dict(cfg, name=f"{setting}_{loss}_s{seed}", seed=seed)


def scores(query_net, gallery_net, mini, cache: Path) -> dict:
    from asymret.retrieval.datasets import RevisitedDataset
    from asymret.retrieval.evaluate import evaluate_pair

    res = evaluate_pair(query_net, gallery_net, "mini-roxford", mini["roxford"], distractors=mini["distractors"],
                        rows=("symmetric", "asymmetric"), cache_dir=cache, num_workers=0)
    entry = {f"{row}_{p}": 100 * res[row][p]["mAP"] for row in res for p in ("medium", "hard")}
    entry["d_self"] = d_self(query_net, gallery_net, list(RevisitedDataset(mini["roxford"]).database), cache)
    return entry


def run_one(job) -> tuple:
    """One training run in a worker process (one torch thread)."""
    import torch

    from asymret.retrieval.pair import load_pair
    from asymret.training.config import ExperimentConfig
    from asymret.training.trainer import train

    torch.set_num_threads(1)
    out, mini, setting, loss, seed = job
    run = train(ExperimentConfig.model_validate(config(out, mini, setting, loss, seed)), progress=False)
    pair = load_pair(run / "pair.pt")
    entry = scores(pair.query_net, pair.gallery_net, mini, out / "runs" / ".cache")
    log.info("%s %s seed %d: asym M %.2f sym M %.2f d_self %.3f", setting, loss, seed, entry["asymmetric_medium"],
             entry["symmetric_medium"], entry["d_self"])
    return setting, loss, seed, entry


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="exp-aml")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=1, help="training runs in parallel (one thread each)")
    ap.add_argument("--losses", default=",".join(LOSSES))
    ap.add_argument("--settings", default=",".join(SETTINGS))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    from asymret.mini import ensure_mini
    from asymret.retrieval.encoders import create_encoder
    from asymret.retrieval.evaluate import evaluate_pair
    from asymret.training.config import ExperimentConfig

    torch.set_num_threads(1)
    out = Path(args.out).resolve()
    mini = ensure_mini(out / "data")
    started = time.perf_counter()
    settings, losses = args.settings.split(","), args.losses.split(",")
    cache = out / "runs" / ".cache"
    untrained, gallery_row = {}, None
    for setting in settings:
        cfg = ExperimentConfig.model_validate(config(out, mini, setting, "regression", 0))
        gallery_net = create_encoder(cfg.gallery_net)
        untrained[setting] = scores(create_encoder(cfg.query_net), gallery_net, mini, cache)
        if gallery_row is None:
            g = evaluate_pair(gallery_net, gallery_net, "mini-roxford", mini["roxford"], distractors=mini["distractors"],
                              rows=("gallery",), cache_dir=cache, num_workers=0)["gallery"]
            gallery_row = {p: 100 * g[p]["mAP"] for p in ("medium", "hard")}
    jobs = [(out, mini, s, loss, seed) for seed in range(args.seeds) for s in settings for loss in losses]
    results = [run_one(jobs[0])]  # fills the gallery network's training-set cache before the workers share it
    with ProcessPoolExecutor(args.jobs) as pool:
        results += list(pool.map(run_one, jobs[1:]))
    table: dict = {}
    for setting, loss, _seed, entry in results:
        for key, value in entry.items():
            table.setdefault(setting, {}).setdefault(loss, {}).setdefault(key, []).append(value)
    write_docs(gallery_row, table, untrained, args, time.perf_counter() - started)


def fmt(values, digits: int = 2):
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def write_docs(gallery, table, untrained, args, seconds):
    DOCS.mkdir(parents=True, exist_ok=True)
    lines = [
        "# AML losses on the mini benchmark, from pretrained networks",
        "",
        (f"`OMP_NUM_THREADS=1 python experiments/aml_losses_mini.py --seeds {args.seeds} --jobs {args.jobs}` "
        f"({seconds / 60:.0f} min on a 2-core machine)."),
        "",
        ("Gallery network: ImageNet MobileNetV2-1.0 + GeM at 224 px, frozen (the demo's). Query networks: the same "
        "pretrained backbone at 64 px, trained asymmetrically on mini-sfm with each loss at its paper defaults, "
        f"{COMMON['query_epochs']} epochs x {COMMON['query_tuples']} tuples ({COMMON['negatives']} mined negatives), "
        "Adam. mini-roxford + 300 distractors, mAP (%), mean ± std over seeds. `d_self`: mean distance between the "
        "query and gallery embeddings of the same database image (unseen in training; two random unit vectors "
        "are 1.41 apart)."),
        "",
        f"Gallery network alone: Medium {gallery['medium']:.2f}, Hard {gallery['hard']:.2f}.",
    ]
    for setting, losses in table.items():
        s, u = SETTINGS[setting], untrained[setting]
        lines += [
            "",
            f"## `{setting}` start: " + ("a fresh fc layer after GeM" if s["query_net"] else "no new layer"),
            "",
            (f"lr {s['query_lr']:g}" + (f" (fc layer {s['query_lr'] * s['head_lr_mult']:g})" if s["query_net"] else "")
             + ". Untrained query network: asymmetric "
            f"Medium {u['asymmetric_medium']:.2f}, symmetric Medium {u['symmetric_medium']:.2f}, d_self {u['d_self']:.3f}."),
            "",
            "| loss | asym Medium | asym Hard | sym Medium | sym Hard | d_self |",
            "|---|---|---|---|---|---|",
        ]
        for loss, e in sorted(losses.items(), key=lambda kv: -statistics.mean(kv[1]["asymmetric_medium"])):
            lines.append(f"| `{loss}` | {fmt(e['asymmetric_medium'])} | {fmt(e['asymmetric_hard'])} | "
                         f"{fmt(e['symmetric_medium'])} | {fmt(e['symmetric_hard'])} | {fmt(e['d_self'], 3)} |")
    (DOCS / "aml_losses_mini.md").write_text("\n".join(lines) + "\n")
    (DOCS / "aml_losses_mini.json").write_text(json.dumps(
        {"gallery": gallery, "untrained": untrained, "losses": table, "settings": SETTINGS, "common": COMMON},
        indent=1, default=float))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
