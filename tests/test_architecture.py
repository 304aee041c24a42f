"""The layering of DESIGN.md, enforced on the source by reading its imports (AST).

The tables below are the rules. A change that needs another import — a new
third-party package, a library used in one more module, a pure module that
wants I/O, a package that reaches sideways — must change a table here, on
purpose, in the same commit.

The package is a stack of **layers**, one subpackage each (:data:`LAYERS`,
lowest first). A module may import its own package and every layer below
it, never one above. A handful of cross-cutting **root modules**
(:data:`ROOT_MODULES`: the error family, the data model, nursery helpers)
sit beneath every layer and import only each other.

Every import counts: at module level, inside functions (lazy imports), and
``__import__`` / ``importlib.import_module`` calls with a literal name. Only
imports under ``if TYPE_CHECKING:`` are left out of the cycle check, since they
never run; the layer order holds for them too.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import attrs
import pytest

import p2pbackup

PACKAGE = "p2pbackup"
PACKAGE_DIR = Path(p2pbackup.__file__).parent

#: The layers, lowest first. Each may import the ones before it.
LAYERS = (
    "core",
    "net",
    "wire",
    "stores",
    "dht",
    "engine",
    "maintenance",
    "node",
    "app",
    "sim",
    "ui",
    "cli",
)

#: Modules at the root of the package, beside the layers: the package face
#: and the cross-cutting ones every layer uses.
ROOT_MODULES = frozenset({PACKAGE, f"{PACKAGE}.errors", f"{PACKAGE}.model", f"{PACKAGE}.nurseries"})

#: The one module that runs kademlia (asyncio) inside trio.
DHT_ADAPTER = "p2pbackup.dht.adapter"

#: Anywhere in the package.
ANYWHERE = frozenset({"*"})

#: Every third-party package the package may import, and where. A package not
#: listed here may not be imported at all.
THIRD_PARTY: Mapping[str, frozenset[str]] = {
    "attrs": ANYWHERE,
    "trio": ANYWHERE,  # but see PURE_PACKAGES and PURE_ELSEWHERE
    "nacl": frozenset({"p2pbackup.core.crypto"}),
    "reedsolo": frozenset({"p2pbackup.core.erasure"}),
    "numpy": frozenset({"p2pbackup.core.erasure"}),
    "zstandard": frozenset({"p2pbackup.core.compression"}),
    "pyfastcdc": frozenset({"p2pbackup.core.chunker"}),
    "msgpack": frozenset(
        {
            "p2pbackup.core.formats",
            "p2pbackup.wire.messages",
            # The frames on the pipes to a backup's child processes.
            "p2pbackup.engine.pipeframes",
            # The DHT's datagrams, in the bytes kademlia's own codec writes.
            DHT_ADAPTER,
        }
    ),
    "kademlia": frozenset({DHT_ADAPTER}),
    "trio_asyncio": frozenset({DHT_ADAPTER}),
    # The dashboard's web stack and its QR codes, each behind one module.
    "starlette": frozenset({"p2pbackup.ui.asgi"}),
    "hypercorn": frozenset({"p2pbackup.ui.http"}),
    "segno": frozenset({"p2pbackup.ui.qr"}),
    # Dask runs the durability model's sweeps (an optional extra).
    "distributed": frozenset({"p2pbackup.sim.sweep"}),
    # Shell completion scripts made from the parser.
    "shtab": frozenset({"p2pbackup.cli.shell"}),
    # FUSE, for `p2pbackup mount` (an optional extra).
    "pyfuse3": frozenset({"p2pbackup.app.mount"}),
    # The simulator's plots (an optional extra).
    "matplotlib": frozenset({"p2pbackup.sim.plots"}),
}

#: Standard-library modules confined like third-party ones.
CONFINED_STDLIB: Mapping[str, frozenset[str]] = {
    # trio does all I/O; asyncio only where the kademlia package needs it.
    "asyncio": frozenset({DHT_ADAPTER}),
}

#: Never imported by the package: unsafe deserialisers (DESIGN: never pickle on
#: anything another party can write), and test or dev-only code.
FORBIDDEN = frozenset(
    {
        "pickle",
        "_pickle",
        "cPickle",
        "shelve",
        "marshal",
        "dill",
        "cloudpickle",
        "jsonpickle",
        "tests",
        "conftest",
        "pytest",
        "hypothesis",
        "zfec",
    }
)

#: Pure packages: every module in them takes bytes and returns bytes or decisions.
PURE_PACKAGES = frozenset({"core"})

#: Pure modules in the other layers and at the root.
PURE_ELSEWHERE = frozenset(
    f"{PACKAGE}.{name}"
    for name in (
        "model",
        "errors",
        "wire.messages",
        "wire.noise",
        "engine.sealwire",
        "engine.listwire",
        "engine.pipeframes",
        "engine.shards",
        "engine.retention",
        "maintenance.audit",
        "maintenance.reputation",
        "dht.records",
        "dht.invites",
        "dht.ratelimit",
        "maintenance.repair",
        "net.pacing",
        "app.requests",
        "node.admission",
        "net.natpmp",
        "net.upnp",
        "ui.plots",
        "sim.durability",
        "sim.closedform",
    )
)


def _pure_modules() -> frozenset[str]:
    modules = package_modules()
    in_pure_packages = {
        name for name in modules if layer_of(name) in PURE_PACKAGES and name != PACKAGE
    }
    return frozenset(in_pure_packages | PURE_ELSEWHERE)


#: What pure modules may not import (beside any impure p2pbackup module).
IO_MODULES = frozenset(
    {
        "trio",
        "trio_asyncio",
        "asyncio",
        "kademlia",
        "socket",
        "socketserver",
        "ssl",
        "selectors",
        "sqlite3",
        "subprocess",
        "http",
        "urllib",
    }
)
#: Parts of those packages that only compute (URL splitting and joining).
PURE_PARTS_OF_IO_MODULES = frozenset({"urllib.parse"})


def layer_of(module: str) -> str | None:
    """The layer ``module`` belongs to; None for a root module."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return None


