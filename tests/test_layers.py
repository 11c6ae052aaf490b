"""The tree is the import graph: each top-level folder is one layer and imports only the layers below it.

core <- pruner, latency <- train <- search <- pipeline <- cli (pruner and
latency never import each other). No module calls another package's private
(``_name``) functions. Lazy imports inside functions count like any other.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"core": 0, "pruner": 1, "latency": 1, "train": 2, "search": 3, "pipeline": 4, "cli": 5}
ROOT_PACKAGE = "updp"  # updp/__init__.py: the version; updp/__main__.py: the `python -m updp` entry point
ROOT_LEVEL = 0.5  # the package root re-exports from core only; any layer may read its __version__


def _package(module: str) -> str | None:
    """``updp.search.study`` -> ``search``; ``updp`` -> ``updp``; None outside the project."""
    parts = module.split(".")
    if parts[0] != "updp":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else ROOT_PACKAGE


def violations(package: str, source: str, where: str) -> list[str]:
    """What one module of ``package`` does wrong: imports up or sideways, private names of other packages."""
    found, aliases = [], set()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            found.append(f"{where}:{node.lineno}: relative import (write updp.{package}...)")
            continue
        if isinstance(node, ast.Import):
            targets = [(a.name, a.asname or a.name.split(".")[0], None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            targets = [(node.module, a.asname or a.name, a.name) for a in node.names]
        else:
            continue
        for module, bound, name in targets:
            other = _package(module if name is None else f"{module}.{name}")
            other = _package(module) if other == ROOT_PACKAGE and name else other
            if other is None or other == package:
                continue
            if other == ROOT_PACKAGE:
                if name not in ("__version__", "UpdpError"):
                    found.append(f"{where}:{node.lineno}: imports {name or module} from the package root")
                continue
            level = LAYERS.get(package, ROOT_LEVEL)
            if LAYERS[other] >= level:
                found.append(f"{where}:{node.lineno}: {package} (layer {level}) imports {other} "
                             f"(layer {LAYERS[other]}): only lower layers may be imported")
            if name and name.startswith("_") and not name.startswith("__"):
                found.append(f"{where}:{node.lineno}: imports the private {name} of {module}")
            aliases.add(bound)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{where}:{node.lineno}: uses the private {node.value.id}.{node.attr} of another package")
    return found


def _modules():
    for package in [*LAYERS, ROOT_PACKAGE]:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name != "__main__.py":  # an entry point: nothing imports it
                yield package, path


def test_every_module_imports_only_lower_layers_and_no_private_names():
    problems = [p for package, path in _modules()
                for p in violations(package, path.read_text(), str(path.relative_to(ROOT)))]
    assert not problems, "\n".join(problems)


def test_the_layers_are_the_packages_pyproject_maps():
    import tomllib

    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert {k.removeprefix("updp.") for k in mapping if k != "updp"} == set(LAYERS)
    assert all(mapping[f"updp.{name}"] == name for name in LAYERS)
    assert len(list(_modules())) > 50


@pytest.mark.parametrize("package, source, complaint", [
    ("pruner", "from updp.search.study import Objective", "pruner (layer 1) imports search"),
    ("latency", "def f():\n    import updp.pruner.merge\n", "latency (layer 1) imports pruner"),
    ("train", "from updp.pipeline import config", "train (layer 2) imports pipeline"),
    ("search", "from updp.pipeline.search import run_search", "search (layer 3) imports pipeline"),
    ("pipeline", "from updp.search.storage import _retry", "private _retry"),
    ("pipeline", "from updp.latency import interleave\ninterleave._load(1)", "private interleave._load"),
    ("core", "from .fileio import atomic_path", "relative import"),
])
def test_the_checker_finds_each_kind_of_violation(package, source, complaint):
    found = violations(package, source, "x.py")
    assert any(complaint in f for f in found), found


def test_the_checker_accepts_downward_imports():
    ok = ("from updp.core.errors import UpdpError\nfrom updp.pruner import PruningPlan\n"
          "from updp.latency.table import build_table\nfrom updp import __version__\n")
    assert violations("train", ok, "x.py") == []
