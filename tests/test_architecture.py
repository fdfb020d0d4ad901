"""The layering of shared/DESIGN.md and docs/architecture.md, checked on the source: which package may import
which, no private name imported across modules, and module size.

Layers, each importing only those below it (``api`` may import all): ``index`` < ``retrieval`` < ``training`` <
``api``; no layer but ``api`` skips one (``training`` reaches ``index`` through ``retrieval``). The top-level
modules (``errors``, ``config``, ``runtime``, ``files``, ...) import no layer, and every layer may import them.
``mini`` (the bundled benchmark renderer) sits beside the layers: it may import ``retrieval`` and ``index``, and
only ``api`` imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "asymret"
LAYERS = {"index": 0, "retrieval": 1, "training": 2, "api": 3}
MAX_LINES = 450
REASON = "Over 450 lines"  # how the docstring sentence that says why a module is longer begins


def modules():
    return sorted(PACKAGE.rglob("*.py"))


def group(path_or_module) -> str:
    """``index``/``retrieval``/``training``/``api``/``mini``, or ``top`` for the shared top-level modules."""
    if isinstance(path_or_module, Path):
        parts = path_or_module.relative_to(PACKAGE).parts
        if parts == ("__main__.py",):
            return "api"  # ``python -m asymret``: the command line
    else:
        parts = path_or_module.split(".")[1:]
    return parts[0] if len(parts) > 1 or (parts and parts[0] in LAYERS) else "top"


def imports(path: Path):
    """``(line, imported module, imported names)`` of every ``asymret`` import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = ["asymret", *path.relative_to(PACKAGE).with_suffix("").parts]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("asymret"):
                    yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = here[:-node.level] if path.name != "__init__.py" else here[:len(here) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            if module.startswith("asymret"):
                yield node.lineno, module, [a.name for a in node.names]


def allowed(source: str, target: str) -> bool:
    if target == "top" or source == target:
        return True
    if source == "top":
        return False
    if source == "mini":
        return target in ("retrieval", "index")
    if target == "mini":
        return source == "api"
    if source not in LAYERS or target not in LAYERS:
        return False
    below = LAYERS[source] - LAYERS[target]
    return below >= 0 and (source == "api" or below <= 1)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path):
    source = group(path)
    wrong = [f"line {line}: {module}" for line, module, _ in imports(path)
             if module != "asymret" and not allowed(source, group(module))]
    assert not wrong, f"{path.relative_to(PACKAGE)} ({source}) imports across the layering: {wrong}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_name_is_imported_from_another_module(path):
    private = [f"line {line}: {module}.{name}" for line, module, names in imports(path) for name in names
               if name.startswith("_") and not name.startswith("__")]
    private += [f"line {line}: {module}" for line, module, _ in imports(path)
                if any(p.startswith("_") and not p.startswith("__") for p in module.split("."))]
    assert not private, f"{path.relative_to(PACKAGE)} imports private names: {private}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_module_over_450_lines_says_why(path):
    lines = len(path.read_text().splitlines())
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert lines <= MAX_LINES or REASON in doc, (
        f"{path.relative_to(PACKAGE)} has {lines} lines; split it by job, or give the reason in its docstring "
        f"('{REASON} ...')")


def test_the_checks_see_a_violation():
    """The checker itself: a training module importing index, a retrieval module importing training, and a
    private import are each caught; api importing anything is not."""
    assert not allowed("training", "index") and not allowed("retrieval", "training")
    assert allowed("api", "index") and allowed("training", "retrieval") and allowed("mini", "retrieval")
    assert not allowed("retrieval", "mini") and not allowed("top", "index")
    assert group("asymret.index.store") == "index" and group("asymret.errors") == "top"
    assert group(PACKAGE / "retrieval" / "datasets" / "acd.py") == "retrieval" and group(PACKAGE / "config.py") == "top"


def test_docs_architecture_names_every_module():
    table = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    missing = [str(p.relative_to(PACKAGE)) for p in modules()
               if p.name != "__main__.py" and f"`{p.relative_to(PACKAGE)}`" not in table]
    assert not missing, f"docs/architecture.md's module table leaves out {missing}; add a row for each"
