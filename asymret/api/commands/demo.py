"""``asymret demo``: the whole flow on the bundled mini benchmark, on a laptop CPU.

1. render the mini benchmark from the photographs inside scikit-image (once);
2. train a gallery network briefly (symmetric contrastive, the "large" side);
3. train a query network with ``contr_plus`` against it, frozen (AML);
4. evaluate: gallery network alone, symmetric, asymmetric.

The settings below are the demo's embedded defaults; ``configs/mini/`` holds the same kind of runs
as YAML for the experiments.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger("asymret.demo")

# Small enough for 2 CPU cores: gallery ResNet-18 at 128 px, query MobileNetV2-0.5 at 96 px.
FULL = {"gallery_epochs": 4, "query_epochs": 6, "tuples": 80, "gallery_size": 112, "query_size": 80}
QUICK = {"gallery_epochs": 1, "query_epochs": 1, "tuples": 20, "gallery_size": 64, "query_size": 48}


def demo_configs(root: Path, out: Path, quick: bool, mini: dict) -> tuple[dict, dict]:
    """The two experiment configs of the demo (gallery pre-training, then query network)."""
    s = QUICK if quick else FULL
    data = {"format": "sfm120k", "pkl": str(mini["train_pkl"]), "root": str(mini["train_images"]),
            "num_workers": 2}
    evaluation = {"benchmark": "mini-roxford", "root": str(mini["roxford"])}
    mining = {"tuples_per_epoch": s["tuples"], "num_negatives": 5, "pool_size": 400}
    gallery_net = {"backbone": "resnet18", "dim": 256, "input": {"size": s["gallery_size"]}}
    gallery = {
        "name": "gallery", "seed": 0, "output_dir": str(out),
        "query_net": gallery_net, "data": data, "eval": evaluation,
        "loss": {"name": "contrastive", "mode": "symmetric"},
        "train": {"epochs": s["gallery_epochs"], "batch_size": 5, "bn_eval": False,
                  "optim": {"optimizer": "adam", "lr": 1e-4, "weight_decay": 1e-6}, "mining": mining},
    }
    query = {
        "name": "query_contr_plus", "seed": 0, "output_dir": str(out),
        "query_net": {"backbone": "mobilenetv2_050", "dim": 256, "input": {"size": s["query_size"]}},
        "gallery_net": {**gallery_net, "weights": str(out / "gallery" / "query_net.pt")},
        "data": data, "eval": evaluation,
        "loss": {"name": "contr_plus"},
        "train": {"epochs": s["query_epochs"], "batch_size": 5, "bn_eval": False,
                  "optim": {"optimizer": "adam", "lr": 1e-4, "weight_decay": 1e-6}, "mining": mining},
    }
    return gallery, query


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="build the mini benchmark, train a gallery and a query network, evaluate",
        description="The whole asymret flow on a mini benchmark rendered from real photographs: "
        "about 10 minutes on a 2-core CPU (--quick: about one minute).")
    parser.add_argument("--out", default="asymret-demo", help="working folder (default ./asymret-demo)")
    parser.add_argument("--quick", action="store_true", help="tiny settings, about a minute (used by the tests)")
    parser.add_argument("--json", action="store_true", help="print the final table as JSON")
    parser.set_defaults(func=run)


def run(args) -> int:
    from asymret.retrieval.evaluate import evaluate_pair, format_pair_table, public
    from asymret.retrieval.mini import ensure_mini
    from asymret.retrieval.pair import load_pair
    from asymret.training.config import ExperimentConfig
    from asymret.training.trainer import train

    start = time.perf_counter()
    out = Path(args.out).expanduser().resolve()
    log.info("1/4 mini benchmark in %s", out / "data")
    mini = ensure_mini(out / "data", size="tiny" if args.quick else "small")
    gallery_cfg, query_cfg = demo_configs(out / "data", out / "runs", args.quick, mini)
    log.info("2/4 training the gallery network (%s)", gallery_cfg["query_net"]["backbone"])
    train(ExperimentConfig.model_validate(gallery_cfg), progress=not args.json)
    log.info("3/4 training the query network (%s) with contr_plus against the frozen gallery network",
             query_cfg["query_net"]["backbone"])
    run_dir = train(ExperimentConfig.model_validate(query_cfg), progress=not args.json)
    log.info("4/4 evaluating on mini-roxford")
    pair = load_pair(run_dir / "pair.pt")
    result = evaluate_pair(pair.query_net, pair.gallery_net, "mini-roxford", mini["roxford"],
                           cache_dir=out / "runs" / ".cache")
    if args.json:
        print(json.dumps({row: public(r) for row, r in result.items()}))
    else:
        print(format_pair_table(result, "mini-roxford"))
        print(f"\npair file: {run_dir / 'pair.pt'}   ({time.perf_counter() - start:.0f} s in all)")
    return 0
