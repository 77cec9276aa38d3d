"""Reading, validating and summarising the JSONL logs written by ``StructuredLogger``.

The functions here are what ``smloop logs`` runs, kept free of any printing so they
can be tested and reused: :func:`read_log` turns a run directory or ``.jsonl`` file
into records (or one clear :class:`LogReadError`), :func:`validate` replays the
recorded transitions through the lifecycle machine, and :func:`summarize` condenses
each fit into a :class:`RunSummary`.

Legality comes from the machine itself —
``transition_table(build_machine(MachineModel()))`` — never from a hand-kept table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import attrs

from statemachine_loop.errors import LoopError
from statemachine_loop.events import Event
from statemachine_loop.machine import (
    FINAL_STATE,
    INITIAL_STATE,
    MachineModel,
    build_machine,
    transition_table,
)
from statemachine_loop.trace import TraceViolation, assert_valid_trace, replay

__all__ = [
    "LOG_FILE_NAME",
    "LogReadError",
    "Record",
    "RunSummary",
    "Violation",
    "number",
    "read_log",
    "resolve_log_path",
    "summarize",
    "validate",
]

#: The file ``StructuredLogger`` writes inside a run directory by default.
LOG_FILE_NAME = "events.jsonl"

_REQUIRED = ("kind", "event", "run_id", "level")
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class LogReadError(LoopError, ValueError):
    """A log could not be read: missing, empty, truncated, not JSON, or not our format.

    The message is one sentence naming the file (and line) and what is wrong.
    """


@attrs.frozen
class Record:
    """One line of a log: its 1-based line number and the parsed JSON object."""

    line: int
    data: dict[str, Any]

    @property
    def kind(self) -> str:
        """``transition``, ``metrics``, ``stop``, ``failure``, or a kind added later."""
        return str(self.data["kind"])

    @property
    def event(self) -> str:
        """The lifecycle event the record is about."""
        return str(self.data["event"])


@attrs.frozen
class Violation:
    """Where a replay left the lifecycle: the line, the event, and what was legal there."""

    line: int
    event: str
    state: str
    legal: tuple[str, ...]
    message: str


def resolve_log_path(run: str | Path) -> Path:
    """The JSONL file of ``run``: the path itself, or ``run/events.jsonl`` for a directory."""
    path = Path(run)
    if path.is_dir():
        candidate = path / LOG_FILE_NAME
        if not candidate.is_file():
            raise LogReadError(f"{path} is a directory without a {LOG_FILE_NAME} log in it.")
        return candidate
    if not path.exists():
        raise LogReadError(f"{path} does not exist; give a run directory or a .jsonl log.")
    return path


def read_log(run: str | Path) -> list[Record]:
    """Parse every line of a run's log, or raise :class:`LogReadError` naming the problem."""
    path = resolve_log_path(run)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise LogReadError(f"{path} cannot be read: {error}.") from None
    if not text.strip():
        raise LogReadError(f"{path} is empty; no fit has logged to it (or it was vetoed).")
    lines = text.split("\n")
    records: list[Record] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):  # the last line, with no newline after it
                raise LogReadError(
                    f"{path} is truncated: line {number} is a partial record "
                    "(the writer stopped mid-line)."
                ) from None
            raise LogReadError(f"{path} line {number} is not JSON: {error.msg}.") from None
        if not isinstance(data, dict) or any(key not in data for key in _REQUIRED):
            raise LogReadError(
                f"{path} line {number} is not a statemachine_loop record "
                f"(it needs the fields {', '.join(_REQUIRED)})."
            )
        records.append(Record(number, data))
    return records


def number(value: Any) -> float:
    """A metric value from the log as a float (``"nan"``, ``"inf"`` back to floats)."""
    if isinstance(value, str):
        return _NONFINITE.get(value, math.nan)
    return math.nan if value is None else float(value)