def layer_violations(imports: Iterable[Import]) -> list[str]:
    """Every import of the package's own modules that breaks the layer order."""
    problems = []
    for imp in imports:
        if imp.top != PACKAGE:
            continue
        source, target = layer_of(imp.importer), layer_of(imp.target)
        if source is None:
            if imp.target not in ROOT_MODULES and imp.target != PACKAGE:
                problems.append(f"{imp}: a root module imports only root modules")
        elif target is not None and LAYERS.index(target) > LAYERS.index(source):
            problems.append(f"{imp}: {source} may not import {target}, a layer above it")
        elif target is None and imp.target not in ROOT_MODULES:
            problems.append(f"{imp}: not a module of the package")
    return problems


# -- reading imports ----------------------------------------------------------------------


@attrs.frozen
class Import:
    importer: str
    target: str
    line: int
    type_checking: bool = False

    @property
    def top(self) -> str:
        return self.target.split(".")[0]

    def __str__(self) -> str:
        return f"{self.importer} (line {self.line}) imports {self.target}"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def imports_in(
    source: str, module: str, *, is_package: bool = False, known: Iterable[str] = ()
) -> list[Import]:
    """Every import in ``source`` (the text of ``module``).

    ``from pkg import name`` counts as importing ``pkg.name`` when that is one of
    the ``known`` modules, else as importing ``pkg``.
    """
    known_modules = set(known)
    found: list[Import] = []

    def visit(node: ast.AST, type_checking: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for stmt in node.body:
                visit(stmt, True)
            for stmt in node.orelse:
                visit(stmt, type_checking)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(module, alias.name, node.lineno, type_checking))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                target = candidate if candidate in known_modules else base
                found.append(Import(module, target, node.lineno, type_checking))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            dynamic = (isinstance(func, ast.Name) and func.id == "__import__") or (
                isinstance(func, ast.Attribute) and func.attr == "import_module"
            )
            first = node.args[0]
            if dynamic and isinstance(first, ast.Constant) and isinstance(first.value, str):
                found.append(Import(module, first.value, node.lineno, type_checking))
        for child in ast.iter_child_nodes(node):
            visit(child, type_checking)

    visit(ast.parse(source), False)
    return found


