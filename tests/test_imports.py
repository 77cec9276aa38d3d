"""Import structure of ``statemachine_loop``: no import circles, and a cheap ``import``.

Two kinds of checks live here.

* The import graph. Every ``.py`` module of the package is parsed with :mod:`ast`
  (nothing is imported), and every import in it becomes an edge: module-level ones,
  deferred ones inside functions, and those under ``if TYPE_CHECKING:`` alike. The
  rule: no import circle, except one made of a package's ``__init__`` and its own
  direct submodules. A failure prints one concrete cycle per offending circle, each
  edge with the file, line and kind of the import(s) behind it, so the edge to cut
  is plain to see.
* Import cost. In a fresh interpreter, ``import statemachine_loop`` and a default
  ``TrainingLoop`` must not load the optional writers (TensorBoard, structlog, CSV),
  and ``import statemachine_loop.testing`` must not load Hypothesis.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
import textwrap
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

PACKAGE = "statemachine_loop"
REPO_ROOT = Path(__file__).resolve().parents[1]

ImportKind = Literal["module-level", "deferred", "TYPE_CHECKING"]


@dataclass(frozen=True, order=True)
class ImportSite:
    """One import statement behind an edge: where it is and when it runs."""

    file: str
    line: int
    kind: ImportKind

    def describe(self) -> str:
        """``file:line [kind]``, the form a developer can jump to."""
        return f"{self.file}:{self.line} [{self.kind}]"


@dataclass(frozen=True)
class ModuleInfo:
    """A module of the package: dotted name, source file, and whether it is an ``__init__``."""

    name: str
    path: Path
    is_package: bool


#: importer -> imported -> the import statements that make the edge.
Graph = dict[str, dict[str, list[ImportSite]]]


# -- building the graph -------------------------------------------------------------------


def _package_root(package: str = PACKAGE) -> Path:
    """The directory of ``package``, found without executing its ``__init__``.

    ``find_spec`` gives the same path as ``statemachine_loop.__file__`` but does not run
    the package, so a circular import that crashes at import time cannot hide the graph.
    """
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.origin is not None, f"cannot find package {package!r}"
    return Path(spec.origin).parent


def _discover_modules(root: Path, package: str) -> dict[str, ModuleInfo]:
    """Every module under ``root`` (the directory of ``package``), keyed by dotted name.

    A package's ``__init__.py`` is named after the package (``a.b``, not ``a.b.__init__``).
    Files in directories without an ``__init__.py`` are not modules of the package.
    """
    modules: dict[str, ModuleInfo] = {}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        depths = range(len(relative.parts))
        directories = [root.joinpath(*relative.parts[:depth]) for depth in depths]
        if not all((directory / "__init__.py").is_file() for directory in directories):
            continue
        parts = [package, *relative.with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        name = ".".join(parts)
        modules[name] = ModuleInfo(name=name, path=path, is_package=is_package)
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    """Whether an ``if`` test is ``TYPE_CHECKING`` or ``typing.TYPE_CHECKING``."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _import_statements(
    node: ast.AST, *, deferred: bool = False, type_checking: bool = False
) -> Iterator[tuple[ast.Import | ast.ImportFrom, ImportKind]]:
    """Every import statement under ``node`` with its kind.

    ``TYPE_CHECKING`` wins over ``deferred`` (such an import never runs); the ``else``
    branch of ``if TYPE_CHECKING:`` runs, so it keeps the enclosing kind. Class bodies
    run at import time, so imports there are module-level.
    """
    if isinstance(node, ast.Import | ast.ImportFrom):
        kind: ImportKind = (
            "TYPE_CHECKING" if type_checking else "deferred" if deferred else "module-level"
        )
        yield node, kind
        return
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        for child in node.body:
            yield from _import_statements(child, deferred=deferred, type_checking=True)
        for child in node.orelse:
            yield from _import_statements(child, deferred=deferred, type_checking=type_checking)
        return
    in_function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
    for nested in ast.iter_child_nodes(node):
        yield from _import_statements(
            nested, deferred=deferred or in_function, type_checking=type_checking
        )


