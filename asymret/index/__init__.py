"""Vectors and their metadata: FAISS indices and the SQL metadata store.

Knows nothing about images or networks: imports neither torch models nor ``retrieval``.

* :class:`VectorIndex` (``vectors``): one FAISS factory string, stable 64-bit ids, add/remove/search,
  per-call ``nprobe``/``efSearch``, GPU when present, atomic save and memory-mapped load;
  :func:`recommend_index` picks a factory string for a collection size and memory budget.
* :func:`topk_inner_product` (``topk``): exact blocked top-k over numpy arrays, memory bounded.
* :class:`GalleryStore` / :class:`Gallery` (``store``): an index plus its SQL metadata (SQLite or any
  SQLAlchemy URL), kept consistent by a write-ahead journal; metadata filters on search.
* :func:`synthetic_embeddings` (``synthetic``): deterministic R1M-scale distractors without images.
* :func:`open_store` (``backend``): the gallery-backend interface (:class:`StoreBackend`,
  :class:`GalleryBackend`) over ``faiss`` (``store``) or ``milvus`` (``milvus``: a Milvus server or
  Milvus Lite file; pymilvus imported only there, only when used).
"""

from asymret.index.backend import GalleryBackend, StoreBackend, open_store
from asymret.index.recommend import IndexRecommendation, index_memory, recommend_index
from asymret.index.rows import Hit, Item
from asymret.index.store import Gallery, GalleryStore
from asymret.index.synthetic import iter_synthetic_embeddings, synthetic_embeddings
from asymret.index.topk import topk_inner_product
from asymret.index.vectors import VectorIndex

__all__ = [
    "Gallery", "GalleryBackend", "GalleryStore", "Hit", "IndexRecommendation", "Item", "StoreBackend", "VectorIndex",
    "index_memory", "iter_synthetic_embeddings", "open_store", "recommend_index", "synthetic_embeddings",
    "topk_inner_product",
]
