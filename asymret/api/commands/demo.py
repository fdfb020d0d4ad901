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
import os
import time
from pathlib import Path

from asymret.errors import InputError

log = logging.getLogger("asymret.demo")

# Small enough for 2 CPU cores (docs/mini-benchmark.md, "How hard it is"). Square inputs, so every training
# step is one batch (BatchNorm trains in batch mode, from scratch). The gallery network trains with
# augmentation (random crops, colour jitter, grey, flips) on top of mini-sfm's rendered colour remaps; the
# query network trains without (as AML): its target is the frozen gallery's embedding of the clean image.
# Hard negatives are mined from a small random pool (``pool``): in a barely trained space the hardest of
# all images are near-duplicates from the same photograph.
FULL = {"gallery_epochs": 6, "gallery_tuples": 150, "gallery_size": 48, "gallery_lr": 1e-3,
        "query_epochs": 15, "query_tuples": 300, "query_size": 48, "query_lr": 1e-3, "query_batch": 20,
        "negatives": 3, "pool": 80}
QUICK = {"gallery_epochs": 1, "gallery_tuples": 20, "gallery_size": 48, "gallery_lr": 1e-3,
         "query_epochs": 1, "query_tuples": 20, "query_size": 40, "query_lr": 1e-3, "query_batch": 10,
         "negatives": 3, "pool": 40}


def demo_configs(root: Path, out: Path, quick: bool, mini: dict, **overrides) -> tuple[dict, dict]:
    """The two experiment configs of the demo (gallery pre-training, then query network).

    ``overrides``: keys of :data:`FULL` (e.g. ``query_epochs=20``), for experiments.
    """
    s = {**(QUICK if quick else FULL), **overrides}
    data = {"format": "sfm120k", "pkl": str(mini["train_pkl"]), "root": str(mini["train_images"]),
            "num_workers": 2}
    evaluation = {"benchmark": "mini-roxford", "root": str(mini["roxford"])}

    def train(epochs, lr, tuples, batch):
        mining = {"tuples_per_epoch": tuples, "num_negatives": s["negatives"], "pool_size": s["pool"]}
        return {"epochs": epochs, "batch_size": batch, "bn_eval": False, "mining": mining,
                "optim": {"optimizer": "adam", "lr": lr, "weight_decay": 1e-6}}

    gallery_net = {"backbone": "resnet18", "dim": 256, "input": {"size": [s["gallery_size"]] * 2}}
    gallery = {
        "name": "gallery", "seed": 0, "output_dir": str(out),
        "query_net": gallery_net, "data": {**data, "augment": {"enabled": True}}, "eval": evaluation,
        "loss": {"name": "contrastive", "mode": "symmetric"},
        "train": train(s["gallery_epochs"], s["gallery_lr"], s["gallery_tuples"], 5),
    }
    query = {
        "name": "query_contr_plus", "seed": 0, "output_dir": str(out),
        "query_net": {"backbone": "mobilenetv2_050", "dim": 256, "input": {"size": [s["query_size"]] * 2}},
        "gallery_net": {**gallery_net, "weights": str(out / "gallery" / "query_net.pt")},
        "data": data, "eval": evaluation,
        "loss": {"name": "contr_plus"},
        "train": train(s["query_epochs"], s["query_lr"], s["query_tuples"], s["query_batch"]),
    }
    return gallery, query


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="build the mini benchmark, train a gallery and a query network, evaluate",
        description="The whole asymret flow on a mini benchmark rendered from real photographs: "
        "about 3 minutes on a 2-core CPU (--quick: about one minute).")
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
