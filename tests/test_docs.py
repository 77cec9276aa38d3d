"""The docs are kept true: generated parts equal the machine, and every snippet runs.

* The Mermaid block of ``docs/lifecycle.md`` must equal ``lifecycle_diagram("mermaid")``
  exactly, and its transition, redirect and wind-down tables must be the machine's.
* Every ``python`` block of the pages in :data:`RUNNABLE_PAGES` runs, in order, in one
  namespace per page (later snippets use what the first one set up), as a reader would
  paste them.
* Every public name of the package has a docstring.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import statemachine_loop
from statemachine_loop import Event, lifecycle_diagram
from statemachine_loop.machine import (
    REDIRECT_TARGETS,
    TRANSITIONS,
    MachineModel,
    build_machine,
    wind_down_paths,
)

DOCS = Path(__file__).resolve().parent.parent / "docs"
LIFECYCLE = DOCS / "lifecycle.md"
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```$", re.MULTILINE | re.DOTALL)


def _blocks(page: Path, lang: str) -> list[tuple[int, str]]:
    """``(line number, source)`` of each fenced block of ``lang`` on the page."""
    text = page.read_text()
    return [
        (text.count("\n", 0, match.start()) + 2, match.group("body"))
        for match in FENCE.finditer(text)
        if match.group("lang") == lang
    ]


def _section(title: str) -> str:
    """The text of one ``##`` section of the lifecycle page."""
    text = LIFECYCLE.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def _table(title: str) -> list[list[str]]:
    """The body rows of the first table in a section, cells stripped of backticks."""
    rows = [line for line in _section(title).splitlines() if line.startswith("|")]
    return [
        [cell.strip().replace("`", "") for cell in row.strip("|").split("|")] for row in rows[2:]
    ]


def _names(cell: str) -> list[str]:
    """The names listed in a cell, without parenthesised remarks."""
    cell = re.sub(r"\([^)]*\)", "", cell)
    return [name.strip() for name in cell.split(",") if name.strip()]


def test_mermaid_block_is_the_generated_diagram() -> None:
    (block,) = _blocks(LIFECYCLE, "mermaid")
    _, body = block
    assert body.removesuffix("\n") == lifecycle_diagram("mermaid"), (
        "docs/lifecycle.md's diagram is stale; paste the output of "
        "python -c 'import statemachine_loop as s; print(s.lifecycle_diagram(\"mermaid\"))'"
    )


def test_transition_table_is_the_machine() -> None:
    documented = {
        (Event(event), frozenset(_names(sources)), _names(dest)[0])
        for event, sources, dest in _table("Transitions")
    }
    machine = {(event, frozenset(sources), dest) for event, sources, dest in TRANSITIONS}
    assert documented == machine


def test_redirect_table_is_the_code() -> None:
    documented: dict[tuple[str, Event], tuple[Event, ...]] = {}
    for proposal, targets in _table("Redirect targets"):
        match = re.fullmatch(r"(\w+) \((\w+)\)", proposal)
        assert match is not None, proposal
        state, event = match.groups()
        documented[(state, Event(event))] = tuple(Event(name) for name in _names(targets))
    assert documented == dict(REDIRECT_TARGETS)


def test_wind_down_table_is_the_machine() -> None:
    documented: dict[str, tuple[Event, ...]] = {}
    for states, events in _table("Wind-down"):
        path = () if events == "none" else tuple(Event(name) for name in _names(events))
        for state in _names(states):
            documented[state] = path
    assert documented == wind_down_paths(build_machine(MachineModel()))


#: Pages whose every ``python`` block is a runnable snippet (add a page once it is).
RUNNABLE_PAGES = ("callbacks.md", "metrics.md", "quickstart.md")


@pytest.mark.parametrize("name", RUNNABLE_PAGES)
def test_python_snippets_run(
    name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # snippets that log write under run/
    page = DOCS / name
    assert _blocks(page, "python"), f"docs/{name} has no python snippets"
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    for line, source in _blocks(page, "python"):
        # Blank lines first, so a traceback's line numbers are the page's own.
        code = compile("\n" * (line - 1) + source, str(page), "exec")
        exec(code, namespace)
    capsys.readouterr()


@pytest.mark.parametrize("name", statemachine_loop.__all__)
def test_public_name_has_a_docstring(name: str) -> None:
    # ``__doc__`` itself, not ``inspect.getdoc``: that would lend a class its base's docstring.
    doc = getattr(statemachine_loop, name).__doc__
    assert doc is not None and doc.strip(), f"statemachine_loop.{name} has no docstring"


def test_the_lifecycle_page_stands_on_its_own() -> None:
    """It is the project's statement of the contract: it cites nothing outside the repository."""
    text = LIFECYCLE.read_text()
    assert "shared/" not in text and "../" not in text
    for title in ("Invariants", "Precise rules", "The driver", "What a hook may read"):
        assert f"\n## {title}\n" in text
