"""The package's import graph, read from the source: no module may import itself back through
others (a cycle makes import order matter and ties the parts of the pipeline together)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "powergrad_train"


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    """Inside `if TYPE_CHECKING:`: names for annotations, never imported at run time."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at the top or inside functions: `import p.x`,
    `from p.x import y`, `from p import x` (x a module) and relative imports."""
    modules = {_module_name(p, package): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(tree):
            if _type_checking_only(node, parents):
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[:len(here.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                # `import p.a.b` imports p and p.a too; the nearest module the name reaches is the edge
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state = {}  # module -> "open" while on the path, "done" when all it reaches is checked
    path = []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_reader_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "powergrad_train"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import c\n")
    (pkg / "a.py").write_text("import powergrad_train.b\n")
    (pkg / "b.py").write_text("def f():\n    from powergrad_train.sub.c import x\n")
    (pkg / "sub" / "c.py").write_text("from powergrad_train import a\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from powergrad_train import a\n")
    graph = import_graph(pkg)
    assert graph["powergrad_train.a"] == {"powergrad_train.b"}
    assert graph["powergrad_train.b"] == {"powergrad_train.sub.c"}
    assert graph["powergrad_train.sub.c"] == {"powergrad_train.a"}
    assert graph["powergrad_train.sub"] == {"powergrad_train.sub.c"}
    assert graph["powergrad_train.d"] == set()
    assert find_cycle(graph) == ["powergrad_train.a", "powergrad_train.b", "powergrad_train.sub.c", "powergrad_train.a"]


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "powergrad_train.reproduction.report" in graph and "powergrad_train.config.schema" in graph  # the package was read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(m.removeprefix("powergrad_train.") for m in cycle)


# The layers, lowest first: a module imports its own layer and the ones below, never one above.
LAYERS = ("pgt", "system", "config", "data", "training", "reproduction", "cli")


def layer_of(module: str) -> int:
    name = module.removeprefix("powergrad_train").lstrip(".").split(".")[0]
    return LAYERS.index(name) if name in LAYERS else -1  # the package itself and __main__: outside the layers


def test_no_layer_imports_one_above_it():
    """The folders are the architecture: system < config < data < training < reproduction < cli (the PGT
    library below them all); an import upwards would tie a lower layer to a higher one's changes."""
    graph = import_graph()
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                    if layer_of(a) >= 0 and layer_of(b) > layer_of(a))
    assert upward == []


def test_the_layer_check_sees_an_upward_import():
    assert layer_of("powergrad_train.system.dist") < layer_of("powergrad_train.training.engine")
    assert layer_of("powergrad_train.pgt") < layer_of("powergrad_train.system.errors")
    assert layer_of("powergrad_train.__main__") == -1
