"""Every third-party package the code imports is declared in pyproject.toml and pinned."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imported(folders: tuple[str, ...]) -> set[str]:
    """Top-level names of every absolute import outside the standard library and the project."""
    names: set[str] = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module.split(".")[0])
    # visionpipe_model: the copy of tasks/ that a registered MLflow model carries
    own = {"tasks", "flows", "tests", "benchmarks", "visionpipe_model"}
    return names - set(sys.stdlib_module_names) - own


def _undeclared(imports: set[str], declared: set[str]) -> dict[str, list[str]]:
    """Imports none of whose distributions is declared (mlflow is in mlflow and mlflow-skinny)."""
    found = packages_distributions()
    unknown = sorted(name for name in imports if name not in found)
    assert not unknown, f"imported but not installed: {unknown}"
    dists = {name: [d.lower().replace("_", "-") for d in found[name]] for name in imports}
    return {name: ds for name, ds in dists.items() if not set(ds) & declared}


def test_what_the_product_imports_is_a_runtime_dependency():
    declared = {_name(r) for r in PROJECT["dependencies"]}
    missing = _undeclared(_imported(("tasks", "flows")), declared)
    assert missing == {}, (
        f"imported by tasks/ or flows/ but not in [project] dependencies: {missing}"
    )


def test_what_tests_and_benchmarks_import_is_declared_too():
    declared = {_name(r) for r in PROJECT["dependencies"]}
    declared |= {_name(r) for r in PROJECT["optional-dependencies"]["dev"]}
    missing = _undeclared(_imported(("tests", "benchmarks")), declared)
    assert missing == {}, f"imported by tests/ or benchmarks/ but not declared: {missing}"


def test_every_declared_package_has_an_exact_pin_in_the_lock():
    lock = {
        _name(line): line.split("==", 1)[1].strip()
        for line in (ROOT / "requirements.lock").read_text().splitlines()
        if "==" in line and not line.lstrip().startswith("#")
    }
    requirements = [*PROJECT["dependencies"], *PROJECT["optional-dependencies"]["dev"]]
    unpinned = sorted(_name(r) for r in requirements if _name(r) not in lock)
    assert unpinned == []
