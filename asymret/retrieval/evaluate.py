"""Evaluate descriptors on the official protocols: from precomputed features, or by encoding a benchmark.

``evaluate_features_*`` check that the arrays fit the ground truth (row counts, dimensions, NaN,
normalisation) and hand them to :mod:`asymret.retrieval.metrics`; the CLI and the API call these, so
a user's own descriptors get exactly the numbers our trained networks get.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from asymret.errors import InputError
from asymret.retrieval import metrics, rerank
from asymret.retrieval.datasets import RevisitedDataset, VeRi776, open_dataset, parse_veri_name, read_gnd
from asymret.retrieval.datasets.features import read_meta, read_names
from asymret.retrieval.positions import as_features
from asymret.retrieval.rerank import RerankOptions

log = logging.getLogger(__name__)


def _check_rows(array: np.ndarray, expected: int, what: str, listed_in: str) -> None:
    if array.ndim == 2 and array.shape[0] != expected:
        raise InputError(f"{what} has {array.shape[0]} rows but {listed_in} lists {expected} images; "
                         "rows must be the images in list order")


def evaluate_features_revisited(gnd_path, queries, database, distractors=None, kappas=(1, 5, 10),
                                topk: int | None = None) -> dict:
    """Revisited Oxford/Paris (+ R1M distractors appended after the database).

    ``topk``: rank by an index's top-k search (:func:`index_ranking`) instead of exactly.
    """
    data = read_gnd(gnd_path)
    name = Path(gnd_path).name
    _check_rows(queries, len(data["qimlist"]), "queries", f"{name} (qimlist)")
    _check_rows(database, len(data["imlist"]), "database", f"{name} (imlist)")
    q = as_features(queries, "queries")
    db = as_features(database, "database", dim=q.shape[1])
    if distractors is not None:
        db = np.concatenate([db, as_features(distractors, "distractors", dim=q.shape[1])])
    return metrics.evaluate_revisited(data["gnd"], kappas=kappas, **ranking_source(q, db, topk, max(kappas)))


def evaluate_features_veri(query_names, gallery_names, queries, database, camera_rule: bool = True) -> dict:
    """VeRi-776 from its name lists (``name_query.txt``, ``name_test.txt``)."""
    qn, gn = read_names(query_names, "query name list"), read_names(gallery_names, "gallery name list")
    _check_rows(queries, len(qn), "queries", str(query_names))
    _check_rows(database, len(gn), "database", str(gallery_names))
    (qid, qcam), (gid, gcam) = (zip(*[parse_veri_name(n, f"{p}:{i + 1}") for i, n in enumerate(names)])
                                for names, p in ((qn, query_names), (gn, gallery_names)))
    where = {n: i for i, n in enumerate(gn)}
    pos, junk = metrics.reid_groundtruth(qid, qcam, gid, gcam, camera_rule=camera_rule,
                                         query_gallery_index=[where.get(n, -1) for n in qn])
    return _reid(pos, junk, queries, database)


def evaluate_features_reid(query_meta, gallery_meta, queries, database, camera_rule: bool = True) -> dict:
    """Any re-ID dataset from two CSVs (``identity,camera[,path]``); a shared ``path`` marks the query itself."""
    qid, qcam, qpath = read_meta(query_meta)
    gid, gcam, gpath = read_meta(gallery_meta)
    _check_rows(queries, len(qid), "queries", str(query_meta))
    _check_rows(database, len(gid), "database", str(gallery_meta))
    self_index = None
    if qpath is not None and gpath is not None:
        where = {p: i for i, p in enumerate(gpath)}
        self_index = [where.get(p, -1) for p in qpath]
    pos, junk = metrics.reid_groundtruth(qid, qcam, gid, gcam, camera_rule=camera_rule and qcam is not None
                                         and gcam is not None, query_gallery_index=self_index)
    return _reid(pos, junk, queries, database)


def evaluate_features_benchmark(benchmark: str, root, queries, database, camera_rule: bool = True) -> dict:
    """MSMT17, In-Shop, SOP or CUB-200-2011 from its official list files under ``root`` (images not needed).

    Rows are the test split's images in list order: ``query`` then ``gallery`` lists for MSMT17 and In-Shop;
    for SOP and CUB-200-2011 both arrays hold the test split (leave-one-out), e.g. the query network's and
    the gallery network's features of the same images.
    """
    if benchmark not in ACD_BENCHMARKS:
        raise InputError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(ACD_BENCHMARKS)}")
    data = open_dataset(benchmark, root=root, check_files=False)
    _check_rows(queries, len(data.query), "queries", f"the {benchmark} query split")
    _check_rows(database, len(data.gallery), "database", f"the {benchmark} gallery split")
    q = as_features(queries, "queries")
    db = as_features(database, "database", dim=q.shape[1])
    return benchmark_scorer(benchmark, *data.groundtruth(camera_rule=camera_rule))(queries=q, database=db)


def _reid(pos, junk, queries, database) -> dict:
    q = as_features(queries, "queries")
    db = as_features(database, "database", dim=q.shape[1])
    return metrics.evaluate_reid(pos, junk, queries=q, database=db)


# ------------------------------------------------------------------------------- index-backed ranking

INDEX_ADD_BATCH = 100_000  # database rows copied into the index at a time (bounds the extra memory)


def index_ranking(queries, database, k: int, factory: str = "Flat", device: str = "cpu") -> np.ndarray:
    """The top-``k`` database rows per query (best first) from a FAISS index of ``database``.

    The R1M path: 1M x queries is never scored densely, only searched. Pass the result to
    ``metrics.evaluate_revisited(gnd, ranking=...)``, which reports ``exact: False`` when a positive
    fell outside the ``k`` (mAP is then a lower bound). ``Flat`` is exact; other factory strings
    measure what an approximate index costs in mAP (trained on the first block of rows).
    """
    from asymret.index import VectorIndex
    from asymret.index.topk import topk_inner_product

    database = np.asarray(database)
    if factory == "Flat":  # exact: scan the rows in blocks instead of copying them into an index
        return topk_inner_product(np.asarray(queries, dtype=np.float32), database, k)[1]
    index = VectorIndex(database.shape[1], factory, device=device)
    for start in range(0, len(database), INDEX_ADD_BATCH):
        block = database[start:start + INDEX_ADD_BATCH]
        index.add(block, np.arange(start, start + len(block)))
    return index.search(queries, k)[1]


def ranking_source(queries, database, topk: int | None, deepest: int = max(metrics.DEFAULT_KAPPAS)) -> dict:
    """Keyword arguments for the metrics: exact features, or an index's top-``topk`` ranking.

    ``topk`` below ``deepest`` (the deepest mP@k reported) is refused: no query's mP@k could be known.
    """
    if topk is None:
        return {"queries": queries, "database": database}
    check_depth(topk, deepest)
    return {"ranking": index_ranking(queries, database, topk)}


def check_depth(topk: int, deepest: int = max(metrics.DEFAULT_KAPPAS)) -> None:
    """InputError when a ranking cut at ``topk`` cannot give the deepest mP@k reported."""
    if topk < deepest:
        raise InputError(f"--topk {topk} is shallower than mP@{deepest}, which needs the top {deepest} of every "
                         f"query; give --topk {deepest} or more (100 or more keeps mAP close to exact)")


def public(result: dict) -> dict:
    """The result as the documented JSON object: ``exact`` appears only when a ranking was truncated."""
    out = dict(result)
    if out.get("exact", True):
        out.pop("exact", None)
    return out


# ----------------------------------------------------------------------------------- trained pairs

REVISITED_BENCHMARKS = ("roxford5k", "rparis6k", "mini-roxford")
REID_BENCHMARKS = ("veri776", "mini-veri")
# ACD's other benchmarks (datasets.QueryGallerySet readers): the re-ID protocol, plus Recall@K for the three
# product/bird benchmarks; the literature's Ks for the pair table (every K of metrics.RECALL_KS is in the JSON).
ACD_BENCHMARKS = ("msmt17", "inshop", "sop", "cub200")
RECALL_BENCHMARKS = {"inshop": (1, 10, 20, 30), "sop": (1, 10, 100, 1000), "cub200": (1, 10, 20, 30)}
ROWS = ("gallery", "symmetric", "asymmetric")
ALL_ROWS = ROWS + ("sir",)
ROW_TITLES = {"gallery": "gallery network alone (φg / φg)", "symmetric": "symmetric (φq / φq)",
              "asymmetric": "asymmetric (φq / φg)", "sir": "SIR: co-trained gallery (φg' / φg')",
              "asymmetric_untrained": "untrained query network (φq⁰ / φg)"}
# The network that encodes the queries in each row (whose cost the row pays at search time).
ROW_QUERY_SIDE = {"gallery": "gallery_net", "sir": "gallery_net", "symmetric": "query_net", "asymmetric": "query_net",
                  "asymmetric_untrained": "query_net"}
# A row with learned whitening: the row's name + LW ("asymmetric+Lw"), beside the row without it.
LW = "+Lw"
# Whose whitening a row applies to BOTH its sides (AML's test code, methods.md §1): asymmetric testing the
# gallery network's; every other row its one network's own. An ACD pair's gallery row is the reference
# (pre-co-training) gallery's: pair-file keys, as in Pair.whitenings().
ROW_WHITENING = {"gallery": "gallery_net", "symmetric": "query_net", "asymmetric": "gallery_net", "sir": "gallery_net",
                 "asymmetric_untrained": "gallery_net"}
WHITENED_TITLES = {"gallery": "+ Lw of φg", "symmetric": "+ Lw of φq", "asymmetric": "+ Lw of φg, both sides",
                   "sir": "+ Lw of φg'", "asymmetric_untrained": "+ Lw of φg, both sides"}
ROW_TITLES.update({row + LW: f"{title} {WHITENED_TITLES[row]}" for row, title in list(ROW_TITLES.items())})
ROW_QUERY_SIDE.update({row + LW: side for row, side in list(ROW_QUERY_SIDE.items())})


def row_whitening_source(row: str, co_trained: bool = False) -> str:
    """The pair-file key of the network whose whitening ``row`` uses on both sides (:data:`ROW_WHITENING`)."""
    row = base_row(row)
    if row == "gallery" and co_trained:
        return "reference_gallery_net"
    return ROW_WHITENING[row]


# ------------------------------------------------------------------------------ post-processing
@dataclass(frozen=True)
class Postprocessing:
    """Post-processing rows added beside each evaluated row (:mod:`asymret.retrieval.rerank`).

    ``methods``: any of ``kreciprocal``, ``aqe``, ``alpha_qe``; ``dba``: also every row and method on
    the database-side augmented database. ``options``: the methods' settings (papers' defaults).
    """

    methods: tuple[str, ...] = ()
    dba: bool = False
    options: RerankOptions = field(default_factory=RerankOptions)

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in rerank.METHODS]
        if unknown:
            raise InputError(f"unknown re-ranking method(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(rerank.METHODS)}")

    def __bool__(self) -> bool:
        return bool(self.methods) or self.dba


POST_TITLES = {"dba": "DBA", "aqe": "AQE", "alpha_qe": "αQE", "kreciprocal": "k-reciprocal",
               "kreciprocal_expanded": "k-reciprocal, q-q αQE", "kreciprocal_query": "k-reciprocal, q-q φq"}


def base_row(row: str) -> str:
    """The test setting of a row, whitened or post-processed: ``asymmetric+Lw+alpha_qe`` -> ``asymmetric``."""
    return row.split("+", 1)[0]


def row_title(row: str) -> str:
    """A row's line in the tables: its setting, then its post-processing."""
    base, *post = row.split("+")
    if post and "+" + post[0] == LW:  # the whitened row's own title
        base, post = base + LW, post[1:]
    title = ROW_TITLES.get(base, base)
    if base.startswith("asymmetric") and post and post[-1] == "kreciprocal":
        post = [*post[:-1], "kreciprocal_query"]  # the query-query space says which of the two it is
    return " + ".join([title, *(POST_TITLES.get(p, p) for p in post)])


