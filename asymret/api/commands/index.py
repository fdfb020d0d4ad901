"""``asymret index``: build, grow, shrink, inspect and search galleries (docs/gallery.md).

``build`` encodes images with the gallery network (resumable; ``torchrun --nproc_per_node N -m
asymret index build ...`` splits the shards over processes) or loads precomputed embeddings;
``search`` encodes a query image with the pair's *query* network: asymmetric search.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from asymret.errors import ImageError, InputError


def register(subparsers) -> None:
    parser = subparsers.add_parser("index", help="build and search galleries (FAISS index + SQL metadata)",
                                   description="Galleries: the gallery network encodes a database once; "
                                   "query networks search it.")
    sub = parser.add_subparsers(dest="index_command", metavar="INDEX_COMMAND", required=True)
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--root", default="galleries", help="folder of the galleries' files (default ./galleries)")
    store.add_argument("--db", metavar="URL", help="SQLAlchemy URL of the metadata (default: ROOT/galleries.db)")
    store.add_argument("--backend", choices=["faiss", "milvus"], default="faiss",
                       help="where galleries live: faiss (default: FAISS files in ROOT + SQL metadata) or milvus "
                       "(collections at --uri; ROOT holds only build scratch)")
    store.add_argument("--uri", metavar="URI", help="with --backend milvus: a Milvus Lite file (default "
                       "ROOT/galleries.milvus.db) or http://host:19530 (a server or cluster)")
    store.add_argument("--token", metavar="T", help="with --backend milvus: the server's token (user:password)")
    named = argparse.ArgumentParser(add_help=False, parents=[store])
    named.add_argument("--name", required=True, help="the gallery")
    network = argparse.ArgumentParser(add_help=False)
    network.add_argument("--pair", metavar="PAIR.pt", help="a pair file: its gallery network (and whitening) encodes")
    network.add_argument("--gallery-net", metavar="SPEC.yaml", help="an encoder spec (or a config with gallery_net:)")
    network.add_argument("--weights", metavar="W.pt", help="the gallery network's weights (with --gallery-net)")
    encoding = argparse.ArgumentParser(add_help=False, parents=[network])
    encoding.add_argument("--images", metavar="DIR|LIST|CSV", help="a folder (labels = sub-folders), a list "
                          "file (one path per line), a CSV path,label[,camera], or a gnd_*.pkl (its imlist)")
    encoding.add_argument("--batch-size", type=int, default=32, help="images per encoder batch (default 32)")
    encoding.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                          help="DataLoader workers that open images (default: up to 4, at most one per core)")
    encoding.add_argument("--device", default="auto", help="auto (this rank's GPU if any), cpu, cuda:0, ...")
    encoding.add_argument("--shard-size", type=int, help="images per shard (default 8192): the unit a killed "
                          "build resumes from and torchrun splits")

    build = sub.add_parser("build", parents=[named, encoding], help="create a gallery from images or embeddings",
                           description="Create a gallery: encode --images with the gallery network, or load "
                           "--embeddings. Rerun the same command after a kill to resume.")
    build.add_argument("--factory", default="Flat", help="FAISS factory string: Flat, IVF4096,Flat, HNSW32, ...")
    build.add_argument("--embeddings", metavar="X.npy", help="precomputed vectors, one row per item")
    build.add_argument("--meta", metavar="M.csv", help="with --embeddings: a header with path,label,camera "
                       "(other columns become attributes), one row per vector")
    build.add_argument("--dba", action="store_true", help="database-side augmentation, once, before adding: each "
                       "vector becomes the weighted sum of its top --dba-k in the database (docs/rerank.md)")
    from asymret.retrieval.rerank import DBA_ALPHA, DBA_K

    build.add_argument("--dba-k", type=int, help=f"DBA neighbours, the vector itself included (default {DBA_K})")
    build.add_argument("--dba-alpha", type=float, help=f"DBA weight exponent: similarity^alpha (default {DBA_ALPHA:g})")
    build.set_defaults(func=run_build)
    add = sub.add_parser("add", parents=[named, encoding], help="encode more images into a gallery",
                         description="Encode more images into an existing gallery with the gallery network "
                         "that built it; they get new ids. Images already in it (same path and bytes) are "
                         "skipped, so rerunning the command adds nothing twice.")
    add.add_argument("--skip-bad", action="store_true", help="log and skip images that do not decode "
                     "(default: stop at the first one)")
    add.set_defaults(func=run_add)
    abort = sub.add_parser("abort", parents=[store], help="drop the unfinished build or add of a gallery",
                           description="Drop the unfinished build or add of a gallery (killed, or stopped by a "
                           "bad image): its plan and encoded shards. Items it already added stay.")
    abort.add_argument("name", help="the gallery")
    abort.set_defaults(func=run_abort)
    snapshot = sub.add_parser("snapshot", parents=[store], help="write a gallery to a snapshot folder",
                              description="Write a gallery (FAISS index, item rows, sidecar, manifest with "
                              "SHA-256 hashes) to a new folder OUT, for a backup or another store.")
    snapshot.add_argument("name", help="the gallery")
    snapshot.add_argument("out", metavar="OUT", help="the snapshot folder to create (must not exist)")
    snapshot.set_defaults(func=run_snapshot)
    restore = sub.add_parser("restore", parents=[store], help="restore a gallery from a snapshot folder",
                             description="Restore a gallery from a snapshot folder: hashes are verified, and a "
                             "snapshot of another gallery network or format version is refused.")
    restore.add_argument("snapshot", metavar="SNAPSHOT", help="the folder 'asymret index snapshot' wrote")
    restore.add_argument("--name", dest="new_name", metavar="NEW", help="restore under this name (default: "
                         "the snapshot's gallery name)")
    restore.add_argument("--replace", action="store_true", help="replace an existing gallery of that name "
                         "(same gallery network only)")
    restore.set_defaults(func=run_restore)
    remove = sub.add_parser("remove", parents=[named], help="remove items by id")
    remove.add_argument("--ids", required=True, help="comma-separated item ids, e.g. 3,17,42")
    remove.set_defaults(func=run_remove)
    info = sub.add_parser("info", parents=[named], help="size, index type and gallery network of a gallery")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=run_info)
    search = sub.add_parser("search", parents=[named], help="the k nearest items to a query image or vector",
                            description="Search a gallery: --image is encoded by the pair's query network "
                            "(asymmetric search); --vector searches by precomputed vectors.")
    search.add_argument("--pair", metavar="PAIR.pt", help="the pair whose query network encodes --image")
    search.add_argument("--image", metavar="IMG", help="the query image")
    search.add_argument("--bbx", metavar="X1,Y1,X2,Y2", help="crop the query image to this box first (revisited protocol)")
    search.add_argument("--vector", metavar="V.npy", help="query vector(s): shape (dim,) or (n, dim)")
    search.add_argument("-k", type=int, default=10, help="hits per query (default 10)")
    search.add_argument("--nprobe", type=int, help="IVF lists to visit")
    search.add_argument("--ef-search", type=int, help="HNSW beam width")
    search.add_argument("--device", default="auto", help="auto (a GPU if any), cpu, cuda:0, ...")
    search.add_argument("--json", action="store_true", help="print one JSON object")
    search.set_defaults(func=run_search)
    listing = sub.add_parser("list", parents=[store], help="every gallery with its size and index type")
    listing.add_argument("--json", action="store_true", help="print a JSON list")
    listing.set_defaults(func=run_list)
    delete = sub.add_parser("delete", parents=[named], help="delete a gallery: its items, index and files")
    delete.set_defaults(func=run_delete)


def _store(args, *, create: bool = True):
    """The store of ``--backend``; ``create=False`` for read-only commands: a missing store is an error."""
    from asymret.index.backend import open_store

    return open_store(args.backend, args.root, uri=args.uri, token=args.token, db_url=args.db, create=create)


def _gallery_side(args, device):
    """The gallery side from --pair or --gallery-net [--weights]; None when neither is given."""
    from asymret.retrieval import sides
    from asymret.retrieval.pair import load_pair

    if args.pair and args.gallery_net:
        raise InputError("give --pair or --gallery-net, not both")
    if args.weights and not args.gallery_net:
        raise InputError("--weights goes with --gallery-net SPEC.yaml (a pair file holds its own weights)")
    if args.pair:
        return sides.SideEncoder.gallery(load_pair(args.pair, device=device))
    if args.gallery_net:
        return sides.SideEncoder(sides.gallery_encoder(args.gallery_net, args.weights).to(device))
    return None


def _encode_args(args, device) -> dict:
    from asymret.retrieval.gallery import SHARD_SIZE

    return {"shard_size": args.shard_size or SHARD_SIZE, "batch_size": args.batch_size, "num_workers": args.workers,
            "device": device, "progress": sys.stderr.isatty()}


def _images_and_side(args):
    from asymret.retrieval.datasets import inputs
    from asymret.runtime import resolve_device

    device = resolve_device(args.device, setting="--device", fix="use --device cpu or auto")
    side = _gallery_side(args, device)
    if side is None:
        raise InputError("encoding images needs the gallery network: --pair PAIR.pt, or --gallery-net "
                         "SPEC.yaml --weights W.pt")
    return inputs.read_images(args.images), side, device


def run_build(args: argparse.Namespace) -> int:
    from asymret.retrieval import gallery as gb
    from asymret.retrieval.datasets import inputs

    if bool(args.images) == bool(args.embeddings):
        raise InputError("give --images DIR|LIST|CSV to encode, or --embeddings X.npy to load (one of them)")
    dba = gb.dba_settings(args.dba, args.dba_k, args.dba_alpha)
    if args.embeddings:
        from asymret.retrieval.datasets.features import load_features

        side = _gallery_side(args, "cpu")
        with _store(args) as store:
            summary = gb.build_from_embeddings(
                store, args.name, load_features(args.embeddings, "embeddings"),
                inputs.read_item_rows(args.meta) if args.meta else None, factory=args.factory,
                network_spec=side.network_spec() if side is not None else None, progress=sys.stderr.isatty(),
                dba=dba)
    else:
        if args.meta:
            raise InputError("--meta goes with --embeddings; with --images the rows come from the images")
        records, side, device = _images_and_side(args)
        with _store(args) as store:
            summary = gb.build_gallery(store, args.name, side, records, factory=args.factory, dba=dba,
                                       **_encode_args(args, device))
    _print_summary(summary, args)
    return 0


def run_add(args: argparse.Namespace) -> int:
    from asymret.retrieval import gallery as gb

    if not args.images:
        raise InputError("give --images DIR|LIST|CSV: the images to add")
    records, side, device = _images_and_side(args)
    with _store(args) as store:
        try:
            summary = gb.add_images(store, args.name, side, records, skip_bad=args.skip_bad,
                                    **_encode_args(args, device))
        except ImageError as exc:
            raise ImageError(f"{exc}; rerun with --skip-bad to skip such images (after 'asymret index abort "
                             f"{args.name}' to drop this unfinished add)") from None
    _print_summary(summary, args)
    skipped = [f"{summary[key]:,} {what}" for key, what in (("skipped_stored", "already in the gallery"),
                                                               ("skipped_bad", "undecodable")) if summary.get(key)]
    if skipped:
        print(f"skipped {', '.join(skipped)}")
    return 0


def run_abort(args: argparse.Namespace) -> int:
    from asymret.retrieval import gallery as gb

    with _store(args, create=False) as store:
        plan = gb.abort_pending(store, args.name)
        count = len(store.open(args.name, readonly=True))
    if plan is None:
        print(f"gallery '{args.name}' has no unfinished build or add; nothing to do")
    else:
        print(f"dropped the unfinished {plan.get('kind', 'build')} of gallery '{args.name}'; it holds "
              f"{count:,} items (what that job had added stays)")
    return 0


def run_snapshot(args: argparse.Namespace) -> int:
    from asymret.index.snapshot import write_snapshot

    with _store(args, create=False) as store:
        manifest = write_snapshot(store, args.name, args.out)
    print(f"wrote snapshot of gallery '{args.name}' ({manifest['count']:,} items) to {args.out}")
    return 0


def run_restore(args: argparse.Namespace) -> int:
    from asymret.index.snapshot import restore_snapshot

    with _store(args) as store:
        name, count = restore_snapshot(store, args.snapshot, name=args.new_name, replace=args.replace)
    print(f"restored gallery '{name}' ({count:,} items) from {args.snapshot}")
    return 0


def _print_summary(summary: dict, args) -> None:
    if "rank" in summary:  # a torchrun worker: rank 0 reports the gallery
        return
    done = {"build": "built", "add": "added to", "embeddings": "built"}[summary["kind"]]
    where = Path(args.root) / summary["name"] if args.backend == "faiss" else f"Milvus {args.uri or args.root}"
    print(f"{done} gallery '{summary['name']}' in {where}: now {summary['count']:,} items "
          f"({summary['dim']}-d); {summary['added']:,} added, {summary['encoded']:,} images encoded by this "
          f"process [{summary['seconds']:.1f} s]")


def run_remove(args: argparse.Namespace) -> int:
    try:
        ids = [int(i) for i in args.ids.split(",") if i.strip()]
    except ValueError:
        raise InputError(f"--ids must be comma-separated integers, e.g. 3,17,42; got '{args.ids}'") from None
    with _store(args) as store, store.open(args.name) as gallery:
        removed = gallery.remove(ids)
        print(f"removed {removed} item(s) from gallery '{args.name}'; {len(gallery):,} remain")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from asymret.retrieval import gallery as gb
    from asymret.retrieval import sides

    with _store(args, create=False) as store, store.open(args.name, readonly=True) as gallery:
        info = {**gallery.info(), "pending_build": gb.pending_build(store, args.name)}
    if args.json:
        print(json.dumps(info, default=str))
        return 0
    where = (f"{info['index_bytes'] / 2**20:.1f} MiB on disk" if "index_bytes" in info else
             f"Milvus {info['index']['type']} in collection {info['index']['collection']} at {info['index']['uri']}")
    print(f"gallery '{info['name']}': {info['count']:,} items, {info['dim']}-d, index {info['factory']} "
          f"({info['metric']}), {where}")
    print(f"  gallery network: {sides.describe_network(info['network_spec'])}")
    for step, settings in info["processing"].items():
        print(f"  vectors processed before adding: {step} ({', '.join(f'{k}={v}' for k, v in settings.items())})")
    print(f"  created {info['created_at']}, updated {info['updated_at']}")
    pending = info["pending_build"]
    if pending:
        done = f"{pending['shards_done']} of {pending['shards']} shards encoded" if "shards" in pending else "not done"
        print(f"  unfinished {pending['kind']}: {done}; rerun its command to finish it, or drop it with "
              f"'asymret index abort {info['name']}'")
    return 0


def run_search(args: argparse.Namespace) -> int:
    import numpy as np


    if bool(args.image) == bool(args.vector):
        raise InputError("give --image IMG (with --pair) or --vector V.npy, one of them")
    with _store(args, create=False) as store, store.open(args.name, readonly=True, mmap=True) as gallery:
        if args.image:
            queries, names = _encode_query(args, gallery), [args.image]
        else:
            from asymret.retrieval.datasets.features import load_features

            queries = np.atleast_2d(load_features(args.vector, "query vectors"))
            names = [f"{args.vector}[{i}]" for i in range(len(queries))]
        hits = gallery.search(queries, args.k, nprobe=args.nprobe, efSearch=args.ef_search)
    results = [{"query": name, "hits": [h.to_dict() for h in row]} for name, row in zip(names, hits)]
    if args.json:
        print(json.dumps({"gallery": args.name, "k": args.k, "results": results}))
        return 0
    for result in results:
        print(f"query {result['query']}: top {len(result['hits'])} of gallery '{args.name}'")
        print(f"{'rank':>5} {'id':>10} {'score':>8}  {'label':<16} path")
        for rank, hit in enumerate(result["hits"], 1):
            label = hit["label"] if hit["label"] is not None else "-"
            print(f"{rank:>5} {hit['id']:>10} {hit['score']:>8.4f}  {label:<16} {hit['path'] or '-'}")
    return 0


def _encode_query(args, gallery):
    """The query image through the pair's query network (and the gallery network's whitening)."""
    from asymret.retrieval import sides
    from asymret.retrieval.pair import load_pair
    from asymret.retrieval.records import ImageRecord, load_image
    from asymret.runtime import resolve_device

    if not args.pair:
        raise InputError("--image needs --pair PAIR.pt: its query network encodes the query")
    bbx = None
    if args.bbx:
        try:
            bbx = tuple(float(v) for v in args.bbx.split(","))
        except ValueError:
            bbx = ()
        if len(bbx) != 4:
            raise InputError(f"--bbx must be four numbers x1,y1,x2,y2 in pixels; got '{args.bbx}'")
    device = resolve_device(args.device, setting="--device", fix="use --device cpu or auto")
    pair = load_pair(args.pair, device=device)
    sides.check_space(gallery, sides.SideEncoder.gallery(pair))
    image = load_image(ImageRecord(Path(args.image), split="query", bbx=bbx))
    return sides.SideEncoder.query(pair).encode_images([image], device=device)


def run_list(args: argparse.Namespace) -> int:
    with _store(args, create=False) as store:
        galleries = store.list()
    if args.json:
        print(json.dumps(galleries))
        return 0
    if not galleries:
        print(f"no galleries under {args.root}; create one with 'asymret index build'")
        return 0
    print(f"{'name':<24} {'items':>12} {'dim':>6}  {'index':<24} updated")
    for g in galleries:
        print(f"{g['name']:<24} {g['count']:>12,} {g['dim']:>6}  {g['factory']:<24} {g['updated_at']}")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    with _store(args) as store:
        count = next((g["count"] for g in store.list() if g["name"] == args.name), 0)
        store.delete(args.name)
    print(f"deleted gallery '{args.name}' ({count:,} items)")
    return 0