def validate(records: list[Record]) -> tuple[int, Violation | None]:
    """Replay every ``transition`` record through the lifecycle machine.

    Each fit (``run_id``) is checked with the same checker the conformance kit uses,
    :func:`~statemachine_loop.trace.assert_valid_trace`: its events must
    be a word of the machine from ``idle`` to ``done``, with balanced scopes. Then
    every record's ``from_state`` and ``to_state`` must agree with the replay. Per-batch
    events that an INFO log leaves out need no special case: every batch returns the
    machine to its phase state, so the remaining word is still legal. Returns the
    number of transitions replayed and the first violation, if any.
    """
    runs: dict[object, list[Record]] = {}
    for record in records:
        if record.kind == "transition":
            runs.setdefault(record.data["run_id"], []).append(record)
    if not runs:
        raise LogReadError(
            "the log holds no transition records (was it written at level warning or above?)."
        )
    replayed = 0
    for run_id, run in runs.items():
        names = [record.event for record in run]
        try:
            events = [Event(name) for name in names]
        except ValueError:
            bad = next(i for i, name in enumerate(names) if name not in _EVENT_VALUES)
            state = replay([Event(name) for name in names[:bad]])[-1] if bad else INITIAL_STATE
            legal = _legal_values(state)
            return replayed + bad, Violation(
                run[bad].line, names[bad], state, legal,
                f"line {run[bad].line}: event {names[bad]!r} is not a lifecycle event; the "
                f"events legal in state {state!r} are {list(legal)}.",
            )  # fmt: skip
        try:
            assert_valid_trace(events)
        except TraceViolation as violation:
            return replayed + violation.index, _violation(run, run_id, violation)
        states = replay(events)
        for record, before, after in zip(run, [INITIAL_STATE, *states[:-1]], states, strict=True):
            recorded = (record.data.get("from_state"), record.data.get("to_state"))
            if recorded != (before, after):
                return replayed, Violation(
                    record.line, record.event, before, _legal_values(before),
                    f"line {record.line}: event {record.event!r} is recorded as "
                    f"{recorded[0]!r} -> {recorded[1]!r}, but the machine takes it "
                    f"{before!r} -> {after!r}.",
                )  # fmt: skip
            replayed += 1
    return replayed, None


_EVENT_VALUES = frozenset(event.value for event in Event)


def _legal_values(state: str) -> tuple[str, ...]:
    table = transition_table(build_machine(MachineModel()))
    return tuple(sorted(event.value for source, event in table if source == state))


def _violation(run: list[Record], run_id: object, violation: TraceViolation) -> Violation:
    legal = tuple(sorted(event.value for event in violation.legal))
    if violation.event is None:  # the run ended before done
        line = run[-1].line
        return Violation(
            line, FINAL_STATE, violation.state, legal,
            f"line {line}: run {run_id} ends in state {violation.state!r} without reaching "
            f"{FINAL_STATE!r}; the events legal there are {list(legal)}.",
        )  # fmt: skip
    line, name = run[violation.index].line, violation.event.value
    if violation.rule == 1:
        message = (
            f"line {line}: event {name!r} cannot be taken from state {violation.state!r}; "
            f"the events legal there are {list(legal)}."
        )
    else:
        message = f"line {line}: {violation}"
    return Violation(line, name, violation.state, legal, message)


@attrs.define
class RunSummary:
    """What ``smloop logs summary`` reports about one fit.

    ``epochs`` maps each epoch index to ``{"training": {...}, "validation": {...},
    "duration_s": float}``, filled in from the metrics and transition records.
    """

    run_id: str
    started: str
    engine: str | None = None
    epoch_count: int | None = None
    metric_names: list[str] = attrs.field(factory=list)
    epochs: dict[int, dict[str, Any]] = attrs.field(factory=dict)
    phase_durations: dict[str, list[float]] = attrs.field(factory=dict)
    decisions: list[dict[str, Any]] = attrs.field(factory=list)
    stop_reason: str | None = None
    failure: str | None = None
    duration_s: float | None = None
    finished: bool = False
    records: int = 0


def summarize(records: list[Record]) -> list[RunSummary]:
    """One :class:`RunSummary` per fit in the log, in the order they were written."""
    runs: dict[str, RunSummary] = {}
    opened: dict[tuple[str, str], float] = {}
    for record in records:
        data = record.data
        run = runs.get(data["run_id"])
        if run is None:
            run = runs[data["run_id"]] = RunSummary(data["run_id"], str(data.get("timestamp", "")))
        run.records += 1
        elapsed = float(data.get("elapsed_s") or 0.0)
        epoch = data.get("epoch_index")
        kind, event = record.kind, record.event
        if kind == "transition":
            run.decisions.extend(data.get("decisions") or [])
            if event == "fit_start":
                run.engine = data.get("engine")
                run.epoch_count = data.get("epoch_count")
                run.metric_names = list(data.get("metric_names") or [])
            elif event in ("epoch_start", "training_start", "validation_start"):
                opened[(run.run_id, event.split("_")[0])] = elapsed
            elif event in ("epoch_end", "training_end", "validation_end"):
                scope = event.split("_")[0]
                began = opened.pop((run.run_id, scope), None)
                if began is not None and isinstance(epoch, int):
                    if scope == "epoch":
                        run.epochs.setdefault(epoch, {})["duration_s"] = elapsed - began
                    else:
                        run.phase_durations.setdefault(scope, []).append(elapsed - began)
            elif event == "fit_end":
                run.finished = True
                run.duration_s = elapsed
        elif kind == "metrics" and isinstance(epoch, int):
            values = {name: number(value) for name, value in (data.get("metrics") or {}).items()}
            run.epochs.setdefault(epoch, {})[str(data.get("phase"))] = values
        elif kind == "stop":
            run.stop_reason = data.get("reason")
        elif kind == "failure":
            run.failure = f"{data.get('exception_type')}: {data.get('message')}"
    return list(runs.values())
