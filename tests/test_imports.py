"""Imports go one way: no import circle in evomerge, and no import of evomerge inside a function outside cli.py.

An import inside a function is how a circle hides (the two modules load, each
later reaching for the other); cli.py keeps its heavy per-command imports lazy
so `evomerge --help` is fast. Third-party imports inside functions (an optional
extra, a slow library only one path needs) are not circles and stay allowed.
The layers themselves (which package may import which) are in docs/DESIGN.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "evomerge"
LAZY_ALLOWED = {"evomerge.cli"}

#: docs/DESIGN.md's layers: a package (or top-level module) may import only those listed for it.
LAYERS = {
    "errors": set(),
    "console": {"errors"},
    "files": {"errors"},
    "batching": {"errors", "console"},
    "benchmarks": {"errors", "console", "files", "batching"},
    "merge": {"errors", "console", "files"},
    "dataflow": {"errors", "console", "files", "merge", "export"},
    "export": {"errors", "console", "files", "merge"},
    "zoo": {"errors", "console", "files", "benchmarks"},
    "estimate": {"errors", "console", "files", "benchmarks", "merge", "zoo"},
    "search": {"errors", "console", "files", "benchmarks", "merge", "dataflow", "export", "estimate"},
    "report": {"errors", "console", "files", "merge", "estimate", "search"},
    "evaluation": {"errors", "console", "files", "benchmarks", "search"},
    "trial_export": {"errors", "console", "files", "export", "search", "report"},
    "demo": {"errors", "console", "files", "estimate", "evaluation", "merge", "search", "trial_export", "zoo"},
    "cli": None,  # the top: may import anything
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _resolve(name: str, modules: dict) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(modules: dict) -> list[tuple[str, str, bool, int]]:
    """(importer, imported evomerge module, inside a function, line) for every import of evomerge."""
    edges = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]

        def visit(node, in_function):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    if isinstance(child, ast.Import):
                        targets = [alias.name for alias in child.names]
                    else:
                        base = child.module or ""
                        if child.level:
                            parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                            base = ".".join(parts + ([base] if base else []))
                        targets = [f"{base}.{alias.name}" for alias in child.names]
                    for target in targets:
                        resolved = _resolve(target, modules) if target.startswith("evomerge") else None
                        if resolved and resolved != name:
                            edges.append((name, resolved, in_function, child.lineno))
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

        visit(ast.parse(path.read_text()), False)
    return edges


def test_no_import_circle():
    modules = _modules()
    graph: dict[str, set] = {name: set() for name in modules}
    for importer, imported, _, _ in _imports(modules):
        graph[importer].add(imported)
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)


def test_no_evomerge_import_inside_a_function():
    lazy = [f"{importer} line {line} imports {imported}" for importer, imported, inside, line
            in _imports(_modules()) if inside and importer not in LAZY_ALLOWED]
    assert not lazy, "imports inside functions (move them to the top of the module):\n" + "\n".join(lazy)


def test_packages_import_only_the_layers_below_them():
    def layer(module: str) -> str:
        return module.split(".")[1] if "." in module else module

    wrong = []
    for importer, imported, _, line in _imports(_modules()):
        mine, theirs = layer(importer), layer(imported)
        allowed = LAYERS.get(mine, set())
        if mine != theirs and allowed is not None and theirs not in allowed:
            wrong.append(f"{importer} line {line} imports {imported} ({mine} may import: {sorted(allowed)})")
    assert not wrong, "\n".join(wrong)
