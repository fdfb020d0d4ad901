"""``asymret serve`` settings: :class:`ServeConfig` (a YAML file, with the command's flags built from it and
laid on top) and the ``NAME=PATH`` form of a pair entry."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

QUERY_NET_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"  # what NAME=PATH may name a query network


def pair_entry(entry: str | Path) -> tuple[str | None, Path]:
    """``(name, path)`` of a ``pair``/``pairs`` entry: ``PATH`` or ``NAME=PATH`` (an existing file
    whose own name holds '=' stays a path)."""
    text = str(entry)
    name, sep, path = text.partition("=")
    if sep and re.fullmatch(QUERY_NET_NAME, name) and not Path(text).expanduser().is_file():
        return name, Path(path)
    return None, Path(text)


class ServeConfig(BaseModel):
    """``asymret serve`` settings (a YAML file, flags on top)."""

    model_config = ConfigDict(extra="forbid")

    pair: Path | None = Field(None, description="pair.pt written by asymret train: both networks and the "
                                                "whitening; its query network is the default one ('NAME=PATH' "
                                                "names it)")
    pairs: list[Path] = Field(default_factory=list, description="more pairs whose query networks search the "
                                                                "same gallery network's galleries, after 'pair'")
    galleries: Path = Field(Path("galleries"), description="folder of the gallery store")
    db_url: str | None = Field(None, description="SQLAlchemy URL of the metadata; SQLite in the folder by default",
                               json_schema_extra={"flag": "--db"})
    backend: Literal["faiss", "milvus"] = Field("faiss", description="where galleries live: FAISS files + SQL "
                                                "metadata, or Milvus (needs the [milvus] extra; docs/scale.md)")
    uri: str | None = Field(None, description="with backend milvus: a Milvus Lite file (default "
                                              "<galleries>/galleries.milvus.db) or http://host:19530")
    token: str | None = Field(None, description="with backend milvus: the server's token (user:password)")
    host: str = Field("127.0.0.1", description="interface to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the networks run (auto: a GPU if any)")
    api_keys: list[str] = Field(default_factory=list, description="a key accepted in the X-API-Key header "
                                "(repeatable; also ASYMRET_API_KEYS, comma-separated, which keeps keys out of ps)",
                                json_schema_extra={"flag": "--api-key"})
    keys_for_reads: bool = Field(False, description="ask for a key on reads (search, get) too, not just writes")
    allowed_roots: list[Path] = Field(default_factory=list, description="a folder items may be added from by "
                                      "server path (repeatable)", json_schema_extra={"flag": "--allow-root"})
    max_request_mb: float = Field(32.0, gt=0, description="largest request body (all uploads together)")
    max_image_mb: float = Field(16.0, gt=0, description="largest single image file")
    max_image_pixels: int = Field(40_000_000, gt=0, description="width x height limit, checked from the header")
    image_formats: list[str] = Field(["JPEG", "PNG", "WEBP", "GIF", "BMP"], min_length=1,
                                     description="an accepted image format, as PIL names it (repeatable)",
                                     json_schema_extra={"flag": "--image-format"})
    max_batch: int = Field(32, ge=1, description="most query images encoded in one forward pass (1: no coalescing)")
    max_wait_ms: float = Field(2.0, ge=0, description="longest a query waits for others to join its batch")
    thumbnail_px: int = Field(160, ge=16, le=1024, description="longer side of the thumbnails the page shows")
    torch_threads: int = Field(0, ge=0, description="intra-op threads of the networks (0: torch's default, one "
                                                   "per core); 1 suits a CPU shared with other work")
    runtime: Literal["torch", "onnx"] = Field("torch", description="what encodes the queries: PyTorch, or ONNX "
                                               "Runtime on the query network exported at start-up "
                                               "(asymret export; needs the [onnx] extra)")
    ready_timeout_s: float = Field(2.0, gt=0, description="how long /readyz waits for the metadata database "
                                                          "to answer its probe before answering 503")
    search_threads: int = Field(1, ge=1, description="FAISS threads per search: concurrency comes from the "
                                                     "requests, and waking a thread team costs more than a "
                                                     "small search (raise it for large batch searches)")

    @model_validator(mode="after")
    def _some_pair(self):
        if self.pair is None and not self.pairs:
            raise ValueError("no pair file; give 'pair' (or 'pairs'), the pair.pt a training run wrote")
        return self

    def pair_entries(self) -> list[tuple[str | None, Path]]:
        """``(name or None, path)`` of every pair to serve, the default (first) one first."""
        return [pair_entry(e) for e in ([self.pair] if self.pair is not None else []) + list(self.pairs)]