def postprocessed(row: str, queries, database, post: Postprocessing, topk: int | None = None):
    """``(name, metric keyword arguments)`` of each post-processed variant of one row.

    With ``dba``: the row on the augmented database, then each method on it too. k-reciprocal on
    the asymmetric row comes twice, one per query-query space (:data:`rerank.QQ_SPACES`):
    ``+kreciprocal`` takes it in the query network's space, ``+kreciprocal_expanded`` between the
    queries expanded into the gallery's (αQE); other rows compare one network with itself.
    """
    opts = post.options
    bases = [("", database)]
    if post.dba:
        bases.append(("+dba", rerank.database_augmentation(database, opts.dba_k, opts.dba_alpha)))
    for tag, db in bases:
        if tag:
            yield row + tag, ranking_source(queries, db, topk)
        for method in post.methods:
            spaces = rerank.QQ_SPACES if method == "kreciprocal" and base_row(row) == "asymmetric" else ("query",)
            for space in spaces:
                if topk is not None:
                    check_depth(topk)
                source = rerank.rerank(method, queries, db, opts, qq_space=space, topk=topk)
                if "queries" in source:
                    source = ranking_source(source["queries"], source["database"], topk)
                yield f"{row}{tag}+{method}{'_expanded' if space == 'expanded' else ''}", source


