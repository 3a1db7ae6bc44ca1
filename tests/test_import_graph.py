"""The import graph of the shipped packages: layered one way, and free of cycles.

Every module under ``detectors/``, ``guard/`` and ``middleware/`` is parsed with
:mod:`ast` (nothing is imported), and each ``import`` is recorded with where it
sits:

``module``
    runs when the module is imported (top level, and inside top-level ``try``,
    ``if`` or class bodies);
``function``
    inside a function, so it runs on first call (a lazy import);
``type_checking``
    inside ``if TYPE_CHECKING:``, so it never runs.

An import by name (``importlib.import_module("pkg.mod")`` or ``__import__`` with
a literal string) counts as an import like any other: loading a module by name
does not make an upward dependency go away.

Two rules:

* **Layers.** Imports point one way, ``middleware -> guard -> detectors``:
  ``detectors`` imports neither ``guard`` nor ``middleware``, and ``guard`` does
  not import ``middleware``. This holds for *every* import, lazy and
  typing-only ones included (a lazy upward import is still an upward
  dependency). Shipped code imports nothing from ``tests`` or ``benchmarks``.
* **No cycles** among the imports that run: neither among module-level imports,
  nor once function-level imports are added (laziness may defer a cost, never
  hide a cycle). ``TYPE_CHECKING`` imports are left out of the cycle check:
  they never execute, so they cannot cause an import-order failure.

The three folders install as one import root, ``inference_guard`` (``guard/`` is
``inference_guard.guard``), so module names here carry that root; an import of
a bare ``guard``, ``detectors`` or ``middleware`` would be somebody else's package
and is refused outright.

Importing ``inference_guard.guard.config`` also runs ``guard/__init__.py``; those
implicit parent-package imports are not edges here, only the imports the code writes.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Mapping, Set
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the layers, lowest first: a module may import its own layer and those below
LAYERS = ("detectors", "guard", "middleware")
#: the installed import root the three folders map onto (pyproject.toml)
ROOT_PACKAGE = "inference_guard"
#: top-level packages that shipped code must never import
NOT_SHIPPED = ("tests", "benchmarks")
KINDS = ("module", "function", "type_checking")


@dataclass(frozen=True, slots=True)
class Import:
    """One import statement's target, as written in ``source``."""

    #: the importing module
    source: str
    #: the module imported (``pkg.mod`` for ``from pkg import mod``, else ``pkg``)
    target: str
    #: ``module``, ``function`` or ``type_checking``
    kind: str
    #: where, for the failure message
    line: int


def layer_of(name: str) -> str | None:
    """``inference_guard.guard.config`` -> ``guard``; a module outside the root -> None."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == ROOT_PACKAGE else None


def ig(name: str) -> str:
    """``guard.config`` -> ``inference_guard.guard.config``."""
    return f"{ROOT_PACKAGE}.{name}"


def module_name(path: Path, root: Path) -> tuple[str, bool]:
    """``guard/stores/base.py`` -> ``("inference_guard.guard.stores.base", False)``;
    packages -> True."""
    parts = [ROOT_PACKAGE, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def find_modules(root: Path, packages: Iterable[str]) -> dict[str, tuple[Path, bool]]:
    """Every module of ``packages`` under ``root``: name -> (path, is a package)."""
    found: dict[str, tuple[Path, bool]] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            name, is_package = module_name(path, root)
            found[name] = (path, is_package)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, known: Set[str]) -> None:
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.known = known
        self.kind = "module"
        self.found: list[Import] = []

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        # a typing-only import stays typing-only, even inside a function
        outer = self.kind
        self.kind = outer if outer == "type_checking" else "function"
        self.generic_visit(node)
        self.kind = outer

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        outer, self.kind = self.kind, "type_checking"
        for child in node.body:
            self.visit(child)
        self.kind = outer
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append(Import(self.module, alias.name, self.kind, node.lineno))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        first = node.args[0] if node.args else None
        if (
            name in ("import_module", "__import__")
            and isinstance(first, ast.Constant)
            and isinstance(first.value, str)
        ):
            self.found.append(Import(self.module, first.value, self.kind, node.lineno))
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            parent = ".".join([*base, node.module] if node.module else base)
        else:
            parent = node.module or ""
        for alias in node.names:
            sub = f"{parent}.{alias.name}"
            target = sub if sub in self.known else parent
            self.found.append(Import(self.module, target, self.kind, node.lineno))


def imports_of(source: str, module: str, is_package: bool, known: Set[str]) -> list[Import]:
    """Every import in ``source`` (the text of ``module``), with where it sits."""
    collector = _Collector(module, is_package, known)
    collector.visit(ast.parse(source))
    return collector.found


def all_imports(root: Path = ROOT) -> list[Import]:
    modules = find_modules(root, LAYERS)
    found: list[Import] = []
    for name, (path, is_package) in modules.items():
        found += imports_of(path.read_text(encoding="utf-8"), name, is_package, set(modules))
    return found


def graph(imports: Iterable[Import], kinds: Set[str]) -> dict[str, set[str]]:
    """``module -> modules it imports`` among the shipped packages, for the given kinds."""
    edges: dict[str, set[str]] = {}
    for imp in imports:
        if imp.kind in kinds and layer_of(imp.target) in LAYERS and imp.target != imp.source:
            edges.setdefault(imp.source, set()).add(imp.target)
    return edges


def find_cycle(edges: Mapping[str, Set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None (depth-first, colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def upward(imports: Iterable[Import]) -> Iterator[Import]:
    """Imports that run against the layers, or into code that is not shipped."""
    for imp in imports:
        src, dst = layer_of(imp.source) or "", layer_of(imp.target)
        top = imp.target.split(".")[0]
        # not shipped; a bare layer name (outside the import root); or against the layers
        outside = top in NOT_SHIPPED or top in LAYERS
        if outside or (dst in LAYERS and LAYERS.index(dst) > LAYERS.index(src)):
            yield imp


# -- the rules, on the real tree ---------------------------------------------------------


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return all_imports()


def test_every_package_is_scanned(imports: list[Import]) -> None:
    modules = find_modules(ROOT, LAYERS)
    assert {ig("detectors.base"), ig("guard.registry"), ig("middleware.asgi")} <= set(modules)
    assert len(modules) > 50
    # all three kinds are recognised (the tree has lazy imports today)
    assert {imp.kind for imp in imports} >= {"module", "function"}


def test_no_import_runs_up_the_layers(imports: list[Import]) -> None:
    bad = [f"{i.source}:{i.line} imports {i.target} ({i.kind})" for i in upward(imports)]
    assert not bad, "imports against middleware -> guard -> detectors:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "kinds",
    [frozenset({"module"}), frozenset({"module", "function"})],
    ids=["module-level", "module-and-function-level"],
)
def test_no_import_cycles(imports: list[Import], kinds: frozenset[str]) -> None:
    cycle = find_cycle(graph(imports, kinds))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_middleware_is_imported_from_the_asgi_layer() -> None:
    from inference_guard import guard
    from inference_guard.middleware import GuardMiddleware
    from inference_guard.middleware.asgi import GuardMiddleware as Defined

    assert GuardMiddleware is Defined
    assert not hasattr(guard, "GuardMiddleware")


# -- the checker itself can fail ---------------------------------------------------------

PLANTED = """
from __future__ import annotations
import typing
from typing import TYPE_CHECKING
from . import sibling
from .. import config