def _relative_base(module: ModuleInfo, level: int, name: str | None) -> str:
    """The absolute module a relative ``from ...name import x`` in ``module`` refers to."""
    base = module.name if module.is_package else module.name.rpartition(".")[0]
    for _ in range(level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{name}" if name else base


def _resolve(name: str, modules: Mapping[str, ModuleInfo]) -> str | None:
    """The nearest module of the package at or above dotted ``name``; None if outside it."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _import_targets(
    statement: ast.Import | ast.ImportFrom, module: ModuleInfo, modules: Mapping[str, ModuleInfo]
) -> set[str]:
    """The package modules one import statement pulls in.

    ``import a.b.c`` targets ``a.b.c``; ``from a.b import c`` targets ``a.b.c`` when that
    is a module of the package, else ``a.b``. Relative imports are made absolute first.
    """
    if isinstance(statement, ast.Import):
        candidates = [alias.name for alias in statement.names]
    else:
        if statement.level:
            base = _relative_base(module, statement.level, statement.module)
        else:
            base = statement.module or ""
        candidates = [
            f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
            for alias in statement.names
        ]
    targets = {_resolve(candidate, modules) for candidate in candidates}
    return {target for target in targets if target is not None and target != module.name}


def _build_graph(root: Path, package: str) -> tuple[Graph, set[str]]:
    """The import graph of ``package`` at ``root``, and the names of its ``__init__`` modules.

    Every module is a node, even one without edges. Sites name files relative to the
    directory that holds the package, as in ``statemachine_loop/loop.py``.
    """
    modules = _discover_modules(root, package)
    graph: Graph = {name: {} for name in modules}
    for module in modules.values():
        file = module.path.relative_to(root.parent).as_posix()
        tree = ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
        for statement, kind in _import_statements(tree):
            site = ImportSite(file=file, line=statement.lineno, kind=kind)
            for target in _import_targets(statement, module, modules):
                graph[module.name].setdefault(target, []).append(site)
    packages = {name for name, module in modules.items() if module.is_package}
    return graph, packages


# -- strongly connected components and cycles ---------------------------------------------


def _strongly_connected_components(graph: Graph) -> list[list[str]]:
    """Tarjan's algorithm, iterative; each component sorted, components in finishing order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> Iterator[str]:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        return iter(sorted(graph.get(node, {})))

    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, visit(root))]
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    work.append((child, visit(child)))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component: list[str] = []
                    while not component or component[-1] != node:
                        component.append(stack.pop())
                        on_stack.discard(component[-1])
                    components.append(sorted(component))
    return components


def _is_allowed(members: Iterable[str], packages: set[str]) -> bool:
    """Whether a circle is a package's ``__init__`` with only its direct children.

    A single module is never a circle. Otherwise some member must be a package ``P``
    and every other member a direct child of ``P`` (a module or subpackage of ``P``).
    """
    members = set(members)
    if len(members) < 2:
        return True
    return any(
        all(member == owner or member.rpartition(".")[0] == owner for member in members)
        for owner in members & packages
    )


def _shortest_path(graph: Graph, start: str, goal: str, within: set[str]) -> list[str] | None:
    """A shortest path ``start -> ... -> goal`` through nodes in ``within`` (breadth first)."""
    previous: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            path = [node]
            while (step := previous[path[-1]]) is not None:
                path.append(step)
            return path[::-1]
        for child in sorted(graph.get(node, {})):
            if child in within and child not in previous:
                previous[child] = node
                queue.append(child)
    return None


def _pick_cycle(graph: Graph, component: list[str], packages: set[str]) -> tuple[list[str], bool]:
    """One concrete cycle in ``component``, and whether it breaks the rule on its own.

    Takes the shortest cycle through each edge of the component; prefers the shortest
    one that is not an allowed ``__init__``/child cycle, and starts it at its
    alphabetically first module so the report is stable.
    """
    within = set(component)
    cycles: list[list[str]] = []
    for node in component:
        for child in sorted(graph.get(node, {})):
            path = _shortest_path(graph, child, node, within) if child in within else None
            if path is not None:
                cycles.append([node, *path[:-1]])
    assert cycles, f"no cycle found in component {component}"
    offending = [cycle for cycle in cycles if not _is_allowed(cycle, packages)]
    chosen = min(offending or cycles, key=lambda cycle: (len(cycle), cycle))
    first = chosen.index(min(chosen))
    return chosen[first:] + chosen[:first], bool(offending)


def _format_cycle(graph: Graph, cycle: list[str]) -> str:
    """``first -> ... -> first``, one edge a line, each with the import sites behind it."""
    width = max(len(node) for node in cycle)
    lines = [f"    {cycle[0]}"]
    for importer, imported in zip(cycle, [*cycle[1:], cycle[0]], strict=True):
        sites = "; ".join(site.describe() for site in sorted(graph[importer][imported]))
        lines.append(f"      -> {imported:<{width}}  via {sites}")
    return "\n".join(lines)


def _describe_offence(graph: Graph, component: list[str], packages: set[str]) -> str:
    """The report for one forbidden circle: its members and one concrete cycle."""
    cycle, alone = _pick_cycle(graph, component, packages)
    header = f"import circle of {len(component)} modules:\n" + "\n".join(
        f"    - {member}" for member in component
    )
    if alone:
        intro = "  one cycle in it (every edge below is an import that can be cut):"
    else:
        intro = (
            "  each of its cycles is an __init__/child cycle on its own, but they chain\n"
            "  modules that are not all direct children of one package; one of them:"
        )
    inside = _format_edges_inside(graph, component)
    return f"{header}\n{intro}\n{_format_cycle(graph, cycle)}\n{inside}"