def open_benchmark(benchmark: str, root, distractors=None):
    """The test split of a benchmark: (queries, database, scorer(**ranking source) -> metrics)."""
    if benchmark in REVISITED_BENCHMARKS:
        data = RevisitedDataset(root, distractors=distractors)

        def score(**source):
            return metrics.evaluate_revisited(data.gnd, **source)

        return data.queries, data.database, score
    if benchmark in REID_BENCHMARKS:
        if distractors:
            raise InputError("--distractors applies to revisited benchmarks (R1M), not re-ID")
        data = VeRi776(root)
        pos, junk = data.groundtruth()

        def score(**source):
            return metrics.evaluate_reid(pos, junk, **source)

        return data.query, data.gallery, score
    if benchmark in ACD_BENCHMARKS:
        if distractors:
            raise InputError(f"--distractors applies to revisited benchmarks (R1M), not {benchmark}")
        data = open_dataset(benchmark, root=root)
        return data.query, data.gallery, benchmark_scorer(benchmark, *data.groundtruth())
    raise InputError(f"unknown benchmark {benchmark!r}; choose one of "
                     f"{', '.join(REVISITED_BENCHMARKS + REID_BENCHMARKS + ACD_BENCHMARKS)}")


def benchmark_scorer(benchmark: str, positives, junk):
    """``score(**ranking source) -> metrics`` of an ACD benchmark: re-ID metrics, and Recall@K where the
    literature reports it."""
    if benchmark in RECALL_BENCHMARKS:
        return lambda **source: metrics.evaluate_retrieval(positives, junk, **source)
    return lambda **source: metrics.evaluate_reid(positives, junk, **source)


