"""Milvus boolean expressions of the store's metadata filters and of exclusion rules.

The filters mean what :mod:`asymret.index.store` makes of them in SQL: a key's list is any of its
values, label/camera/path compare as text, attributes by JSON type. Every comparison with a field that
may be null is guarded with ``is not null``: Milvus's three-valued logic would make
``not (label == "a" and camera == "1")`` null, and drop the item, where its camera is null. Text is
written as JSON string literals, so quotes in a value cannot end it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np

from asymret.errors import InputError


def _literal(value) -> str:
    """A Milvus expression literal (text is JSON-quoted, so quotes in it cannot end it)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)) and np.isfinite(value):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise InputError(f"attribute filters compare to text, numbers or booleans, got {type(value).__name__}")


def _equals(field: str, value) -> str:
    """``field == value``, false (not null) where the field is null, as the SQL store compares."""
    return f"({field} is not null and {field} == {_literal(value)})"


def in_expression(field: str, values: Sequence[str]) -> str:
    """``field in [values]`` (text values, each JSON-quoted), false where the field is null."""
    return f"({field} is not null and {field} in [{', '.join(_literal(str(v)) for v in values)}])"


def filter_expression(filters: Mapping | None) -> str | None:
    """The Milvus expression of the store's filters (:func:`asymret.index.store` module doc)."""
    if not filters:
        return None
    parts = []
    for key, value in filters.items():
        values = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]
        if key in ("label", "camera", "path"):
            text = [str(v) for v in values]
            parts.append(f"({key} is not null and {key} in {json.dumps(text)})" if text else "id < 0")
        elif key == "attributes" and isinstance(value, Mapping):
            for name, wanted in value.items():
                options = list(wanted) if isinstance(wanted, (list, tuple, set, frozenset)) else [wanted]
                field = f"attributes[{json.dumps(str(name))}]"
                parts.append("(" + " or ".join(_equals(field, v) for v in options) + ")" if options else "id < 0")
        else:
            raise InputError(f"cannot filter on '{key}'; filters take label, camera, path and "
                             "attributes (a mapping of attribute name to value)")
    return " and ".join(parts)


def exclusion_expression(rules: Sequence[Mapping]) -> str | None:
    """The expression keeping what none of one query's exclusion rules (:mod:`asymret.index.backend`) drops."""
    parts = []
    for rule in rules:
        terms = [f"id == {int(v)}" if key == "id" else f"{key} is null" if v is None else _equals(key, v)
                 for key, v in rule.items()]
        parts.append("not (" + " and ".join(terms) + ")")
    return " and ".join(parts) or None
