"""The shape of the package: small modules and functions, one run state, one source of scopes.

These read the package's source with :mod:`ast` (nothing is imported) and hold it to
the rules the core was built on:

* no module over 400 lines, no function over 60;
* the fields of :class:`~statemachine_loop.run_state.RunState` are written only by the
  run state's own methods (its named moments), never from another module;
* states are compared by name only in the machine's own module: everywhere else the
  code uses the names the machine and the events define (``BETWEEN_EPOCHS``,
  ``TRAINING``, ``PHASE_OF_STATE``, ...).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

import statemachine_loop
from statemachine_loop.machine import STATES
from statemachine_loop.run_state import RunState

PACKAGE = Path(statemachine_loop.__file__).resolve().parent
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _name(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_the_package_has_modules() -> None:
    assert len(MODULES) > 30
    assert any(path.name == "run_state.py" for path in MODULES)


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_modules_are_small(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{_name(path)} has {lines} lines"


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_functions_are_short(path: Path) -> None:
    long = [
        f"{node.name} ({(node.end_lineno or node.lineno) - node.lineno + 1} lines)"
        for node in _functions(_tree(path))
        if (node.end_lineno or node.lineno) - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{_name(path)}: {', '.join(long)}"


RUN_FIELDS = frozenset(field.name for field in attrs.fields(RunState))


def _attribute_writes(tree: ast.AST) -> Iterator[ast.Attribute]:
    """Every ``<expr>.<name> = ...`` (plain, augmented or annotated) in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets: list[ast.expr] = list(node.targets)
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        while targets:
            target = targets.pop()
            if isinstance(target, ast.Tuple | ast.List):
                targets.extend(target.elts)
            elif isinstance(target, ast.Attribute):
                yield target


def _is_self(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"


def _holds_run_state(tree: ast.AST) -> bool:
    """Whether a module imports the run state (and so may hold one)."""
    return any(
        isinstance(node, ast.ImportFrom) and node.module == "statemachine_loop.run_state"
        for node in ast.walk(tree)
    )


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_only_the_run_state_writes_its_fields(path: Path) -> None:
    """No ``loop.<field> = ...`` anywhere, nor ``<run>.<field> = ...`` where a run state is held.

    (Another module's own record may share a field name, as ``logs.RunSummary`` does.)
    """
    if path.name == "run_state.py":
        return
    tree = _tree(path)
    holds = _holds_run_state(tree)
    writes = [
        f"line {node.lineno}: {ast.unparse(node)}"
        for node in _attribute_writes(tree)
        if node.attr in RUN_FIELDS
        and not _is_self(node.value)
        and (holds or (isinstance(node.value, ast.Name) and node.value.id == "loop"))
    ]
    assert not writes, f"{_name(path)} writes run-state fields directly: {writes}"


def test_the_write_finder_finds_writes() -> None:
    tree = ast.parse("loop.epoch_index = 1\nrun.batches_run += 1\na, run.failure = 1, 2\n")
    assert [node.attr for node in _attribute_writes(tree)] == [
        "epoch_index",
        "batches_run",
        "failure",
    ]


#: The state names a comparison may not spell out. ``epoch`` is left out: it is also the
#: key of a ``History`` entry and the unit of ``LearningRateScheduler(per="epoch")``.
COMPARED_STATES = frozenset(STATES) - {"epoch"}


def _state_names_compared(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """State names written as string literals in a comparison (``==``, ``in``, ...)."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        for operand in (node.left, *node.comparators):
            items = (
                operand.elts if isinstance(operand, ast.Tuple | ast.List | ast.Set) else [operand]
            )
            for item in items:
                if isinstance(item, ast.Constant) and item.value in COMPARED_STATES:
                    yield node.lineno, item.value


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_states_are_compared_by_name_only_in_the_machine(path: Path) -> None:
    if path.name == "machine.py" and path.parent == PACKAGE:
        return
    found = list(_state_names_compared(_tree(path)))
    assert not found, f"{_name(path)} compares state names as literals at {found}"


def test_the_comparison_finder_finds_literals() -> None:
    tree = ast.parse('a == "fit"\nb in ("training", "x")\nc != other\n')
    assert list(_state_names_compared(tree)) == [(1, "fit"), (2, "training")]
