"""No import cycles between the parts of remem_ray, lazy imports included.

An import inside a function hides a cycle from the interpreter without removing it: the two
parts still need each other to be understood, tested or moved. So the graph is read from the
source with every import statement counted wherever it sits, except under `if TYPE_CHECKING:`
(those never run). Importing a submodule implicitly imports its parent package first; that
edge is left out, as is the root package, whose __init__ reaches its submodules only by name.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

import remem_ray

ROOT = "remem_ray"
SOURCE = Path(remem_ray.__file__).parent
PACKAGES = ("remem_ray.train", "remem_ray.sweep", "remem_ray.insight", "remem_ray.data", "remem_ray.storage")
# What insight, the maths leaf, may import: the model helpers that find a ViT's MLP blocks.
INSIGHT_MAY_IMPORT = {"remem_ray.models", "remem_ray.timm_adapter"}

Graph = dict[str, dict[str, str]]  # importer -> {imported: "file:line" of the first such import}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(SOURCE.rglob("*.py")):
        parts = path.relative_to(SOURCE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom in the tree, at any depth, except those only type checkers run."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _import_nodes(ast.Module(body=[child], type_ignores=[]))
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from _import_nodes(node)


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    """The modules an import statement loads (`from pkg import mod` loads pkg.mod)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the importing module's package upwards
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[: len(package) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def import_graph(node_of) -> Graph:
    """Edges between the nodes `node_of` maps module names to (None: not a node)."""
    modules = _modules()
    graph: Graph = defaultdict(dict)
    for module, path in modules.items():
        source = node_of(module)
        if source is None:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _import_nodes(tree):
            for target in _targets(node, module, path.name == "__init__.py", modules):
                imported = node_of(target)
                if imported is not None and imported != source:
                    site = f"{path.relative_to(SOURCE.parent)}:{node.lineno}"
                    graph[source].setdefault(imported, site)
    return dict(graph)


def part_of(module: str) -> str | None:
    """A subpackage (remem_ray.train) or a top-level module (remem_ray.config); None outside."""
    parts = module.split(".")
    if parts[0] != ROOT or len(parts) == 1:
        return None
    return ".".join(parts[:2])


def module_of(module: str) -> str | None:
    return module if module.split(".")[0] == ROOT and module != ROOT else None


def find_cycle(graph: Graph) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None if the graph is acyclic."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph.get(node, {})):
            if nxt in on_path:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in done and (cycle := visit(nxt)):
                return cycle
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (cycle := visit(start)):
            return cycle
    return None


def _describe(cycle: list[str], graph: Graph) -> str:
    steps = [f"  {a} -> {b}  ({graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return "import cycle:\n" + "\n".join(steps)


def test_the_named_packages_are_parts():
    """Guards the tests below against a renamed package they would silently stop checking."""
    parts = {part_of(m) for m in _modules()}
    assert set(PACKAGES) <= parts


@pytest.mark.parametrize("granularity", [part_of, module_of], ids=["packages", "modules"])
def test_no_import_cycle(granularity):
    """Between subpackages and top-level modules (the packages' layering), and between modules."""
    graph = import_graph(granularity)
    cycle = find_cycle(graph)
    assert cycle is None, _describe(cycle, graph)


def test_insight_is_a_leaf():
    imported = set(import_graph(part_of).get("remem_ray.insight", {}))
    assert imported <= INSIGHT_MAY_IMPORT, f"remem_ray.insight imports {sorted(imported - INSIGHT_MAY_IMPORT)}"


def test_find_cycle_reports_the_path():
    graph = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:2"}, "c": {"a": "c.py:3"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert "b -> c  (b.py:2)" in _describe(["a", "b", "c", "a"], graph)
    assert find_cycle({"a": {"b": "a.py:1"}, "b": {}}) is None


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_on_its_own(package):
    """Each package imports first in a fresh interpreter: no import order hides a cycle."""
    result = subprocess.run([sys.executable, "-c", f"import {package}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
