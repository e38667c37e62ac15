"""The pgolf code an exported `train_gpt.py` runs, and nothing more (SPEC §1.2: code bytes count).

`reach(entry)` starts from the pgolf names an entry's source imports and follows every name the
reached code uses, across modules, at the grain of top-level statements: a function or class is
kept whole once anything names it, an import keeps only the aliases kept code uses, and a module
is bundled only when something in it is reached. The walk is static and ignores the config, so
code reached on any path is kept; what it leaves out no path of the entry can call (the bundle's
finder refuses any pgolf module it does not carry, so a dynamic import cannot fall back to an
installed pgolf). Statements that run for their effect (`try`, `if`, a call, an assignment to an
attribute, a side-effecting decorator) are always kept.

`minify` is the safe minifier: the kept statements parsed and unparsed, less docstrings and
function annotations (`ast.unparse` keeps semantics; comments and layout go with the parse).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pgolf

PACKAGE_ROOT = Path(pgolf.__file__).resolve().parent
# Decorators that only wrap the function; any other one may register it somewhere (atexit), so
# its definition runs whether or not anything names it.
_WRAPPING_DECORATORS = {"dataclass", "contextmanager", "cache", "lru_cache", "no_grad", "wraps"}


_ALL = "*"  # as a name to reach: every top-level name of the module


def module_path(name: str) -> Path | None:
    """The source file of pgolf module `name` (a package's `__init__.py`), or None."""
    rel = Path(*name.split(".")[1:])
    package = PACKAGE_ROOT / rel / "__init__.py"
    if package.is_file():
        return package
    module = (PACKAGE_ROOT / rel).with_suffix(".py")
    return module if name != "pgolf" and module.is_file() else None


def is_pgolf(name: str) -> bool:
    return name.split(".")[0] == "pgolf"


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an `import from` names, relative levels resolved against `module`."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    parts = parts[: len(parts) - node.level + is_package]
    return ".".join(parts + ([node.module] if node.module else []))


def _import_targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> dict:
    """Bound name → (module, attribute or None for the module itself) of one import statement."""
    out = {}
    if isinstance(node, ast.Import):
        for a in node.names:
            # `import a.b` binds `a` (and loads a.b); `import a.b as c` binds c to a.b
            out[a.asname or a.name.split(".")[0]] = (a.name if a.asname else a.name.split(".")[0],
                                                     None)  # fmt: skip
        return out
    base = _absolute(module, is_package, node)
    for a in node.names:
        sub = f"{base}.{a.name}"
        out[a.asname or a.name] = (sub, None) if module_path(sub) else (base, a.name)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def _is_main_guard(test: ast.expr) -> bool:
    return isinstance(test, ast.Compare) and ast.unparse(test) == "__name__ == '__main__'"


def _wraps_only(node: ast.stmt) -> bool:
    for dec in getattr(node, "decorator_list", []):
        target = dec.func if isinstance(dec, ast.Call) else dec
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name not in _WRAPPING_DECORATORS:
            return False
    return True


def _bound_names(node: ast.stmt) -> list[str]:
    """The top-level names a definition, plain assignment or import binds ([] = run for effect)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name] if _wraps_only(node) else []
    if isinstance(node, ast.ImportFrom) and node.module == "__future__":
        return []  # a compiler directive: kept wherever the module is
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [a.asname or a.name.split(".")[0] for a in node.names]
    targets = {ast.Assign: lambda n: n.targets, ast.AnnAssign: lambda n: [n.target]}
    if type(node) in targets and node.value is not None:
        names = []
        for target in targets[type(node)](node):
            elts = target.elts if isinstance(target, ast.Tuple) else [target]
            if not all(isinstance(e, ast.Name) for e in elts):
                return []
            names += [e.id for e in elts]
        return names
    return []


@dataclass
class Module:
    """One pgolf module's top-level statements, indexed by the names they bind."""

    name: str
    path: Path
    tree: ast.Module
    bindings: dict[str, list[ast.stmt]] = field(default_factory=dict)
    effects: list[ast.stmt] = field(default_factory=list)

    @property
    def lazy_annotations(self) -> bool:
        """Under `from __future__ import annotations` no annotation is evaluated at run time."""
        return any(
            isinstance(n, ast.ImportFrom)
            and n.module == "__future__"
            and any(a.name == "annotations" for a in n.names)
            for n in self.tree.body
        )

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"

    @classmethod
    def load(cls, name: str) -> Module:
        path = module_path(name)
        if path is None:
            raise ValueError(f"{name}: no such pgolf module")
        mod = cls(name, path, ast.parse(path.read_text(encoding="utf-8")))
        for node in mod.body:
            names = _bound_names(node)
            for bound in names:
                mod.bindings.setdefault(bound, []).append(node)
            if not names:
                mod.effects.append(node)
        return mod

    @property
    def body(self) -> list[ast.stmt]:
        """The statements that can run: no docstring, no `if TYPE_CHECKING`, no `__main__` guard."""
        out = []
        for i, node in enumerate(self.tree.body):
            if i == 0 and _is_docstring(node):
                continue
            if isinstance(node, ast.If) and (_is_type_checking(node.test) or
                                             _is_main_guard(node.test)):  # fmt: skip
                continue
            out.append(node)
        return out


def _walk(node: ast.AST, skip_annotations: bool):
    """ast.walk, less annotations when they are never evaluated (a name only they use is unused)."""
    todo = [node]
    while todo:
        node = todo.pop()
        yield node
        for name, value in ast.iter_fields(node):
            if skip_annotations and name in ("annotation", "returns"):
                continue
            values = value if isinstance(value, list) else [value]
            todo.extend(v for v in values if isinstance(v, ast.AST))


def _is_docstring(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


class Reach:
    """The walk: modules loaded on demand, `kept[module]` the names reached in each."""

    def __init__(self, unused: frozenset[str] = frozenset()) -> None:
        self.unused = unused  # modules the caller knows no path will run: reached, not followed
        self.stand_ins: set[str] = set()
        self.modules: dict[str, Module] = {}
        self.kept: dict[str, set[str]] = {}
        self.todo: list[tuple[str, str | None]] = []

    def add(self, module: str, name: str | None = None) -> None:
        """Reach `module` (its effects run on import), and its top-level `name` if given."""
        self.todo.append((module, name))

    def run(self) -> None:
        while self.todo:
            module, name = self.todo.pop()
            if module in self.unused:
                self.stand_ins.add(module)
                self._add_parents(module)
                continue
            if module not in self.modules:
                self._include(module)
            if name is None or name in self.kept[module]:
                continue
            mod = self.modules[module]
            if name == _ALL:
                self.todo.extend((module, n) for n in mod.bindings)
                continue
            if name in mod.bindings:
                self.kept[module].add(name)
                for node in mod.bindings[name]:
                    self._follow(mod, node, name)
            elif module_path(f"{module}.{name}"):
                self.add(f"{module}.{name}")
            elif not (name.startswith("__") and name.endswith("__")):
                raise ValueError(f"{module}.{name}: not defined at the top level of {module}")

    def _add_parents(self, module: str) -> None:
        parts = module.split(".")
        for i in range(1, len(parts)):  # importing a.b.c runs a and a.b first
            self.add(".".join(parts[:i]))

    def _include(self, module: str) -> None:
        mod = self.modules[module] = Module.load(module)
        self.kept[module] = set()
        self._add_parents(module)
        for node in mod.effects:
            self._follow(mod, node, None)

    def _follow(self, mod: Module, node: ast.stmt, name: str | None) -> None:
        """Reach what statement `node` of `mod` uses; of an import, only the alias `name`."""
        if isinstance(node, (ast.Import, ast.ImportFrom)) and name is not None:
            target, attr = _import_targets(mod.name, mod.is_package, node)[name]
            if isinstance(node, ast.Import):  # `import a.b` loads a.b even though it binds a
                target = next(a.name for a in node.names if (a.asname or a.name.split(".")[0])
                              == name)  # fmt: skip
            if is_pgolf(target):
                self.add(target, attr)
            return
        nodes = list(_walk(node, mod.lazy_annotations))
        # pgolf modules bound to a name, at the top level or by an import inside `node`
        aliases = {}
        for sub in nodes:
            if isinstance(sub, (ast.Import, ast.ImportFrom)):  # a lazy import, or one in a `try`
                for alias, (target, attr) in _import_targets(mod.name, mod.is_package, sub).items():
                    if is_pgolf(target):
                        self.add(target, attr)
                        if attr is None:
                            aliases[alias] = target
                for a in sub.names if isinstance(sub, ast.Import) else []:
                    if is_pgolf(a.name):
                        self.add(a.name)
        bases = {id(sub.value) for sub in nodes if isinstance(sub, ast.Attribute)}
        for sub in nodes:
            if isinstance(sub, ast.Name) and sub.id in mod.bindings:
                self.add(mod.name, sub.id)
            if isinstance(sub, ast.Name) and id(sub) not in bases:
                module = aliases.get(sub.id) or self._module_alias(mod, sub.id)
                if module:  # a module used as a value: any of its names may be read
                    self._add_all(module)
            elif isinstance(sub, ast.Attribute):
                self._follow_attribute(mod, sub, aliases)

    def _module_alias(self, mod: Module, name: str) -> str | None:
        """The pgolf module a top-level import of `mod` binds to `name`, if any."""
        for stmt in mod.bindings.get(name, []):
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                target, attr = _import_targets(mod.name, mod.is_package, stmt).get(name, ("", ""))
                if attr is None and is_pgolf(target):
                    return target
        return None

    def _add_all(self, module: str) -> None:
        self.add(module)
        self.todo.append((module, _ALL))

    def _follow_attribute(self, mod: Module, node: ast.Attribute, aliases: dict) -> None:
        """`alias.attr` where alias is a pgolf module: reach attr in that module."""
        chain = []
        base: ast.expr = node
        while isinstance(base, ast.Attribute):
            chain.append(base.attr)
            base = base.value
        if not isinstance(base, ast.Name):
            return
        target = aliases.get(base.id) or self._module_alias(mod, base.id)
        if target is None:
            return
        for part in reversed(chain):  # descend through submodules: pgolf.eval.ttt.f
            if not module_path(f"{target}.{part}"):
                self.add(target, part)
                return
            target = f"{target}.{part}"
        self.add(target)

    def readable(self) -> dict[str, str]:
        """Each reached module's kept statements as written: comments, docstrings and all.

        A statement's text runs from the end of the one before it in the file, so the comments
        above it come along; an import cut to fewer aliases is rendered anew.
        """
        out = {}
        for name in sorted(self.modules):
            mod, kept = self.modules[name], self.kept[name]
            lines = mod.path.read_text(encoding="utf-8").splitlines(keepends=True)
            nodes = mod.tree.body
            has_doc = bool(nodes) and _is_docstring(nodes[0])
            parts = lines[: nodes[0].end_lineno] if has_doc else []
            for prev, node in zip([None, *nodes], nodes, strict=False):
                if node not in mod.body:
                    continue
                text = "".join(lines[prev.end_lineno if prev else 0 : node.end_lineno])
                if node in mod.effects:
                    parts.append(text)
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    aliases = [a for a in node.names if (a.asname or a.name.split(".")[0]) in kept]
                    if aliases == node.names:
                        parts.append(text)
                    elif aliases:
                        parts.append(ast.unparse(type(node)(**{**node.__dict__, "names": aliases})))
                        parts.append("\n")
                elif any(n in kept for n in _bound_names(node)):
                    parts.append(text)
            out[name] = "".join(parts)
        return out

    @property
    def packages(self) -> list[str]:
        return sorted(n for n, m in self.modules.items() if m.is_package)


class _Minifier(ast.NodeTransformer):
    """Drops docstrings and function annotations, neither of which the bundle's code reads."""

    def _undoc(self, node: ast.AST) -> ast.AST:
        if node.body and _is_docstring(node.body[0]):
            node.body = node.body[1:] or [ast.Pass()]
        return self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        args = node.args
        for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
            if arg is not None:
                arg.annotation = None
        node.returns = None
        return self._undoc(node)

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_ClassDef = _undoc
    visit_Module = _undoc


def minify(source: str) -> str:
    """`source` without comments, docstrings, function annotations or layout; same semantics."""
    return ast.unparse(_Minifier().visit(ast.parse(source)))


def reach(entry: str, unused: frozenset[str] = frozenset()) -> Reach:
    """The pgolf code reached from the imports in `entry` (a script's source).

    Modules in `unused` are not followed: `stand_ins` lists those the code names.
    """
    walk = Reach(unused)
    entry_module = Module("__entry__", Path("<entry>"), ast.parse(entry))
    walk._follow(entry_module, entry_module.tree, None)
    walk.run()
    return walk
