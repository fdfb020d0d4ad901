"""What the SQL metadata store holds: the ``galleries`` and ``items`` tables, an item's row as a caller
gives it (checked by :func:`validate_rows`, shared by every backend), the :class:`Item` and :class:`Hit` a
search returns, and metadata filters as SQL conditions (:func:`where_clauses`)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import sqlalchemy as sa

from asymret.errors import InputError

metadata = sa.MetaData()
galleries = sa.Table(
    "galleries", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("dim", sa.Integer, nullable=False),
    sa.Column("factory", sa.String(128), nullable=False),
    sa.Column("metric", sa.String(8), nullable=False),
    sa.Column("network_spec", sa.JSON),
    sa.Column("network_hash", sa.String(64)),
    sa.Column("last_seq", sa.BigInteger, nullable=False),  # last committed journal record
    sa.Column("next_id", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)
items = sa.Table(
    "items", metadata,
    sa.Column("gallery_id", sa.Integer, sa.ForeignKey("galleries.id"), primary_key=True),
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("path", sa.Text),
    sa.Column("label", sa.String(255)),
    sa.Column("camera", sa.String(64)),
    sa.Column("attributes", sa.JSON),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("sha256", sa.String(64)),  # of the image file's bytes: reruns skip what is stored (migrate.py)
    sa.Index("ix_items_label", "gallery_id", "label"),
    sa.Index("ix_items_camera", "gallery_id", "camera"),
    sa.Index("ix_items_path", "gallery_id", "path"),
)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ROW_KEYS = ("path", "label", "camera", "attributes", "sha256")


@dataclass(frozen=True)
class Item:
    """One gallery item's metadata."""

    id: int
    path: str | None
    label: str | None
    camera: str | None
    attributes: dict
    created_at: datetime
    sha256: str | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "created_at": self.created_at.isoformat()}


@dataclass(frozen=True)
class Hit:
    """One search result: the item and its cosine similarity to the query."""

    id: int
    score: float
    item: Item

    def to_dict(self) -> dict:
        return {"id": self.id, "score": self.score, **self.item.to_dict()}


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def spec_hash(network_spec: Mapping | None) -> str | None:
    """SHA-256 of the canonical JSON of a gallery network's spec: equal specs, equal hashes."""
    if network_spec is None:
        return None
    canonical = json.dumps(network_spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def as_json(value, what: str) -> dict | None:
    """A JSON mapping (a pydantic model is dumped first), as the database will store it."""
    if value is not None and hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    if value is not None and not isinstance(value, Mapping):
        raise InputError(f"{what} must be a mapping of JSON values, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(value)) if value is not None else None
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} must hold only JSON values ({exc})") from None


def validate_rows(rows, n: int) -> list[dict]:
    rows = [{}] * n if rows is None else list(rows)
    if len(rows) != n:
        raise InputError(f"got {n} vectors but {len(rows)} metadata rows; give one row per vector")
    out = []
    for row in rows:
        if not isinstance(row, Mapping) or set(row) - set(ROW_KEYS):
            extra = sorted(set(row) - set(ROW_KEYS)) if isinstance(row, Mapping) else type(row).__name__
            raise InputError(f"metadata rows are mappings with keys {', '.join(ROW_KEYS)}; got {extra} "
                             "(put anything else under 'attributes')")
        sha = row.get("sha256")
        if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
            raise InputError("a row's 'sha256' must be 64 lower-case hex digits (hashlib.sha256(data).hexdigest())")
        out.append({"path": text(row.get("path")), "label": text(row.get("label")),
                    "camera": text(row.get("camera")), "sha256": sha,
                    "attributes": as_json(row.get("attributes") or {}, "a row's 'attributes'")})
    return out


def text(value) -> str | None:
    return None if value is None else str(value)


# ------------------------------------------------------------------------------------- filters
def where_clauses(filters: Mapping) -> list:
    """SQL conditions for ``{"label": v, "camera": [v1, v2], "attributes": {"key": v}}``.

    A list means any of its values; label, camera and path compare as text, attributes by JSON type.
    """
    clauses = []
    for key, value in filters.items():
        if key in ("label", "camera", "path"):
            clauses.append(match_any(lambda v, c=items.c[key]: c == text(v), value))
        elif key == "attributes" and isinstance(value, Mapping):
            for name, wanted in value.items():
                clauses.append(match_any(lambda v, n=name: json_equals(items.c.attributes[n], v), wanted))
        else:
            raise InputError(f"cannot filter on '{key}'; filters take label, camera, path and "
                             "attributes (a mapping of attribute name to value)")
    return clauses


def match_any(equals, value):
    values = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]
    return sa.or_(*(equals(v) for v in values)) if values else sa.false()


def json_equals(element, value):
    if isinstance(value, bool):
        return element.as_boolean() == value
    if isinstance(value, int):
        return element.as_integer() == value
    if isinstance(value, float):
        return element.as_float() == value
    if isinstance(value, str):
        return element.as_string() == value
    raise InputError(f"attribute filters compare to text, numbers or booleans, got {type(value).__name__}")
