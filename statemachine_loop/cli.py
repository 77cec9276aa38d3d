"""The ``smloop`` command: inspect run logs and draw the lifecycle.

::

    smloop logs show RUN [--event E] [--epoch N] [--level L]   a table of the records
    smloop logs summary RUN                                     epochs, metrics, decisions, outcome
    smloop logs validate RUN                                    replay through the lifecycle machine
    smloop diagram [--format mermaid|dot]                       the machine's diagram

``RUN`` is a run directory holding ``events.jsonl`` or the ``.jsonl`` file itself.
Exit status: 0 on success, 1 when ``validate`` finds a violation, 2 for a usage
error or a log that cannot be read (missing, empty, truncated, not JSON); errors are
one line on standard error, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from statemachine_loop.callbacks._phases import format_value
from statemachine_loop.events import BATCH_EVENTS, Event
from statemachine_loop.logs import (
    LogReadError,
    Record,
    RunSummary,
    number,
    read_log,
    summarize,
    validate,
)

__all__ = ["main"]

_LEVELS = ("debug", "info", "warning", "error")
_BATCH_EVENTS = frozenset(event.value for event in BATCH_EVENTS)


class _UsageError(Exception):
    """A bad argument found after parsing; reported like argparse's own errors."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smloop", description="Inspect statemachine_loop run logs and its lifecycle."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    logs = commands.add_parser("logs", help="read a run's JSONL log")
    actions = logs.add_subparsers(dest="action", required=True, metavar="ACTION")
    run_help = "a run directory holding events.jsonl, or the .jsonl file"
    show = actions.add_parser("show", help="the records as a table")
    show.add_argument("run", metavar="RUN", help=run_help)
    show.add_argument("--event", help="only records about this lifecycle event")
    show.add_argument("--epoch", type=int, help="only records of this 0-based epoch index")
    show.add_argument("--level", choices=_LEVELS, help="only records at this level or above")
    summary = actions.add_parser("summary", help="epochs, metrics, decisions and outcome")
    summary.add_argument("run", metavar="RUN", help=run_help)
    check = actions.add_parser("validate", help="replay the transitions through the machine")
    check.add_argument("run", metavar="RUN", help=run_help)
    diagram = commands.add_parser("diagram", help="print the lifecycle diagram")
    diagram.add_argument("--format", choices=("mermaid", "dot"), default="mermaid")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``smloop`` with ``argv`` (default: the process arguments); return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    console = Console(highlight=False)
    try:
        if args.command == "diagram":
            return _diagram(args.format)
        records = read_log(args.run)
        if args.action == "show":
            return _show(console, records, args.event, args.epoch, args.level)
        if args.action == "summary":
            return _summary(console, records)
        return _validate(console, records)
    except _UsageError as error:
        parser.error(str(error))
    except LogReadError as error:
        print(f"smloop: error: {error}", file=sys.stderr)
    return 2


