"""``asymret whiten --pair P --data ...``: learn the learned whitening of an existing pair's networks.

What training does at its end with ``whitening.learn: true`` (docs/whitening.md), for a pair file that
has none or should get new ones: each network's whitening from the matching pairs of a training set,
stored in the pair (written atomically: the old file stays whole if anything fails).
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

from asymret.errors import InputError

NETWORKS = {"query": "query_net", "gallery": "gallery_net", "reference": "reference_gallery_net"}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "whiten", help="learn each network's learned whitening (Lw) for an existing pair file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Learn the post-processing whitening of a pair's networks from a training set's matching\n"
        "pairs, as cirtorch and AML do (Radenovic et al. TPAMI 2018): SfM-120k's qidxs/pidxs, or each image\n"
        "with a random other image of its label. Every network gets its own, learned on its own embeddings:\n"
        "asymmetric testing and serving apply the gallery network's to both sides, symmetric testing the query\n"
        "network's. The pair file is rewritten atomically (or --out is written). Galleries built with another\n"
        "gallery whitening hold another embedding space: rebuild them (asymret index build), serve refuses them.")
    parser.add_argument("--pair", required=True, metavar="PAIR.pt", help="the pair file to whiten")
    parser.add_argument("--data", required=True, metavar="PATH",
                        help="the training set: SfM-120k's .pkl, a path,label[,camera] CSV, a folder of one "
                        "sub-folder per label, or a VeRi-776 root")
    parser.add_argument("--format", default="auto", choices=("auto", "sfm120k", "csv", "folder", "veri776"),
                        help="how to read --data (auto: .pkl sfm120k, .csv csv, a folder with name_train.txt "
                        "veri776, another folder: folder)")
    parser.add_argument("--images", metavar="DIR", help="sfm120k: the ims/ folder (default: ims/ beside the .pkl); "
                        "csv: the folder paths are relative to")
    parser.add_argument("--kind", default="learned", choices=("learned", "pca"),
                        help="learned: from matching pairs (default); pca: unsupervised, from the same images")
    parser.add_argument("--pairs", default="auto", choices=("auto", "sfm", "labels"),
                        help="sfm: SfM-120k's qidxs/pidxs; labels: same-label pairs; auto: sfm when present")
    parser.add_argument("--max-pairs", type=int, metavar="N", help="a random subset of N pairs (default: all)")
    parser.add_argument("--dim", type=int, metavar="D", help="keep the top D dimensions (default: all)")
    parser.add_argument("--networks", default=None, metavar="LIST",
                        help="comma-separated: query, gallery, reference (ACD's pre-co-training gallery); "
                        "default: every network of the pair")
    parser.add_argument("--keep-existing", action="store_true",
                        help="keep a whitening the pair already has (e.g. a converted cirtorch gallery's Lw); "
                        "learn only the missing ones")
    parser.add_argument("--out", metavar="PAIR2.pt", help="write the whitened pair here (default: over --pair)")
    parser.add_argument("--seed", type=int, default=0, help="draws same-label pairs and --max-pairs subsets")
    parser.add_argument("--device", default="auto", help="auto (a GPU if any), cpu, cuda:0, ...")
    parser.add_argument("--batch-size", type=int, default=32, help="images per encoder batch (default 32)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers that open images (default 2)")
    parser.add_argument("--cache-dir", metavar="DIR", help="an embedding cache (asymret train's runs/.cache): a "
                        "network whose embeddings of these training images it holds (the frozen gallery network's) "
                        "is not run again")
    parser.add_argument("--json", action="store_true", help="print one JSON object: the pair file and whitenings")
    parser.set_defaults(func=run)


def data_config(path: str, fmt: str, images: str | None):
    """The :class:`~asymret.training.config.DataConfig` that reads ``--data`` (as a training config would)."""
    from asymret.errors import NotFoundError
    from asymret.training.config import DataConfig

    data = Path(path).expanduser()
    if not data.exists():
        raise NotFoundError(f"--data {path} not found; give SfM-120k's .pkl, a CSV, or a folder of images")
    if fmt == "auto":
        fmt = ("sfm120k" if data.suffix == ".pkl" else "csv" if data.suffix == ".csv"
               else "veri776" if (data / "name_train.txt").is_file() else "folder")
    if fmt == "sfm120k":
        return DataConfig(format=fmt, pkl=str(data), root=images or "", num_workers=0)
    if fmt == "csv":
        return DataConfig(format=fmt, csv=str(data), root=images or "", num_workers=0)
    return DataConfig(format=fmt, root=str(data), num_workers=0)


def run(args: argparse.Namespace) -> int:
    from asymret.retrieval.pair import load_pair, save_pair, weights_hash
    from asymret.runtime import resolve_device
    from asymret.training.config import WhiteningConfig
    from asymret.training.recipe import open_training_set
    from asymret.training.whiten import learn_whitenings

    chosen = [n.strip() for n in (args.networks or "").split(",") if n.strip()]
    unknown = [n for n in chosen if n not in NETWORKS]
    if unknown:
        raise InputError(f"unknown --networks {', '.join(unknown)}; choose from {', '.join(NETWORKS)}")
    try:
        cfg = WhiteningConfig(learn=True, kind=args.kind, pairs=args.pairs, max_pairs=args.max_pairs, dim=args.dim,
                              batch_size=args.batch_size)
    except ValueError as exc:
        raise InputError(f"bad whitening option: {exc.errors()[0]['loc'][0]} {exc.errors()[0]['msg']}") from None
    dcfg = data_config(args.data, args.format, args.images)
    device = resolve_device(args.device, setting="--device", fix="use --device cpu or auto")
    pair = load_pair(args.pair, device=device)
    nets = {"query_net": pair.query_net, "gallery_net": pair.gallery_net}
    if pair.reference_gallery is not None:
        nets["reference_gallery_net"] = pair.reference_gallery
    if chosen:
        missing = [n for n in chosen if NETWORKS[n] not in nets]
        if missing:
            raise InputError(f"this pair has no {' or '.join(missing)} network (reference: only ACD pairs)")
        nets = {k: v for k, v in nets.items() if k in {NETWORKS[n] for n in chosen}}
    current = pair.whitenings()
    if args.keep_existing:
        nets = {k: v for k, v in nets.items() if current.get(k) is None}
    if "query_net" in nets and "gallery_net" in nets and pair.query_net.spec == pair.gallery_net.spec \
            and weights_hash(pair.query_net) == weights_hash(pair.gallery_net):
        nets["gallery_net"] = nets["query_net"]  # a symmetric pair: one network, learned once
    learned = {}
    if nets:
        data = open_training_set(dcfg)
        embeddings = {}
        if args.cache_dir:
            from asymret.retrieval.cache import EmbeddingCache

            cache = EmbeddingCache(args.cache_dir)
            embeddings = {k: e for k, net in nets.items() if (e := cache.peek(net, data.records)) is not None}
        learned = learn_whitenings(nets, data, cfg, seed=args.seed, source_name=f"{dcfg.format} {args.data}",
                                   embeddings=embeddings, device=device, num_workers=args.workers,
                                   progress=not args.json)
    white = {**current, **learned}
    out = Path(args.out or args.pair).expanduser()
    meta = {**pair.meta, "whitened": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    save_pair(out, pair.query_net, pair.gallery_net, whitening=white["gallery_net"], meta=meta,
              reference_gallery=pair.reference_gallery, query_whitening=white["query_net"],
              reference_whitening=white["reference_gallery_net"])
    described = {k: (w.describe() if w is not None else None) for k, w in white.items()
                 if k != "reference_gallery_net" or pair.reference_gallery is not None}
    if args.json:
        print(json.dumps({"pair": str(out), "learned": sorted(learned), "whitenings": described}))
        return 0
    for name, w in described.items():
        what = "none" if w is None else (f"{w['kind']} {w['input_dim']} -> {w['dim']}"
                                         + (f", {w['pairs']} pairs" if w.get("pairs") else "")
                                         + f", {w.get('images', '?')} images")
        print(f"{name:<22} {'learned now' if name in learned else 'kept':<12} {what}")
    print(f"pair file: {out}")
    if "gallery_net" in learned:
        print("the gallery network's whitening is part of the embedding space galleries record: rebuild galleries "
              "built with the old one (asymret index build --pair ...); asymret serve refuses a mismatch")
    return 0
