"""The package's seams: no import cycles among pgolf modules, and one CLI package.

Read from the source with ast, nothing imported: a cycle works in Python as long as nobody touches
a half-initialised module, so it shows up only on the import order that breaks it. An import under
`if TYPE_CHECKING:` is for annotations and is not an import; a package's implicit import of its
parent `__init__` is not counted either (no pgolf `__init__` imports anything but `pgolf.cli`'s,
whose submodules import only `pgolf.cli.common`, never the package itself).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pgolf

ROOT = Path(pgolf.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, ast.Name | ast.Attribute) and "TYPE_CHECKING" in ast.unparse(test)


def _imports(body: list[ast.stmt], lazy: bool):
    """The import statements `body` runs: at module level only, or also inside functions."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _imports(node.body, lazy)
            yield from _imports(node.orelse, lazy)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _imports(block, lazy)
        elif isinstance(node, ast.With | ast.For | ast.While | ast.ClassDef):
            # A class body runs when the module does; a function body only when it is called.
            yield from _imports(node.body, lazy)
        elif lazy and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield from _imports(node.body, lazy)


def _targets(name: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The pgolf modules one import statement of module `name` loads."""
    if isinstance(node, ast.Import):
        candidates = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*parts, base] if base else parts)
        # `from pgolf.x import y` loads pgolf.x.y when y is a submodule, else pgolf.x.
        candidates = [
            f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
        ]
    out = set()
    for target in candidates:
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)
    return out


def import_graph(lazy: bool) -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        body = ast.parse(path.read_text(encoding="utf-8")).body
        graph[name] = set().union(*(_targets(name, n) for n in _imports(body, lazy)))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each as a cycle's path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [[f"{m} -> {sorted(graph[m] & set(g))}" for m in g] for g in found]


def test_the_cycle_finder_finds_a_cycle_and_reads_imports():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
        ["a -> ['b']", "b -> ['c']", "c -> ['a']"]
    ]
    graph = import_graph(lazy=True)
    assert "pgolf.artifact.container" in graph["pgolf.run"]
    assert "pgolf.run" in graph["pgolf.cli.stages"]  # imported inside a function
    assert "pgolf.run" not in import_graph(lazy=False)["pgolf.cli.stages"]


def test_no_import_cycles_at_module_level():
    assert cycles(import_graph(lazy=False)) == []


def test_no_import_cycles_even_through_imports_inside_functions():
    # A function-level import defers a cycle rather than removing it: the two modules still each
    # need the other, and which one is "below" is then anybody's guess.
    assert cycles(import_graph(lazy=True)) == []


def _imported_names(path: Path) -> set[str]:
    nodes = _imports(ast.parse(path.read_text(encoding="utf-8")).body, lazy=True)
    return {
        name
        for n in nodes
        for name in ([a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""])
    }


def test_pgolf_cli_is_the_only_command_line():
    """Only pgolf.cli parses arguments; the `python -m` entry points hand argv to it."""
    parsers = {name for name, path in MODULES.items() if "argparse" in _imported_names(path)}
    assert parsers and all(n == "pgolf.cli" or n.startswith("pgolf.cli.") for n in parsers)
    assert MODULES["pgolf.cli"].name == "__init__.py"  # a package, not a cli.py among others
    graph = import_graph(lazy=True)
    for main in ("pgolf.__main__", "pgolf.train.__main__"):
        assert graph[main] == {"pgolf.cli"}, main
    assert not any(n.endswith(".commands") for n in MODULES)  # the old per-package wiring
