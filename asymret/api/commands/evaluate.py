"""``asymret evaluate``: the official protocols on precomputed features or on a trained pair."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from asymret.errors import InputError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="evaluate features or a trained pair on a benchmark",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate on the official protocols (mAP, mP@k, R1, mINP).\n\n"
        "With --pair: the rows gallery (the gallery network alone), symmetric (the query network on both sides),\n"
        "asymmetric (query network for the queries, gallery network for the database) and, for an ACD pair, sir.\n"
        "Learned whitening (Lw; Radenovic et al. TPAMI 2018, as cirtorch and AML apply it): when the pair holds a\n"
        "network's whitening (asymret train with whitening.learn: true, or asymret whiten), each row is shown\n"
        "without it and again as ROW+Lw with it on both sides: asymmetric+Lw uses the GALLERY network's whitening\n"
        "for queries and database alike (AML), symmetric+Lw the query network's own, gallery+Lw the gallery's own.\n"
        "The JSON says under each row's \"whitening\" which one it used (null: none). --no-whitening shows only\n"
        "the rows without it. See docs/whitening.md.")
    sub = parser.add_subparsers(dest="evaluate_command", metavar="{features}")
    feats = sub.add_parser(
        "features", help="evaluate precomputed L2-normalised features (.npy, rows in list order)",
        description="Evaluate your own descriptors. Rows must be L2-normalised (normalised with a "
        "warning otherwise) and in the order of the dataset's lists.")
    feats.add_argument("--protocol", required=True,
                       choices=["revisited", "veri776", "reid", "msmt17", "inshop", "sop", "cub200"],
                       help="the benchmark's protocol the features follow (docs/metrics.md)")
    feats.add_argument("--queries", required=True, metavar="Q.npy", help="query features")
    feats.add_argument("--database", required=True, metavar="X.npy", help="database / gallery features")
    feats.add_argument("--gnd", metavar="FILE", help="revisited: gnd_roxford5k.pkl / gnd_rparis6k.pkl")
    feats.add_argument("--distractors", metavar="D.npy", help="revisited: R1M distractor features")
    feats.add_argument("--query-names", metavar="TXT", help="veri776: name_query.txt")
    feats.add_argument("--gallery-names", metavar="TXT", help="veri776: name_test.txt")
    feats.add_argument("--root", metavar="DIR", help="msmt17, inshop, sop, cub200: the folder with the official "
                       "list files (rows: the test split in list order; sop/cub200: both arrays hold the test split)")
    feats.add_argument("--query-meta", metavar="CSV", help="reid: identity,camera[,path] per query")
    feats.add_argument("--gallery-meta", metavar="CSV", help="reid: identity,camera[,path] per gallery image")
    feats.add_argument("--no-camera-rule", action="store_true",
                       help="re-ID: keep same-identity same-camera gallery images as positives")
    feats.add_argument("--json", action="store_true", help="print one JSON object (fractions in [0, 1])")
    feats.set_defaults(func=run_features)
    parser.add_argument("--pair", metavar="PAIR.pt", help="a pair file written by asymret train")
    parser.add_argument("--benchmark", choices=["roxford5k", "rparis6k", "mini-roxford", "veri776", "mini-veri",
                                                "msmt17", "inshop", "sop", "cub200"],
                        help="the benchmark to evaluate on (with --root its folder)")
    parser.add_argument("--root", help="the benchmark's folder (jpg/ + gnd_*.pkl, VeRi's image_*/ + name_*.txt, or "
                        "the official lists of MSMT17, In-Shop, SOP, CUB-200-2011; docs/reid.md)")
    parser.add_argument("--distractors", metavar="LIST", help="revisitop1m.txt list of R1M distractor images")
    parser.add_argument("--multiscale", action="store_true", help="extract at scales 1, 1/sqrt(2), 1/2")
    parser.add_argument("--rows", default=None,
                        help="comma-separated: gallery, symmetric, asymmetric, sir (default: the first three, "
                        "plus sir for a pair whose gallery network was co-trained with ACD)")
    parser.add_argument("--no-whitening", action="store_true",
                        help="only the rows without learned whitening (no ROW+Lw rows)")
    parser.add_argument("--topk", type=int, metavar="K",
                        help="rank through an index's top-K search (R1M scale); the report says when a "
                        "positive fell outside the K")
    parser.add_argument("--device", default="auto", help="auto (a GPU if any), cpu, cuda:0, ...")
    parser.add_argument("--batch-size", type=int, default=16, help="images per encoder batch (default 16)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers that open images (default 2)")
    parser.add_argument("--cache-dir", help="reuse the gallery network's database embeddings across runs")
    parser.add_argument("--amp", action="store_true",
                        help="encode under bf16 autocast on CUDA (faster; default fp32, which the published "
                        "numbers use; docs/metrics.md gives the measured difference); no effect on CPU")
    parser.add_argument("--json", action="store_true", help="print one JSON object (fractions in [0, 1])")
    parser.add_argument("--save-ranks", metavar="DIR",
                        help="also write DIR/ranks.json (each row's top-20, or top-K with --topk, database ids "
                        "and AP per query, image paths, positives and junk: for 'asymret report') and "
                        "DIR/results.json (what --json prints)")
    from asymret.retrieval import rerank as rr

    post = parser.add_argument_group(
        "post-processing", "rows added beside each row, on the same features (docs/rerank.md)")
    post.add_argument("--rerank", metavar="METHODS",
                      help="comma-separated: kreciprocal (Zhong et al. 2017), aqe, alpha_qe (Radenovic et al. 2018); "
                      "on the asymmetric row k-reciprocal comes twice, its query-query distances in the query "
                      "network's space and between the queries expanded into the gallery's")
    post.add_argument("--dba", action="store_true", help="also every row (and method) on the database after "
                      "database-side augmentation")
    post.add_argument("--k1", type=int, default=rr.K1, help=f"k-reciprocal: neighbourhood size (default {rr.K1})")
    post.add_argument("--k2", type=int, default=rr.K2,
                      help=f"k-reciprocal: local query expansion size (default {rr.K2})")
    post.add_argument("--lambda", dest="lambda_value", type=float, default=rr.LAMBDA,
                      help=f"k-reciprocal: weight of the original distance (default {rr.LAMBDA})")
    post.add_argument("--qe-n", type=int, default=rr.QE_N,
                      help=f"AQE / alpha-QE: top neighbours averaged (default {rr.QE_N})")
    post.add_argument("--qe-alpha", type=float, default=rr.QE_ALPHA,
                      help=f"alpha-QE: weight exponent (default {rr.QE_ALPHA:g})")
    post.add_argument("--dba-k", type=int, default=rr.DBA_K,
                      help=f"DBA: top neighbours, itself included (default {rr.DBA_K})")
    post.add_argument("--dba-alpha", type=float, default=rr.DBA_ALPHA,
                      help=f"DBA: weight exponent (default {rr.DBA_ALPHA:g})")
    parser.set_defaults(func=run_pair)


def postprocessing(args: argparse.Namespace):
    """The ``--rerank`` / ``--dba`` options as :class:`~asymret.retrieval.evaluate.Postprocessing` (None if neither)."""
    from asymret.retrieval.evaluate import Postprocessing
    from asymret.retrieval.rerank import RerankOptions

    methods = tuple(dict.fromkeys(m.strip() for m in (args.rerank or "").split(",") if m.strip()))
    if not methods and not args.dba:
        return None
    options = RerankOptions(k1=args.k1, k2=args.k2, lambda_value=args.lambda_value, qe_n=args.qe_n,
                            qe_alpha=args.qe_alpha, dba_k=args.dba_k, dba_alpha=args.dba_alpha)
    return Postprocessing(methods=methods, dba=args.dba, options=options)


def _need(args, *names):
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is None]
    if missing:
        raise InputError(f"--protocol {args.protocol} needs {' and '.join(missing)}")


def run_features(args: argparse.Namespace) -> int:
    from asymret.api import tables
    from asymret.retrieval import evaluate as ev
    from asymret.retrieval.datasets.features import load_features

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = load_features(args.queries, "queries")
        db = load_features(args.database, "database")
        if args.protocol == "revisited":
            _need(args, "gnd")
            d = load_features(args.distractors, "distractors") if args.distractors else None
            result = ev.evaluate_features_revisited(args.gnd, q, db, d)
            text = tables.format_revisited(result)
        elif args.protocol == "veri776":
            _need(args, "query_names", "gallery_names")
            result = ev.evaluate_features_veri(args.query_names, args.gallery_names, q, db,
                                               camera_rule=not args.no_camera_rule)
            text = tables.format_reid(result)
        elif args.protocol != "reid":
            _need(args, "root")
            result = ev.evaluate_features_benchmark(args.protocol, args.root, q, db,
                                                    camera_rule=not args.no_camera_rule)
            text = tables.format_reid(result)
        else:
            _need(args, "query_meta", "gallery_meta")
            result = ev.evaluate_features_reid(args.query_meta, args.gallery_meta, q, db,
                                               camera_rule=not args.no_camera_rule)
            text = tables.format_reid(result)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(json.dumps(ev.public(result)) if args.json else text)
    return 0


def run_pair(args: argparse.Namespace) -> int:
    if not args.pair or not args.benchmark:
        raise InputError("give --pair PAIR.pt and --benchmark NAME (or use 'asymret evaluate features')")
    if not args.root:
        raise InputError(f"--benchmark {args.benchmark} needs --root, the folder that holds it")
    from asymret.api import tables
    from asymret.retrieval import evaluate as ev
    from asymret.retrieval.cost import pair_cost
    from asymret.retrieval.pair import load_pair
    from asymret.runtime import resolve_device

    rows = tuple(r.strip() for r in (args.rows or "").split(",") if r.strip())
    post = postprocessing(args)  # bad settings fail before the pair loads
    device = resolve_device(args.device, setting="--device", fix="use --device cpu or auto")
    pair = load_pair(args.pair, device=device)
    if not rows:
        rows = ev.ALL_ROWS if pair.co_trained else ev.ROWS
    recorder = None
    if args.save_ranks:
        from asymret.retrieval.ranks import DEFAULT_K, RankRecorder

        recorder = RankRecorder(args.benchmark, args.root, distractors=args.distractors,
                                k=args.topk or DEFAULT_K, topk=args.topk)
    result = ev.evaluate_pair(pair.query_net, pair.gallery_net, args.benchmark, args.root,
                              whitenings=None if args.no_whitening else pair.whitenings(),
                              distractors=args.distractors,
                              multiscale=args.multiscale, rows=rows, batch_size=args.batch_size,
                              num_workers=args.workers, device=device, cache_dir=args.cache_dir,
                              topk=args.topk, reference_gallery=pair.reference_gallery,
                              progress=sys.stderr.isatty(), on_row=recorder, amp=args.amp, postprocessing=post)
    cost = pair_cost(pair.query_net, pair.gallery_net)
    read = ev.dataset_name(args.benchmark, args.root)
    table = {**{row: ev.public(r) for row, r in result.items()}, "cost": cost, "dataset": read,
             "precision": "bf16" if args.amp and device.type == "cuda" else "fp32"}
    if post:
        table["postprocessing"] = {"methods": list(post.methods), "dba": post.dba, **vars(post.options)}
    if recorder is not None:
        _save_ranks(args, recorder, table)
    if args.json:
        print(json.dumps(table))
    else:
        print(f"{read}{'' if read == args.benchmark else f' (read from --root; asked: {args.benchmark})'}: "
              f"query network {pair.query_net.spec.backbone}, gallery network {pair.gallery_net.spec.backbone}"
              f"{', bf16 autocast' if args.amp and device.type == 'cuda' else ''}")
        print(tables.format_pair_table(result, args.benchmark, cost=cost))
        if post:
            print(f"post-processing: {post.options.describe()}")
    return 0


def _save_ranks(args: argparse.Namespace, recorder, table: dict) -> None:
    from pathlib import Path

    meta = {"pair": str(Path(args.pair).expanduser().resolve()), "benchmark": args.benchmark}
    out = Path(args.save_ranks).expanduser()
    path = recorder.save(out, meta=meta)
    (out / "results.json").write_text(json.dumps({**table, **meta}))
    print(f"rankings: {path}; results: {out / 'results.json'}", file=sys.stderr)