def package_modules() -> dict[str, Path]:
    """Dotted name → file, for every module of the package."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def all_imports() -> list[Import]:
    modules = package_modules()
    found = []
    for name, path in modules.items():
        found.extend(
            imports_in(
                path.read_text(),
                name,
                is_package=path.name == "__init__.py",
                known=modules,
            )
        )
    return found


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path (first node repeated last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for succ in sorted(graph.get(node, ())):
            if state.get(succ) == 1:
                return [*stack[stack.index(succ) :], succ]
            if succ not in state:
                cycle = dfs(succ)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = dfs(start)
            if cycle:
                return cycle
    return None


def _allowed(importer: str, where: frozenset[str]) -> bool:
    return where == ANYWHERE or importer in where


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    found = all_imports()
    assert len({i.importer for i in found}) > 20  # the reader really read the package
    return found


# -- the rules ------------------------------------------------------------------------------


def test_the_tables_name_modules_that_exist() -> None:
    modules = package_modules()
    named = set(PURE_ELSEWHERE) | ROOT_MODULES | {DHT_ADAPTER}
    for where in [*THIRD_PARTY.values(), *CONFINED_STDLIB.values()]:
        named |= where - ANYWHERE
    assert named <= set(modules), sorted(named - set(modules))


def test_third_party_packages_only_where_the_table_allows(imports: list[Import]) -> None:
    stdlib = sys.stdlib_module_names
    problems = []
    for imp in imports:
        if imp.top == PACKAGE or imp.top in FORBIDDEN:
            continue
        if imp.top in stdlib and imp.top not in CONFINED_STDLIB:
            continue
        where = THIRD_PARTY.get(imp.top, CONFINED_STDLIB.get(imp.top))
        if where is None:
            problems.append(f"{imp}: {imp.top} is not in the THIRD_PARTY table")
        elif not _allowed(imp.importer, where):
            problems.append(f"{imp}: only {sorted(where)} may import {imp.top}")
    assert problems == []


@pytest.mark.parametrize(
    ("library", "owner"),
    [
        ("nacl", "p2pbackup.core.crypto"),
        ("reedsolo", "p2pbackup.core.erasure"),
        ("zstandard", "p2pbackup.core.compression"),
        ("pyfastcdc", "p2pbackup.core.chunker"),
        ("starlette", "p2pbackup.ui.asgi"),
        ("hypercorn", "p2pbackup.ui.http"),
        ("segno", "p2pbackup.ui.qr"),
        ("shtab", "p2pbackup.cli.shell"),
        ("pyfuse3", "p2pbackup.app.mount"),
    ],
)
def test_each_library_lives_behind_one_module(
    imports: list[Import], library: str, owner: str
) -> None:
    importers = {i.importer for i in imports if i.top == library}
    assert importers == {owner}


def test_no_kademlia_or_asyncio_outside_the_dht_adapter(imports: list[Import]) -> None:
    offenders = [
        str(i)
        for i in imports
        if i.top in {"kademlia", "asyncio", "trio_asyncio"} and i.importer != DHT_ADAPTER
    ]
    assert offenders == []


def test_nothing_imports_pickle_or_test_code(imports: list[Import]) -> None:
    assert [str(i) for i in imports if i.top in FORBIDDEN] == []


def test_pure_modules_do_no_io_and_import_only_pure_modules(imports: list[Import]) -> None:
    pure = _pure_modules()
    problems = []
    for imp in imports:
        if imp.importer not in pure:
            continue
        if imp.top in IO_MODULES and imp.target not in PURE_PARTS_OF_IO_MODULES:
            problems.append(f"{imp}: a pure module may not import {imp.top}")
        if imp.top == PACKAGE and imp.target not in pure | {PACKAGE}:
            problems.append(f"{imp}: a pure module may import only pure modules")
    assert problems == []


def test_the_root_holds_only_the_face_and_the_cross_cutting_modules() -> None:
    roots = {name for name in package_modules() if layer_of(name) is None}
    assert roots == set(ROOT_MODULES)
    layers = {path.name for path in PACKAGE_DIR.iterdir() if (path / "__init__.py").exists()}
    assert layers == set(LAYERS)


def test_every_import_follows_the_layer_order(imports: list[Import]) -> None:
    assert layer_violations(imports) == []


@pytest.mark.parametrize(
    ("importer", "target"),
    [
        ("p2pbackup.core.crypto", "p2pbackup.engine.repository"),  # pure core reaching up
        ("p2pbackup.dht.discovery", "p2pbackup.engine.repository"),  # the DHT reading the engine
        ("p2pbackup.maintenance.status", "p2pbackup.node.shardhost"),
        ("p2pbackup.node.server", "p2pbackup.app.home"),
        ("p2pbackup.model", "p2pbackup.core.formats"),  # a root module depending on a layer
    ],
)
def test_a_wrong_import_breaks_the_layer_order(importer: str, target: str) -> None:
    (problem,) = layer_violations([Import(importer, target, 1)])
    assert importer in problem and "import" in problem


@pytest.mark.parametrize(
    ("importer", "target"),
    [
        ("p2pbackup.engine.prune", "p2pbackup.engine.repository"),  # its own package
        ("p2pbackup.cli.main", "p2pbackup.core.crypto"),  # any layer below
        ("p2pbackup.wire.session", "p2pbackup.errors"),  # a root module
        ("p2pbackup.model", "p2pbackup.errors"),
    ],
)
def test_imports_down_and_within_a_package_are_allowed(importer: str, target: str) -> None:
    assert layer_violations([Import(importer, target, 1)]) == []


def test_each_layer_names_its_nouns_and_what_it_may_import() -> None:
    for position, layer in enumerate(LAYERS):
        doc = ast.get_docstring(ast.parse((PACKAGE_DIR / layer / "__init__.py").read_text()))
        assert doc is not None and "Nouns" in doc, f"{layer}/__init__.py names no nouns"
        below = ", ".join(LAYERS[:position]) or "nothing but the root modules"
        assert f"May import: {below}." in " ".join(doc.split()), (
            f"{layer}/__init__.py does not say what it may import: 'May import: {below}.'"
        )


def test_no_import_cycles(imports: list[Import]) -> None:
    graph: dict[str, set[str]] = {name: set() for name in package_modules()}
    for imp in imports:
        if imp.top == PACKAGE and not imp.type_checking and imp.target != imp.importer:
            graph[imp.importer].add(imp.target)
    unknown = {t for targets in graph.values() for t in targets} - set(graph)
    assert unknown == set(), f"imports of modules that do not exist: {sorted(unknown)}"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


# -- the reader itself ----------------------------------------------------------------------


def test_the_reader_sees_every_form_of_import() -> None:
    source = """
