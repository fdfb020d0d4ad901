"""YAML configs with ``_base_`` inheritance and ``key.sub=value`` overrides, validated by pydantic.

Conventions (as mmcv/detectron users know them):

* ``_base_: ../base.yaml`` or a list of files, paths relative to the file that names them; bases
  are merged in order, then the file itself on top; several levels deep; cycles are an error.
* Mappings merge recursively; any other value (lists included) replaces. ``_delete_: true`` inside a
  mapping replaces the inherited mapping instead of merging into it.
* Overrides ``a.b=value`` parse ``value`` as YAML (``3``, ``true``, ``[1, 2]``, ``null``) and win
  over every file; a number indexes a list (``loss.1.weight=0.5``: the second of several losses).
* Errors name the dotted key path and the file (or "command line") that set the value.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from asymret.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

CLI = "command line"


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a directory, not a YAML file: {path}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys, got {type(data).__name__}")
    return data


def _merge(base: dict, top: dict, origins: dict, top_origins: dict, prefix: str = "") -> dict:
    """Merge ``top`` into a copy of ``base``; ``origins`` maps dotted keys to the file that set them."""
    out = dict(base)
    for key, value in top.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and not value.get("_delete_") and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, origins, top_origins, path + ".")
        else:
            if isinstance(value, dict):
                value = {k: v for k, v in value.items() if k != "_delete_"}
            # a replaced subtree forgets where its old leaves came from
            for k in [k for k in origins if k == path or k.startswith(path + ".")]:
                del origins[k]
            out[key] = copy.deepcopy(value)
        for k, src in top_origins.items():
            if k == path or k.startswith(path + "."):
                origins[k] = src
    return out


def _origins_of(tree: Any, source: str, prefix: str = "") -> dict[str, str]:
    found = {prefix.rstrip("."): source} if prefix else {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            found.update(_origins_of(value, source, f"{prefix}{key}."))
    return found


def load_tree(path: str | Path, _stack: tuple[Path, ...] = ()) -> tuple[dict, dict[str, str]]:
    """Read ``path`` with its ``_base_`` chain resolved. Returns (tree, origins)."""
    path = Path(path).expanduser().resolve()
    if path in _stack:
        chain = " -> ".join(str(p) for p in (*_stack, path))
        raise ConfigError(f"_base_ cycle: {chain}")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a file name or a list of file names")
    tree: dict = {}
    origins: dict[str, str] = {}
    for base in bases:
        base_path = (path.parent / base).resolve()
        if not base_path.is_file():
            raise ConfigError(f"{path}: _base_ file '{base}' not found (looked for {base_path})")
        base_tree, base_origins = load_tree(base_path, (*_stack, path))
        tree = _merge(tree, base_tree, origins, base_origins)
    tree = _merge(tree, data, origins, _origins_of(data, str(path)))
    return tree, origins


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], parsed value)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _list_index(node: list, key: str, text: str, where: str) -> int:
    """``key`` as an index into the list ``node`` (``loss.1.weight`` is the second loss's weight)."""
    if not key.isdigit() or int(key) >= len(node):
        raise ConfigError(f"override '{text}': '{where}' is a list of {len(node)}; index it with 0 to {len(node) - 1}")
    return int(key)


def _set(tree: dict, keys: list[str], value: Any, text: str) -> None:
    """``tree[k0][k1]... = value``, making missing sections; ``text`` names the override in errors."""
    node = tree
    for depth, key in enumerate(keys[:-1]):
        where = ".".join(keys[: depth + 1])
        if isinstance(node, list):
            child = node[_list_index(node, key, text, ".".join(keys[:depth]))]
        else:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"override '{text}': '{where}' is a value, not a section")
        node = child
    if isinstance(node, list):
        node[_list_index(node, keys[-1], text, ".".join(keys[:-1]))] = value
    else:
        node[keys[-1]] = value


def apply_overrides(tree: dict, overrides: Iterable[str], origins: dict[str, str]) -> dict:
    """Set each ``a.b=value``; a key part that is a number indexes a list (``loss.0.weight=4``)."""
    tree = copy.deepcopy(tree)
    for text in overrides:
        keys, value = parse_override(text)
        _set(tree, keys, value, text)
        origins[".".join(keys)] = CLI
    return tree


def apply_values(tree: dict, values: Mapping[str, Any], origins: dict[str, str], source: str) -> dict:
    """Like :func:`apply_overrides` for values already parsed (``{"acd.alpha": 3.0}``), set by ``source``."""
    tree = copy.deepcopy(tree)
    for key, value in values.items():
        keys = str(key).split(".")
        if not key or any(not part for part in keys):
            raise ConfigError(f"{source}: key '{key}' must look like key.sub")
        _set(tree, keys, copy.deepcopy(value), f"{key} (in {source})")
        origins[key] = source
    return tree


def _origin(loc: tuple, origins: dict[str, str], default: str) -> str:
    parts = [str(p) for p in loc]
    while parts:
        key = ".".join(parts)
        if key in origins:
            return origins[key]
        parts.pop()
    return default


def validate(tree: dict, model: type[M], origins: dict[str, str] | None = None, source: str = "") -> M:
    """Validate ``tree`` against ``model``; errors name each key path and where it was set."""
    origins = origins or {}
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = err["loc"]
            key = ".".join(str(p) for p in loc) or "<root>"
            where = _origin(loc, origins, source or "config")
            if err["type"] == "extra_forbidden":
                msg = f"unknown key '{key}' (set in {where}); check its spelling and section"
            elif err["type"] == "missing":
                msg = f"missing required key '{key}' (in {where})"
            else:
                value = err.get("input")
                shown = repr(value) if not isinstance(value, dict) else "a mapping"
                msg = f"'{key}' = {shown} (set in {where}): {err['msg']}"
            lines.append(msg)
        raise ConfigError("; ".join(lines)) from None


def load_config(path: str | Path, overrides: Iterable[str] = (), model: type[M] | None = None) -> M | dict:
    """Read a config file, resolve ``_base_``, apply overrides and validate it against ``model``."""
    tree, origins = load_tree(path)
    tree = apply_overrides(tree, overrides, origins)
    if model is None:
        return tree
    return validate(tree, model, origins, str(path))


def dump_config(config: BaseModel | dict) -> str:
    """The resolved config as YAML, in field order, as it would be written to a run folder."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, allow_unicode=True)
