"""The package's modules form a layered graph: no import cycles, no private names across modules.

Every ``import`` between secateurs modules counts, also those hidden inside functions (a lazy
import hides a cycle from Python, not from the reader). The graph is built from the source with
``ast``, so the test does not import anything and sees code paths a run would not take.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "secateurs"

# Cycles that are allowed, as frozensets of module names, each with the reason. Keep it empty
# unless a lazily imported optional piece truly cannot be moved below its user.
ALLOWED_CYCLES: dict[frozenset[str], str] = {}

# (importing module, imported module, name) triples that may cross a module boundary although
# the name starts with an underscore, each with the reason. Keep it empty.
ALLOWED_PRIVATE: dict[tuple[str, str, str], str] = {}


@functools.cache
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(root: Path = SRC) -> dict[str, Path]:
    return {_module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}


def _resolve(importer: str, is_package: bool, level: int, target: str | None) -> str:
    """Absolute module name of ``from <level dots><target> import ...`` written in ``importer``."""
    if level == 0:
        return target or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]  # a module's dots count from its package, a package's from itself
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(tree: ast.AST):
    """Yield ``(node, type_only)`` for every node; ``type_only`` inside ``if TYPE_CHECKING:``."""
    todo = [(tree, False)]
    while todo:
        node, type_only = todo.pop()
        yield node, type_only
        if _is_type_checking(node):
            todo.extend((child, True) for child in node.body)
            todo.extend((child, type_only) for child in node.orelse)
        else:
            todo.extend((child, type_only) for child in ast.iter_child_nodes(node))


def _imports(modules: dict[str, Path]):
    """Yield ``(importer, imported module, name or None, line, type_only)`` for every import of a
    package module.

    ``from pkg import x`` is an import of the module ``pkg.x`` when that module exists (a
    submodule), else of ``pkg`` (a name ``pkg/__init__.py`` defines or re-exports). ``type_only``
    marks imports under ``if TYPE_CHECKING:``: they name a type for annotations and never run.
    """
    for importer, path in modules.items():
        is_package = path.name == "__init__.py"
        for node, type_only in _walk(_parse(path)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                        yield importer, alias.name, None, node.lineno, type_only
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(importer, is_package, node.level, node.module)
                if not (base == PACKAGE or base.startswith(PACKAGE + ".")):
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:
                        yield importer, sub, None, node.lineno, type_only
                    else:
                        yield importer, base, alias.name, node.lineno, type_only


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> modules it imports at run time (at module level or inside a function).

    A package ``__init__`` is its own node: ``from secateurs.graph import x`` depends on
    ``graph/__init__.py`` and, through it, on what that re-exports. Python runs the ``__init__``
    of every package above an imported module first, so ``secateurs.methods`` importing
    ``secateurs.train.schedule`` depends on ``secateurs.train`` too; a module importing its own
    package's modules does not (that ``__init__`` is already running), else every package that
    re-exports its modules would be a cycle; importing a name from it (``from . import Plan``) does. Imports under ``if TYPE_CHECKING:`` are left out: an
    annotation naming a type is not a dependency of the code (a rule's signature names the
    tracer that calls it).
    """
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for importer, imported, _, _, type_only in _imports(modules):
        if imported not in modules:
            raise AssertionError(f"{importer} imports {imported}, which is not a module of the package")
        if type_only:
            continue
        if imported != importer:
            edges[importer].add(imported)
        parts = imported.split(".")
        for depth in range(2, len(parts)):  # the top package itself is always imported first
            ancestor = ".".join(parts[:depth])
            if not (importer + ".").startswith(ancestor + "."):
                edges[importer].add(ancestor)
    return edges


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components with more than one module (or a self loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
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
                if len(component) > 1 or node in edges[node]:
                    found.append(sorted(component))
    return found


def test_scc_finder_sees_a_cycle():
    # the checker itself must be able to fail
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_relative_imports_resolve():
    assert _resolve("secateurs.io.specs", False, 2, "semi_structured") == "secateurs.semi_structured"
    assert _resolve("secateurs.io", True, 1, "specs") == "secateurs.io.specs"
    assert _resolve("secateurs.graph.rules.shape", False, 3, None) == "secateurs"


def test_graph_sees_lazy_imports_and_package_inits(tmp_path):
    files = {
        "__init__.py": "",
        "a/__init__.py": "from .x import X\n",
        "a/x.py": "def f():\n    from ..b.y import Y  # lazy, and it runs b/__init__.py first\n",
        "b/__init__.py": "from .z import Z\n",
        "b/y.py": "",
        "b/z.py": "from typing import TYPE_CHECKING\nfrom ..a import X\nif TYPE_CHECKING:\n    from ..c import C\n",
        "c.py": "from .b.z import Z\n",
    }
    for name, text in files.items():
        (tmp_path / PACKAGE / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / PACKAGE / name).write_text(text)
    edges = _graph(_modules(tmp_path))
    p = PACKAGE + "."
    assert edges[p + "a.x"] == {p + "b", p + "b.y"}
    assert edges[p + "b.z"] == {p + "a"}  # the TYPE_CHECKING import of c is no dependency
    assert strongly_connected(edges) == [[p + "a", p + "a.x", p + "b", p + "b.z"]]


def _path_in(component: list[str], edges: dict[str, set[str]]) -> str:
    """One cycle through the component, as ``a -> b -> a``, so the failure says what to cut."""
    members = set(component)
    start = component[0]
    trail, seen, node = [start], {start}, start
    while True:
        nxt = sorted(edges[node] & members)
        back = [m for m in nxt if m == start]
        if back and len(trail) > 1:
            return " -> ".join(trail + [start])
        fresh = [m for m in nxt if m not in seen]
        if not fresh:
            return " <-> ".join(component)
        node = fresh[0]
        trail.append(node)
        seen.add(node)


def test_no_import_cycles():
    modules = _modules()
    assert f"{PACKAGE}.io.specs" in modules and f"{PACKAGE}.graph" in modules
    edges = _graph(modules)
    cycles = [c for c in strongly_connected(edges) if frozenset(c) not in ALLOWED_CYCLES]
    assert not cycles, "import cycles (imports inside functions count too):\n" + "\n".join(
        _path_in(c, edges) for c in cycles)


def test_no_private_names_across_modules():
    modules = _modules()
    bad = sorted(
        f"{importer}:{line} imports {name} from {imported}"
        for importer, imported, name, line, _ in _imports(modules)
        if name is not None and name.startswith("_") and not name.startswith("__")
        and imported != importer and (importer, imported, name) not in ALLOWED_PRIVATE
    )
    assert not bad, "make these public in the module that owns them:\n" + "\n".join(bad)


def test_no_private_attributes_of_imported_modules():
    # ``from . import registry`` then ``registry._RULES`` is the same reach into another module
    modules = _modules()
    bad = []
    for importer, path in modules.items():
        tree = _parse(path)
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(importer, path.name == "__init__.py", node.level, node.module)
                aliases |= {a.asname or a.name: f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
            elif isinstance(node, ast.Import):
                aliases |= {a.asname: a.name for a in node.names if a.asname and a.name in modules}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and (importer, aliases[node.value.id], node.attr) not in ALLOWED_PRIVATE):
                bad.append(f"{importer}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "make these public in the module that owns them:\n" + "\n".join(bad)


@pytest.mark.parametrize("table", [ALLOWED_CYCLES, ALLOWED_PRIVATE])
def test_allow_lists_are_still_needed(table):
    # an entry that no longer matches anything is stale: remove it
    modules = _modules()
    if table is ALLOWED_CYCLES:
        live = {frozenset(c) for c in strongly_connected(_graph(modules))}
    else:
        live = {(i, m, n) for i, m, n, _, _ in _imports(modules)}
    assert not [k for k in table if k not in live]