def _diagram(fmt: str) -> int:
    from statemachine_loop import machine

    try:
        drawn = machine.lifecycle_diagram("dot" if fmt == "dot" else "mermaid")
    except ImportError as error:  # MissingDependencyError: dot without graphviz
        print(f"smloop: error: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(drawn if drawn.endswith("\n") else drawn + "\n")
    return 0


# -- show ------------------------------------------------------------------------------


def _details(data: dict[str, Any]) -> str:
    kind = data["kind"]
    if kind == "transition":
        text = f"{data.get('from_state')} -> {data.get('to_state')}"
        for decision in data.get("decisions") or []:
            target = f" to {decision['target']}" if decision.get("target") else ""
            status = (
                "" if decision.get("applied") else f", ignored: {decision.get('ignored_because')}"
            )
            text += (
                f"; {decision['kind']}{target} of {decision['event']} by {decision['callback']}"
                f"{status}" + (f": {decision['reason']}" if decision.get("reason") else "")
            )
        return text
    if kind == "metrics":
        values = data.get("metrics") or {}
        return "  ".join(f"{name} {format_value(number(v))}" for name, v in values.items())
    if kind == "stop":
        by = f" (by {data['callback']})" if data.get("callback") else ""
        return f"{data.get('reason')}{by}"
    if kind == "failure":
        return f"{data.get('exception_type')}: {data.get('message')}"
    common = {"timestamp", "level", "run_id", "kind", "event", "elapsed_s"}
    common |= {"epoch_index", "batch_index", "phase"}
    return "  ".join(f"{key}={value}" for key, value in data.items() if key not in common)


def _show(
    console: Console, records: list[Record], event: str | None, epoch: int | None, level: str | None
) -> int:
    if event is not None and event not in {e.value for e in Event}:
        raise _UsageError(
            f"argument --event: {event!r} is not a lifecycle event; choose from "
            f"{', '.join(e.value for e in Event)}."
        )
    floor = _LEVELS.index(level) if level is not None else 0
    table = Table(
        title=f"{len(records)} records",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    for column in ("line", "time", "level", "kind", "event", "epoch", "batch", "phase"):
        table.add_column(column, no_wrap=True, justify="right" if column == "line" else "left")
    table.add_column("details", min_width=24, overflow="fold")
    shown = 0
    for record in records:
        data = record.data
        if event is not None and record.event != event:
            continue
        if epoch is not None and data.get("epoch_index") != epoch:
            continue
        record_level = str(data["level"])
        if record_level in _LEVELS and _LEVELS.index(record_level) < floor:
            continue
        shown += 1
        cells = (
            str(record.line),
            f"{float(data.get('elapsed_s') or 0.0):.3f}s",
            record_level,
            record.kind,
            record.event,
            _blank(data.get("epoch_index")),
            _blank(data.get("batch_index")),
            _blank(data.get("phase")),
            _details(data),
        )
        table.add_row(*(Text(cell) for cell in cells))
    if shown != len(records):
        table.title = f"{shown} of {len(records)} records"
    console.print(table)
    return 0


def _blank(value: object) -> str:
    return "" if value is None else str(value)


# -- summary ---------------------------------------------------------------------------


def _summary(console: Console, records: list[Record]) -> int:
    for index, run in enumerate(summarize(records)):
        if index:
            console.print()
        _print_run(console, run)
    return 0


def _outcome(run: RunSummary) -> str:
    if run.failure is not None:
        return f"failed with {run.failure}"
    if run.stop_reason is not None:
        return f"stopped: {run.stop_reason}"
    return "completed" if run.finished else "unfinished (no fit_end record)"


def _print_run(console: Console, run: RunSummary) -> None:
    epochs_run = len(run.epochs)
    requested = f"/{run.epoch_count}" if run.epoch_count is not None else ""
    took = f" in {run.duration_s:.2f}s" if run.duration_s is not None else ""
    console.print(Text(f"Run {run.run_id}  started {run.started}  engine {run.engine}"))
    console.print(Text(f"Epochs: {epochs_run}{requested}  outcome: {_outcome(run)}{took}"))
    phases = [p for p in ("training", "validation") if any(p in e for e in run.epochs.values())]
    names = run.metric_names or sorted(
        {name for e in run.epochs.values() for p in phases for name in e.get(p, {})}
    )
    table = Table(title="Metrics per epoch", title_justify="left")
    table.add_column("epoch", justify="right")
    table.add_column("duration", justify="right")
    for phase in phases:
        for name in names:
            table.add_column(f"{phase} {name}", justify="right")
    for epoch in sorted(run.epochs):
        entry = run.epochs[epoch]
        duration = entry.get("duration_s")
        row = [str(epoch), "" if duration is None else f"{duration:.2f}s"]
        for phase in phases:
            values = entry.get(phase, {})
            row.extend(format_value(values[name]) if name in values else "" for name in names)
        table.add_row(*(Text(cell) for cell in row))
    console.print(table)
    spent = [
        f"{phase} {sum(times):.2f}s over {len(times)} phase(s), mean {sum(times) / len(times):.3f}s"
        for phase, times in run.phase_durations.items()
        if times
    ]
    if spent:
        console.print(Text("Time: " + "; ".join(spent)))
    if run.decisions:
        decisions = Table(title=f"Decisions ({len(run.decisions)})", title_justify="left")
        for column in (
            "epoch",
            "batch",
            "event",
            "callback",
            "kind",
            "target",
            "applied",
            "reason",
        ):
            decisions.add_column(column)
        for d in run.decisions:
            applied = "yes" if d.get("applied") else f"no ({d.get('ignored_because')})"
            # The loop records its batch index with every decision; it means
            # something only for the per-batch events.
            batch = d.get("batch_index") if d.get("event") in _BATCH_EVENTS else None
            cells = [d.get("epoch_index"), batch, d.get("event"), d.get("callback")]
            cells += [d.get("kind"), d.get("target"), applied, d.get("reason")]
            decisions.add_row(*(Text(_blank(cell)) for cell in cells))
        console.print(decisions)
    else:
        console.print(Text("Decisions: none"))
    console.print(Text(f"Stop reason: {run.stop_reason or 'none'}"))
    if run.failure is not None:
        console.print(Text(f"Failure: {run.failure}"))


# -- validate --------------------------------------------------------------------------


def _validate(console: Console, records: list[Record]) -> int:
    try:
        replayed, violation = validate(records)
    except LogReadError as error:
        print(f"smloop: error: {error}", file=sys.stderr)
        return 1
    if violation is not None:
        print(f"smloop: invalid: {violation.message}", file=sys.stderr)
        return 1
    runs = len({r.data["run_id"] for r in records if r.kind == "transition"})
    console.print(
        Text(f"valid: {replayed} transitions in {runs} run(s) replay through the lifecycle machine")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
