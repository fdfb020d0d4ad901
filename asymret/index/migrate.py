"""Bring a store's tables written by an older asymret up to date, in place; old stores keep opening.

Each step is idempotent and safe when two processes open the same store at once (one ALTER wins,
the other sees "duplicate column" / "already exists" and goes on). Steps:

1. ``items.sha256`` (the SHA-256 of the image file's bytes, NULL for rows written before it) and
   the index ``ix_items_path (gallery_id, path)`` that finds stored (path, sha256) pairs: what makes
   a rerun of ``asymret index add`` skip the images already stored.
"""

from __future__ import annotations

import sqlalchemy as sa

_RACE = ("duplicate column", "already exists", "duplicate")


def upgrade(engine: sa.engine.Engine, items: sa.Table, schema: str | None = None) -> list[str]:
    """Apply the missing steps to ``items`` (in ``schema`` on PostgreSQL); returns what was done."""
    done = []
    columns = {c["name"] for c in sa.inspect(engine).get_columns("items", schema=schema)}
    if "sha256" not in columns:
        table = f'"{schema}".items' if schema else "items"
        _tolerant(engine, lambda conn: conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN sha256 VARCHAR(64)")))
        done.append("items.sha256")
    indexes = {i["name"] for i in sa.inspect(engine).get_indexes("items", schema=schema)}
    if "ix_items_path" not in indexes:
        index = next(i for i in items.indexes if i.name == "ix_items_path")
        _tolerant(engine, lambda conn: index.create(conn, checkfirst=True))
        done.append("ix_items_path")
    return done


def _tolerant(engine, step) -> None:
    try:
        with engine.begin() as conn:
            step(conn)
    except (sa.exc.OperationalError, sa.exc.ProgrammingError) as exc:
        if not any(word in str(exc).lower() for word in _RACE):
            raise