def _format_edges_inside(graph: Graph, component: list[str]) -> str:
    """Every import between members of ``component``, grouped by importer."""
    members = set(component)
    lines: list[str] = []
    for importer in component:
        targets = [target for target in sorted(graph[importer]) if target in members]
        if targets:
            lines.append(f"    {importer}")
        width = max((len(target) for target in targets), default=0)
        for target in targets:
            sites = "; ".join(site.describe() for site in sorted(graph[importer][target]))
            lines.append(f"      -> {target:<{width}}  via {sites}")
    count = sum(line.startswith("      ->") for line in lines)
    return f"  all {count} import edges inside this circle:\n" + "\n".join(lines)


def _offences(graph: Graph, packages: set[str]) -> list[str]:
    """One report per strongly connected component that breaks the rule."""
    return [
        _describe_offence(graph, component, packages)
        for component in _strongly_connected_components(graph)
        if not _is_allowed(component, packages)
    ]


def _graph_from_edges(edges: Iterable[tuple[str, str]]) -> Graph:
    """A made-up graph for the self-tests; each edge gets a fake module-level site."""
    graph: Graph = {}
    for number, (importer, imported) in enumerate(edges, start=1):
        graph.setdefault(imported, {})
        sites = graph.setdefault(importer, {}).setdefault(imported, [])
        sites.append(ImportSite(file=f"{importer}.py", line=number, kind="module-level"))
    return graph


# -- the package's import graph -----------------------------------------------------------


@pytest.fixture(scope="module")
def package_graph() -> tuple[Graph, set[str]]:
    return _build_graph(_package_root(), PACKAGE)


def test_the_graph_sees_the_whole_package(package_graph: tuple[Graph, set[str]]) -> None:
    graph, packages = package_graph
    assert {PACKAGE, f"{PACKAGE}.callbacks", f"{PACKAGE}.testing"} <= packages
    assert {f"{PACKAGE}.loop", f"{PACKAGE}.logs", f"{PACKAGE}.callbacks.tensorboard"} <= set(graph)
    assert sum(len(targets) for targets in graph.values()) > len(graph), "too few imports seen"


def test_no_import_circles(package_graph: tuple[Graph, set[str]]) -> None:
    graph, packages = package_graph
    offences = _offences(graph, packages)
    if offences:
        pytest.fail(
            f"{len(offences)} import circle(s) in {PACKAGE}. Only a package's __init__ with "
            "its own direct submodules may import each other in a circle; every import counts "
            "(module-level, deferred and TYPE_CHECKING).\n\n" + "\n\n".join(offences),
            pytrace=False,
        )


def test_logs_does_not_import_testing(package_graph: tuple[Graph, set[str]]) -> None:
    """The trace checker belongs to the core: ``logs`` must not import the test kit."""
    graph, _ = package_graph
    testing = f"{PACKAGE}.testing"
    offending = {
        target: sites
        for target, sites in graph[f"{PACKAGE}.logs"].items()
        if target == testing or target.startswith(f"{testing}.")
    }
    assert not offending, f"{PACKAGE}.logs imports the test kit:\n" + "\n".join(
        f"    {PACKAGE}.logs -> {target}  via {'; '.join(site.describe() for site in sites)}"
        for target, sites in sorted(offending.items())
    )


# -- self-tests of the graph code: they show that the checks can fail --------------------


def test_cycle_finder_allows_an_init_with_its_children() -> None:
    graph = _graph_from_edges(
        [("p", "p.a"), ("p.a", "p"), ("p", "p.sub"), ("p.sub", "p"), ("p.a", "p.sub")]
    )
    assert _offences(graph, packages={"p", "p.sub"}) == []


def test_cycle_finder_reports_a_real_cycle() -> None:
    graph = _graph_from_edges(
        [("p", "p.a"), ("p.a", "p"), ("x", "y"), ("y", "z"), ("z", "x"), ("y", "x")]
    )
    offences = _offences(graph, packages={"p"})
    assert len(offences) == 1
    assert "import circle of 3 modules" in offences[0]
    assert "    x\n      -> y  via x.py:3 [module-level]\n      -> x  via y.py:6" in offences[0]


def test_cycle_finder_rejects_siblings_without_their_init() -> None:
    graph = _graph_from_edges([("p.a", "p.b"), ("p.b", "p.a")])
    assert len(_offences(graph, packages={"p"})) == 1


def test_cycle_finder_rejects_chained_init_cycles() -> None:
    graph = _graph_from_edges([("p", "p.a"), ("p.a", "p"), ("p.a", "p.a.x"), ("p.a.x", "p.a")])
    (offence,) = _offences(graph, packages={"p", "p.a"})
    assert "they chain" in offence


