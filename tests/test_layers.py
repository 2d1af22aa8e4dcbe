"""The import graph keeps its layers: no cycles, nothing imports upward.

Like an import-linter layers contract, for every package of the tree (a
package that is not in :data:`LAYERS` fails the test, so a new one must be
placed). Imports inside functions count too. Pure: reads source, imports nothing.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("services", "router", "scaler", "monitor")

#: Package -> layer. A package may import its own layer's packages only where
#: :data:`SIBLINGS` allows, and any lower layer except where :data:`ONLY` narrows it.
LAYERS = {
    "services.common": 0,       # base: config, errors, server bootstrap, telemetry, stubs, windowed metrics
    "services.engine": 1,       # continuous batching
    "services.speculative": 2,  # proposer, rejection sampler, target/draft sync
    "services.parallel": 2,     # TP x PP ranks over torch.distributed, each running the engine's model runner
    "services.serving": 3,      # what the two model services share
    "services.target": 4,
    "services.draft": 4,
    "router": 4,
    "scaler": 4,
    "monitor": 4,
    "services.models": 5,       # tools: above everything, imported by nothing below
    "services.bench": 5,
    "services.cli": 5,
}
#: Packages that may import only these (besides themselves): the control
#: plane talks to the model services through the contract alone.
ONLY = {name: {"services.common"} for name in ("router", "scaler", "monitor")}
#: Same-layer imports that are allowed (the tools stack: cli on bench on models).
SIBLINGS = {("services.cli", "services.bench"), ("services.cli", "services.models"),
            ("services.bench", "services.models")}


def package_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] not in ROOTS:
        return None
    if parts[0] == "services":
        return ".".join(parts[:2]) if len(parts) > 1 else None
    return parts[0]


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; relative ones resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path).split(".")
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_package else here[:-1]
                base = base[:len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
    return found


def package_graph() -> dict[str, dict[str, set[str]]]:
    """package -> imported package -> the modules that import it."""
    graph: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            source = module_name(path)
            src_pkg = package_of(source)
            if src_pkg is None:
                continue
            graph[src_pkg]  # every package is a node, even one that imports nothing
            for target in imports_of(path):
                dst_pkg = package_of(target)
                if dst_pkg is not None and dst_pkg != src_pkg:
                    graph[src_pkg][dst_pkg].add(source)
    return graph


GRAPH = package_graph()


def test_every_package_has_a_layer():
    unplaced = sorted(set(GRAPH) - set(LAYERS))
    assert not unplaced, f"packages with no layer in tests/test_layers.py LAYERS: {unplaced}"


def test_no_cycles_between_packages():
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in GRAPH.get(node, {}):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"package cycles: {cycles}"


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_imports_point_down(package):
    wrong = []
    for target, sources in sorted(GRAPH.get(package, {}).items()):
        if target not in LAYERS:
            continue  # reported by test_every_package_has_a_layer
        allowed = LAYERS[target] < LAYERS[package] or (package, target) in SIBLINGS
        if package in ONLY:
            allowed = target in ONLY[package]
        if not allowed:
            wrong.append(f"{package} -> {target} (in {', '.join(sorted(sources))})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_the_graph_is_read():
    """The walk finds the edges it must (so the rules above are not vacuous)."""
    assert "services.common" in GRAPH["router"]
    assert "services.engine" in GRAPH["services.serving"]
    assert "services.common" in GRAPH["services.engine"]
