"""Search: by uploaded image (encoded by a QUERY network, named by ``query_net``), by vector, by an item
of the gallery.

The re-ID rule "exclude same identity on same camera" (Market-1501/VeRi protocols) drops hits whose
label and camera both equal the query's, and a search by item leaves the item out of its own hits:
both are exclusion rules the gallery's search applies exactly (``exclude``, :mod:`asymret.index.backend`;
a filter expression in Milvus, growing rounds k, 4k, 16k, ... over FAISS).

``rerank`` (a search option; :mod:`asymret.retrieval.rerank`) post-processes each query's ranking with
the gallery's stored vectors (a Flat gallery): ``aqe`` / ``alpha_qe`` expand the query with its top
:data:`~asymret.retrieval.rerank.QE_N` hits (those the filters and rules keep) and search again;
``kreciprocal`` re-ranks the top ``max(RERANK_SHORTLIST, 2k)`` hits by k-reciprocal encoding among the
query and those hits (a local re-ranking: the gallery's neighbourhoods are taken within the shortlist;
with one query the query-query block is the query itself, so no query-query space is needed).
Each hit keeps ``score``, its cosine similarity to the query as sent, and gets ``rerank_score``.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Form, UploadFile
from pydantic import ValidationError

from asymret.api.routers.deps import GalleryName, Reader
from asymret.api.routers.items import per_image, read_uploads, thumbnail_url
from asymret.api.schemas import (
    QUERY_NET_FIELD,
    RERANK_FIELD,
    RERANK_SHORTLIST,
    Encoded,
    Filters,
    K,
    Rerank,
    SearchOptions,
    SearchRequest,
    SearchResponse,
)
from asymret.errors import InputError

router = APIRouter(prefix="/v1", tags=["search"])
QueryNetName = Annotated[str | None, Form(max_length=64, description=QUERY_NET_FIELD)]



def item_vectors(gallery, item_ids, purpose: str = "search by item id") -> np.ndarray:
    """The stored vectors of existing items, in the order of ``item_ids`` (a Flat FAISS gallery keeps them
    exactly, Milvus whatever its index)."""
    try:
        return gallery.vectors(np.asarray(item_ids, np.int64))
    except InputError:
        raise InputError(f"{purpose} needs a Flat gallery (exact vectors); '{gallery.name}' is "
                         f"{gallery.factory}: search it without that option, or rebuild it as Flat") from None


def run_search(service, gallery, vectors: np.ndarray, options: SearchOptions, queries: list[dict]) -> list[dict]:
    """Hits per query; ``queries[i]`` may hold ``label``/``camera`` (re-ID rule) and ``self_id``."""
    if options.exclude_same_camera and any(q.get("label") is None or q.get("camera") is None for q in queries):
        raise InputError("exclude_same_camera needs each query's label and camera; give them, or drop the option")
    if options.rerank is None:
        hits = find(service, gallery, vectors, options.k, options, queries)
        return [_result(gallery.name, row, options.group_by_label) for row in hits]
    hits, rerank_scores = reranked(service, gallery, vectors, options, queries)
    return [_result(gallery.name, row, options.group_by_label, s) for row, s in zip(hits, rerank_scores)]


def find(service, gallery, vectors: np.ndarray, k: int, options: SearchOptions, queries: list[dict]) -> list[list]:
    """The ``k`` best hits per query that pass the filters and the rules (store ``Hit`` objects)."""
    filters = options.filters.as_store_filters() if options.filters else None
    return service.registry.search(gallery, vectors, k, filters, [_rules(q, options.exclude_same_camera) for q in queries])


def reranked(service, gallery, vectors: np.ndarray, options: SearchOptions, queries: list[dict]):
    """Hits per query in the order of ``options.rerank`` (module doc), with their cosine ``score`` to the
    query as sent, and the scores they are ordered by."""
    from asymret.retrieval import rerank

    defaults = rerank.RerankOptions()
    purpose = f"rerank={options.rerank}"
    item_vectors(gallery, [], purpose)  # a non-Flat gallery is refused before searching
    q = gallery.as_unit(vectors, "queries")

    def stored(rows):  # every hit's vector, one pass over the gallery's ids for the whole batch
        ids = sorted({h.id for row in rows for h in row})
        return dict(zip(ids, item_vectors(gallery, ids, purpose)))

    if options.rerank in ("aqe", "alpha_qe"):
        alpha = 0.0 if options.rerank == "aqe" else defaults.qe_alpha
        top = find(service, gallery, q, defaults.qe_n, options, queries)
        near = stored(top)
        expanded = np.stack([
            rerank.weighted_expansion(q[i:i + 1], np.stack([near[h.id] for h in row])[None],
                                      np.array([[h.score for h in row]], np.float32), alpha)[0] if row else q[i]
            for i, row in enumerate(top)])
        hits = find(service, gallery, expanded, options.k, options, queries)
        order_scores = [[h.score for h in row] for row in hits]
        near = stored(hits)
    else:
        shortlist = find(service, gallery, q, max(RERANK_SHORTLIST, 2 * options.k), options, queries)
        near = stored(shortlist)
        hits, order_scores = [], []
        for i, row in enumerate(shortlist):
            if not row:
                hits.append([]), order_scores.append([])
                continue
            dist = rerank.re_ranking_sparse(q[i:i + 1], np.stack([near[h.id] for h in row]), k1=defaults.k1,
                                            k2=defaults.k2, lambda_value=defaults.lambda_value)[0]
            order = np.argsort(dist, kind="stable")[:options.k]
            hits.append([row[j] for j in order])
            order_scores.append((1 - dist[order]).tolist())
    # each hit's score stays its cosine similarity to the query as sent
    hits = [[replace(h, score=float(near[h.id] @ q[i])) for h in row] for i, row in enumerate(hits)]
    return hits, order_scores


def _rules(query: dict, same_camera_rule: bool) -> list[dict]:
    """The gallery's exclusion rules of one query: itself (a search by item), its identity on its camera."""
    rules = [{"id": query["self_id"]}] if query.get("self_id") is not None else []
    if same_camera_rule:
        rules.append({"label": query["label"], "camera": query["camera"]})
    return rules