def test_graph_builder_resolves_imports(tmp_path: Path) -> None:
    files = {
        "__init__.py": "from pkg import sub\nfrom pkg.sub import thing\n",
        "sub/__init__.py": "from .mod import f\n",
        "sub/mod.py": textwrap.dedent(
            """\
            from typing import TYPE_CHECKING
            import pkg.other
            if TYPE_CHECKING:
                from .. import sub
            def f():
                from ..other import g
            """
        ),
        "other.py": "def h():\n    import pkg.sub.mod\n",
        "data/stray.py": "import pkg\n",
    }
    for name, text in files.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(text)
    graph, packages = _build_graph(tmp_path / "pkg", "pkg")
    assert packages == {"pkg", "pkg.sub"}
    assert set(graph) == {"pkg", "pkg.sub", "pkg.sub.mod", "pkg.other"}
    assert {target: [s.kind for s in sites] for target, sites in graph["pkg.sub.mod"].items()} == {
        "pkg.other": ["module-level", "deferred"],
        "pkg.sub": ["TYPE_CHECKING"],
    }
    assert set(graph["pkg"]) == {"pkg.sub"}
    assert set(graph["pkg.sub"]) == {"pkg.sub.mod"}
    assert graph["pkg.other"] == {"pkg.sub.mod": [ImportSite("pkg/other.py", 2, "deferred")]}
    (offence,) = _offences(graph, packages)
    assert (
        "    pkg.other\n"
        "      -> pkg.sub.mod  via pkg/other.py:2 [deferred]\n"
        "      -> pkg.other    via pkg/sub/mod.py:2 [module-level]; pkg/sub/mod.py:6 [deferred]\n"
    ) in offence


# -- import cost, each in a fresh interpreter ---------------------------------------------

OPTIONAL_WRITERS = (
    "tensorboardX",
    "structlog",
    f"{PACKAGE}.callbacks.tensorboard",
    f"{PACKAGE}.callbacks.structured",
    f"{PACKAGE}.callbacks.csv_logger",
)


def _run_probe(code: str) -> Any:
    """Run ``code`` in a fresh interpreter; it prints one JSON value last, which is returned."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    if done.returncode != 0:
        pytest.fail(f"the probe failed (exit {done.returncode}):\n{done.stderr}", pytrace=False)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _loaded_after(setup: str, watched: Iterable[str]) -> list[str]:
    """The modules of ``watched`` that are in ``sys.modules`` after running ``setup``."""
    report = (
        "import json, sys\n"
        f"print(json.dumps(sorted(m for m in {sorted(watched)!r} if m in sys.modules)))\n"
    )
    return list(_run_probe(textwrap.dedent(setup).rstrip() + "\n" + report))


def test_import_does_not_load_optional_writers() -> None:
    loaded = _loaded_after("import statemachine_loop", OPTIONAL_WRITERS)
    assert loaded == [], f"`import {PACKAGE}` loaded optional modules: {', '.join(loaded)}"


def test_default_loop_does_not_load_optional_writers() -> None:
    setup = """\
        import torch
        from statemachine_loop import TrainingLoop
        TrainingLoop(
            training=[(torch.zeros(2, 3), torch.zeros(2, 1))],
            optimizer=torch.optim.SGD(torch.nn.Linear(3, 1).parameters(), lr=0.1),
            loss_fn=torch.nn.functional.mse_loss,
        )
        """
    loaded = _loaded_after(setup, OPTIONAL_WRITERS)
    assert loaded == [], f"a default TrainingLoop loaded optional modules: {', '.join(loaded)}"


def test_testing_import_does_not_load_hypothesis() -> None:
    facts = _run_probe(
        """\
        import json, sys
        import statemachine_loop.testing as testing
        before = "hypothesis" in sys.modules
        try:
            found = callable(testing.check_callback)
        except AttributeError as error:
            found = repr(error)
        print(json.dumps({"hypothesis_loaded": before, "check_callback": found}))
        """
    )
    assert facts == {"hypothesis_loaded": False, "check_callback": True}, (
        f"`import {PACKAGE}.testing` loaded hypothesis: {facts['hypothesis_loaded']}; "
        f"then `{PACKAGE}.testing.check_callback` gave: {facts['check_callback']}"
    )


def test_check_callback_is_importable_from_testing() -> None:
    result = _run_probe(
        """\
        import json
        try:
            from statemachine_loop.testing import check_callback
            result = callable(check_callback)
        except ImportError as error:
            result = repr(error)
        print(json.dumps(result))
        """
    )
    assert result is True, f"`from {PACKAGE}.testing import check_callback` failed: {result}"
