"""What pyproject.toml promises: runtime dependencies are what asymret imports, and the docs it names exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def imported_top_level_modules() -> set[str]:
    names = set()
    for path in (ROOT / "asymret").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
    return names


def requirement_name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower()


def test_test_only_packages_are_dev_extras_not_runtime_dependencies():
    project = pyproject()["project"]
    runtime = {requirement_name(r) for r in project["dependencies"]}
    dev = {requirement_name(r) for r in project["optional-dependencies"]["dev"]}
    assert "pytorch_metric_learning" not in imported_top_level_modules()  # only the loss tests compare with it
    assert "pytorch-metric-learning" not in runtime and "pytorch-metric-learning" in dev


def test_docs_that_pyproject_points_to_exist():
    named = set(re.findall(r"docs/[\w./-]+\.md", (ROOT / "pyproject.toml").read_text()))
    assert "docs/install.md" in named
    assert [doc for doc in sorted(named) if not (ROOT / doc).is_file()] == []
