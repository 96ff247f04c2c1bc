"""The package's layering, checked statically: import cycles, library -> orchestration, layer order, shims.

Every module of the installed `lightning_mim` package is parsed with `ast` (nothing is imported, so no
torch). Every `import` statement counts, at module level, inside functions, and under `if TYPE_CHECKING:`.
An import names its target module exactly:
- `import lightning_mim.a.b` and `from lightning_mim.a.b import name` import `lightning_mim.a.b`
  (for a package: its `__init__`);
- `from lightning_mim.a import b` imports `lightning_mim.a.b` when `b` is a submodule, else `lightning_mim.a`.
The packages above the target (`lightning_mim.a` when importing `lightning_mim.a.b`) are not counted:
Python initialises them first, and by the time a sibling imports them they are already in sys.modules,
so counting them would report every `__init__` that re-exports its submodules as a cycle.

`ALLOWED_IMPORTS` below is the one table of which layer may import which; docs/ARCHITECTURE.md shows the
same table and `test_architecture_doc_mirrors_the_table` keeps the two equal.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

PACKAGE = "lightning_mim"
REPO = Path(__file__).resolve().parents[1]
ARCHITECTURE_DOC = REPO / "docs" / "ARCHITECTURE.md"

# The documented commands, kept as shims: shim module -> the orchestration module whose `main` it runs.
SHIMS = {
    "lightning_mim.train": "lightning_mim.orchestration.train",
    "lightning_mim.sweep": "lightning_mim.orchestration.sweep",
    "lightning_mim.evaluate": "lightning_mim.orchestration.evaluate",
    "lightning_mim.tokenize": "lightning_mim.orchestration.tokenize",
    "lightning_mim.data.prepare": "lightning_mim.orchestration.prepare",
    "lightning_mim.report": "lightning_mim.orchestration.report",
    "lightning_mim.edit": "lightning_mim.orchestration.edit",
}

# Layer -> the layers its modules may import (their own included). THE table: docs/ARCHITECTURE.md mirrors it.
# "math" = the package root (`lightning_mim/__init__.py`) and the single-file modules next to it
# (masking, decoding, losses, optim, tokens, editing, locks, ...), shims excepted. Sub-packages are
# layers of their own name. Nothing in the library may import "orchestration".
ALLOWED_IMPORTS: dict[str, set[str]] = {
    "math": {"math"},
    "nn": {"math", "nn"},
    "data": {"math", "data"},
    "checkpoints": {"math", "nn", "checkpoints"},
    "modules": {"math", "nn", "data", "checkpoints", "modules"},
    "eval": {"math", "nn", "data", "checkpoints", "eval"},
    "callbacks": {"math", "nn", "data", "checkpoints", "modules", "eval", "callbacks"},
    "orchestration": {"math", "nn", "data", "checkpoints", "modules", "eval", "callbacks", "orchestration"},
    "shims": {"orchestration"},
}
LIBRARY_LAYERS = ("math", "nn", "data", "checkpoints", "modules", "eval", "callbacks")




@pytest.fixture(autouse=True)
def _reset_lightning_rank():
    """Overrides conftest's autouse fixture of this name, which imports lightning (and torch) after every
    test to undo what trainers leave behind: nothing here builds a trainer, and this file stays torch-free."""
    yield


# --------------------------------------------------------------------------------------------------
# the package, parsed


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported lightning_mim module
    line: int
    where: str  # "module level" or "in f()" (the enclosing function)
    names: tuple[str, ...] = ()  # for `from target import names` where the names are not submodules

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({path_of(self.source)}:{self.line}, {self.where})"


def package_root() -> Path:
    spec = importlib.util.find_spec(PACKAGE)  # finds the installed package without executing it
    assert spec is not None and spec.submodule_search_locations, f"{PACKAGE} is not installed"
    return Path(list(spec.submodule_search_locations)[0])


@lru_cache(maxsize=None)
def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file (`__init__.py` for a package)."""
    root = package_root()
    found = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = rel.parts
        if any(not p.isidentifier() for p in parts):
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        # only modules reachable as a package: every folder on the way has an __init__.py
        if all((root.parent.joinpath(*rel.parts[:i]) / "__init__.py").is_file() for i in range(1, len(rel.parts))):
            found[".".join(parts)] = path
    return found


def path_of(module: str) -> str:
    path = modules().get(module)
    if path is None:
        return module
    return str(path.relative_to(package_root().parent))


def is_package(module: str) -> bool:
    return modules()[module].name == "__init__.py"


