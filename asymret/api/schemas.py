"""Pydantic schemas of every request and response of the REST API (they make the OpenAPI spec)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

from asymret.retrieval import rerank as rr

ItemId = Annotated[int, Field(ge=0, lt=2**63, description="the item's stable 64-bit id")]
# a label or camera: text, and a number sent is taken as its text (label 7 is "7"), as the spec says
Text = Annotated[str, Field(max_length=255),
                 WithJsonSchema({"anyOf": [{"type": "string", "maxLength": 255}, {"type": "number"}]})]
Scalar = str | int | float | bool
K = Annotated[int, Field(ge=1, le=1000, description="hits per query")]
GALLERY_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class In(BaseModel):
    """A request body: unknown keys are errors; a number where a label or camera is expected (label 7) is
    text, but names, factory strings and paths are strict (``{"name": 0}`` is refused, not the name "0")."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class Out(BaseModel):
    """A response body."""


# ------------------------------------------------------------------------------------------ errors
class ErrorDetail(Out):
    code: str = Field(description="machine-readable: not_found, invalid_image, forbidden, ...")
    message: str = Field(description="one sentence that says what to fix")


class ErrorBody(Out):
    error: ErrorDetail


# --------------------------------------------------------------------------------------- galleries
class GalleryCreate(In):
    name: str = Field(pattern=GALLERY_NAME, strict=True, description="1-64 letters, digits, '_', '-' or '.'")
    factory: str = Field("Flat", max_length=128, strict=True,
                         description="FAISS index factory string: Flat, HNSW32, IVF4096,Flat, IVF4096,PQ64, ...")


class GallerySummary(Out):
    name: str
    dim: int
    factory: str
    metric: str
    count: int
    network_hash: str | None
    created_at: str
    updated_at: str


class GalleryInfo(GallerySummary):
    network_spec: dict | None = Field(description="the gallery network that encoded the items")
    compatible: bool = Field(description="whether this server's pair has that gallery network, so "
                                         "images can be added and searched")
    readonly: bool
    index: dict[str, Any] = Field(description="index type, size, device")


class GalleryList(Out):
    galleries: list[GallerySummary]


# ------------------------------------------------------------------------------------------- items
class ItemOut(Out):
    id: int
    path: str | None
    label: str | None
    camera: str | None
    attributes: dict[str, Any]
    created_at: str
    thumbnail_url: str


class PathItem(In):
    path: str = Field(min_length=1, max_length=4096, strict=True,
                      description="a file under one of the server's allowed roots")
    label: Text | None = None
    camera: Text | None = None
    attributes: dict[str, Any] = Field(default_factory=dict)


class AddPaths(In):
    items: list[PathItem] = Field(min_length=1, max_length=256)


class ItemsAdded(Out):
    gallery: str
    items: list[ItemOut]


class Deleted(Out):
    deleted: str


# ------------------------------------------------------------------------------------------ search
class Filters(In):
    """Keep only items matching every given key; a list matches any of its values."""

    label: Text | list[Text] | None = None
    camera: Text | list[Text] | None = None
    attributes: dict[str, Scalar] | None = Field(None, description="attribute name -> value, compared by JSON type")

    def as_store_filters(self) -> dict:
        return self.model_dump(exclude_none=True)


RERANK_SHORTLIST = 100  # hits k-reciprocal re-ranks at least (k1 = 20 needs neighbourhoods to form)
RERANK_FIELD = (f"post-process the ranking (Flat galleries): 'aqe' / 'alpha_qe' search again with the query "
                f"expanded by its top {rr.QE_N} hits (plain average / weights sim^{rr.QE_ALPHA:g}); 'kreciprocal' "
                f"re-ranks the top max({RERANK_SHORTLIST}, 2k) hits by k-reciprocal encoding (k1={rr.K1}, "
                f"k2={rr.K2}, lambda={rr.LAMBDA}) among themselves")
Rerank = Literal["aqe", "alpha_qe", "kreciprocal"]


class SearchOptions(In):
    k: K = 10
    filters: Filters | None = None
    exclude_same_camera: bool = Field(False, description="re-ID rule: drop hits of the query's identity "
                                                         "(label) seen by the query's camera")
    group_by_label: bool = Field(False, description="also return the hits grouped by identity (label)")
    rerank: Rerank | None = Field(None, description=RERANK_FIELD)


class Query(In):
    """One query: a vector in the gallery network's space, or an item of the gallery (excluded from its hits)."""

    vector: list[float] | None = Field(None, max_length=65536)
    item_id: ItemId | None = None
    label: Text | None = Field(None, description="the query's identity, for exclude_same_camera")
    camera: Text | None = Field(None, description="the query's camera, for exclude_same_camera")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.vector is None) == (self.item_id is None):
            raise ValueError("give exactly one of 'vector' and 'item_id'")
        return self


class SearchRequest(SearchOptions):
    queries: list[Query] = Field(min_length=1, max_length=256, description="a batch of queries")


class Hit(Out):
    id: int
    score: float = Field(description="cosine similarity to the query")
    rerank_score: float | None = Field(None, description="with rerank, what the hits are ordered by: cosine "
                                                         "similarity to the expanded query (aqe, alpha_qe), or "
                                                         "1 - the k-reciprocal distance (kreciprocal)")
    path: str | None
    label: str | None
    camera: str | None
    attributes: dict[str, Any]
    thumbnail_url: str


class Group(Out):
    label: str | None
    score: float = Field(description="the group's best score")
    hits: list[Hit]


class QueryResult(Out):
    hits: list[Hit]
    groups: list[Group] | None = None


QUERY_NET_FIELD = ("the query network to encode with, by its name in /v1/info's query_nets (default: the "
                   "server's first)")


class SearchResponse(Out):
    gallery: str
    query_net: str = Field(description="the network that encoded the queries: backbone, dimension, input size "
                                       "('vector' when given as vectors or items)")
    query_net_name: str | None = Field(None, description="its name, as a request's query_net names it "
                                                         "(null when given as vectors or items)")
    took_ms: float
    results: list[QueryResult]


class Encoded(Out):
    query_net: str
    query_net_name: str = Field(description="the query network's name, as a request's query_net names it")
    dim: int
    vectors: list[list[float]]


# ------------------------------------------------------------------------------------------ service
class Cost(Out):
    """What an encoder costs per image (:func:`asymret.retrieval.cost.encoder_cost`)."""

    params: int = Field(description="parameters that compute the embedding")
    gflops: float = Field(description="GFLOPs of one image's embedding (a multiply-add is 2 FLOPs)")
    input: list[int] = Field(description="the [height, width] counted")


class QueryNetInfo(Out):
    name: str = Field(description="what a search request's query_net field names it by")
    description: str = Field(description="backbone, dimension, input size")
    default: bool = Field(description="whether a request naming no query network gets this one")
    spec: dict
    cost: Cost
    pair: dict = Field(description="its pair file's metadata (run, created, asymret version)")


class Info(Out):
    query_net: dict = Field(description="the default query network's spec")
    query_net_name: str = Field(description="the default query network's description")
    query_nets: list[QueryNetInfo] = Field(description="every query network served, the default first; all "
                                                       "search the gallery network's space")
    gallery_net: dict
    gallery_net_cost: Cost
    dim: int
    whitening: str | None
    pair: dict = Field(description="the pair file's metadata (run, created, asymret version)")
    limits: dict[str, Any]
    keys_for_reads: bool


class Health(Out):
    status: str


class Ready(Out):
    ready: bool
    galleries: int
    error: str | None = None