try:
    from inference_guard.guard import registry
except ImportError:
    registry = None

if TYPE_CHECKING:
    from inference_guard.middleware.asgi import GuardMiddleware

if typing.TYPE_CHECKING:
    import inference_guard.middleware.types

class Holder:
    from inference_guard.detectors import base

def lazy() -> None:
    import inference_guard.middleware
    importlib.import_module("inference_guard.middleware.demo")

    def inner() -> None:
        from inference_guard.guard.stores import memory
"""


def test_the_checker_sees_every_kind_of_import() -> None:
    known = {ig(m) for m in ("guard", "guard.config", "guard.registry", "guard.stores",
                             "guard.stores.memory", "guard.stores.sibling", "middleware",
                             "middleware.asgi", "middleware.types", "detectors",
                             "detectors.base")}
    source = ig("guard.stores.base")
    found = {(i.target, i.kind) for i in imports_of(PLANTED, source, False, known)}
    assert found >= {
        (ig("guard.stores.sibling"), "module"),
        (ig("guard.config"), "module"),
        (ig("guard.registry"), "module"),
        (ig("middleware.asgi"), "type_checking"),
        (ig("middleware.types"), "type_checking"),
        (ig("detectors.base"), "module"),
        (ig("middleware"), "function"),
        (ig("guard.stores.memory"), "function"),
        (ig("middleware.demo"), "function"),
    }
    planted = imports_of(PLANTED, source, False, known)
    assert {i.target for i in upward(planted)} == {
        ig("middleware"), ig("middleware.asgi"), ig("middleware.types"), ig("middleware.demo")
    }
    x = ig("detectors.x")
    assert [i.target for i in upward(imports_of("import tests.conftest", x, False, known))] == [
        "tests.conftest"
    ]
    # a bare layer name is another project's package, whatever the layer
    assert [i.target for i in upward(imports_of("from detectors import base", x, False, known))
            ] == ["detectors"]


def test_the_checker_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    lazy = [
        Import(ig("guard.stores.base"), ig("guard.stores.memory"), "function", 1),
        Import(ig("guard.stores.memory"), ig("guard.stores.base"), "module", 1),
    ]
    assert find_cycle(graph(lazy, {"module"})) is None
    assert find_cycle(graph(lazy, {"module", "function"})) is not None
    typing_only = [
        Import(ig("guard.a"), ig("guard.b"), "module", 1),
        Import(ig("guard.b"), ig("guard.a"), "type_checking", 1),
    ]
    assert find_cycle(graph(typing_only, {"module", "function"})) is None