@lru_cache(maxsize=None)
def tree(module: str) -> ast.Module:
    path = modules()[module]
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _enclosing_functions(node: ast.AST) -> dict[ast.AST, str]:
    """Import node -> "module level" or "in f()" (innermost enclosing function)."""
    where: dict[ast.AST, str] = {}

    def visit(n: ast.AST, func: str | None) -> None:
        for child in ast.iter_child_nodes(n):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                where[child] = f"in {func}()" if func else "module level"
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            visit(child, inner)

    visit(node, None)
    return where


def find_imports(module: str, parsed: ast.Module, package: str, known: set[str] | dict[str, Path]) -> list[Import]:
    """The lightning_mim modules `module` imports (`package`: the package its relative imports start
    from; `known`: the package's modules, to tell `from a import submodule` from `from a import name`)."""
    found: list[Import] = []
    for node, where in _enclosing_functions(parsed).items():
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    found.append(Import(module, alias.name, node.lineno, where))
            continue
        if node.level:  # relative import
            base = package.split(".")
            if node.level > 1:
                base = base[: -(node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if not (target == PACKAGE or target.startswith(PACKAGE + ".")):
            continue
        plain = []
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            if alias.name != "*" and sub in known:
                found.append(Import(module, sub, node.lineno, where))
            else:
                plain.append(alias.name)
        if plain:
            found.append(Import(module, target, node.lineno, where, tuple(plain)))
    return sorted(found, key=lambda i: (i.line, i.target))


@lru_cache(maxsize=None)
def imports_of(module: str) -> tuple[Import, ...]:
    """The lightning_mim modules `module` imports, with line and place (module level or function)."""
    package = module if is_package(module) else module.rpartition(".")[0]
    return tuple(find_imports(module, tree(module), package, modules()))


def graph() -> dict[str, list[Import]]:
    return {m: [i for i in imports_of(m) if i.target in modules()] for m in modules()}


def layer_of(module: str) -> str | None:
    if module in SHIMS:
        return "shims"
    parts = module.split(".")
    if len(parts) == 1 or (len(parts) == 2 and not is_package(module)):
        return "math"
    return parts[1] if parts[1] in ALLOWED_IMPORTS else None


# --------------------------------------------------------------------------------------------------
# cycles


def strongly_connected(edges: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the strongly connected components with a cycle in them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    result: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in edges.get(node, ()):
                        result.append(sorted(component))
    return result


def shortest_cycle_through(start: str, edges: dict[str, list[str]], within: set[str]) -> list[str]:
    """A shortest path start -> ... -> start inside one component (breadth first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(edges[node]):
                if child not in within:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in parent:
                    parent[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"{start} is on no cycle")


def describe_cycles(g: dict[str, list[Import]]) -> list[str]:
    edges = {m: sorted({i.target for i in imps}) for m, imps in g.items()}
    out = []
    for component in strongly_connected(edges):
        cycle = shortest_cycle_through(component[0], edges, set(component))
        hops = []
        for a, b in zip(cycle, cycle[1:]):
            imp = next(i for i in g[a] if i.target == b)
            hops.append(f"    {imp}")
        out.append(
            f"cycle among {len(component)} module(s): {', '.join(component)}\n  e.g. "
            + " -> ".join(cycle)
            + "\n"
            + "\n".join(hops)
        )
    return out


# --------------------------------------------------------------------------------------------------
# the tests


def test_the_package_is_found_and_parsed():
    mods = modules()
    assert PACKAGE in mods and "lightning_mim.orchestration" in mods, sorted(mods)
    for module in mods:
        tree(module)  # a syntax error fails here, naming the file
    assert set(SHIMS) <= set(mods), f"shims missing: {sorted(set(SHIMS) - set(mods))}"


def test_every_module_belongs_to_a_layer():
    unplaced = [m for m in modules() if layer_of(m) is None]
    assert not unplaced, (
        f"modules in no layer (add their sub-package to ALLOWED_IMPORTS in {Path(__file__).name} "
        f"and to docs/ARCHITECTURE.md): {unplaced}"
    )


def test_no_import_cycles():
    cycles = describe_cycles(graph())
    assert not cycles, "import cycles (imports inside functions count too):\n" + "\n".join(cycles)


def test_the_library_does_not_import_orchestration():
    bad = [
        str(imp)
        for m, imps in graph().items()
        if layer_of(m) in LIBRARY_LAYERS
        for imp in imps
        if layer_of(imp.target) in ("orchestration", "shims")
    ]
    assert not bad, "library modules importing the orchestration layer (or a shim):\n  " + "\n  ".join(bad)


def test_layer_order():
    """Each layer imports only the layers `ALLOWED_IMPORTS` gives it (imports of orchestration are
    reported by the test above; the shims by `test_shims_are_thin`)."""
    bad = []
    for m, imps in graph().items():
        src = layer_of(m)
        if src is None or src == "shims":
            continue
        for imp in imps:
            dst = layer_of(imp.target)
            if dst is None or (dst in ("orchestration", "shims") and src in LIBRARY_LAYERS):
                continue
            if dst not in ALLOWED_IMPORTS[src]:
                bad.append(f"[{src} -> {dst}] {imp}")
    assert not bad, "imports against the layer order (see ALLOWED_IMPORTS / docs/ARCHITECTURE.md):\n  " + "\n  ".join(bad)


def _main_call(node: ast.AST) -> bool:
    """`main()`, `main(sys.argv[1:])`-style calls, or those wrapped in `sys.exit(...)` / `SystemExit(...)`."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "main":
        return True
    if isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords:
        f = node.func
        wrapper = (isinstance(f, ast.Attribute) and f.attr == "exit" and isinstance(f.value, ast.Name) and f.value.id == "sys") or (
            isinstance(f, ast.Name) and f.id == "SystemExit"
        )
        return wrapper and _main_call(node.args[0])
    return False


def _is_main_guard(node: ast.stmt) -> bool:
    if not (isinstance(node, ast.If) and not node.orelse and len(node.body) == 1):
        return False
    test = node.test
    if not (
        isinstance(test, ast.Compare)
        and len(test.ops) == 1
        and isinstance(test.ops[0], ast.Eq)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and isinstance(test.comparators[0], ast.Constant)
        and test.comparators[0].value == "__main__"
    ):
        return False
    stmt = node.body[0]
    if isinstance(stmt, ast.Expr):
        return _main_call(stmt.value)
    if isinstance(stmt, ast.Raise):
        return stmt.exc is not None and stmt.cause is None and _main_call(stmt.exc)
    return False


@pytest.mark.parametrize("shim", sorted(SHIMS))
def test_shims_are_thin(shim):
    """A shim holds a docstring, optionally `import sys` / `from __future__ import ...`, the import of
    `main` from its orchestration module, and the `if __name__ == "__main__":` guard that runs it."""
    target = SHIMS[shim]
    body = list(tree(shim).body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
        body = body[1:]
    imports_main = guards = 0
    extra = []
    for node in body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        if isinstance(node, ast.Import) and [a.name for a in node.names] == ["sys"] and node.names[0].asname is None:
            continue
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and node.module == target
            and [(a.name, a.asname) for a in node.names] == [("main", None)]
        ):
            imports_main += 1
            continue
        if _is_main_guard(node):
            guards += 1
            continue
        extra.append(f"line {node.lineno}: {ast.unparse(node).splitlines()[0]}")
    problems = []
    if imports_main != 1:
        problems.append(f"expected exactly one `from {target} import main`, found {imports_main}")
    if guards != 1:
        problems.append(f'expected exactly one `if __name__ == "__main__":` running main(), found {guards}')
    if extra:
        problems.append("statements a shim should not have:\n    " + "\n    ".join(extra))
    assert not problems, f"{path_of(shim)} is not a thin shim over {target}:\n  " + "\n  ".join(problems)
    assert target in modules(), f"{shim} points at {target}, which does not exist"
    assert "main" in top_level_names(target), f"{target} defines no `main` for {shim} to run"


@lru_cache(maxsize=None)
def top_level_names(module: str) -> frozenset[str] | None:
    """Names bound at the top of `module` (also under top-level if/try/with); None = can't tell (star import
    or a module `__getattr__`)."""
    names: set[str] = set()

    def bind(target: ast.AST) -> None:
        for n in ast.walk(target):
            if isinstance(n, ast.Name):
                names.add(n.id)

    def visit(stmts: list[ast.stmt]) -> bool:
        for s in stmts:
            if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(s.name)
            elif isinstance(s, ast.Assign):
                for t in s.targets:
                    bind(t)
            elif isinstance(s, (ast.AnnAssign, ast.AugAssign)):
                bind(s.target)
            elif isinstance(s, ast.Import):
                names.update((a.asname or a.name).split(".")[0] for a in s.names)
            elif isinstance(s, ast.ImportFrom):
                if any(a.name == "*" for a in s.names):
                    return False
                names.update(a.asname or a.name for a in s.names)
            elif isinstance(s, (ast.If, ast.For, ast.While)):
                if not (visit(s.body) and visit(s.orelse)):
                    return False
                if isinstance(s, ast.For):
                    bind(s.target)
            elif isinstance(s, ast.With):
                if not visit(s.body):
                    return False
            elif isinstance(s, ast.Try) or type(s).__name__ == "TryStar":
                blocks = [s.body, s.orelse, s.finalbody, *[h.body for h in s.handlers]]
                if not all(visit(b) for b in blocks):
                    return False
        return True

    if not visit(tree(module).body) or "__getattr__" in names:
        return None
    # submodules are attributes of their package once imported
    names.update(m.rpartition(".")[2] for m in modules() if m.rpartition(".")[0] == module)
    return frozenset(names)


def test_imports_resolve():
    """Every `lightning_mim` import names an existing module and names that module defines — also the
    imports inside functions, which only fail when the function runs (the usual leftover of a move)."""
    bad = []
    for m in modules():
        for imp in imports_of(m):
            if imp.target not in modules():
                bad.append(f"{imp}: no module {imp.target}")
                continue
            defined = top_level_names(imp.target)
            if defined is None:
                continue
            missing = [n for n in imp.names if n != "*" and n not in defined]
            if missing:
                bad.append(f"{imp}: {imp.target} defines no {', '.join(missing)}")
    assert not bad, "imports that do not resolve:\n  " + "\n  ".join(bad)


def _doc_table() -> dict[str, set[str]]:
    """The `| layer | ... | may import |` table of docs/ARCHITECTURE.md: layer -> allowed layers."""
    text = ARCHITECTURE_DOC.read_text(encoding="utf-8")
    rows: dict[str, set[str]] = {}
    header = None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else None
        if not cells:
            header = None
            continue
        if header is None:
            header = [c.lower() for c in cells]
            continue
        if set(line.strip()) <= set("|-: "):
            continue
        if "layer" in header and "may import" in header:
            layer = cells[header.index("layer")].strip("`* ")
            allowed = cells[header.index("may import")]
            rows[layer] = set(re.findall(r"`([a-z_]+)`", allowed))
    return rows


def test_architecture_doc_mirrors_the_table():
    assert ARCHITECTURE_DOC.is_file(), f"{ARCHITECTURE_DOC} is missing"
    doc = _doc_table()
    assert doc, f"no `| layer | ... | may import |` table found in {ARCHITECTURE_DOC.name}"
    expected = {k: set(v) for k, v in ALLOWED_IMPORTS.items()}
    diff = [
        f"{layer}: test {sorted(expected.get(layer, []))} vs doc {sorted(doc.get(layer, []))}"
        for layer in sorted(set(doc) | set(expected))
        if doc.get(layer) != expected.get(layer)
    ]
    assert not diff, "docs/ARCHITECTURE.md's table differs from ALLOWED_IMPORTS:\n  " + "\n  ".join(diff)


# --------------------------------------------------------------------------------------------------
# the checker itself, on made-up graphs


def test_cycle_finder_on_small_graphs():
    assert strongly_connected({"a": ["b"], "b": ["c"], "c": []}) == []
    assert strongly_connected({"a": ["b"], "b": ["a"], "c": ["a"]}) == [["a", "b"]]
    assert strongly_connected({"a": ["a"]}) == [["a"]]
    edges = {"a": ["b"], "b": ["c", "d"], "c": ["a"], "d": ["e"], "e": ["d"]}
    assert sorted(strongly_connected(edges)) == [["a", "b", "c"], ["d", "e"]]
    assert shortest_cycle_through("a", edges, {"a", "b", "c"}) == ["a", "b", "c", "a"]


def test_import_rules_on_a_made_up_module():
    known = {"lightning_mim", "lightning_mim.eval", "lightning_mim.eval.probe", "lightning_mim.masking"}
    source = """
import os
import lightning_mim.masking
from lightning_mim import masking, __version__
from lightning_mim.eval import probe, evaluate_generation
from . import probe as p2
from .. import masking as m2

def f():
    from lightning_mim.eval.probe import knn_top1
    def g():
        import lightning_mim
"""
    found = find_imports("lightning_mim.eval.x", ast.parse(source), "lightning_mim.eval", known)
    got = [(i.target, i.names, i.where) for i in found]
    assert got == [
        ("lightning_mim.masking", (), "module level"),
        ("lightning_mim", ("__version__",), "module level"),  # a name of the package: its __init__
        ("lightning_mim.masking", (), "module level"),  # a submodule: the submodule
        ("lightning_mim.eval", ("evaluate_generation",), "module level"),
        ("lightning_mim.eval.probe", (), "module level"),
        ("lightning_mim.eval.probe", (), "module level"),  # relative
        ("lightning_mim.masking", (), "module level"),  # relative, two levels
        ("lightning_mim.eval.probe", ("knn_top1",), "in f()"),
        ("lightning_mim", (), "in g()"),
    ], got