def _result(gallery: str, hits, group_by_label: bool, rerank_scores=None) -> dict:
    out = [{"id": h.id, "score": h.score, "path": h.item.path, "label": h.item.label, "camera": h.item.camera,
            "attributes": h.item.attributes, "thumbnail_url": thumbnail_url(gallery, h.id)} for h in hits]
    if rerank_scores is not None:
        for hit, s in zip(out, rerank_scores):
            hit["rerank_score"] = float(s)
    if not group_by_label:
        return {"hits": out}
    groups: dict = {}
    for hit in out:  # hits come best first, so each group's first hit is its best
        groups.setdefault(hit["label"], []).append(hit)
    return {"hits": out, "groups": [{"label": label, "score": members[0]["score"], "hits": members}
                                    for label, members in groups.items()]}


@router.post("/galleries/{name}/search", response_model=SearchResponse, summary="Search by vectors or item ids")
def search(name: GalleryName, body: SearchRequest, service: Reader):
    """A batch of queries, each a vector in the gallery network's space or an item id (the item
    itself is left out of its own hits)."""
    start = time.perf_counter()
    gallery = service.registry.get(name)
    by_item = [q.item_id for q in body.queries if q.item_id is not None]
    items = dict(zip(by_item, gallery.get(by_item))) if by_item else {}  # unknown ids: 404
    stored = dict(zip(by_item, item_vectors(gallery, by_item))) if by_item else {}
    queries = [{"label": q.label, "camera": q.camera} if q.item_id is None else
               {"label": q.label or items[q.item_id].label, "camera": q.camera or items[q.item_id].camera,
                "self_id": q.item_id} for q in body.queries]
    vectors = [stored[q.item_id] if q.item_id is not None else q.vector for q in body.queries]
    if len({len(v) for v in vectors}) > 1:
        raise InputError(f"query vectors differ in length; each must have the gallery's {gallery.dim} dimensions")
    results = run_search(service, gallery, np.asarray(vectors, np.float32), body, queries)
    return {"gallery": name, "query_net": "vector", "took_ms": 1000 * (time.perf_counter() - start), "results": results}


@router.post("/galleries/{name}/search/image", response_model=SearchResponse, summary="Search by uploaded images")
def search_image(name: GalleryName, service: Reader,
                 image: Annotated[list[UploadFile], File(description="one or more query images")],
                 k: Annotated[K, Form()] = 10,
                 filters: Annotated[str | None, Form(description='JSON, e.g. {"camera": ["c1", "c2"]}')] = None,
                 exclude_same_camera: Annotated[bool, Form()] = False,
                 group_by_label: Annotated[bool, Form()] = False,
                 label: Annotated[list[str] | None, Form(description="each query's identity (re-ID rule)")] = None,
                 camera: Annotated[list[str] | None, Form(description="each query's camera (re-ID rule)")] = None,
                 query_net: QueryNetName = None,
                 rerank: Annotated[Rerank | None, Form(description=RERANK_FIELD)] = None):
    """The QUERY network named by ``query_net`` encodes the images (batched with concurrent requests
    for the same network); the gallery answers."""
    start = time.perf_counter()
    net = service.query_net(query_net)
    gallery = service.registry.get(name)
    service.registry.require_compatible(gallery)
    _, images = read_uploads(service, image)
    options = SearchOptions(k=k, filters=parse_filters(filters), exclude_same_camera=exclude_same_camera,
                            group_by_label=group_by_label, rerank=rerank)
    queries = [{"label": lb, "camera": c} for lb, c in zip(per_image(label, len(images), "label"),
                                                         per_image(camera, len(images), "camera"))]
    results = run_search(service, gallery, service.query_vectors(images, net), options, queries)
    return {"gallery": name, "query_net": net.description, "query_net_name": net.name,
            "took_ms": 1000 * (time.perf_counter() - start), "results": results}


def parse_filters(text: str | None) -> Filters | None:
    if text is None or not text.strip():
        return None
    try:
        return Filters.model_validate_json(text)
    except ValidationError as exc:
        problem = exc.errors()[0]
        raise InputError(f"'filters' must be JSON such as {{\"camera\": [\"c1\"], \"attributes\": {{\"color\": "
                         f"\"red\"}}}}: {problem['msg']}") from None


@router.post("/encode", response_model=Encoded, summary="Query-network embeddings of uploaded images")
def encode(service: Reader, image: Annotated[list[UploadFile], File(description="one or more images")],
           query_net: QueryNetName = None):
    """The vectors the service searches with (whitened and L2-normalised), e.g. for ``/search``."""
    net = service.query_net(query_net)
    _, images = read_uploads(service, image)
    return {"query_net": net.description, "query_net_name": net.name, "dim": service.dim,
            "vectors": service.query_vectors(images, net).tolist()}