def dataset_name(benchmark: str, root) -> str:
    """The name of the data that ``open_benchmark`` reads under ``root``: a revisited folder's ``gnd_<name>.pkl``
    (``roxford5k`` pointed at a mini folder reads ``mini-roxford``); for re-ID, the benchmark asked for."""
    if benchmark in REVISITED_BENCHMARKS and Path(root).expanduser().is_dir():
        return RevisitedDataset.gnd_path_in(Path(root).expanduser(), None).stem[len("gnd_"):]
    return benchmark


def _with_scales(encoder, scales):
    """A view of ``encoder`` extracting at ``scales`` (same weights)."""
    import copy

    view = copy.copy(encoder)
    view.spec = encoder.spec.model_copy(update={"input": encoder.spec.input.model_copy(update={"scales": scales})})
    return view


def evaluate_pair(query_net, gallery_net, benchmark: str, root, *, whitenings=None, distractors=None,
                  multiscale: bool = False, rows=ROWS, batch_size: int = 16, num_workers: int = 2,
                  device=None, cache_dir=None, progress: bool = False, topk: int | None = None,
                  reference_gallery=None, on_row=None, amp: bool = False,
                  postprocessing: Postprocessing | None = None) -> dict:
    """Encode a benchmark with both networks and score the rows of the seed tables.

    ``gallery``: the gallery network alone (its own upper bound); ``symmetric``: the query network
    on both sides; ``asymmetric``: query network for queries, gallery network for the database (the
    point of asymret); ``sir``: the gallery network with itself when it was co-trained (ACD): pass the
    co-trained network as ``gallery_net`` and the original as ``reference_gallery``, which then gives
    the ``gallery`` row (without a reference, ``sir`` equals ``gallery``).
    Each side uses its own input spec. The frozen gallery network's database embeddings come from the
    embedding cache when ``cache_dir`` is set. ``topk``: rank by an index's top-k search
    (:func:`index_ranking`; R1M scale) instead of the exact full ranking. ``amp``: encode under bf16
    autocast on CUDA (default fp32).

    ``whitenings``: ``{"query_net" | "gallery_net" | "reference_gallery_net": Whitening | None}``
    (:meth:`~asymret.retrieval.pair.Pair.whitenings`). Every row is scored without whitening and, when
    its network has one, again as ``<row>+Lw`` with that whitening on both sides (:data:`ROW_WHITENING`:
    the gallery network's for asymmetric testing, as AML does; each network's own for the others).
    Each result says which it used under ``"whitening"``: None, or ``{"network", "kind", "input_dim",
    "dim", ...provenance}``. ``on_row(row, queries, database)``, when given, sees the exact (whitened)
    features each row scores, before it is scored: a caller keeps rankings from them
    (:mod:`asymret.retrieval.ranks`) without encoding the benchmark twice.
    ``postprocessing`` adds, after each row (whitened or not), its post-processed variants
    (:func:`postprocessed`: ``asymmetric+alpha_qe``, ``asymmetric+Lw+dba``, ...) on the same features;
    ``on_row`` sees only the rows without post-processing.
    """
    from asymret.retrieval.cache import EmbeddingCache
    from asymret.retrieval.encode import encode_records
    from asymret.retrieval.specs import MULTISCALE

    queries, database, score = open_benchmark(benchmark, root, distractors)
    unknown = set(rows) - set(ALL_ROWS)
    if unknown:
        raise InputError(f"unknown row(s) {', '.join(sorted(unknown))}; choose from {', '.join(ALL_ROWS)}")
    reference = reference_gallery if reference_gallery is not None else gallery_net
    co_trained = reference is not gallery_net
    whitenings = {k: v for k, v in (whitenings or {}).items() if v is not None}
    unknown = set(whitenings) - {"query_net", "gallery_net", "reference_gallery_net"}
    if unknown:
        raise InputError(f"unknown whitening key(s) {', '.join(sorted(unknown))}; use query_net, gallery_net, "
                         "reference_gallery_net")
    nets = {"query_net": query_net, "gallery_net": gallery_net, "reference_gallery_net": reference}
    for name, white in whitenings.items():
        if white.input_dim != nets[name].dim:
            raise InputError(f"the {name} whitening takes {white.input_dim}-d descriptors but the {name} gives "
                             f"{nets[name].dim}-d")
        learned, used = white.info.get("scales"), list(MULTISCALE if multiscale else nets[name].spec.input.scales)
        if learned is not None and (len(learned) != len(used) or not np.allclose(learned, used)):
            log.warning("the %s whitening was learned on descriptors at scales %s but this evaluation extracts at %s; "
                        "its +Lw rows mix the two (learn it at these scales: asymret whiten)", name, learned, used)
    if multiscale:
        query_net, gallery_net = _with_scales(query_net, MULTISCALE), _with_scales(gallery_net, MULTISCALE)
        reference = _with_scales(reference, MULTISCALE)
    kw = {"batch_size": batch_size, "num_workers": num_workers, "device": device, "progress": progress, "amp": amp}

    def encode(net, records, cacheable=False):
        if cacheable and cache_dir:
            return np.asarray(EmbeddingCache(cache_dir).get(net, records, **kw))
        return encode_records(net, records, **kw)

    need_q = {r for r in rows if r in ("symmetric", "asymmetric")}
    own_rows = {"sir"} | (set() if co_trained else {"gallery"})  # rows of gallery_net with itself
    same = queries is database  # a leave-one-out split (SOP, CUB-200-2011): each network encodes it once
    g_db = encode(gallery_net, database, cacheable=True) if ({"asymmetric"} | own_rows) & set(rows) else None
    g_q = (g_db if same else encode(gallery_net, queries)) if own_rows & set(rows) else None
    r_db, r_q = g_db, g_q
    if co_trained and "gallery" in rows:
        r_db = encode(reference, database, cacheable=True)
        r_q = r_db if same else encode(reference, queries)
    q_q = encode(query_net, queries) if need_q else None
    q_db = (q_q if same else encode(query_net, database)) if "symmetric" in rows else None
    features = {"gallery": (r_q, r_db), "symmetric": (q_q, q_db), "asymmetric": (q_q, g_db), "sir": (g_q, g_db)}
    results = {}
    for row in rows:
        q, db = features[row]
        source = row_whitening_source(row, co_trained)
        white = whitenings.get(source)
        for name, w in ((row, None), (row + LW, white)):
            if name != row and w is None:
                continue
            wq = q if w is None else w(q)
            wdb = db if w is None else wq if db is q else w(db)  # a leave-one-out split is whitened once
            if on_row is not None:
                on_row(name, wq, wdb)
            used = None if w is None else {"network": source, **w.describe()}
            results[name] = {**score(**ranking_source(wq, wdb, topk)), "whitening": used}
            if postprocessing:
                for post_name, post_source in postprocessed(name, wq, wdb, postprocessing, topk):
                    results[post_name] = {**score(**post_source), "whitening": used}
    return results