import nacl.bindings
import os, pickle as p
from p2pbackup.core import formats, errors
from p2pbackup.model import Tree
from . import crypto
from .sub import thing
from .. import top
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from p2pbackup.stores import folder as storage
def later():
    import sqlite3
    return __import__("marshal"), importlib.import_module("trio")
"""
    known = {
        "p2pbackup.core.formats",
        "p2pbackup.core.errors",
        "p2pbackup.core.crypto",
        "p2pbackup.stores.folder",
    }
    found = imports_in(source, "p2pbackup.pkg.mod", known=known | {"p2pbackup.pkg.crypto"})
    targets = {(i.target, i.type_checking) for i in found}
    assert targets == {
        ("nacl.bindings", False),
        ("os", False),
        ("pickle", False),
        ("p2pbackup.core.formats", False),
        ("p2pbackup.core.errors", False),
        ("p2pbackup.model", False),
        ("p2pbackup.pkg.crypto", False),
        ("p2pbackup.pkg.sub", False),
        ("p2pbackup", False),  # `from .. import top`: top is not a known module
        ("typing", False),
        ("p2pbackup.stores.folder", True),
        ("sqlite3", False),
        ("marshal", False),
        ("trio", False),
    }
    assert {i.top for i in found if i.line == 14} == {"marshal", "trio"}
    # A package's relative imports resolve from the package itself.
    (imp,) = imports_in("from . import keys", "p2pbackup.core", is_package=True)
    assert imp.target == "p2pbackup.core"
    (imp,) = imports_in(
        "from . import keys", "p2pbackup.core", is_package=True, known={"p2pbackup.core.keys"}
    )
    assert imp.target == "p2pbackup.core.keys"


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y"}}) == ["y", "y"]
    assert find_cycle({"a": {"b", "d"}, "b": set(), "d": {"e"}, "e": {"d"}}) == ["d", "e", "d"]
